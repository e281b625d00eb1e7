"""gunicorn settings for the function runtime (`gunicorn -c python:runtime.server.gunicorn_conf`).

One worker process holds the model; its threads serve concurrent requests and SSE streams while
the engine thread batches their generation. Every value can be overridden by gunicorn's own
GUNICORN_CMD_ARGS or flags.
"""

import os

from runtime.server.settings import Settings

# Loaded by the master before it forks: the worker times its cold start from the master's creation.
os.environ.setdefault("SLLM_SPAWN_PID", str(os.getpid()))

bind = f"{os.environ.get('SLLM_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8080')}"  # noqa: S104 - a container port
workers = 1
worker_class = "runtime.http_server.Worker"  # gthread that slow clients cannot exhaust
threads = Settings.from_env().http_threads  # the app admits threads - SLLM_HTTP_RESERVED_THREADS generations
timeout = int(os.environ.get("SLLM_WORKER_TIMEOUT", "600"))  # long streams must not be killed as hung workers
graceful_timeout = 30
keepalive = 75  # longer than typical load balancer idle timeouts
accesslog = "-" if os.environ.get("SLLM_ACCESS_LOG") else None
errorlog = "-"
loglevel = os.environ.get("SLLM_LOG_LEVEL", "info")
