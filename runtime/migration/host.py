"""What live migration needs of the runtime it runs in, and nothing more.

The runtime (runtime/server/app.py) implements `Host`; migration never sees the rest of it: not its
settings, not how it loads or registers, and it writes none of its state. So the dependency runs one way,
server -> migration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sllm_faas.common.errors import ApiError

if TYPE_CHECKING:
    from sllm_faas.common.metrics import Metrics
    from sllm_faas.runtime.model.engine import Engine


class Host(Protocol):
    @property
    def engine(self) -> Engine | None:
        """The loaded model's engine; None while there is none (starting, failed, or released)."""

    @property
    def model_name(self) -> str | None:
        """The served model's name (the one clients ask for); None while no model is loaded."""

    @property
    def metrics(self) -> Metrics:
        """The registry the instance's /metrics shows, where migration's own metrics go."""

    def release_model(self, reason: str) -> bool:
        """Give the model back (engine, weights, node-loader lease and slot) once no request is left;
        False, and nothing released, while one is."""


def loaded_engine(host: Host) -> Engine:
    """The engine a migration route works on; 503 while the instance has none (GET /_/ready says why)."""
    engine = host.engine
    if engine is None:
        raise ApiError(503, "this instance has no model loaded (GET /_/ready says why)")
    return engine
