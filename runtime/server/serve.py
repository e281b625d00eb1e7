"""`sllm-faas serve MODEL_DIR_OR_NAME [--port 8080] [--max-model-len N] ...`: the function runtime under gunicorn.

This is what the OpenFaaS template's fprocess and the Knative container run. Every runtime setting is a flag
(runtime/server/settings.py `Settings`, as `vllm serve` has them), its SLLM_ env variable the fallback; the flags
given are checked here and exported into the environment that gunicorn's worker reads its settings from.
"""

from __future__ import annotations

import argparse
import os
import sys

from sllm_faas.common import settings as common
from sllm_faas.runtime.server.settings import Settings, SettingsError


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    common.add_arguments(parser, Settings)
    parser.add_argument("--app", default="sllm_faas.runtime.server.app:create_app()",
                        help="WSGI app to serve (the OpenFaaS template passes its own, with the user's handler)")


def run(args: argparse.Namespace) -> int:
    flags = common.given(args, Settings)
    try:
        settings = Settings.resolve(flags)
    except SettingsError as exc:
        print(f"sllm-faas serve: {exc}", file=sys.stderr)
        return 2
    if not settings.model:
        print("sllm-faas serve: no model: pass MODEL_DIR_OR_NAME or set SLLM_MODEL", file=sys.stderr)
        return 2
    env = common.env_names(Settings)
    for name, raw in flags.items():   # the worker (Settings.from_env) inherits them
        os.environ[env[name]] = raw
    os.environ["SLLM_SPAWN_PID"] = str(os.getpid())
    # gunicorn runs in this process: no second interpreter start on the cold-start path
    from sllm_faas.common.http_server import run as run_http

    run_http(["--config", "python:sllm_faas.runtime.server.gunicorn_conf", args.app])
    return 0
