"""`sllm-faas up | deploy | invoke | list | describe | logs | remove`: the local cluster and the faas-cli-like verbs
that talk to its gateway."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sllm_faas.runtime.local.logs import FOLLOW_MAX_S, MAX_TAIL
from sllm_faas.runtime.local.paths import token_path

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


def admin_token(args: argparse.Namespace) -> str:
    """--token, else $SLLM_GATEWAY_TOKEN, else the file `up` wrote for this gateway; "" when none."""
    if args.token:
        return args.token
    if os.environ.get("SLLM_GATEWAY_TOKEN"):
        return os.environ["SLLM_GATEWAY_TOKEN"]
    path = token_path(args.gateway)
    return path.read_text().strip() if path.is_file() else ""


def key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE of -e/--env, -l/--label and --annotation."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "up":
        from sllm_faas.runtime.local.up import add_arguments as add_up

        add_up(parser)
        return
    parser.add_argument("--gateway", "-g", default=os.environ.get("OPENFAAS_URL", DEFAULT_GATEWAY),
                        help=f"gateway URL (default $OPENFAAS_URL or {DEFAULT_GATEWAY})")
    if verb != "invoke":   # the verbs that use the admin (/system/) routes
        parser.add_argument("--token", help="the gateway's admin token (default $SLLM_GATEWAY_TOKEN, else the file "
                                            "`sllm-faas up` wrote for this gateway)")
    if verb in ("deploy", "remove"):
        parser.add_argument("-f", "--yaml", dest="stack", required=verb == "deploy",
                            help="OpenFaaS stack file (stack.yml)")
        parser.add_argument("--filter", help=f"{verb} only this function of the stack file")
    if verb == "deploy":
        parser.add_argument("--build-dir", type=Path, default=Path("build"),
                            help="where function builds go (default ./build, as faas-cli)")
        for flags, field, what in ((("-e", "--env"), "env", "environment variable"), (("-l", "--label"), "label",
                                   "label"), (("--annotation",), "annotation", "annotation")):
            parser.add_argument(*flags, dest=field, type=key_value, action="append", default=[], metavar="KEY=VALUE",
                                help=f"set an {what} of every function deployed, over the stack file's (repeatable)")
    elif verb == "remove":
        parser.add_argument("name", nargs="?", help="the function to remove (else those of -f/--yaml)")
    elif verb == "list":
        parser.add_argument("-q", "--quiet", action="store_true", help="print only the function names")
        parser.add_argument("-v", "--verbose", action="store_true", help="also print each function's image and labels")
        parser.add_argument("--sort", choices=("name", "invocations"), default="name",
                            help="sort by name or invocations, most first (default name)")
    elif verb in ("describe", "logs"):
        parser.add_argument("name", help="function name")
        if verb == "logs":
            parser.add_argument("--tail", type=int, default=-1,
                                help=f"the last N lines (default -1: all, at most {MAX_TAIL} over all instances)")
            parser.add_argument("--follow", action="store_true",
                                help=f"then print new lines as they are written (for up to {FOLLOW_MAX_S:.0f} s)")
            parser.add_argument("--instance", help="only this instance's log")
    else:
        parser.add_argument("name", help="function name")
        parser.add_argument("--path", default="", help="path under /function/NAME/ (e.g. v1/chat/completions)")
        parser.add_argument("--method", default="POST")
        parser.add_argument("--content-type", default="application/json")


def run(args: argparse.Namespace) -> int:
    if args.verb == "up":
        from sllm_faas.runtime.local.up import run as run_up

        return run_up(args)
    import requests

    args.gateway = args.gateway.rstrip("/")
    verbs = {"deploy": deploy, "invoke": invoke, "list": list_functions, "describe": describe, "logs": function_logs,
             "remove": remove}
    try:
        return verbs[args.verb](args)
    except requests.RequestException as exc:
        print(f"sllm-faas {args.verb}: gateway {args.gateway} unreachable: {exc}", file=sys.stderr)
        return 1


def system(args: argparse.Namespace, method: str, path: str, **kwargs):
    """A request to an admin route of the gateway, with the admin token (admin_token)."""
    import requests

    token = admin_token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs.setdefault("timeout", 30)
    return requests.request(method, args.gateway + path, headers=headers, **kwargs)


def refused(args: argparse.Namespace, response, what: str = "") -> int:
    """Print the gateway's refusal (its `error`, else the body) and return 1."""
    try:
        error = response.json().get("error") or response.text
    except (ValueError, AttributeError):
        error = response.text
    print(f"sllm-faas {args.verb}: {what + ': ' if what else ''}{response.status_code} {str(error).strip()}",
          file=sys.stderr)
    return 1


def stack_functions(args: argparse.Namespace) -> list | None:
    """The functions of -f/--yaml, filtered by --filter; None (after saying why) when none."""
    from sllm_faas.runtime.local.stack import StackError, read_stack

    try:
        specs = read_stack(args.stack)
    except StackError as exc:
        print(f"sllm-faas {args.verb}: {exc}", file=sys.stderr)
        return None
    specs = [s for s in specs if args.filter in (None, s.name)]
    if not specs:
        print(f"sllm-faas {args.verb}: no function named {args.filter!r} in {args.stack}", file=sys.stderr)
        return None
    return specs


