"""The scheduler core: a pure function from a cluster snapshot to ranked placement decisions.

No I/O happens here, so the controller, the tests and the trace-driven simulator run the same
code. Startup-time estimates follow ServerlessLLM (OSDI'24, section 6):

    load(n, t)   = max(q_n, t) + size / b_n(tier holding the model on n)   # GPUs free at t, loader busy until q_n
    migrate(i)   = a * (t_in + t_out) + b       # the destination recomputes i's KV cache from tokens
    startup(n)   = load(n, 0)                    if n has enough free GPUs
                 = load(n, wait(i))              if instance i on n ends first (its expected remaining time)
                 = load(n, move(i))              if i moves to node m != n first: load(m) of i's model + migrate(i)

Slots are GPUs: a model needing g GPUs fits where at least g are free, and a wait or a migration frees the
GPUs of the instances it is about. A migration is offered only where it saves more waiting than it costs
other requests: it frees the GPUs `move` seconds from now instead of `wait`, and holds the destination's
GPUs for those `move` seconds (load and recompute) on top of what the request needs anyway. Those GPU-seconds
are priced by who wants them: the request itself and every request already waiting for GPUs (`pending`), each
of which they may hold up by as much, so a migration is offered only where wait - move > move x (1 + pending)
(the moved request ends when it would have either way). On an idle cluster this is wait - move > move; near
saturation, when requests queue for GPUs, migration stops before it can lengthen the tail. A wait is not a commitment:
the caller waits for room and decides again. `plans()` is the one decision path: the controller's
placement and the simulator both take its first decision they can carry out.

Unlike the reference implementation, every node counts (remote-only ones load from the store at the
remote bandwidth), and bandwidths are the ones each node measured, never a constant. A bandwidth a
node has not measured yet borrows the median of the nodes that have; if none has, that tier costs
infinity and such nodes rank last. Ties break by node id, so the ranking is deterministic.
"""

from __future__ import annotations

import enum
import functools
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from sllm_faas.common.tiers import FASTEST_FIRST, Tier

TIERS = FASTEST_FIRST
GPU, REMOTE = Tier.GPU, Tier.REMOTE  # as module globals: an Enum attribute lookup costs ~0.3 us per use


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size_bytes: int
    prefill_tokens_per_s: float | None = None  # measured prefill speed: fits a and b of the migration cost
    migration_overhead_s: float = 0.05          # b: fixed cost of a migration round trip
    gpus: int = 1                               # GPUs one instance needs (free slots are counted in GPUs)


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    node: str
    model: str
    tokens: int  # t_in + t_out so far
    migratable: bool = True
    remaining_s: float | None = None  # expected time until its request ends; None: unknown, never waited for
    likely_remaining_s: float | None = None  # the time it outlasts with probability 1/2 (None: remaining_s)
    loading: bool = False  # still loading (ends after serving a request not started yet): only its own model's
                           # requests wait for it, to be served warm; others do not count on the GPUs it frees


