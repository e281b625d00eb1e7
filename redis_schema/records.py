"""The records in Redis (SCHEMA.md) as typed values, each encoded (`to_hash`) and decoded (`from_hash`) here
only, so the loader, the runtime, the gateway, the controller and the CLI write and read fields the same way.
Missing or malformed fields raise RecordError naming the key and field; an empty bandwidth means "not
measured yet"."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from sllm_faas.common.tiers import HELD, SLOWEST_FIRST
from sllm_faas.redis_schema.keys import SCHEMA_VERSION


class RecordError(ValueError):
    def __init__(self, key: str, field: str, problem: str) -> None:
        super().__init__(f"{key}: field {field!r} {problem}")
        self.key, self.field = key, field


def _time(value: float) -> str:
    return f"{value:.3f}"


def _json(record: dict[str, str], key: str, name: str, kind: type, default: str) -> Any:
    """The JSON value of field `name`, which must be a `kind` (list or dict)."""
    try:
        value = json.loads(record.get(name) or default)
    except json.JSONDecodeError:
        raise RecordError(key, name, "is not JSON") from None
    if not isinstance(value, kind):
        raise RecordError(key, name, f"is not a JSON {kind.__name__}")
    return value


def _number(record: dict[str, str], key: str, field: str, kind=float, default=None):
    raw = record.get(field)
    if raw is None or raw == "":
        if default is None:
            raise RecordError(key, field, "is missing")
        return default
    try:
        return kind(raw)
    except ValueError:
        raise RecordError(key, field, f"is not a number: {raw[:40]!r}") from None


# field names per tier, formatted once (a node record is decoded per node and read, ~1,000 a second)
_BANDWIDTH_FIELDS = tuple((tier, f"bw_{tier.value}") for tier in SLOWEST_FIRST)
_HELD_FIELDS = tuple((tier, f"{tier.value}_capacity", f"{tier.value}_used") for tier in HELD)


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    address: str
    heartbeat_at: float
    slots: int
    bandwidth: dict[str, float | None]  # tier -> bytes/s; None = not measured yet
    capacity: dict[str, int]
    used: dict[str, int]
    gpus: list
    queue_length: int = 0  # staging jobs queued or running
    remote: str = ""       # the loader's model store

    def to_hash(self) -> dict[str, str]:
        """`sllm:node:<node>`, as the loader publishes it every heartbeat."""
        record = {"node_id": self.node_id, "address": self.address, "heartbeat_at": _time(self.heartbeat_at),
                  "schema_version": str(SCHEMA_VERSION), "queue_length": str(self.queue_length),
                  "gpus": json.dumps(self.gpus), "remote": self.remote, "slots": str(self.slots)}
        for tier in HELD:
            record[f"{tier}_capacity"] = str(self.capacity.get(tier, 0))
            record[f"{tier}_used"] = str(self.used.get(tier, 0))
        for tier in SLOWEST_FIRST:
            rate = self.bandwidth.get(tier)
            record[f"bw_{tier}"] = "" if rate is None else f"{rate:.0f}"  # bytes/s; empty = not measured yet
        return record

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> NodeRecord:
        bandwidth = {tier: _number(record, key, name, default=0.0) or None for tier, name in _BANDWIDTH_FIELDS}
        gpus = _json(record, key, "gpus", list, "[]")
        return cls(node_id=record.get("node_id") or key.rsplit(":", 1)[-1], address=record.get("address", ""),
                   heartbeat_at=_number(record, key, "heartbeat_at"),
                   slots=_number(record, key, "slots", int, default=len(gpus) or 1),
                   bandwidth=bandwidth,
                   capacity={t: _number(record, key, name, int, default=0) for t, name, _ in _HELD_FIELDS},
                   used={t: _number(record, key, name, int, default=0) for t, _, name in _HELD_FIELDS},
                   gpus=gpus, queue_length=_number(record, key, "queue_length", int, default=0),
                   remote=record.get("remote", ""))


@dataclass(frozen=True)
class InstanceRecord:
    id: str
    node: str
    model: str
    function: str
    address: str
    state: str
    active: int
    tokens: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    heartbeat_at: float
    slots: int = 1           # requests it generates at once
    started_at: float = 0.0  # process start

    def to_hash(self) -> dict[str, str]:
        """`sllm:instance:<id>`, as the instance publishes it every heartbeat."""
        return {"id": self.id, "node": self.node, "address": self.address, "function": self.function,
                "started_at": _time(self.started_at), "heartbeat_at": _time(self.heartbeat_at),
                "state": self.state, "model": self.model, "slots": str(self.slots), "active": str(self.active),
                "tokens": str(self.tokens), "decode_tokens_per_s": f"{self.decode_tokens_per_s:.1f}",
                "prefill_tokens_per_s": f"{self.prefill_tokens_per_s:.1f}"}

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> InstanceRecord:
        for name in ("id", "node", "model", "state"):
            if not record.get(name):
                raise RecordError(key, name, "is missing")
        return cls(id=record["id"], node=record["node"], model=record["model"], function=record.get("function", ""),
                   address=record.get("address", ""), state=record["state"],
                   active=_number(record, key, "active", int, default=0),
                   tokens=_number(record, key, "tokens", int, default=0),
                   decode_tokens_per_s=_number(record, key, "decode_tokens_per_s", default=0.0),
                   prefill_tokens_per_s=_number(record, key, "prefill_tokens_per_s", default=0.0),
                   heartbeat_at=_number(record, key, "heartbeat_at"),
                   slots=_number(record, key, "slots", int, default=1),
                   started_at=_number(record, key, "started_at", default=0.0))


@dataclass(frozen=True)
class ModelRecord:
    """`sllm:model:<model>`: a checkpoint's size and layout, from its manifest."""

    size_bytes: int
    partitions: int
    format_version: int

    @classmethod
    def of(cls, manifest: Any) -> ModelRecord:
        """The record of a checkpoint manifest (runtime/checkpoint/format.py's Manifest; not imported here,
        so the schema stays below the runtime)."""
        return cls(manifest.total_bytes, len(manifest.partitions), manifest.version)

    def to_hash(self) -> dict[str, str]:
        return {"size_bytes": str(self.size_bytes), "partitions": str(self.partitions),
                "format_version": str(self.format_version)}

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> ModelRecord:
        return cls(size_bytes=_number(record, key, "size_bytes", int),
                   partitions=_number(record, key, "partitions", int, default=0),
                   format_version=_number(record, key, "format_version", int, default=0))


