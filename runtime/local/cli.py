"""`sllm-faas up | deploy | invoke`: the local cluster and the faas-cli-like verbs that talk to its gateway."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GATEWAY = os.environ.get("OPENFAAS_URL", "http://127.0.0.1:8080")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "up":
        from runtime.local.up import add_arguments as add_up

        add_up(parser)
        return
    parser.add_argument("--gateway", "-g", default=GATEWAY, help="gateway URL (default $OPENFAAS_URL or "
                                                                  "http://127.0.0.1:8080)")
    if verb == "deploy":
        parser.add_argument("-f", "--yaml", dest="stack", required=True, help="OpenFaaS stack file (stack.yml)")
        parser.add_argument("--build-dir", type=Path, default=Path("build"),
                            help="where function builds go (default ./build, as faas-cli)")
        parser.add_argument("--filter", help="deploy only this function")
    else:
        parser.add_argument("name", help="function name")
        parser.add_argument("--path", default="", help="path under /function/NAME/ (e.g. v1/chat/completions)")
        parser.add_argument("--method", default="POST")
        parser.add_argument("--content-type", default="application/json")


def run(args: argparse.Namespace) -> int:
    if args.verb == "up":
        from runtime.local.up import run as run_up

        return run_up(args)
    import requests

    try:
        return deploy(args) if args.verb == "deploy" else invoke(args)
    except requests.RequestException as exc:
        print(f"sllm-faas {args.verb}: gateway {args.gateway} unreachable: {exc}", file=sys.stderr)
        return 1


def deploy(args: argparse.Namespace) -> int:
    import requests

    from runtime.local.build import shrinkwrap
    from runtime.local.stack import StackError, read_stack

    try:
        specs = read_stack(args.stack)
    except StackError as exc:
        print(f"sllm-faas deploy: {exc}", file=sys.stderr)
        return 2
    specs = [s for s in specs if args.filter in (None, s.name)]
    if not specs:
        print(f"sllm-faas deploy: no function named {args.filter!r} in {args.stack}", file=sys.stderr)
        return 2
    args.build_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        try:
            build = shrinkwrap(spec.lang, spec.handler, (args.build_dir / spec.name).resolve())
        except ValueError as exc:
            print(f"sllm-faas deploy: {args.stack}: functions.{spec.name}.lang: {exc}", file=sys.stderr)
            return 2
        body = {"service": spec.name, "image": spec.image, "envVars": spec.environment, "labels": spec.labels,
                "annotations": {**spec.annotations, "sllm.io/build": str(build), "sllm.io/model": spec.model}}
        response = requests.post(args.gateway + "/system/functions", json=body, timeout=30)
        if response.status_code == 409:
            response = requests.put(args.gateway + "/system/functions", json=body, timeout=30)
        if response.status_code >= 400:
            print(f"sllm-faas deploy: {spec.name}: {response.status_code} {response.text.strip()}", file=sys.stderr)
            return 1
        print(f"Deployed {spec.name}. {response.status_code} Accepted.\nURL: {args.gateway}/function/{spec.name}")
    return 0


def invoke(args: argparse.Namespace) -> int:
    """Like `faas-cli invoke`: the body from stdin, the answer (streamed) to stdout."""
    import requests

    data = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    url = f"{args.gateway}/function/{args.name}" + (f"/{args.path.lstrip('/')}" if args.path else "")
    with requests.request(args.method, url, data=data, headers={"Content-Type": args.content_type}, stream=True,
                          timeout=(10, 900)) as response:
        for chunk in response.iter_content(chunk_size=None):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    if not data.endswith(b"\n"):
        print()
    if response.status_code >= 400:
        print(f"sllm-faas invoke: {response.status_code}", file=sys.stderr)
        return 1
    return 0