@dataclass(frozen=True)
class NodeInfo:
    id: str
    free_slots: int  # free GPUs (one slot per GPU)
    tier_of: dict[str, str] = field(default_factory=dict)  # model -> fastest tier holding it on this node
    bandwidth: dict[str, float | None] = field(default_factory=dict)  # tier -> bytes/s out of that tier
    queue_wait_s: float = 0.0  # q: until the node's loading queue drains

    def tier(self, model: str) -> str:
        return self.tier_of.get(model, REMOTE)


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeInfo, ...]
    models: dict[str, ModelInfo]
    instances: tuple[InstanceInfo, ...] = ()
    migrating: frozenset[str] = frozenset()  # instances already being moved by an earlier decision
    pending: int = 0  # other requests waiting for GPUs that no decision covers yet: what a migration's GPU time costs

    def updated(self, nodes: dict[str, NodeInfo] | None = None, models: dict[str, ModelInfo] | None = None,
                migrating: frozenset[str] = frozenset(), pending: int | None = None) -> Snapshot:
        """A copy with some nodes replaced, models added or another `pending` that keeps this snapshot's derived
        indexes (the migration options only where `pending`, their price, is the same).

        For callers that apply small changes between full reads (the controller's own bookings): the
        indexes may be stale about the replaced nodes as migration destinations until the next full read.
        """
        nodes = nodes or {}
        pending = self.pending if pending is None else pending
        copy = Snapshot(tuple(nodes.get(n.id, n) for n in self.nodes) if nodes else self.nodes,
                        {**self.models, **(models or {})}, self.instances, self.migrating | migrating, pending)
        for derived in ("fallback_bandwidths", "holders", "free_frontier", "migration_options", "instances_by_node"):
            if derived in self.__dict__ and (derived != "migration_options" or pending == self.pending):
                copy.__dict__[derived] = self.__dict__[derived]
        if "node_by_id" in self.__dict__:  # patched, not rebuilt: a decision's snapshot replaces one node
            by_id = self.node_by_id
            replaced = {i: n for i, n in nodes.items() if i in by_id}
            copy.__dict__["node_by_id"] = {**by_id, **replaced} if replaced else by_id
        return copy

    def index_holders(self) -> None:
        """Find every model's holders in one pass over the nodes: for the controller's cache, whose one read serves
        hundreds of decisions on different models (found per model, each decision scanned every node)."""
        index: dict[str, list[NodeInfo]] = {name: [] for name in self.models}
        for node in self.nodes:
            for model in node.tier_of:
                index.setdefault(model, []).append(node)
        self.holders.update(index)

    @functools.cached_property
    def node_by_id(self) -> dict[str, NodeInfo]:
        return {n.id: n for n in self.nodes}

    @functools.cached_property
    def fallback_bandwidths(self) -> dict[str, float | None]:
        """Computed once per snapshot: every decision taken on it reuses them."""
        return cluster_bandwidths(self.nodes)

    @functools.cached_property
    def instances_by_node(self) -> dict[str, list[InstanceInfo]]:
        """Running instances a slot can be freed from (by waiting or migrating), per node."""
        by_node: dict[str, list[InstanceInfo]] = {}
        for instance in self.instances:
            if instance.model in self.models and (instance.migratable or instance.remaining_s is not None):
                by_node.setdefault(instance.node, []).append(instance)
        return by_node

    @functools.cached_property
    def holders(self) -> _OnDemand:
        """Per model: the nodes holding it in some tier. Found per model asked about, as a decision asks about a few
        models only and a node may hold hundreds (one index of them all cost ~1 ms per snapshot of 1,000 nodes)."""
        return _OnDemand(lambda model: [n for n in self.nodes if model in n.tier_of])

    @functools.cached_property
    def free_frontier(self) -> _OnDemand:
        """Per GPU count: the remote-load frontier of the nodes with that many GPUs free (offset: their loading
        queue). Placements and migration destinations draw on the same one."""
        fallback = self.fallback_bandwidths.get(REMOTE) or 0.0
        return _OnDemand(lambda gpus: _Frontier([(n.queue_wait_s, n) for n in self.nodes if n.free_slots >= gpus],
                                               fallback))

    @functools.cached_property
    def migration_options(self) -> _MigrationOptions:
        return _MigrationOptions(self)


class _OnDemand(dict):
    """An index per key asked for (a GPU count, a model), built on first use."""

    def __init__(self, build) -> None:
        super().__init__()
        self.build = build

    def __missing__(self, gpus: int):
        self[gpus] = self.build(gpus)
        return self[gpus]


@dataclass(frozen=True)
class Decision:
    node: str
    estimate_s: float
    tier: str                      # where the model loads from on `node`
    load_s: float
    migrate: str | None = None     # instance to move off `node` first
    migrate_to: str | None = None
    migrate_s: float = 0.0
    wait_for: tuple[str, ...] = ()  # instances on `node` whose ends free the GPUs (the load starts then)
    wait_s: float = 0.0
    feasible: bool = True          # False: no free slot and no migration frees one (an unknown bandwidth
                                   # makes the estimate infinite but the node stays feasible)
    price_s: float = 0.0           # a migration's destination GPU time, in seconds of delay (move x (1 + pending)):
                                   # decisions rank on estimate + price, so a migration must beat every other way by it

    @property
    def action(self) -> Action:
        return Action.MIGRATE_THEN_LOAD if self.migrate else Action.WAIT_THEN_LOAD if self.wait_for else Action.LOAD

    def plan(self) -> Plan:
        """The decision as callers carry it out (and as the API shows it, `Plan.as_json`)."""
        return Plan(self.action, self.node, self.tier, _finite(self.estimate_s), _finite(self.load_s),
                    self.migrate, self.migrate_to, _finite(self.migrate_s) if self.migrate else None, self.wait_for,
                    _finite(self.wait_s) if self.wait_for else None)


