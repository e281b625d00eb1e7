"""Decoding of the records in Redis (SCHEMA.md) into typed values, in one place, so the controller,
the CLI and the tests read fields the same way. Missing or malformed fields raise RecordError naming
the key and field; an empty bandwidth means "not measured yet"."""

from __future__ import annotations

import json
from dataclasses import dataclass


class RecordError(ValueError):
    def __init__(self, key: str, field: str, problem: str) -> None:
        super().__init__(f"{key}: field {field!r} {problem}")
        self.key, self.field = key, field


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

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> NodeRecord:
        bandwidth = {tier: _number(record, key, f"bw_{tier}", default=0.0) or None
                     for tier in ("remote", "ssd", "dram", "gpu")}
        try:
            gpus = json.loads(record.get("gpus") or "[]")
        except json.JSONDecodeError:
            raise RecordError(key, "gpus", "is not JSON") from None
        if not isinstance(gpus, list):
            raise RecordError(key, "gpus", "is not a JSON list")
        return cls(node_id=record.get("node_id") or key.rsplit(":", 1)[-1], address=record.get("address", ""),
                   heartbeat_at=_number(record, key, "heartbeat_at"),
                   slots=_number(record, key, "slots", int, default=len(gpus) or 1),
                   bandwidth=bandwidth,
                   capacity={t: _number(record, key, f"{t}_capacity", int, default=0) for t in ("ssd", "dram", "gpu")},
                   used={t: _number(record, key, f"{t}_used", int, default=0) for t in ("ssd", "dram", "gpu")},
                   gpus=gpus)


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

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> InstanceRecord:
        for field in ("id", "node", "model", "state"):
            if not record.get(field):
                raise RecordError(key, field, "is missing")
        return cls(id=record["id"], node=record["node"], model=record["model"], function=record.get("function", ""),
                   address=record.get("address", ""), state=record["state"],
                   active=_number(record, key, "active", int, default=0),
                   tokens=_number(record, key, "tokens", int, default=0),
                   decode_tokens_per_s=_number(record, key, "decode_tokens_per_s", default=0.0),
                   prefill_tokens_per_s=_number(record, key, "prefill_tokens_per_s", default=0.0),
                   heartbeat_at=_number(record, key, "heartbeat_at"))
