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

import bisect
import functools
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
    migrating: frozenset[str] = frozenset()  # instances already being moved by an earlier decision

    def updated(self, nodes: dict[str, NodeInfo] | None = None, models: dict[str, ModelInfo] | None = None,
                migrating: frozenset[str] = frozenset()) -> Snapshot:
        """A copy with some nodes replaced or models added that keeps this snapshot's derived indexes.

        For callers that apply small changes between full reads (the controller's own bookings): the
        indexes may be stale about the replaced nodes as migration destinations until the next full read.
        """
        nodes = nodes or {}
        copy = Snapshot(tuple(nodes.get(n.id, n) for n in self.nodes) if nodes else self.nodes,
                        {**self.models, **(models or {})}, self.instances, self.migrating | migrating)
        for derived in ("fallback_bandwidths", "free_node_index", "migration_options", "shortlist_index"):
            if derived in self.__dict__:
                copy.__dict__[derived] = self.__dict__[derived]
        return copy

    @functools.cached_property
    def node_by_id(self) -> dict[str, NodeInfo]:
        return {n.id: n for n in self.nodes}

    @functools.cached_property
    def fallback_bandwidths(self) -> dict[str, float | None]:
        """Computed once per snapshot: every decision taken on it reuses them."""
        return cluster_bandwidths(self.nodes)

    @functools.cached_property
    def free_node_index(self) -> _FreeNodeIndex:
        return _FreeNodeIndex(self)

    @functools.cached_property
    def migration_options(self) -> _MigrationOptions:
        return _MigrationOptions(self)

    @functools.cached_property
    def shortlist_index(self) -> _ShortlistIndex:
        return _ShortlistIndex(self)


class _FreeNodeIndex:
    """The nodes with a free slot, arranged so the best migration destination for any model is found
    without scanning them all: the holders of each model, plus the remote-load frontier."""

    def __init__(self, snapshot: Snapshot) -> None:
        free = [n for n in snapshot.nodes if n.free_slots > 0]
        self.holders: dict[str, list[NodeInfo]] = {}
        for node in free:
            for model in node.tier_of:
                self.holders.setdefault(model, []).append(node)
        fallback = snapshot.fallback_bandwidths.get("remote") or 0.0
        self.remote_frontier = _Frontier([(n.queue_wait_s, n) for n in free], fallback)


@dataclass(frozen=True)
class Decision:
    node: str
    estimate_s: float
    tier: str                      # where the model loads from on `node`
    load_s: float
    migrate: str | None = None     # instance to move off `node` first
    migrate_to: str | None = None
    migrate_s: float = 0.0
    feasible: bool = True          # False: no free slot and no migration frees one (an unknown bandwidth
                                   # makes the estimate infinite but the node stays feasible)

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
    decisions = [_decide(snapshot, node, model) for node in snapshot.nodes]
    decisions.sort(key=_order)
    return decisions


def shortlist(snapshot: Snapshot, model_name: str) -> list[Decision]:
    """The nodes that can rank first, ranked; `shortlist(s, m)[0] == rank(s, m)[0]` on a fully read snapshot.

    A decision needs the best node, not all of them: the holders of the model, plus the nodes on the
    frontiers of remote-only loads (see _Frontier), which is a few dozen nodes out of thousands. On a
    snapshot from `updated()`, candidates are scored with the updated values but chosen from the last full
    read's frontiers: a node that became best only because others got busier shows at the next read."""
    model = snapshot.models[model_name]
    index, current = snapshot.shortlist_index, snapshot.node_by_id
    candidates = {n.id for n in index.holders.get(model_name, [])}
    holders = set(candidates)
    candidates.update(n.id for n in index.free_frontier.candidates(holders) + index.full_frontier.candidates(holders))
    decisions = sorted((_decide(snapshot, current[node], model) for node in candidates), key=_order)
    if not decisions or not decisions[0].feasible or math.isinf(decisions[0].estimate_s):
        return rank(snapshot, model_name)  # degenerate (nothing measured or nothing free): rank them all
    return decisions


def _order(decision: Decision) -> tuple:
    return not decision.feasible, decision.estimate_s, decision.node


def _decide(snapshot: Snapshot, node: NodeInfo, model: ModelInfo) -> Decision:
    load_s, tier = load_time(node, model, snapshot.fallback_bandwidths)
    if node.free_slots > 0:
        return Decision(node.id, load_s, tier, load_s)
    best = snapshot.migration_options.cheapest(node.id)
    if best is not None:  # options may be carried over from the last full read: check them against now
        target = snapshot.node_by_id.get(best[2])
        if best[1] in snapshot.migrating or target is None or target.free_slots <= 0:
            best = None
    if best is None:
        return Decision(node.id, math.inf, tier, load_s, feasible=False)
    cost, instance, target = best
    return Decision(node.id, cost + load_s, tier, load_s, instance, target, cost)


