"""Runtime settings: each one a `sllm-faas serve` flag and an environment variable, flag > env > default.

OPTIONS is the one table. `serve` builds its flags from it, validates them with `Settings.resolve` and
exports the ones given into the environment, which the gunicorn worker (and a pooled runtime) read with
`Settings.from_env`. One validator (`parse`) refuses a bad value naming the flag, where the value came
from (the flag or the env variable) and the value. README.md documents every option (tests/test_cli.py).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SettingsError(SystemExit):
    """A refused value; a SystemExit so that gunicorn's config and the worker stop with the message."""


def _dns_label(text: str) -> str:
    """Hostnames as Redis-schema ids: lowercase, anything outside [a-z0-9.-] becomes '-'."""
    return re.sub(r"[^a-z0-9.-]", "-", text.lower()).strip("-.") or "localhost"


def _default_instance_id() -> str:
    return f"{_dns_label(socket.gethostname())}-{os.environ.get('SLLM_SPAWN_PID') or os.getpid()}"


@dataclass(frozen=True)
class Option:
    name: str                 # the Settings field
    flag: str                 # the serve flag; MODEL_DIR_OR_NAME is the positional argument
    env: str
    default: Any              # used when neither is given; a callable is called then
    help: str
    kind: str = "str"         # str, int, bool or template (a Jinja file)
    optional: bool = False    # an empty value means None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    shown_default: str = ""   # how help and README say a computed default

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def default_text(self) -> str:
        return self.shown_default or ("unset" if self.default is None else repr(self.default))


OPTIONS: tuple[Option, ...] = (
    Option("model", "MODEL_DIR_OR_NAME", "SLLM_MODEL", "",
           "a checkpoint directory, or a model name under --model-store (of-watchdog runs fprocess without a "
           "shell, so templates pass it by env)", shown_default="none"),
    Option("model_store", "--model-store", "SLLM_MODEL_STORE", "/var/lib/sllm/models",
           "where model names are looked up without a node loader"),
    Option("served_name", "--served-model-name", "SLLM_SERVED_MODEL_NAME", None,
           "the id in /v1/models and the `model` requests must name", optional=True,
           shown_default="the model directory's name"),
    Option("chat_template", "--chat-template", "SLLM_CHAT_TEMPLATE", None,
           "a Jinja chat template file used instead of the checkpoint's", kind="template", optional=True,
           shown_default="the checkpoint's template"),
    Option("loader_socket", "--loader-socket", "SLLM_LOADER_SOCKET", None,
           "the node loader's Unix socket; set, the model is a name the loader stages and leases", optional=True,
           shown_default="unset: load from the directory"),
    Option("loader_tier", "--loader-tier", "SLLM_LOADER_TIER", "dram", "the tier to ask the node loader for",
           choices=("ssd", "dram", "gpu")),
    Option("max_body_bytes", "--max-body-bytes", "SLLM_MAX_BODY_BYTES", 1 << 20, "request body limit (413 above)",
           kind="int", minimum=1),
    Option("max_prompt_tokens", "--max-prompt-tokens", "SLLM_MAX_PROMPT_TOKENS", 4096, "prompt limit (400 above)",
           kind="int", minimum=1),
    Option("max_tokens", "--max-tokens", "SLLM_MAX_TOKENS", 1024,
           "the largest max_tokens a request may ask for, and the chat default", kind="int", minimum=1),
    Option("max_batch", "--max-num-seqs", "SLLM_MAX_BATCH", 8,
           "requests generating at once (KV cache slots; more wait in a queue)", kind="int", minimum=1),
    Option("max_seq", "--max-model-len", "SLLM_MAX_SEQ", 2048,
           "context per request, prompt + output (capped by the model's)", kind="int", minimum=16),
    Option("torch_threads", "--torch-threads", "SLLM_TORCH_THREADS", lambda: os.cpu_count() or 1,
           "torch intra-op threads", kind="int", minimum=1, shown_default="the CPU count"),
    Option("redis_url", "--redis-url", "SLLM_REDIS_URL", None,
           "publish this instance (sllm:instance:<id>, a slot of its node) for the controller", optional=True,
           shown_default="unset: not published"),
    Option("key_prefix", "--key-prefix", "SLLM_KEY_PREFIX", "sllm:", "Redis key prefix"),
    Option("instance_id", "--instance-id", "SLLM_INSTANCE_ID", _default_instance_id,
           "this instance's id (in Kubernetes the pod name)", shown_default="<hostname>-<pid>"),
    Option("node_id", "--node-id", "SLLM_NODE_ID", lambda: _dns_label(socket.gethostname()),
           "the node it runs on (in Kubernetes spec.nodeName via the downward API)", shown_default="the host name"),
    Option("advertise_url", "--advertise-url", "SLLM_ADVERTISE_URL", "",
           "base URL the controller and other instances reach it at"),
    Option("function_name", "--function-name", "SLLM_FUNCTION_NAME", "", "the FaaS function it serves"),
    Option("booking_id", "--booking-id", "SLLM_BOOKING_ID", None,
           "the controller's slot booking this instance takes over (the webhook and the gateway set it)",
           optional=True),
    Option("heartbeat_s", "--heartbeat-s", "SLLM_INSTANCE_HEARTBEAT_S", 2,
           "heartbeat of the instance record in seconds (it expires after 3 missed beats)", kind="int", minimum=1),
    Option("host", "--host", "SLLM_HOST", "0.0.0.0", "address to bind"),  # noqa: S104 - a container port
    Option("port", "--port", "PORT", 8080, "port to listen on", kind="int", minimum=1, maximum=65535),
    Option("http_threads", "--http-threads", "SLLM_HTTP_THREADS", 32, "gunicorn threads", kind="int", minimum=2),
    Option("http_reserved", "--http-reserved-threads", "SLLM_HTTP_RESERVED_THREADS", 4,
           "threads kept for /_/... and /metrics (generations beyond the rest get 503)", kind="int", minimum=1),
    Option("worker_timeout", "--worker-timeout", "SLLM_WORKER_TIMEOUT", 600,
           "gunicorn worker timeout in seconds (0: none)", kind="int", minimum=0),
    Option("log_level", "--log-level", "SLLM_LOG_LEVEL", "info", "log level",
           choices=("debug", "info", "warning", "error", "critical")),
    Option("access_log", "--access-log", "SLLM_ACCESS_LOG", False, "log each request (env: 1/0, true/false)",
           kind="bool"),
    Option("api_key", "--api-key", "SLLM_API_KEY", None,
           "require `Authorization: Bearer KEY` on /v1/*", optional=True, shown_default="unset: open"),
)
BY_NAME = {option.name: option for option in OPTIONS}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse(option: Option, raw: str, source: str) -> Any:
    """The one validator: `raw` from `source` ("flag --x" or "env VAR") as the option's value, or a
    SettingsError naming the flag, the source and the value."""

    def refuse(problem: str) -> SettingsError:
        return SettingsError(f"{option.flag}={raw!r} (from {source}): {problem}")

    if option.optional and raw == "":
        return None
    if option.kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise refuse("not an integer") from None
        if option.minimum is not None and value < option.minimum:
            raise refuse(f"must be at least {option.minimum}")
        if option.maximum is not None and value > option.maximum:
            raise refuse(f"must be at most {option.maximum}")
        return value
    if option.kind == "bool":
        if raw.lower() not in TRUE + FALSE:
            raise refuse(f"not a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)})")
        return raw.lower() in TRUE
    if option.choices and raw not in option.choices:
        raise refuse(f"not one of {', '.join(option.choices)}")
    if option.kind == "template":
        from sllm_faas.runtime.model.tokenizer import check_template

        try:
            check_template(open(raw).read())   # noqa: SIM115 - read at once
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise refuse(f"not a usable chat template: {exc}") from None
    return raw


