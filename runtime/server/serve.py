"""`sllm-faas serve MODEL_DIR_OR_NAME [--port 8080]`: the function runtime under gunicorn.

This is what the OpenFaaS template's fprocess and the Knative container run.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("model", nargs="?", default=os.environ.get("SLLM_MODEL"),
                        help="a checkpoint directory, or a model name under $SLLM_MODEL_STORE (default: $SLLM_MODEL; "
                             "of-watchdog runs fprocess without a shell, so templates pass it by env)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")),
                        help="port to listen on (default: $PORT or 8080)")
    parser.add_argument("--host", default=os.environ.get("SLLM_HOST", "0.0.0.0"),  # noqa: S104
                        help="address to bind (default: $SLLM_HOST or 0.0.0.0)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /v1/* (default: $SLLM_API_KEY; unset: open)")
    parser.add_argument("--app", default="runtime.server.app:create_app()",
                        help="WSGI app to serve (the OpenFaaS template passes its own, with the user's handler)")


def run(args: argparse.Namespace) -> int:
    if not args.model:
        print("sllm-faas serve: no model: pass MODEL_DIR_OR_NAME or set SLLM_MODEL", file=sys.stderr)
        return 2
    os.environ["SLLM_MODEL"] = args.model
    os.environ["PORT"] = str(args.port)
    os.environ["SLLM_HOST"] = args.host
    if args.api_key:
        os.environ["SLLM_API_KEY"] = args.api_key
    os.environ["SLLM_SPAWN_PID"] = str(os.getpid())
    # gunicorn runs in this process: no second interpreter start on the cold-start path
    from runtime.http_server import run as run_http

    run_http(["--config", "python:runtime.server.gunicorn_conf", args.app])
    return 0
