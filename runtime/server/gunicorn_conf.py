"""gunicorn settings for the function runtime (`gunicorn -c python:sllm_faas.runtime.server.gunicorn_conf`).

One worker process holds the model; its threads serve concurrent requests and SSE streams while
the engine thread batches their generation. Every value can be overridden by gunicorn's own
GUNICORN_CMD_ARGS or flags.
"""

import os

from sllm_faas.runtime.server.settings import Settings, SettingsError

# Loaded by the master before it forks: the worker times its cold start from the master's creation.
os.environ.setdefault("SLLM_SPAWN_PID", str(os.getpid()))

try:
    settings = Settings.from_env()   # `sllm-faas serve` exported its flags into the environment
except SettingsError as exc:         # gunicorn's own start (and a pooled runtime's) stop with the message alone
    raise SystemExit(f"sllm-faas runtime: {exc}") from None
bind = f"{settings.host}:{settings.port}"
workers = 1
worker_class = "sllm_faas.common.http_server.Worker"  # gthread that slow clients cannot exhaust
threads = settings.http_threads  # the app admits threads - SLLM_HTTP_RESERVED_THREADS generations
timeout = settings.worker_timeout  # long streams must not be killed as hung workers
graceful_timeout = 30
keepalive = 75  # longer than typical load balancer idle timeouts
accesslog = "-" if settings.access_log else None
errorlog = "-"
loglevel = settings.log_level