class Action(enum.StrEnum):
    """What a plan does on its node (the values are the API's `action` strings)."""
    LOAD = "load"                           # GPUs free now: load
    WAIT_THEN_LOAD = "wait_then_load"       # wait for running instances to end, then load (or be served warm)
    MIGRATE_THEN_LOAD = "migrate_then_load"  # move a running instance to another node first


@dataclass(frozen=True)
class Plan:
    """A decision to carry out: seconds are rounded to the microsecond, None where infinite (not measured)."""
    action: Action
    node: str
    tier: str
    estimate_s: float | None
    load_s: float | None
    instance: str | None = None           # MIGRATE_THEN_LOAD: the instance moved off `node`, to node `to`
    to: str | None = None
    migrate_s: float | None = None
    instances: tuple[str, ...] = ()       # WAIT_THEN_LOAD: the instances whose ends free the GPUs
    wait_s: float | None = None

    def as_json(self) -> dict:
        """The API's JSON object (wire format): the migration and wait fields only for those actions."""
        plan = {"action": str(self.action), "node": self.node, "tier": str(self.tier), "estimate_s": self.estimate_s,
                "load_s": self.load_s}
        if self.action is Action.MIGRATE_THEN_LOAD:
            plan.update(instance=self.instance, to=self.to, migrate_s=self.migrate_s)
        if self.action is Action.WAIT_THEN_LOAD:
            plan.update(instances=list(self.instances), wait_s=self.wait_s)
        return plan


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 6)


def cluster_bandwidths(nodes: tuple[NodeInfo, ...]) -> dict[str, float | None]:
    """Median measured bandwidth per tier: the stand-in for nodes that have not measured a tier yet.

    Every snapshot asks, and bandwidths rarely change between snapshots: the last answer is kept with a copy of
    the bandwidths it came from, and given again while they are equal (a comparison costs ~1/20 of a median)."""
    global _last_bandwidths
    bandwidths = [n.bandwidth for n in nodes]
    seen, medians = _last_bandwidths
    if bandwidths != seen:
        medians = {}
        for tier in TIERS:
            measured = [b[tier] for b in bandwidths if b.get(tier)]
            medians[tier] = statistics.median(measured) if measured else None
        _last_bandwidths = ([dict(b) for b in bandwidths], medians)
    return dict(medians)


_last_bandwidths: tuple[list[dict[str, float | None]] | None, dict[str, float | None]] = (None, {})


def load_time(node: NodeInfo, model: ModelInfo, fallback: dict[str, float | None], after_s: float = 0.0
              ) -> tuple[float, str]:
    """(max(q, after_s) + size / b of the tier holding the model on `node`, that tier): the load starts once
    the node's loading queue has drained and its GPUs are free (`after_s` from now)."""
    tier, start = node.tier(model.name), max(node.queue_wait_s, after_s)
    if tier == GPU:
        return start, tier  # resident already: nothing to move
    rate = node.bandwidth.get(tier) or fallback.get(tier)
    if not rate:
        return math.inf, tier
    return start + model.size_bytes / rate, tier


def migration_time(instance: InstanceInfo, model: ModelInfo) -> float:
    """a * tokens + b: the destination re-prefills the instance's tokens (the KV cache is not sent)."""
    if not model.prefill_tokens_per_s:
        return math.inf
    return instance.tokens / model.prefill_tokens_per_s + model.migration_overhead_s


@functools.lru_cache(maxsize=1 << 16)  # the simulator asks for every running request at every decision
def expected_remaining_tokens(generated: int, mean: float, cv: float, cap: int) -> float:
    """E[L - k | L > k] for lognormal output lengths L (this mean and cv, at most `cap`): how much longer a
    running request is expected to go on, knowing only how far it got (the true length is unknown)."""
    if cv <= 0 or generated <= 0:
        return min(max(0.0, mean - generated), cap - generated)
    sigma = math.sqrt(math.log1p(cv**2))
    mu, log_k = math.log(mean) - sigma**2 / 2, math.log(generated)
    beyond = _normal_cdf((mu - log_k) / sigma)  # P(L > k)
    if beyond <= 0.0:
        return max(0.0, cap - generated)
    tail_mean = mean * _normal_cdf((mu + sigma**2 - log_k) / sigma) / beyond  # E[L | L > k]
    return max(0.0, min(tail_mean, cap) - generated)


