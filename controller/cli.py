"""`sllm-faas controller | status | place`: run the placement controller, or inspect what it sees.

`status` and `place` read Redis directly (as redis-cli would), so they work whether or not a controller
is running; `place` ranks without booking anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from sllm_faas.common import settings as common
from sllm_faas.common.redis_client import connect
from sllm_faas.common.settings import setting
from sllm_faas.common.tiers import Tier


@dataclass(frozen=True, kw_only=True)
class StatusSettings:
    """`status`, `place` and `migrate` read the cluster's Redis as the controller does."""

    redis_url: str = setting("REDIS_URL", "the cluster's Redis", common.DEFAULT_REDIS_URL)
    key_prefix: str = setting("SLLM_KEY_PREFIX", "Redis key prefix", common.DEFAULT_KEY_PREFIX)


@dataclass(frozen=True, kw_only=True)
class PlaceSettings(StatusSettings):
    model_store: str = setting("SLLM_CONTROLLER_MODEL_STORE", "read the size from this model store (dir or URL) when "
                               "Redis does not know it", "")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "controller":
        from sllm_faas.controller.config import add_arguments as add_config

        add_config(parser)
        return
    common.add_arguments(parser, PlaceSettings if verb == "place" else StatusSettings)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    if verb == "place":
        parser.add_argument("model", help="model name")
        parser.add_argument("--size-bytes", type=int, help="model size, when no loader has seen the model yet")


def run(args: argparse.Namespace) -> int:
    if args.verb == "controller":
        return run_controller(args)
    import redis

    from sllm_faas.controller.cluster import ClusterCache, read_cluster
    from sllm_faas.redis_schema.keys import Keys

    try:
        settings = common.resolve(PlaceSettings if args.verb == "place" else StatusSettings,
                                  common.given(args, PlaceSettings))
    except common.SettingsError as exc:
        print(f"sllm-faas {args.verb}: {exc}", file=sys.stderr)
        return 2
    client = connect(settings.redis_url, timeout_s=5)
    keys = Keys(settings.key_prefix)
    try:
        if args.verb == "status":
            return print_status(read_cluster(client, keys), client, keys, args.json)
        from sllm_faas.controller.booking import Booker
        from sllm_faas.controller.placement import Placer, UnknownModel

        placer = Placer(client, keys, ClusterCache(client, keys), Booker(client, keys),
                        settings.model_store or None)
        try:
            ranked = placer.estimate(args.model, args.size_bytes)
        except (UnknownModel, ValueError) as exc:
            print(f"sllm-faas place: {exc}", file=sys.stderr)
            return 1
        plans = [d.plan().as_json() for d in ranked]
        if args.json:
            print(json.dumps({"model": args.model, "ranked": plans}, indent=2))
        else:
            print_table(["rank", "node", "estimate_s", "action", "tier", "load_s", "migrate", "to"],
                        [[i + 1, p["node"], _seconds(p["estimate_s"]), p["action"], p["tier"], _seconds(p["load_s"]),
                          p.get("instance", ""), p.get("to", "")] for i, p in enumerate(plans)])
        return 0 if ranked and ranked[0].feasible else 1
    except redis.RedisError as exc:
        print(f"sllm-faas {args.verb}: Redis unavailable at {settings.redis_url}: {exc}", file=sys.stderr)
        return 1


def run_controller(args: argparse.Namespace) -> int:
    from sllm_faas.controller.config import resolve

    try:
        config = resolve(args)
    except ValueError as exc:
        print(f"sllm-faas controller: {exc}", file=sys.stderr)
        return 2
    os.environ["SLLM_CONTROLLER_CONFIG"] = config.to_env()
    from sllm_faas.common.http_server import run as run_http

    tls = []
    if config.tls_cert:
        tls = ["--certfile", config.tls_cert, "--keyfile", config.tls_key]
        if config.client_ca:
            tls += ["--ca-certs", config.client_ca, "--cert-reqs", "2"]  # ssl.CERT_REQUIRED
    run_http(["--bind", f"{config.host}:{config.port}", "--workers", str(config.workers), "--threads", "8",
              "--graceful-timeout", "10", *tls, "sllm_faas.controller.service:create_app()"])
    return 0


def _seconds(value) -> str:
    return "inf" if value is None else f"{value:.3f}"


def _size(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_status(view, client, keys, as_json: bool) -> int:
    from sllm_faas.controller.cluster import read_migrations

    migrations = read_migrations(client, keys)
    now = time.time()
    if as_json:
        print(json.dumps({**view.as_dict(), "migrations": migrations}, indent=2))
        return 0
    print("NODES")
    print_table(["node", "slots free", "queue s", "bw remote/ssd/dram GB/s", "ssd used", "dram used", "heartbeat"],
                [[n.id, f"{n.free_slots}/{view.nodes[n.id].slots}", f"{n.queue_wait_s:.2f}",
                  "/".join("-" if not n.bandwidth.get(t) else f"{n.bandwidth[t] / 1e9:.2f}"
                           for t in (Tier.REMOTE, Tier.SSD, Tier.DRAM)),
                  _size(view.nodes[n.id].used[Tier.SSD]), _size(view.nodes[n.id].used[Tier.DRAM]),
                  f"{now - view.nodes[n.id].heartbeat_at:.1f}s ago"] for n in view.snapshot.nodes])
    print("\nMODELS BY TIER")
    print_table(["node", "tier", "model", "size"],
                [[n.id, tier, model, _size(view.snapshot.models[model].size_bytes)
                  if model in view.snapshot.models else "?"]
                 for n in view.snapshot.nodes for model, tier in sorted(n.tier_of.items())])
    print("\nQUEUES")
    print_table(["node", "load", "finishes in s"],
                [[node, member, f"{score - now:.2f}"] for node, queue in view.queues.items()
                 for member, score in queue])
    print("\nINSTANCES")
    print_table(["instance", "node", "model", "state", "active", "tokens", "address"],
                [[i.id, i.node, i.model, i.state, i.active, i.tokens, i.address] for i in view.instances.values()])
    print(f"\nWAITING FOR GPUS ({view.snapshot.pending} callers; they price migrations)")
    print_table(["model/function/caller"], [[member] for member in sorted(view.waiting)])  # members are not parsed
    print("\nMIGRATIONS")
    print_table(["migration", "state", "source", "destination", "request"],
                [[m["id"], m.get("state", ""), m.get("source", ""), m.get("destination", ""), m.get("request", "")]
                 for m in migrations])
    for key, problem in view.skipped.items():
        print(f"warning: skipped {key}: {problem}", file=sys.stderr)
    return 0