@dataclass(frozen=True)
class Settings:
    """One field per option of OPTIONS (README.md: `serve` flags and environment variables)."""

    model: str
    model_store: str
    served_name: str | None
    chat_template: str | None
    loader_socket: str | None
    loader_tier: str
    max_body_bytes: int
    max_prompt_tokens: int
    max_tokens: int
    max_batch: int
    max_seq: int
    torch_threads: int
    redis_url: str | None
    key_prefix: str
    instance_id: str
    node_id: str
    advertise_url: str
    function_name: str
    booking_id: str | None
    heartbeat_s: int
    host: str
    port: int
    http_threads: int
    http_reserved: int
    worker_timeout: int
    log_level: str
    access_log: bool
    api_key: str | None

    @classmethod
    def resolve(cls, flags: Mapping[str, str] | None = None) -> Settings:
        """Each option from `flags` (field name -> the flag's text), else its env variable (empty = unset),
        else its default; values are checked by `parse`, and the threads by one cross-check."""
        flags = flags or {}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for option in OPTIONS:
            if flags.get(option.name) is not None:
                raw, source = flags[option.name], f"flag {option.flag}"
            elif os.environ.get(option.env):
                raw, source = os.environ[option.env], f"env {option.env}"
            else:
                values[option.name], sources[option.name] = option.default_value(), "default"
                continue
            values[option.name], sources[option.name] = parse(option, raw, source), source
        if values["http_reserved"] >= values["http_threads"]:
            raise SettingsError(f"--http-reserved-threads={values['http_reserved']} (from {sources['http_reserved']})"
                                f" must be below --http-threads={values['http_threads']} (from "
                                f"{sources['http_threads']}): generations need threads too")
        return cls(**values)

    @classmethod
    def from_env(cls) -> Settings:
        return cls.resolve()