@functools.lru_cache(maxsize=1 << 16)
def median_remaining_tokens(generated: int, mean: float, cv: float, cap: int) -> float:
    """The x with P(L - k > x | L > k) = 1/2 for the same lognormal: what a running request outlasts as often as
    not. A migration only pays when the request goes on longer than the move; under a heavy tail the conditional
    mean (`expected_remaining_tokens`) is inflated by the few very long requests, so a rule on the mean bets on
    most requests running far longer than they do."""
    if cv <= 0:
        return expected_remaining_tokens(generated, mean, cv, cap)  # no spread: one length, mean = median
    sigma = math.sqrt(math.log1p(cv**2))
    mu = math.log(mean) - sigma**2 / 2
    beyond = _normal_cdf((mu - math.log(generated)) / sigma) if generated > 0 else 1.0  # P(L > k)
    if beyond <= 0.0:
        return max(0.0, cap - generated)
    median = math.exp(mu + sigma * statistics.NormalDist().inv_cdf(1 - beyond / 2))  # P(L > x) = P(L > k) / 2
    return max(0.0, min(median, cap) - generated)


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def rank(snapshot: Snapshot, model_name: str) -> list[Decision]:
    """Every node, best (lowest estimated startup time) first."""
    model = snapshot.models[model_name]
    decisions = [_decide(snapshot, node, model) for node in snapshot.nodes]
    decisions.sort(key=_order)
    return decisions


class Plans:
    """The one decision path (the controller's placement and the simulator iterate it): the feasible
    decisions, best first; the shortlist, then the rest of the ranking only if a caller gets that far
    (every shortlisted node was taken meanwhile)."""

    def __init__(self, snapshot: Snapshot, model_name: str) -> None:
        self.snapshot, self.model_name = snapshot, model_name
        self.ranked = shortlist(snapshot, model_name)

    def __iter__(self) -> Iterator[Decision]:
        for decision in self._in_order():
            if not decision.feasible:
                return
            yield decision

    def _in_order(self) -> Iterator[Decision]:
        """The shortlist, then the full ranking; the ranking (every node) is computed only when reached."""
        yield from self.ranked
        tried = {d.node for d in self.ranked}
        yield from (d for d in rank(self.snapshot, self.model_name) if d.node not in tried)


def plans(snapshot: Snapshot, model_name: str) -> Plans:
    return Plans(snapshot, model_name)


def shortlist(snapshot: Snapshot, model_name: str) -> list[Decision]:
    """The nodes that can rank first, ranked; `shortlist(s, m)[0] == rank(s, m)[0]` on a fully read snapshot.

    A decision needs the best node, not all of them: the holders of the model, plus the nodes on the
    frontiers of remote-only loads (see _Frontier), which is a few dozen nodes out of thousands. A node
    without room enters the frontier of full nodes only if its load, started as soon as its queue drains,
    would not end after the best of the others (freeing its GPUs and the price only add to that), so a way
    to free GPUs is priced only on the nodes that could still win. On a snapshot from `updated()`,
    candidates are scored with the updated values but the free nodes' frontier and the ways to free GPUs come
    from the last full read: a node that became best only because others got busier shows at the next read."""
    model = snapshot.models[model_name]
    current = snapshot.node_by_id
    holders = {n.id for n in snapshot.holders[model_name]}
    chosen = holders | {n.id for n in snapshot.free_frontier[model.gpus].candidates(holders)}
    decisions = [_decide(snapshot, current[node], model) for node in chosen]
    best = min(decisions, key=_order, default=None)
    bound = best.estimate_s + best.price_s if best is not None and best.feasible else math.inf
    decisions += [_decide(snapshot, current[n.id], model) for n in _full_frontier(snapshot, model, bound)
                  .candidates(holders) if n.id not in chosen]
    decisions.sort(key=_order)
    if not decisions or not decisions[0].feasible or math.isinf(decisions[0].estimate_s):
        return rank(snapshot, model_name)  # degenerate (nothing measured or nothing free): rank them all
    return decisions