@dataclass
class FunctionRecord:
    """`sllm:function:<name>`: one function deployed to the local gateway (whose Function extends it with
    its live state)."""

    model: str
    build: str
    image: str = ""
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def to_hash(self) -> dict[str, str]:
        return {"model": self.model, "build": self.build, "image": self.image, "env": json.dumps(self.env),
                "labels": json.dumps(self.labels), "annotations": json.dumps(self.annotations),
                "created_at": _time(self.created_at)}

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> FunctionRecord:
        for name in ("model", "build"):
            if not record.get(name):
                raise RecordError(key, name, "is missing")
        return cls(model=record["model"], build=record["build"], image=record.get("image", ""),
                   env=_json(record, key, "env", dict, "{}"), labels=_json(record, key, "labels", dict, "{}"),
                   annotations=_json(record, key, "annotations", dict, "{}"),
                   created_at=_number(record, key, "created_at"))


@dataclass(frozen=True)
class Event:
    """One entry of the `sllm:events` stream: what happened (`kind`) to which model in which tier of which
    node, when, and the kind's own fields (SCHEMA.md lists them)."""

    node: str
    kind: str
    model: str
    tier: str
    ts: float
    fields: dict[str, str] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        return {"node": self.node, "kind": self.kind, "model": self.model, "tier": str(self.tier),
                "ts": _time(self.ts), **{name: str(value) for name, value in self.fields.items()}}

    @classmethod
    def from_fields(cls, entry_id: str, entry: dict[str, str]) -> Event:
        key = f"events entry {entry_id}"
        for name in ("node", "kind", "model", "tier"):
            if name not in entry:
                raise RecordError(key, name, "is missing")
        common = {"node", "kind", "model", "tier", "ts"}
        return cls(entry["node"], entry["kind"], entry["model"], entry["tier"], _number(entry, key, "ts"),
                   {name: value for name, value in entry.items() if name not in common})


