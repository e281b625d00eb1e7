"""Runtime settings: each one a `sllm-faas serve` flag and an environment variable, flag > env > default.

`Settings` is the one declaration (sllm_faas/common/settings.py). `serve` builds its flags from it, validates them
with `Settings.resolve` and exports the ones given into the environment, which the gunicorn worker (and a pooled
runtime) read with `Settings.from_env`. A refused value names the flag, where the value came from (the flag or the
env variable) and the value. README.md documents every setting (tests/test_settings.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sllm_faas.common import settings as common
from sllm_faas.common.names import default_node_id
from sllm_faas.common.settings import Conflict, SettingsError, setting
from sllm_faas.common.tiers import HELD

__all__ = ["Settings", "SettingsError"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _default_instance_id() -> str:
    return f"{default_node_id()}-{os.environ.get('SLLM_SPAWN_PID') or os.getpid()}"


def _usable_template(path: str) -> str:
    from sllm_faas.runtime.model.tokenizer import check_template

    try:
        check_template(open(path).read())   # noqa: SIM115 - read at once
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not a usable chat template: {exc}") from None
    return path


@dataclass(frozen=True)
class Settings:
    """The runtime's settings (README.md: `serve` flags and environment variables)."""

    model: str = setting("SLLM_MODEL", "a checkpoint directory, or a model name under --model-store (of-watchdog runs "
                         "fprocess without a shell, so templates pass it by env)", "", flag="MODEL_DIR_OR_NAME",
                         shown_default="none")
    model_store: str = setting("SLLM_MODEL_STORE", "where model names are looked up without a node loader",
                               "/var/lib/sllm/models")
    served_name: str | None = setting("SLLM_SERVED_MODEL_NAME", "the id in /v1/models and the `model` requests must "
                                      "name", None, flag="--served-model-name", optional=True,
                                      shown_default="the model directory's name")
    chat_template: str | None = setting("SLLM_CHAT_TEMPLATE", "a Jinja chat template file used instead of the "
                                        "checkpoint's", None, optional=True, check=_usable_template,
                                        shown_default="the checkpoint's template")
    loader_socket: str | None = setting("SLLM_LOADER_SOCKET", "the node loader's Unix socket; set, the model is a name "
                                        "the loader stages and leases", None, optional=True,
                                        shown_default="unset: load from the directory")
    loader_tier: str = setting("SLLM_LOADER_TIER", "the tier to ask the node loader for", "dram",
                               choices=HELD)
    max_body_bytes: int = setting("SLLM_MAX_BODY_BYTES", "request body limit (413 above)", 1 << 20, kind="size",
                                  minimum=1)
    max_prompt_tokens: int = setting("SLLM_MAX_PROMPT_TOKENS", "prompt limit (400 above)", 4096, kind="int", minimum=1)
    max_tokens: int = setting("SLLM_MAX_TOKENS", "the largest max_tokens a request may ask for, and the chat default",
                              1024, kind="int", minimum=1)
    max_batch: int = setting("SLLM_MAX_BATCH", "requests generating at once (KV cache slots; more wait in a queue)", 8,
                             flag="--max-num-seqs", kind="int", minimum=1)
    max_seq: int = setting("SLLM_MAX_SEQ", "context per request, prompt + output (capped by the model's)", 2048,
                           flag="--max-model-len", kind="int", minimum=16)
    torch_threads: int = setting("SLLM_TORCH_THREADS", "torch intra-op threads", lambda: os.cpu_count() or 1,
                                 kind="int", minimum=1, shown_default="the CPU count")
    redis_url: str | None = setting("SLLM_REDIS_URL", "publish this instance (sllm:instance:<id>, a slot of its node) "
                                    "for the controller", None, optional=True, shown_default="unset: not published")
    key_prefix: str = setting("SLLM_KEY_PREFIX", "Redis key prefix", common.DEFAULT_KEY_PREFIX)
    instance_id: str = setting("SLLM_INSTANCE_ID", "this instance's id (in Kubernetes the pod name)",
                               _default_instance_id, shown_default="<hostname>-<pid>")
    node_id: str = setting("SLLM_NODE_ID", "the node it runs on (in Kubernetes spec.nodeName via the downward API)",
                           default_node_id, shown_default="the host name as an id (My_Host: my-host)")
    advertise_url: str = setting("SLLM_ADVERTISE_URL", "base URL the controller and other instances reach it at", "")
    function_name: str = setting("SLLM_FUNCTION_NAME", "the FaaS function it serves", "")
    booking_id: str | None = setting("SLLM_BOOKING_ID", "the controller's slot booking this instance takes over (the "
                                     "webhook and the gateway set it)", None, optional=True)
    heartbeat_s: int = setting("SLLM_INSTANCE_HEARTBEAT_S", "heartbeat of the instance record in seconds (it expires "
                               "after 3 missed beats)", 2, kind="int", minimum=1)
    host: str = setting("SLLM_HOST", "address to bind", "0.0.0.0")  # noqa: S104 - a container port
    port: int = setting("PORT", "port to listen on", 8080, kind="int", minimum=1, maximum=65535)
    http_threads: int = setting("SLLM_HTTP_THREADS", "gunicorn threads", 32, kind="int", minimum=2)
    http_reserved: int = setting("SLLM_HTTP_RESERVED_THREADS", "threads kept for /_/... and /metrics (generations "
                                 "beyond the rest get 503)", 4, flag="--http-reserved-threads", kind="int", minimum=1)
    worker_timeout: int = setting("SLLM_WORKER_TIMEOUT", "gunicorn worker timeout in seconds (0: none)", 600,
                                  kind="int", minimum=0)
    log_level: str = setting("SLLM_LOG_LEVEL", "log level", "info", choices=LOG_LEVELS)
    access_log: bool = setting("SLLM_ACCESS_LOG", "log each request (env: 1/0, true/false)", False, kind="bool")
    api_key: str | None = setting("SLLM_API_KEY", "require `Authorization: Bearer KEY` on /v1/*", None, optional=True,
                                  shown_default="unset: open", secret=True)

    def __post_init__(self) -> None:
        if self.http_reserved >= self.http_threads:
            raise Conflict("{http_reserved} must be below {http_threads}: generations need threads too", self)

    @classmethod
    def resolve(cls, flags: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Each setting from `flags` (field name -> the flag's text), else its env variable, else its default."""
        return common.resolve(cls, flags, env)

    @classmethod
    def from_env(cls) -> Settings:
        return cls.resolve()