class _Frontier:
    """Nodes ordered by how a load from the remote store (offset + size / remote bandwidth) can rank,
    whatever the model size: layers of Pareto frontiers of (offset low, remote bandwidth high), the first
    layer being the nodes no other node beats on both. Every node of a deeper layer is beaten (or tied)
    by one in the layer above, so for a model, holders aside, the best remote load is in the layers down
    to the first that holds no node holding that model (whose cost is not a remote load)."""

    def __init__(self, offsets: list[tuple[float, NodeInfo]], fallback: float) -> None:
        ordered = sorted(offsets, key=lambda o: (o[0], -(o[1].bandwidth.get("remote") or fallback), o[1].id))
        self.layers: list[list[NodeInfo]] = []
        tops: list[tuple[float, float]] = []  # per layer: (rate, offset) of its last node
        negated: list[float] = []             # -rate of each layer's top: non-decreasing, so bisectable
        for offset, node in ordered:
            rate = node.bandwidth.get("remote") or fallback
            layer = bisect.bisect_right(negated, -rate)  # the first layer whose top is slower than this node
            if layer and tops[layer - 1] == (rate, offset):
                layer -= 1                               # an exact duplicate joins its twin's layer
            if layer == len(self.layers):
                self.layers.append([])
                tops.append((rate, offset))
                negated.append(-rate)
            self.layers[layer].append(node)
            tops[layer], negated[layer] = (rate, offset), -rate

    def candidates(self, holders: set[str]) -> list[NodeInfo]:
        chosen = []
        for layer in self.layers:
            chosen += layer
            if not any(node.id in holders for node in layer):
                break
        return chosen


class _ShortlistIndex:
    def __init__(self, snapshot: Snapshot) -> None:
        self.holders: dict[str, list[NodeInfo]] = {}
        for node in snapshot.nodes:
            for model in node.tier_of:
                self.holders.setdefault(model, []).append(node)
        fallback = snapshot.fallback_bandwidths.get("remote") or 0.0
        self.free_frontier = _Frontier([(n.queue_wait_s, n) for n in snapshot.nodes if n.free_slots > 0], fallback)
        moves = snapshot.migration_options
        full = [(n, moves.cheapest(n.id)) for n in snapshot.nodes if n.free_slots <= 0]
        self.full_frontier = _Frontier([(n.queue_wait_s + best[0], n) for n, best in full if best], fallback)


class _MigrationOptions:
    """Cheapest way to free a slot on a full node: move one of its instances to the node where that
    instance's model loads fastest. It does not depend on the model being placed, so it is computed
    at most once per node and snapshot, and ranking stays linear in the number of nodes."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot, self.fallback = snapshot, snapshot.fallback_bandwidths
        self._by_node: dict[str, list[InstanceInfo]] | None = None
        self._destination: dict[str, tuple[float, str] | None] = {}
        self._cheapest: dict[str, tuple[float, str, str] | None] = {}

    def _instances_on(self, node_id: str) -> list[InstanceInfo]:
        if self._by_node is None:
            self._by_node = {}
            for instance in self.snapshot.instances:
                if instance.migratable and instance.model in self.snapshot.models:
                    self._by_node.setdefault(instance.node, []).append(instance)
        return self._by_node.get(node_id, [])

    def _best_destination(self, model_name: str) -> tuple[float, str] | None:
        """(load time, node) of the best node with a free slot; a full node is never its own destination."""
        if model_name not in self._destination:
            model, index = self.snapshot.models[model_name], self.snapshot.free_node_index
            holders = index.holders.get(model_name, [])
            candidates = index.remote_frontier.candidates({n.id for n in holders}) + holders
            targets = [(load_time(n, model, self.fallback)[0], n.id) for n in candidates]
            self._destination[model_name] = min(targets) if targets else None
        return self._destination[model_name]

    def cheapest(self, node_id: str) -> tuple[float, str, str] | None:
        """(migration + destination load cost, instance id, destination node), or None."""
        if node_id not in self._cheapest:
            self._cheapest[node_id] = self._compute_cheapest(node_id)
        return self._cheapest[node_id]

    def _compute_cheapest(self, node_id: str) -> tuple[float, str, str] | None:
        options = []
        for instance in self._instances_on(node_id):
            destination = self._best_destination(instance.model)
            if destination is None:
                continue
            cost = migration_time(instance, self.snapshot.models[instance.model]) + destination[0]
            if not math.isinf(cost):
                options.append((cost, instance.id, destination[1]))
        return min(options) if options else None
