"""The scheduler core: a pure function from a cluster snapshot to ranked placement decisions.

No I/O happens here, so the controller, the tests and the trace-driven simulator run the same
code. Startup-time estimates follow ServerlessLLM (OSDI'24, section 6):

    load(n)      = q_n + size / b_n(tier holding the model on n)
    migrate(i)   = a * (t_in + t_out) + b       # the destination recomputes i's KV cache from tokens
    startup(n)   = load(n)                       if n has a free slot
                 = migrate(i) + load(n)          if instance i must first move off n to node m (m != n)

Unlike the reference implementation, every node counts (remote-only ones load from the store at the
remote bandwidth), and bandwidths are the ones each node measured, never a constant. A bandwidth a
node has not measured yet borrows the median of the nodes that have; if none has, that tier costs
infinity and such nodes rank last. Ties break by node id, so the ranking is deterministic.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

TIERS = ("gpu", "dram", "ssd", "remote")  # fastest first


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size_bytes: int
    prefill_tokens_per_s: float | None = None  # measured prefill speed: fits a and b of the migration cost
    migration_overhead_s: float = 0.05          # b: fixed cost of a migration round trip


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    node: str
    model: str
    tokens: int  # t_in + t_out so far
    migratable: bool = True


@dataclass(frozen=True)
class NodeInfo:
    id: str
    free_slots: int
    tier_of: dict[str, str] = field(default_factory=dict)  # model -> fastest tier holding it on this node
    bandwidth: dict[str, float | None] = field(default_factory=dict)  # tier -> bytes/s out of that tier
    queue_wait_s: float = 0.0  # q: until the node's loading queue drains

    def tier(self, model: str) -> str:
        return self.tier_of.get(model, "remote")


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeInfo, ...]
    models: dict[str, ModelInfo]
    instances: tuple[InstanceInfo, ...] = ()


@dataclass(frozen=True)
class Decision:
    node: str
    estimate_s: float
    tier: str                      # where the model loads from on `node`
    load_s: float
    migrate: str | None = None     # instance to move off `node` first
    migrate_to: str | None = None
    migrate_s: float = 0.0

    def plan(self) -> dict:
        plan = {"action": "migrate_then_load" if self.migrate else "load", "node": self.node, "tier": self.tier,
                "estimate_s": _finite(self.estimate_s), "load_s": _finite(self.load_s)}
        if self.migrate:
            plan.update(instance=self.migrate, to=self.migrate_to, migrate_s=_finite(self.migrate_s))
        return plan


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 6)


def cluster_bandwidths(nodes: tuple[NodeInfo, ...]) -> dict[str, float | None]:
    """Median measured bandwidth per tier: the stand-in for nodes that have not measured a tier yet."""
    medians: dict[str, float | None] = {}
    for tier in TIERS:
        measured = [n.bandwidth[tier] for n in nodes if n.bandwidth.get(tier)]
        medians[tier] = statistics.median(measured) if measured else None
    return medians


def load_time(node: NodeInfo, model: ModelInfo, fallback: dict[str, float | None]) -> tuple[float, str]:
    """(q + size / b of the tier holding the model on `node`, that tier)."""
    tier = node.tier(model.name)
    if tier == "gpu":
        return node.queue_wait_s, tier  # resident already: nothing to move
    rate = node.bandwidth.get(tier) or fallback.get(tier)
    if not rate:
        return math.inf, tier
    return node.queue_wait_s + model.size_bytes / rate, tier


def migration_time(instance: InstanceInfo, model: ModelInfo) -> float:
    """a * tokens + b: the destination re-prefills the instance's tokens (the KV cache is not sent)."""
    if not model.prefill_tokens_per_s:
        return math.inf
    return instance.tokens / model.prefill_tokens_per_s + model.migration_overhead_s


def rank(snapshot: Snapshot, model_name: str) -> list[Decision]:
    """Every node, best (lowest estimated startup time) first."""
    model = snapshot.models[model_name]
    fallback = cluster_bandwidths(snapshot.nodes)
    decisions = []
    for node in snapshot.nodes:
        load_s, tier = load_time(node, model, fallback)
        if node.free_slots > 0:
            decisions.append(Decision(node.id, load_s, tier, load_s))
            continue
        best = _cheapest_migration(snapshot, node, fallback)
        if best is None:
            decisions.append(Decision(node.id, math.inf, tier, load_s))
            continue
        instance, target, cost = best
        decisions.append(Decision(node.id, cost + load_s, tier, load_s, instance.id, target, cost))
    return sorted(decisions, key=lambda d: (d.estimate_s, d.node))


def _cheapest_migration(snapshot: Snapshot, node: NodeInfo, fallback: dict[str, float | None]):
    """The instance on `node` whose move (to the best node with a free slot) costs least, or None."""
    options = []
    for instance in snapshot.instances:
        if instance.node != node.id or not instance.migratable or instance.model not in snapshot.models:
            continue
        moved = snapshot.models[instance.model]
        targets = [(load_time(other, moved, fallback)[0], other.id) for other in snapshot.nodes
                   if other.id != node.id and other.free_slots > 0]
        if not targets:
            continue
        dest_load, dest = min(targets)
        cost = migration_time(instance, moved) + dest_load
        if not math.isinf(cost):
            options.append((cost, instance.id, dest, instance))
    if not options:
        return None
    cost, _, dest, instance = min(options, key=lambda o: (o[0], o[1]))
    return instance, dest, cost
