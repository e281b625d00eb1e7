"""Controller settings: flags over SLLM_CONTROLLER_* environment over documented defaults (README)."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "0.0.0.0"                      # noqa: S104 (a cluster service)
    port: int = 8090
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "sllm:"
    token: str = ""                            # bearer token for every endpoint but /healthz and /metrics
    loader_token: str = ""                     # bearer token of the node loaders' TCP API (their SLLM_LOADER_TOKEN)
    insecure_no_auth: bool = False             # run with neither token nor client_ca: anyone can book slots
    model_store: str = ""                      # where model sizes are read when no loader has seen a model yet
    snapshot_max_age_s: float = 1.0            # how stale the cluster view may get between background reads
    booking_ttl_s: float = 120.0               # how long a booked slot waits for its instance to register
    max_body_bytes: int = 4 << 20              # request body limit (AdmissionReview pods can be large)
    workers: int = 2                           # gunicorn worker processes
    tls_cert: str = ""                         # serve HTTPS with this certificate (the webhook requires TLS)
    tls_key: str = ""
    client_ca: str = ""                        # require client certificates signed by this CA (mTLS)
    # What the webhook injects into function pods (deploy/README.md, "What the webhook adds to a pod"):
    inject_socket_dir: str = "/run/sllm"       # host dir of the node loader's socket (loader.sock)
    inject_dram_dir: str = "/dev/shm/sllm"     # host dir of the loaders' DRAM tier, mounted read-only
    inject_redis_secret: str = ""              # SECRET/KEY in the pod's namespace holding SLLM_REDIS_URL;
                                               # empty = the controller's own redis_url as a plain value

    def __post_init__(self) -> None:
        if self.snapshot_max_age_s <= 0 or self.booking_ttl_s <= 0 or self.max_body_bytes <= 0 or self.workers < 1:
            raise ValueError("snapshot_max_age_s, booking_ttl_s, max_body_bytes and workers must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca and not self.tls_cert:
            raise ValueError("client_ca (mTLS) needs tls_cert and tls_key")
        if not (self.token or self.client_ca or self.insecure_no_auth):
            raise ValueError("no credentials: set token (--token / SLLM_CONTROLLER_TOKEN) or client_ca (mTLS), or "
                             "run unauthenticated on purpose with --insecure-no-auth "
                             "(SLLM_CONTROLLER_INSECURE_NO_AUTH=true)")
        for name in ("inject_socket_dir", "inject_dram_dir"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not an absolute path")
        if self.inject_redis_secret and not re.fullmatch(r"[a-z0-9.-]+/[-._a-zA-Z0-9]+", self.inject_redis_secret):
            raise ValueError(f"inject_redis_secret: {self.inject_redis_secret!r} is not SECRET/KEY "
                             "(a Secret name and one of its keys)")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ControllerConfig:
        return cls(**json.loads(text))


ENV = {f.name: f"SLLM_CONTROLLER_{f.name.upper()}" for f in fields(ControllerConfig)}


TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(ControllerConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # a switch: present = true
            parser.add_argument(flag, dest=f.name, action="store_const", const="true", default=None,
                                help=f"env {ENV[f.name]}=true; default off")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f"env {ENV[f.name]}; default {f.default!r}")


def _convert(f, raw: str):
    """bool("false") is True, so switches are parsed by word; everything else by its default's type."""
    if isinstance(f.default, bool):
        if raw.strip().lower() not in TRUE | FALSE:
            raise ValueError
        return raw.strip().lower() in TRUE
    return type(f.default)(raw)


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
            values[f.name] = _convert(f, raw)
        except ValueError:
            kind = "true/false (1/0, yes/no, on/off)" if isinstance(f.default, bool) else type(f.default).__name__
            raise ValueError(f"{f.name} (--{f.name.replace('_', '-')} / {ENV[f.name]}): {raw!r} is not a "
                             f"{kind}") from None
    return ControllerConfig(**values)