def deploy(args: argparse.Namespace) -> int:
    from sllm_faas.runtime.local.build import shrinkwrap

    specs = stack_functions(args)
    if specs is None:
        return 2
    args.build_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        try:
            build = shrinkwrap(spec.lang, spec.handler, (args.build_dir / spec.name).resolve())
        except ValueError as exc:
            print(f"sllm-faas deploy: {args.stack}: functions.{spec.name}.lang: {exc}", file=sys.stderr)
            return 2
        body = {"service": spec.name, "image": spec.image, "envVars": {**spec.environment, **dict(args.env)},
                "labels": {**spec.labels, **dict(args.label)},
                "annotations": {**spec.annotations, **dict(args.annotation), "sllm.io/build": str(build),
                                "sllm.io/model": spec.model}}
        response = system(args, "POST", "/system/functions", json=body)
        if response.status_code == 409:
            response = system(args, "PUT", "/system/functions", json=body)
        if response.status_code >= 400:
            return refused(args, response, spec.name)
        print(f"Deployed {spec.name}. {response.status_code} Accepted.\nURL: {args.gateway}/function/{spec.name}")
    return 0


def remove(args: argparse.Namespace) -> int:
    """Like `faas-cli remove NAME` or `faas-cli remove -f stack.yml [--filter NAME]`."""
    if args.name:
        names = [args.name]
    elif args.stack:
        specs = stack_functions(args)
        if specs is None:
            return 2
        names = [spec.name for spec in specs]
    else:
        print("sllm-faas remove: name a function, or give -f/--yaml stack.yml", file=sys.stderr)
        return 2
    code = 0
    for name in names:
        print(f"Deleting: {name}.")
        response = system(args, "DELETE", "/system/functions", json={"functionName": name}, timeout=120)
        if response.status_code >= 400:
            code = refused(args, response, name)
        else:
            print("Removing old function.")
    return code


def list_functions(args: argparse.Namespace) -> int:
    """Like `faas-cli list [-q] [-v] [--sort]`."""
    response = system(args, "GET", "/system/functions")
    if response.status_code >= 400:
        return refused(args, response)
    functions = response.json()
    if args.sort == "invocations":
        functions.sort(key=lambda f: -f["invocationCount"])
    if args.quiet:
        for function in functions:
            print(function["name"])
        return 0
    rows = [("Function", "Image", "Invocations", "Replicas", "Labels") if args.verbose else
            ("Function", "Invocations", "Replicas")]
    for f in functions:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(f["labels"].items()))
        row = (f["name"], f["image"] or "-", str(f["invocationCount"]), str(f["replicas"]))
        rows.append((*row, labels or "-") if args.verbose else (row[0], *row[2:]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]))
    return 0


def describe(args: argparse.Namespace) -> int:
    """Like `faas-cli describe NAME`, plus the instances: node, start kind, placement and cold-start breakdown."""
    response = system(args, "GET", f"/system/function/{args.name}")
    if response.status_code >= 400:
        return refused(args, response, args.name)
    f = response.json()

    def field(key: str, value: object) -> None:
        print(f"{key + ':':<20} {value}")

    def mapping(key: str, values: dict) -> None:
        lines = [f"{k} : {v}" for k, v in sorted(values.items())] or ["<none>"]
        field(key, lines[0])
        for line in lines[1:]:
            print(" " * 21 + line)

    field("Name", f["name"])
    field("Status", "Ready" if f["availableReplicas"] else "Not Ready")
    field("Replicas", f["replicas"])
    field("Available replicas", f["availableReplicas"])
    field("Invocations", f["invocationCount"])
    field("Image", f["image"] or "<none>")
    field("Build", f["annotations"].get("sllm.io/build", "<none>"))
    field("Model", f["annotations"].get("sllm.io/model") or f["envVars"].get("SLLM_MODEL", "<none>"))
    field("Function process", f["envProcess"])
    field("URL", f"{args.gateway}/function/{f['name']}")
    field("Created", f["createdAt"])
    mapping("Labels", f["labels"])
    mapping("Annotations", f["annotations"])
    mapping("Environment", f["envVars"])
    field("Held requests", f.get("heldRequests", 0))
    if f.get("lastError"):
        field("Last start error", f["lastError"])
    field("Instances", len(f["instances"]) or "<none>")
    for instance in f["instances"]:
        print(f"  {instance['id']}  node {instance['node']}  pid {instance['pid']}  start {instance['start']}  "
              f"{'ready' if instance['ready'] else 'not ready'}  in flight {instance['in_flight']}  {instance['url']}")
        placement = instance.get("placement") or {}
        if placement:
            print("    placement: " + "  ".join(f"{k} {v}" for k, v in placement.items() if v not in (None, "")))
        cold = instance.get("cold_start") or {}
        if cold:
            phases = "  ".join(f"{k.removesuffix('_s')} {v:.3f}s" for k, v in cold.items()
                               if k.endswith("_s") and k != "process_start_to_ready_s")
            print(f"    cold start: total {cold.get('process_start_to_ready_s', 0):.3f}s ({phases})  "
                  f"tier {cold.get('tier')}  decoder {cold.get('decoder')}")
        if instance.get("failure"):
            print(f"    failure: {instance['failure']}")
    return 0


def function_logs(args: argparse.Namespace) -> int:
    """Like `faas-cli logs NAME`: the function's instance logs (GET /system/logs), `INSTANCE TEXT` per line."""
    import json

    params = {"name": args.name, "tail": args.tail, "follow": "true" if args.follow else "false"}
    if args.instance:
        params["instance"] = args.instance
    with system(args, "GET", "/system/logs", params=params, stream=True, timeout=(10, 60)) as response:
        if response.status_code >= 400:
            return refused(args, response, args.name)
        for line in response.iter_lines(chunk_size=None):   # each line as it arrives
            if line.strip():
                message = json.loads(line)
                print(f"{message['instance']} {message['text']}", flush=True)
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
