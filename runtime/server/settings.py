"""Runtime settings, read from the environment once; every knob has a documented default (README)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SystemExit(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    model: str                # SLLM_MODEL: checkpoint directory, or a name under SLLM_MODEL_STORE
    model_store: str          # SLLM_MODEL_STORE
    served_name: str | None   # SLLM_SERVED_MODEL_NAME: the id in /v1/models (default: the model's dir name)
    loader_socket: str | None  # SLLM_LOADER_SOCKET: the node loader's Unix socket; unset = no loader
    loader_tier: str          # SLLM_LOADER_TIER: the tier to ask the loader for ("dram", or "gpu")
    max_body_bytes: int       # SLLM_MAX_BODY_BYTES
    max_prompt_tokens: int    # SLLM_MAX_PROMPT_TOKENS
    max_tokens: int           # SLLM_MAX_TOKENS: upper bound for a request's max_tokens
    max_batch: int            # SLLM_MAX_BATCH: requests generating at once
    max_seq: int              # SLLM_MAX_SEQ: context per request (prompt + output)
    torch_threads: int        # SLLM_TORCH_THREADS
    redis_url: str | None     # SLLM_REDIS_URL: publish this instance for the controller; unset = not published
    key_prefix: str           # SLLM_KEY_PREFIX: Redis key prefix (redis_schema)
    instance_id: str          # SLLM_INSTANCE_ID: default "<hostname>-<pid>" (the pod name in Kubernetes)
    node_id: str              # SLLM_NODE_ID: the node this instance runs on (downward API spec.nodeName)
    advertise_url: str        # SLLM_ADVERTISE_URL: base URL other instances and the controller reach us at
    function_name: str        # SLLM_FUNCTION_NAME: the FaaS function this instance serves
    booking_id: str | None    # SLLM_BOOKING_ID: the controller's slot booking this instance takes over
    heartbeat_s: int          # SLLM_INSTANCE_HEARTBEAT_S: the instance record expires after 3 missed beats
    http_threads: int         # SLLM_HTTP_THREADS: gunicorn threads
    http_reserved: int        # SLLM_HTTP_RESERVED_THREADS: threads kept for /_/ and /metrics (generations: 503)
    api_key: str | None       # SLLM_API_KEY: /v1/* needs `Authorization: Bearer <key>`; unset = open

    def __post_init__(self) -> None:
        if self.http_reserved >= self.http_threads:
            raise SystemExit(f"SLLM_HTTP_RESERVED_THREADS={self.http_reserved} must be below "
                             f"SLLM_HTTP_THREADS={self.http_threads}: generations need threads too")

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            model=os.environ.get("SLLM_MODEL", ""),
            model_store=os.environ.get("SLLM_MODEL_STORE", "/var/lib/sllm/models"),
            served_name=os.environ.get("SLLM_SERVED_MODEL_NAME") or None,
            loader_socket=os.environ.get("SLLM_LOADER_SOCKET") or None,
            loader_tier=os.environ.get("SLLM_LOADER_TIER", "dram"),
            max_body_bytes=_int("SLLM_MAX_BODY_BYTES", 1 << 20),
            max_prompt_tokens=_int("SLLM_MAX_PROMPT_TOKENS", 4096),
            max_tokens=_int("SLLM_MAX_TOKENS", 1024),
            max_batch=_int("SLLM_MAX_BATCH", 8),
            max_seq=_int("SLLM_MAX_SEQ", 2048, minimum=16),
            torch_threads=_int("SLLM_TORCH_THREADS", os.cpu_count() or 1),
            redis_url=os.environ.get("SLLM_REDIS_URL") or None,
            key_prefix=os.environ.get("SLLM_KEY_PREFIX", "sllm:"),
            instance_id=os.environ.get("SLLM_INSTANCE_ID") or _default_instance_id(),
            node_id=os.environ.get("SLLM_NODE_ID") or _dns_label(socket.gethostname()),
            advertise_url=os.environ.get("SLLM_ADVERTISE_URL", ""),
            function_name=os.environ.get("SLLM_FUNCTION_NAME", ""),
            booking_id=os.environ.get("SLLM_BOOKING_ID") or None,
            heartbeat_s=_int("SLLM_INSTANCE_HEARTBEAT_S", 2),
            http_threads=_int("SLLM_HTTP_THREADS", 32, minimum=2),
            http_reserved=_int("SLLM_HTTP_RESERVED_THREADS", 4),
            api_key=os.environ.get("SLLM_API_KEY") or None,
        )


def _dns_label(text: str) -> str:
    """Hostnames as Redis-schema ids: lowercase, anything outside [a-z0-9.-] becomes '-'."""
    return re.sub(r"[^a-z0-9.-]", "-", text.lower()).strip("-.") or "localhost"


def _default_instance_id() -> str:
    return f"{_dns_label(socket.gethostname())}-{os.environ.get('SLLM_SPAWN_PID') or os.getpid()}"
