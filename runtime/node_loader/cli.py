"""`sllm-faas loader`: the node loader daemon, under gunicorn on a Unix socket (and optionally TCP)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sllm_faas.runtime.node_loader import config as loader_config


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    loader_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = loader_config.resolve(args)
        loader_config.check_dram_budget(config)
    except ValueError as exc:
        print(f"sllm-faas loader: {exc}", file=sys.stderr)
        return 2
    Path(config.socket_path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(config.socket_path):
        os.unlink(config.socket_path)  # a previous run's socket; gunicorn refuses to bind over it
    binds = ["--bind", f"unix:{config.socket_path}"] + (["--bind", config.tcp] if config.tcp else [])
    os.environ["SLLM_LOADER_CONFIG"] = config.to_env()
    from sllm_faas.common.http_server import run as run_http

    # one worker: the loader's state (jobs, leases, GPU buffers) lives in that process
    run_http([*binds, "--workers", "1", "--threads", "16", "--timeout", "0", "--graceful-timeout", "10",
              "--umask", "0o007", "sllm_faas.runtime.node_loader.api:create_app()"])
    return 0
