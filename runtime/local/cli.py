"""`sllm-faas up | deploy | invoke`: the local cluster and the faas-cli-like verbs that talk to its gateway."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

GATEWAY = os.environ.get("OPENFAAS_URL", "http://127.0.0.1:8080")


def cache_root() -> Path:
    """$SLLM_FAAS_CACHE, else ~/.cache/sllm-faas: the model store and the gateways' admin tokens."""
    return Path(os.environ.get("SLLM_FAAS_CACHE") or Path.home() / ".cache" / "sllm-faas")


def token_path(gateway: str) -> Path:
    """Where `sllm-faas up` leaves the admin token of the gateway at `gateway` (mode 0600, removed when it
    stops), so that `sllm-faas deploy` finds it without being told."""
    url = urlsplit(gateway)
    return cache_root() / "gateways" / f"{url.hostname}_{url.port or 80}.token"


def admin_token(args: argparse.Namespace) -> str:
    """--token, else $SLLM_GATEWAY_TOKEN, else the file `up` wrote for this gateway; "" when none."""
    if args.token:
        return args.token
    if os.environ.get("SLLM_GATEWAY_TOKEN"):
        return os.environ["SLLM_GATEWAY_TOKEN"]
    path = token_path(args.gateway)
    return path.read_text().strip() if path.is_file() else ""


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
        parser.add_argument("--token", help="the gateway's admin token (default $SLLM_GATEWAY_TOKEN, else the file "
                                            "`sllm-faas up` wrote for this gateway)")
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
    token = admin_token(args)
    for spec in specs:
        try:
            build = shrinkwrap(spec.lang, spec.handler, (args.build_dir / spec.name).resolve())
        except ValueError as exc:
            print(f"sllm-faas deploy: {args.stack}: functions.{spec.name}.lang: {exc}", file=sys.stderr)
            return 2
        body = {"service": spec.name, "image": spec.image, "envVars": spec.environment, "labels": spec.labels,
                "annotations": {**spec.annotations, "sllm.io/build": str(build), "sllm.io/model": spec.model}}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = requests.post(args.gateway + "/system/functions", json=body, headers=headers, timeout=30)
        if response.status_code == 409:
            response = requests.put(args.gateway + "/system/functions", json=body, headers=headers, timeout=30)
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
