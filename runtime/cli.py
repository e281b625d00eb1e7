"""`sllm-faas VERB ...`: one entry point for every user action.

Each verb lives in its own module with `add_arguments(parser)` and `run(args) -> int`; modules are
imported only for the verb that runs, so `sllm-faas --help` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module under sllm_faas, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "doctor": ("runtime.doctor", "check this machine: torch, CUDA, GPUs, /dev/shm, O_DIRECT, Redis"),
    "convert": ("runtime.checkpoint.cli", "convert a safetensors file or HF folder to the sllm checkpoint format"),
    "inspect": ("runtime.checkpoint.cli", "summarise a converted checkpoint: tensors, dtypes, partitions"),
    "verify": ("runtime.checkpoint.cli", "check every partition checksum of a converted checkpoint"),
    "serve": ("runtime.server.serve", "run the function runtime (OpenAI-compatible API) for one model"),
    "loader": ("runtime.node_loader.cli", "run the node loader sidecar: stage models into SSD/DRAM/GPU tiers"),
    "simulate": ("controller.simulator.cli", "replay a cluster scenario's trace under each placement policy"),
    "controller": ("controller.cli", "run the placement controller: placement API, scheduler extender, webhook"),
    "status": ("controller.cli", "show nodes, tiers, queues, instances, callers waiting for GPUs, migrations"),
    "place": ("controller.cli", "show the ranked startup-time estimate for a model (books nothing)"),
    "migrate": ("controller.migrate_cli", "move in-flight generations to another instance, live; --list, --recover"),
    "up": ("runtime.local.cli", "run everything on this machine: Redis, controller, N node loaders, gateway"),
    "deploy": ("runtime.local.cli", "deploy the functions of an OpenFaaS stack file to the gateway"),
    "invoke": ("runtime.local.cli", "call a function through the gateway (body from stdin)"),
    "list": ("runtime.local.cli", "list the functions deployed to the gateway: invocations, replicas"),
    "describe": ("runtime.local.cli", "describe a function: status, replicas, labels, its instances and cold starts"),
    "logs": ("runtime.local.cli", "print a function's instance logs (--tail N, --follow)"),
    "remove": ("runtime.local.cli", "remove functions from the gateway (by name, or those of a stack file)"),
}


def version() -> str:
    """The installed package's version, or "unknown" when run from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("sllm-faas")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sllm-faas", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_module, summary) in VERBS.items():
        sub.add_parser(verb, help=summary, description=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] not in VERBS:
        parser.parse_args(argv or ["--help"])
        return 2
    verb = argv[0]
    module = importlib.import_module("sllm_faas." + VERBS[verb][0])
    verb_parser = argparse.ArgumentParser(prog=f"sllm-faas {verb}", description=VERBS[verb][1])
    module.add_arguments(verb_parser, verb)
    args = verb_parser.parse_args(argv[1:])
    args.verb = verb
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