def _full_frontier(snapshot: Snapshot, model: ModelInfo, bound: float) -> _Frontier:
    """The remote-load frontier of the nodes without room for `model` that can rank at `bound` or better
    (offset: when their load can start once a wait or a migration has freed the GPUs, plus its price). A
    node whose load alone, from when its queue drains, ends after `bound` cannot, unless an instance of the
    model on it serves warm."""
    fallback = snapshot.fallback_bandwidths
    moves, serving = snapshot.migration_options, {i.node for i in snapshot.instances if i.model == model.name}
    offsets = []
    for node in snapshot.nodes:
        if node.free_slots >= model.gpus or (
                load_time(node, model, fallback, -math.inf)[0] > bound and node.id not in serving):
            continue
        best = moves.cheapest(node.id, model.gpus - max(0, node.free_slots))
        if best:
            offsets.append((max(node.queue_wait_s, best.seconds) + best.price, node))
    return _Frontier(offsets, fallback.get(REMOTE) or 0.0)


def _order(decision: Decision) -> tuple:
    return not decision.feasible, decision.estimate_s + decision.price_s, decision.node


def _decide(snapshot: Snapshot, node: NodeInfo, model: ModelInfo) -> Decision:
    fallback = snapshot.fallback_bandwidths
    load_s, tier = load_time(node, model, fallback)
    if node.free_slots >= model.gpus:
        return Decision(node.id, load_s, tier, load_s)
    own = min(((i.remaining_s, i.id) for i in snapshot.instances_by_node.get(node.id, ())
               if i.model == model.name and i.remaining_s is not None and i.id not in snapshot.migrating), default=None)
    freed = _free_gpus(snapshot, node, model, tier, load_s)
    if own is not None and own[0] <= freed.estimate_s:  # an instance of this model ends: it serves, warm
        return Decision(node.id, own[0], GPU, 0.0, wait_for=(own[1],), wait_s=own[0])
    return freed


def _free_gpus(snapshot: Snapshot, node: NodeInfo, model: ModelInfo, tier: str, load_s: float) -> Decision:
    """On a node without room: load once the soonest wait or migration has freed the GPUs."""
    best = snapshot.migration_options.cheapest(node.id, model.gpus - max(0, node.free_slots))
    if best is not None:  # options may be carried over from the last full read: check them against now
        target = snapshot.node_by_id.get(best.target) if best.target else None
        if not snapshot.migrating.isdisjoint(best.instances) or (
                best.target and (target is None or target.free_slots < snapshot.models[best.model].gpus)):
            best = None
    if best is None:
        return Decision(node.id, math.inf, tier, load_s, feasible=False)
    cost, instances, target, _, price = best
    total = load_time(node, model, snapshot.fallback_bandwidths, cost)[0]
    if target is None:
        return Decision(node.id, total, tier, load_s, wait_for=instances, wait_s=cost)
    return Decision(node.id, total, tier, load_s, instances[0], target, cost, price_s=price)


class _Frontier:
    """Nodes ordered by how a load from the remote store (offset + size / remote bandwidth) can rank,
    whatever the model size: layers of Pareto frontiers of (offset low, remote bandwidth high), the first
    layer being the nodes no other node beats on both. Every node of a deeper layer is beaten (or tied)
    by one in the layer above, so for a model, holders aside, the best remote load is in the layers down
    to the first that holds no node holding that model (whose cost is not a remote load).

    Layers are peeled only as far as a caller asks: a decision needs the first few, and building them all
    for every snapshot was most of a decision's time on 1,000 nodes. A layer is the nodes, in (offset,
    -bandwidth, id) order, each faster than the last one taken (or its exact twin)."""

    def __init__(self, offsets: list[tuple[float, NodeInfo]], fallback: float) -> None:
        self._rest = sorted((offset, -(node.bandwidth.get(REMOTE) or fallback), node.id, order, node)
                            for order, (offset, node) in enumerate(offsets))
        self.layers: list[list[NodeInfo]] = []

    def _peel(self) -> None:
        layer, rest, top_rate, top_offset = [], [], math.nan, math.nan
        for entry in self._rest:
            offset, negated = entry[0], entry[1]
            if not layer or -negated > top_rate or (-negated == top_rate and offset == top_offset):
                layer.append(entry[4])
                top_rate, top_offset = -negated, offset
            else:
                rest.append(entry)
        self._rest = rest
        self.layers.append(layer)

    def candidates(self, holders: set[str]) -> list[NodeInfo]:
        chosen, depth = [], 0
        while depth < len(self.layers) or self._rest:
            if depth == len(self.layers):
                self._peel()
            layer = self.layers[depth]
            chosen += layer
            depth += 1
            if not any(node.id in holders for node in layer):
                break
        return chosen


