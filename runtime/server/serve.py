"""`sllm-faas serve MODEL_DIR_OR_NAME [--port 8080] [--max-model-len N] ...`: the function runtime under gunicorn.

This is what the OpenFaaS template's fprocess and the Knative container run. Every runtime setting is a flag
(runtime/server/settings.py OPTIONS, as `vllm serve` has them), its SLLM_ env variable the fallback; the flags
given are checked here and exported into the environment that gunicorn's worker reads its settings from.
"""

from __future__ import annotations

import argparse
import os
import sys

from sllm_faas.runtime.server.settings import BY_NAME, OPTIONS, Settings, SettingsError


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    for option in OPTIONS:
        text = f"{option.help} (env {option.env}; default: {option.default_text()})".replace("%", "%%")
        if option.name == "model":
            parser.add_argument("model", nargs="?", metavar=option.flag, help=text)
        elif option.kind == "bool":
            parser.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            # choices are checked by settings.parse (env values too), so they are only shown here
            metavar = "{" + ",".join(option.choices) + "}" if option.choices else \
                {"int": "N", "template": "FILE"}.get(option.kind, option.flag.lstrip("-").upper().replace("-", "_"))
            parser.add_argument(option.flag, dest=option.name, default=None, metavar=metavar, help=text)
    parser.add_argument("--app", default="sllm_faas.runtime.server.app:create_app()",
                        help="WSGI app to serve (the OpenFaaS template passes its own, with the user's handler)")


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """Field name -> the flag's text, for the options given on the command line."""
    flags = {}
    for option in OPTIONS:
        value = getattr(args, option.name)
        if value is not None:
            flags[option.name] = ("1" if value else "0") if option.kind == "bool" else value
    return flags


def run(args: argparse.Namespace) -> int:
    flags = given_flags(args)
    try:
        settings = Settings.resolve(flags)
    except SettingsError as exc:
        print(f"sllm-faas serve: {exc}", file=sys.stderr)
        return 2
    if not settings.model:
        print("sllm-faas serve: no model: pass MODEL_DIR_OR_NAME or set SLLM_MODEL", file=sys.stderr)
        return 2
    for name, raw in flags.items():   # the worker (Settings.from_env) inherits them
        os.environ[BY_NAME[name].env] = raw
    os.environ["SLLM_SPAWN_PID"] = str(os.getpid())
    # gunicorn runs in this process: no second interpreter start on the cold-start path
    from sllm_faas.common.http_server import run as run_http

    run_http(["--config", "python:sllm_faas.runtime.server.gunicorn_conf", args.app])
    return 0
