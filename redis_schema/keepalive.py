"""`sllm:keepalive:<model>` (SCHEMA.md): the controller's keep-alive decision for one model, as a typed value
encoded and decoded here only. The controller writes it when the model goes idle; every node loader reads the
decisions of the models it holds, to order its evictions and to pre-stage a checkpoint before a predicted arrival.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from sllm_faas.common.tiers import Tier
from sllm_faas.redis_schema.keys import Keys
from sllm_faas.redis_schema.records import RecordError, _number, _time

log = logging.getLogger("sllm.keepalive")
EXPIRE_AFTER_S = 60.0  # a decision stays readable this long after its window ends


@dataclass(frozen=True)
class KeepAliveRecord:
    model: str
    node: str            # where the model last ran: the node that keeps it warm and pre-stages it ("" = any holder)
    tier: Tier           # GPU: the idle instance is kept; DRAM: its GPUs go at once, the checkpoint waits in DRAM
    keep_s: float        # how long an instance stays idle (after the pre-warm, if any)
    prewarm_s: float     # after idle_since: be ready again by then (0: no pre-warm, the instance is kept)
    restart_s: float     # what bringing an instance back costs (container start + load from DRAM)
    idle_since: float    # unix time the model's last request ended
    hold_s: float = 0.0  # keep the checkpoint in DRAM this long after idle_since, if past the window (a tail model)

    @property
    def hold_until(self) -> float:
        """Until when the policy wants the model warm: its checkpoint is evicted after those held for less."""
        return self.idle_since + max(self.prewarm_s + self.keep_s, self.hold_s)

    @property
    def prestage_at(self) -> float | None:
        """When to start bringing the checkpoint to DRAM so that an instance is ready by the pre-warm."""
        return self.idle_since + self.prewarm_s - self.restart_s if self.prewarm_s > 0 else None

    def to_hash(self) -> dict[str, str]:
        prestage = self.prestage_at
        return {"model": self.model, "node": self.node, "tier": str(self.tier), "keep_s": f"{self.keep_s:.3f}",
                "prewarm_s": f"{self.prewarm_s:.3f}", "restart_s": f"{self.restart_s:.3f}",
                "hold_s": f"{self.hold_s:.3f}",
                "idle_since": _time(self.idle_since), "hold_until": _time(self.hold_until),
                "prestage_at": "" if prestage is None else _time(prestage)}

    @classmethod
    def from_hash(cls, key: str, record: dict[str, str]) -> KeepAliveRecord:
        if not record.get("model"):
            raise RecordError(key, "model", "is missing")
        try:
            tier = Tier.parse(record.get("tier"), "keep-alive tier")
        except ValueError as exc:
            raise RecordError(key, "tier", str(exc)) from None
        if tier not in (Tier.GPU, Tier.DRAM):
            raise RecordError(key, "tier", f"must be gpu or dram, not {record.get('tier')!r}")
        return cls(model=record["model"], node=record.get("node", ""), tier=tier,
                   keep_s=_number(record, key, "keep_s"), prewarm_s=_number(record, key, "prewarm_s"),
                   restart_s=_number(record, key, "restart_s"), idle_since=_number(record, key, "idle_since"),
                   hold_s=_number(record, key, "hold_s"))


def eviction_key(hold_until: float, now: float, last_used: float) -> tuple[bool, float, float]:
    """Sort key of a checkpoint in a tier, evicted first = smallest: the ones no decision wants warm (`hold_until`
    past), least recently used first; then the held ones, the soonest-ending wish first. The node loaders' order and
    the simulator's, one function."""
    held = hold_until > now
    return held, hold_until if held else 0.0, last_used


def publish(client: redis.Redis, keys: Keys, records: Iterable[KeepAliveRecord]) -> int:
    """Write each decision over the model's previous one, expiring EXPIRE_AFTER_S after its window; returns how many."""
    pipe, count = client.pipeline(transaction=False), 0
    for record in records:
        key = keys.keepalive(record.model)
        pipe.delete(key)
        pipe.hset(key, mapping=record.to_hash())
        pipe.expireat(key, int(record.hold_until + EXPIRE_AFTER_S) + 1)
        count += 1
    if count:
        pipe.execute()
    return count


def read(client: redis.Redis, keys: Keys, models: Iterable[str]) -> dict[str, KeepAliveRecord]:
    """The decisions published for `models` (one round trip); a model without one is left out, and so is one with a
    malformed record (logged with its key and field: the reader falls back to its LRU order for it)."""
    models = list(models)
    if not models:
        return {}
    pipe = client.pipeline(transaction=False)
    for model in models:
        pipe.hgetall(keys.keepalive(model))
    decisions = {}
    for model, record in zip(models, pipe.execute(), strict=True):
        if record:
            try:
                decisions[model] = KeepAliveRecord.from_hash(keys.keepalive(model), record)
            except RecordError as exc:
                log.warning("ignoring a keep-alive decision: %s", exc)
    return decisions