MIGRATION_LIVE = ("pending", "started", "transferring")
MIGRATION_TERMINAL = ("completed", "aborted", "failed")


@dataclass(frozen=True)
class MigrationEvent:
    """One entry of a migration record's `events` list: a transition or an incident."""

    t: float
    state: str
    by: str
    detail: str

    def to_json(self) -> str:
        """Compact JSON, appended to the list by the record's Lua scripts (runtime/migration/record.py)."""
        return json.dumps({"t": round(self.t, 3), "state": self.state, "by": self.by, "detail": self.detail},
                          separators=(",", ":"))


@dataclass(frozen=True)
class MigrationRecord:
    """`sllm:migration:<id>`: one migration's state machine. Every field is written at creation; the outcome
    fields stay empty (None here) until known."""

    id: str
    state: str
    owner: str
    lease_until: float
    created_at: float
    updated_at: float
    request: str = ""
    source: str = ""
    destination: str = ""
    source_instance: str = ""
    destination_instance: str = ""
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0
    tokens_recomputed: int = 0
    pause_s: float | None = None
    duration_s: float | None = None
    same_numerics: bool | None = None
    outcome: str = ""
    error: str = ""
    incident: str = ""
    incident_at: float | None = None
    events: tuple[MigrationEvent, ...] = ()

    def to_hash(self) -> dict[str, str]:
        fields = {name: value for name, value in vars(self).items() if name != "events"}
        return {**self.encode_fields(**fields), "events": "[" + ",".join(e.to_json() for e in self.events) + "]"}

    @staticmethod
    def encode_fields(**fields: Any) -> dict[str, str]:
        """Some fields of the record as stored (a transition writes only those it changes): times to the
        millisecond, `same_numerics` as 1/0, `options` as JSON, None as empty."""
        encoded = {}
        for name, value in fields.items():
            if value is None:
                encoded[name] = ""
            elif name in ("lease_until", "created_at", "updated_at", "incident_at"):
                encoded[name] = _time(float(value))
            elif name == "same_numerics":
                encoded[name] = "1" if value else "0"
            elif name == "options":
                encoded[name] = json.dumps(value)
            else:
                encoded[name] = str(value)
        return encoded

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> MigrationRecord:
        for name in ("id", "state"):
            if not record.get(name):
                raise RecordError(key, name, "is missing")

        def optional(name: str) -> float | None:
            return _number(record, key, name) if record.get(name) else None

        events = _json(record, key, "events", list, "[]")
        try:
            parsed = tuple(MigrationEvent(e["t"], e["state"], e["by"], e["detail"]) for e in events)
        except (KeyError, TypeError):
            raise RecordError(key, "events", "holds an entry without t, state, by and detail") from None
        texts = ("owner", "request", "source", "destination", "source_instance", "destination_instance", "reason",
                 "outcome", "error", "incident")
        return cls(id=record["id"], state=record["state"], **{name: record.get(name, "") for name in texts},
                   lease_until=_number(record, key, "lease_until", default=0.0),
                   created_at=_number(record, key, "created_at", default=0.0),
                   updated_at=_number(record, key, "updated_at", default=0.0),
                   options=_json(record, key, "options", dict, "{}"),
                   rounds=_number(record, key, "rounds", int, default=0),
                   tokens_recomputed=_number(record, key, "tokens_recomputed", int, default=0),
                   pause_s=optional("pause_s"), duration_s=optional("duration_s"),
                   same_numerics=None if not record.get("same_numerics") else record["same_numerics"] == "1",
                   incident_at=optional("incident_at"), events=parsed)
