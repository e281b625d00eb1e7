"""The schema version key and the upgrades from older versions.

Writers call `ensure_schema` at start: it records the version on a fresh Redis, upgrades data written by
an older version in place (under a lock, so concurrent controllers upgrade once), and refuses data from
a newer version rather than misreading it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from sllm_faas.redis_schema.keys import SCHEMA_VERSION, Keys


class SchemaError(RuntimeError):
    pass


def _upgrade_1_to_2(client: redis.Redis, keys: Keys) -> None:
    """Version 2 counts slots: node records gain `slots` (one per GPU, or 1 without GPUs), which the
    slot ledger (`node:<node>:slots`) is checked against."""
    for node in client.smembers(keys.nodes):
        key = keys.node(node)
        record = client.hgetall(key)
        if record and "slots" not in record:
            gpus = json.loads(record.get("gpus") or "[]")
            client.hset(key, "slots", str(len(gpus) or 1))


UPGRADES: dict[int, Callable[[redis.Redis, Keys], None]] = {1: _upgrade_1_to_2}


def ensure_schema(client: redis.Redis, keys: Keys) -> int:
    """The version the data is at after this call (always SCHEMA_VERSION, or SchemaError)."""
    if client.set(keys.schema_version, SCHEMA_VERSION, nx=True) or client.get(keys.schema_version) == str(
            SCHEMA_VERSION):
        return SCHEMA_VERSION  # the usual case: no lock taken
    with client.lock(keys.schema_lock, timeout=60, blocking_timeout=60):
        raw = client.get(keys.schema_version)
        try:
            version = int(raw)
        except (TypeError, ValueError):
            raise SchemaError(f"{keys.schema_version} holds {raw!r}, not a version number") from None
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{keys.schema_version} is {version}: written by a newer sllm-faas; this one knows "
                              f"up to version {SCHEMA_VERSION}")
        while version < SCHEMA_VERSION:
            UPGRADES[version](client, keys)
            version += 1
            client.set(keys.schema_version, version)
    return version
