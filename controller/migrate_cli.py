"""`sllm-faas migrate`: move in-flight generations between function instances, live.

    sllm-faas migrate SOURCE --list                      the requests in flight on SOURCE
    sllm-faas migrate SOURCE REQUEST_ID [--to DEST]      migrate one request (its OpenAI response id)
    sllm-faas migrate SOURCE --all [--to DEST]           migrate all of them, then release SOURCE's model
    sllm-faas migrate --recover                          finish or abort migrations whose coordinator died
    sllm-faas migrate --show MIGRATION_ID                print a migration's record

SOURCE and DEST are base URLs (http://10.0.0.5:8080) or registered instance ids; without --to, a ready
instance of the same model with a free slot is picked from Redis. The state machine is kept in Redis
(`sllm:migration:<id>`), as the controller keeps it.
"""

from __future__ import annotations

import argparse
import json
import sys

from sllm_faas.common import settings as common
from sllm_faas.common.redis_client import connect
from sllm_faas.controller.cli import StatusSettings


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("source", nargs="?", help="the instance the request runs on: base URL or instance id")
    parser.add_argument("request", nargs="?", help="the request to migrate: the id its client sees (cmpl-..., "
                                                   "chatcmpl-...)")
    parser.add_argument("--to", dest="destination", help="the destination: base URL or instance id (default: the "
                                                          "ready instance of the same model with most free slots)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the requests in flight on SOURCE")
    what.add_argument("--all", action="store_true", help="migrate every running request of SOURCE, then release "
                                                         "its model (unless --keep-model)")
    what.add_argument("--recover", action="store_true", help="take over migrations whose coordinator died "
                                                             "(lease lapsed) and finish or abort them")
    what.add_argument("--show", metavar="MIGRATION_ID", help="print one migration's record")
    parser.add_argument("--release", action="store_true", help="release SOURCE's model once no request is left")
    parser.add_argument("--keep-model", action="store_true", help="with --all: keep SOURCE's model loaded")
    parser.add_argument("--threshold", type=int, default=20,
                        help="hand over once fewer new tokens than this remain to send (default 20)")
    parser.add_argument("--max-rounds", type=int, default=8, help="hand over after this many rounds (default 8)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="longest wait for a round's prefill at the destination (default 30)")
    parser.add_argument("--handover-timeout-s", type=float, default=5.0,
                        help="longest pause at the handover, and longest silence while relaying (default 5)")
    parser.add_argument("--lease-s", type=float, default=10.0,
                        help="this coordinator's lease on the record; another takes over when it lapses (default 10)")
    common.add_arguments(parser, StatusSettings)   # --redis-url, --key-prefix, as `status` reads them
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import redis
    import requests

    from sllm_faas.controller.migration import Migrator, NoDestination
    from sllm_faas.redis_schema.keys import Keys
    from sllm_faas.runtime.migration.record import StateConflict

    needs_source = not (args.recover or args.show)
    if needs_source and not args.source:
        print("sllm-faas migrate: SOURCE is required (or --recover, --show)", file=sys.stderr)
        return 2
    if needs_source and not (args.list or args.all or args.request):
        print("sllm-faas migrate: give a REQUEST_ID, --all or --list", file=sys.stderr)
        return 2
    try:
        settings = common.resolve(StatusSettings, common.given(args, StatusSettings))
    except common.SettingsError as exc:
        print(f"sllm-faas migrate: {exc}", file=sys.stderr)
        return 2
    client = connect(settings.redis_url, timeout_s=5)
    migrator = Migrator(client, Keys(settings.key_prefix), lease_s=args.lease_s)
    options = {"threshold": args.threshold, "max_rounds": args.max_rounds, "timeout_s": args.timeout_s,
               "handover_timeout_s": args.handover_timeout_s}
    try:
        if args.list:
            return _print(migrator.in_flight(args.source), args.json, ("id", "state", "prompt_tokens",
                                                                        "completion_tokens", "migration"))
        if args.show:
            record = migrator.get(args.show)
            if not record:
                print(f"sllm-faas migrate: no migration {args.show!r}", file=sys.stderr)
                return 1
            return _print([record], args.json, RECORD_COLUMNS, events=True)
        if args.recover:
            records = migrator.recover()
        elif args.all:
            records = migrator.drain(args.source, args.destination, release=not args.keep_model, **options)
        else:
            records = [migrator.migrate(args.source, args.request, args.destination, release=args.release,
                                        **options)]
    except (LookupError, ValueError, StateConflict) as exc:  # NoDestination is a LookupError
        kind = "no destination" if isinstance(exc, NoDestination) else "error"
        print(f"sllm-faas migrate: {kind}: {exc}", file=sys.stderr)
        return 1
    except (redis.RedisError, requests.RequestException) as exc:
        print(f"sllm-faas migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _print(records, args.json, RECORD_COLUMNS)
    return 0 if all(r.get("state") == "completed" for r in records) else 1


RECORD_COLUMNS = ("id", "state", "outcome", "request", "source", "destination", "rounds", "tokens_recomputed",
                  "pause_s", "duration_s", "incident", "error")


def _print(rows: list[dict], as_json: bool, columns: tuple[str, ...], events: bool = False) -> int:
    if as_json:
        print(json.dumps([{**r, "events": json.loads(r["events"])} if "events" in r else r for r in rows], indent=2))
        return 0
    from sllm_faas.controller.cli import print_table

    print_table(list(columns), [[_cell(r.get(c)) for c in columns] for r in rows])
    for row in rows if events else []:
        for event in json.loads(row.get("events") or "[]"):
            print(f"  {event['t']:.3f}  {event['state']:<12} {event['by']}: {event['detail']}")
    return 0


def _cell(value) -> str:
    return "" if value is None else str(value)
