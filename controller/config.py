"""Controller settings: flags over SLLM_CONTROLLER_* environment over the defaults, all from the one declaration
below (sllm_faas/common/settings.py); deploy/README.md lists them."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from sllm_faas.common import settings as common
from sllm_faas.common.settings import Conflict

_controller = common.prefixed("SLLM_CONTROLLER_")


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError("not an absolute path")
    return path


def _secret_key(text: str) -> str:
    if text and not re.fullmatch(r"[a-z0-9.-]+/[-._a-zA-Z0-9]+", text):
        raise ValueError("not SECRET/KEY (a Secret name and one of its keys)")
    return text


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    host: str = _controller("host", "listen address (IPv4 only; `[::]` for IPv6 or dual stack)",
                            "0.0.0.0")  # noqa: S104 (a cluster service)
    port: int = _controller("port", "listen port (the Service's targetPort)", 8090, kind="int", minimum=1,
                            maximum=65535)
    redis_url: str = _controller("redis_url", "the Redis the loaders publish to; `REDIS_URL` is read when neither is "
                                 "set", common.DEFAULT_REDIS_URL, env_fallback=("REDIS_URL",))
    key_prefix: str = _controller("key_prefix", "prefix of every Redis key; equal to the loaders'",
                                  common.DEFAULT_KEY_PREFIX)
    token: str = _controller("token", "bearer token for every route but `/healthz` and `/metrics`, also accepted as "
                             "`/k8s/<token>/...`", "", secret=True)
    loader_token: str = _controller("loader_token", "bearer token (empty: `$SLLM_LOADER_TOKEN` if set) sent to the "
                                    "node loaders' TCP API when the controller tells the chosen node to start staging "
                                    "(the loaders' `SLLM_LOADER_TOKEN`)", "", secret=True)
    insecure_no_auth: bool = _controller("insecure_no_auth", "start with neither token nor client CA, so anyone who "
                                         "reaches the port can book slots. Without it, a controller with no token and "
                                         "no `--client-ca` refuses to start", False, kind="bool")
    model_store: str = _controller("model_store", "model store (directory or http(s) URL, as the loaders' `--remote`) "
                                   "to read a model's size from when no loader has published it", "")
    snapshot_max_age_s: float = _controller("snapshot_max_age_s", "how old the cached cluster view may get; a "
                                            "background thread re-reads it", 1.0, kind="duration", above=0)
    booking_ttl_s: float = _controller("booking_ttl_s", "how long a booked slot waits for its instance to register "
                                       "before it frees", 120.0, kind="duration", above=0)
    max_body_bytes: int = _controller("max_body_bytes", "request body limit, 413 above (AdmissionReviews carry whole "
                                      "pods)", 4 << 20, kind="size", minimum=1, shown_default="4MiB")
    keepalive_exchange_rate: float = _controller("keepalive_exchange_rate", "GPU-seconds one second of a user's "
                                                 "cold-start delay is worth to this deployment: the keep-alive "
                                                 "policy keeps an idle instance while its expected saving, priced so, "
                                                 "exceeds its GPU time (docs/SIMULATOR.md)", 3.0, kind="number",
                                                 above=0)
    keepalive_tail_restart_s: float = _controller("keepalive_tail_restart_s", "a model whose restart from SSD takes "
                                                  "longer than this keeps its checkpoint in DRAM (`hold_s` in "
                                                  "`sllm:keepalive:<model>`)", 10.0, kind="duration", minimum=0)
    keepalive_tail_coverage: float = _controller("keepalive_tail_coverage", "such a model's DRAM hold outlasts this "
                                                 "share of its idle times", 0.99, kind="number", above=0,
                                                 maximum=1)
    workers: int = _controller("workers", "gunicorn worker processes (8 threads each)", 2, kind="int", minimum=1)
    tls_cert: str = _controller("tls_cert", "serve HTTPS with this certificate (PEM); the webhook requires it", "")
    tls_key: str = _controller("tls_key", "its private key; set both or neither", "")
    client_ca: str = _controller("client_ca", "require client certificates signed by this CA (mTLS); needs the two "
                                 "above; counts as credentials (no token needed)", "")
    # What the webhook injects into function pods (deploy/README.md, "What the webhook adds to a pod"):
    inject_socket_dir: str = _controller("inject_socket_dir", "the webhook mounts this host directory (the loaders' "
                                         "`SLLM_LOADER_SOCKET_PATH` directory) into function pods and sets "
                                         "`SLLM_LOADER_SOCKET` to `loader.sock` in it", "/run/sllm", check=_absolute)
    inject_dram_dir: str = _controller("inject_dram_dir", "the webhook mounts this host directory (the loaders' DRAM "
                                       "tier, `SLLM_LOADER_DRAM_DIR`) read-only into function pods", "/dev/shm/sllm",
                                       check=_absolute)
    inject_redis_secret: str = _controller("inject_redis_secret", "`SECRET/KEY`: function pods get `SLLM_REDIS_URL` "
                                           "from this Secret of their own namespace; empty = the controller's "
                                           "`--redis-url` as a plain value (password included)", "",
                                           check=_secret_key)

    def __post_init__(self) -> None:
        common.validate(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise Conflict("{tls_cert} and {tls_key} go together", self)
        if self.client_ca and not self.tls_cert:
            raise Conflict("{client_ca} (mTLS) needs --tls-cert and --tls-key", self)
        if not (self.token or self.client_ca or self.insecure_no_auth):
            raise Conflict("no credentials: set token (--token / SLLM_CONTROLLER_TOKEN) or client_ca (mTLS), or run "
                           "unauthenticated on purpose with --insecure-no-auth (SLLM_CONTROLLER_INSECURE_NO_AUTH=true)",
                           self)

    def to_env(self) -> str:
        return common.to_json(self)

    @classmethod
    def from_json(cls, text: str) -> ControllerConfig:
        return common.from_json(cls, text, "$SLLM_CONTROLLER_CONFIG")


ENV = common.env_names(ControllerConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_arguments(parser, ControllerConfig)


def resolve(args: argparse.Namespace) -> ControllerConfig:
    """Flags, then SLLM_CONTROLLER_* variables (and REDIS_URL for redis_url), then defaults."""
    return common.resolve(ControllerConfig, common.given(args, ControllerConfig))
