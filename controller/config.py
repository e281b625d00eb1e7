"""Controller settings: flags over SLLM_CONTROLLER_* environment over documented defaults (README)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "0.0.0.0"                      # noqa: S104 (a cluster service)
    port: int = 8090
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "sllm:"
    token: str = ""                            # bearer token for every endpoint; empty = no auth (local mode)
    model_store: str = ""                      # where model sizes are read when no loader has seen a model yet
    snapshot_max_age_s: float = 1.0            # how stale the cluster view may get between background reads
    booking_ttl_s: float = 120.0               # how long a booked slot waits for its instance to register
    max_body_bytes: int = 4 << 20              # request body limit (AdmissionReview pods can be large)
    workers: int = 2                           # gunicorn worker processes
    tls_cert: str = ""                         # serve HTTPS with this certificate (the webhook requires TLS)
    tls_key: str = ""
    client_ca: str = ""                        # require client certificates signed by this CA (mTLS)

    def __post_init__(self) -> None:
        if self.snapshot_max_age_s <= 0 or self.booking_ttl_s <= 0 or self.max_body_bytes <= 0 or self.workers < 1:
            raise ValueError("snapshot_max_age_s, booking_ttl_s, max_body_bytes and workers must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca and not self.tls_cert:
            raise ValueError("client_ca (mTLS) needs tls_cert and tls_key")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ControllerConfig:
        return cls(**json.loads(text))


ENV = {f.name: f"SLLM_CONTROLLER_{f.name.upper()}" for f in fields(ControllerConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(ControllerConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"env {ENV[f.name]}; default {f.default!r}")


def resolve(args: argparse.Namespace) -> ControllerConfig:
    """Flags, then SLLM_CONTROLLER_* variables (and REDIS_URL for redis_url), then defaults."""
    values = {}
    for f in fields(ControllerConfig):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = os.environ.get(ENV[f.name])
        if raw is None and f.name == "redis_url":
            raw = os.environ.get("REDIS_URL")
        if raw is None:
            continue
        try:
            values[f.name] = type(f.default)(raw)
        except ValueError:
            raise ValueError(f"{f.name} (--{f.name.replace('_', '-')} / {ENV[f.name]}): {raw!r} is not a "
                             f"{type(f.default).__name__}") from None
    return ControllerConfig(**values)