class FreeingOption(NamedTuple):
    """One way to free GPUs on a node: wait for instances to end, or move one of them to `target`."""
    seconds: float                 # until the GPUs are free
    instances: tuple[str, ...]     # the instances waited for, or the one moved
    target: str | None             # migration destination; None: wait
    model: str                     # the (last) instance's model
    price: float                   # a migration's destination GPU time in seconds of delay (0 for a wait)


class _MigrationOptions:
    """Soonest way to free `need` more GPUs on a node: wait for one of its instances to end, or move it to
    the node where its model loads fastest, whichever is sooner for that instance. It does not depend on the
    model being placed beyond `need`, so it is computed at most once per node, need and snapshot, and
    ranking stays linear in the number of nodes."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot, self.fallback = snapshot, snapshot.fallback_bandwidths
        self._destinations: dict[str, list[tuple[float, str]]] = {}
        self._cheapest: dict[tuple[str, int], FreeingOption | None] = {}

    def _best_destination(self, model_name: str, source: str) -> tuple[float, str] | None:
        """(load time, node) of the best node other than `source` with room for the model."""
        if model_name not in self._destinations:
            model = self.snapshot.models[model_name]
            holders = [n for n in self.snapshot.holders[model_name] if n.free_slots >= model.gpus]
            frontier = self.snapshot.free_frontier[model.gpus]
            candidates = {n.id: n for n in frontier.candidates({n.id for n in holders}) + holders}
            # the two best: a node is never its own destination
            self._destinations[model_name] = sorted(
                (load_time(n, model, self.fallback)[0], n.id) for n in candidates.values())[:2]
        return next((d for d in self._destinations[model_name] if d[1] != source), None)

    def cheapest(self, node_id: str, need: int) -> FreeingOption | None:
        """The option with the lowest seconds + price."""
        key = (node_id, need)
        if key not in self._cheapest:
            self._cheapest[key] = self._compute_cheapest(node_id, need)
        return self._cheapest[key]

    def _compute_cheapest(self, node_id: str, need: int) -> FreeingOption | None:
        options, models = [], self.snapshot.models
        running = self.snapshot.instances_by_node.get(node_id, [])
        # waiting: until enough of the node's instances have ended, the soonest first
        freed, waited = 0, []
        ended = sorted((i for i in running if i.remaining_s is not None and not i.loading),
                       key=lambda i: (i.remaining_s, i.id))
        for instance in ended:
            freed, waited = freed + models[instance.model].gpus, waited + [instance.id]
            if freed >= need:
                options.append(FreeingOption(instance.remaining_s, tuple(waited), None, instance.model, 0.0))
                break
        # migrating one instance that frees enough, where it saves more waiting than the destination's GPU time
        # costs the placed request and every request pending for GPUs
        # (a move takes at least the re-prefill: a destination is looked up only where that bound can still pass
        # the rule and beat the cheapest option so far; the destination's load only adds to it)
        price = 2 + self.snapshot.pending
        options = [option for option in options if not math.isinf(option.seconds)]
        cheapest = min((o.seconds + o.price for o in options), default=math.inf)
        for instance in running:
            model = self.snapshot.models[instance.model]
            if not instance.migratable or model.gpus < need:
                continue
            likely = instance.remaining_s if instance.likely_remaining_s is None else instance.likely_remaining_s
            likely = math.inf if likely is None else likely
            prefill = migration_time(instance, model)
            if not price * prefill < likely or prefill + (price - 1) * prefill > cheapest:
                continue
            destination = self._best_destination(instance.model, node_id)
            if destination is None:
                continue
            move = prefill + destination[0]
            if price * move < likely and not math.isinf(move):
                options.append(FreeingOption(move, (instance.id,), destination[1], instance.model, (price - 1) * move))
                cheapest = min(cheapest, move + (price - 1) * move)
        return min(options, key=lambda o: (o.seconds + o.price, o.instances)) if options else None
