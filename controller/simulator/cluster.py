"""The simulated cluster: nodes with GPUs and checkpoint caches, function instances, and the view of it
that the scheduler core gets (a `sllm_faas.controller.scheduler.Snapshot`).

The physics of a load and of a migration's recompute are the scheduler's own formulas
(`sllm_faas.controller.scheduler.load_time` and `migration_time`) applied to the nodes' true bandwidths, so
the estimate a calibrated scheduler makes is exactly what happens here; policies differ in what
they know and decide, not in the world they run in.
"""

from __future__ import annotations

from collections import OrderedDict

import sllm_faas.controller.scheduler as scheduler
from sllm_faas.controller.simulator.config import ModelSpec, NodeSpec, Scenario, expand_nodes, home_nodes
from sllm_faas.redis_schema.keepalive import eviction_key


class CacheTier:
    """Checkpoints held in one tier of one node (DRAM or SSD), least recently used first, under a byte
    budget; pinned ones (the deployment's home copies) are never evicted, held ones (a keep-alive decision
    wants them warm here) only after every other, the soonest-ending hold first (the node loader's order)."""

    def __init__(self, capacity: float) -> None:
        self.capacity, self.used = capacity, 0.0
        self.entries: OrderedDict[str, float] = OrderedDict()
        self.pinned: set[str] = set()
        self.held_until: dict[str, float] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, size: float, now: float = 0.0) -> list[str]:
        """Hold `name` as most recently used, evicting in `eviction_key` order; returns the evicted names.
        A checkpoint that cannot fit even after evicting every unpinned one is not added."""
        if name in self.entries:
            self.entries.move_to_end(name)
            return []
        evicted = []
        if self.used + size > self.capacity:
            evictable = sum(s for n, s in self.entries.items() if n not in self.pinned)
            if self.used - evictable + size > self.capacity:
                return []
            used = {n: position for position, n in enumerate(self.entries) if n not in self.pinned}  # LRU first
            for victim in sorted(used, key=lambda n: eviction_key(self.held_until.get(n, 0.0), now, used[n])):
                if self.used + size <= self.capacity:
                    break
                self.used -= self.entries.pop(victim)
                evicted.append(victim)
        self.entries[name] = size
        self.used += size
        return evicted


class Instance:
    """One function instance: GPUs on one node holding one model, serving at most one request at a time."""

    __slots__ = ("id", "model", "node", "state", "request", "decode_start_s", "finish_s", "idle_since_s",
                 "successor", "reserved_gpus", "migration_source", "migrating_to", "keep_until", "ready_s")

    def __init__(self, instance_id: str, model: ModelSpec, node: Node) -> None:
        self.id, self.model, self.node = instance_id, model, node
        self.state = "loading"  # loading -> idle <-> busy; "waiting" while its GPUs are still being freed
        self.request = None
        self.decode_start_s = self.finish_s = self.idle_since_s = 0.0
        self.successor: Instance | None = None         # the instance that takes over these GPUs when we leave
        self.reserved_gpus = 0                         # GPUs a waiting instance already holds
        self.migration_source: Instance | None = None  # we are the destination of that instance's migration
        self.migrating_to: Instance | None = None
        self.keep_until: float | None = None           # a pre-warmed instance: scaled down then if still unused
        self.ready_s = 0.0                             # a loading instance is ready then

    @property
    def gpus(self) -> int:
        return self.model.gpus

    @property
    def migratable(self) -> bool:
        return self.state == "busy" and self.successor is None and self.migrating_to is None

    def tokens(self, now: float) -> int:
        """Prompt plus tokens generated so far: what a migration destination recomputes."""
        generated = max(0.0, now - self.decode_start_s) * self.model.decode_tokens_per_s
        return self.request.input_tokens + min(self.request.output_tokens, int(generated))


class Node:
    __slots__ = ("id", "index", "gpus", "free_gpus", "idle_gpus", "idle", "busy", "dram", "ssd", "tier_of",
                 "bandwidth", "loader_free_at")

    def __init__(self, spec: NodeSpec, index: int) -> None:
        self.id, self.index, self.gpus, self.bandwidth = spec.id, index, spec.gpus, spec.bandwidth
        self.free_gpus, self.idle_gpus = spec.gpus, 0
        self.idle: dict[Instance, None] = {}  # oldest idle first: reclaimed in that order
        self.busy: dict[Instance, None] = {}
        self.dram, self.ssd = CacheTier(spec.dram_cache_bytes), CacheTier(spec.ssd_cache_bytes)
        self.tier_of: dict[str, str] = {}  # model -> fastest local tier holding it
        self.loader_free_at = 0.0  # the node's loading queue (one FIFO) drains at this time

    @property
    def reclaimable(self) -> int:
        """GPUs a new instance can have now: free ones plus those of idle instances (scaled down on demand)."""
        return self.free_gpus + self.idle_gpus


class Cluster:
    def __init__(self, scenario: Scenario, local_cache: bool = True) -> None:
        self.scenario, self.local_cache = scenario, local_cache
        specs = expand_nodes(scenario)
        self.nodes = tuple(Node(spec, index) for index, spec in enumerate(specs))
        self.node_by_id = {node.id: node for node in self.nodes}
        self.models = {model.name: model for model in scenario.models}
        self.model_infos = {model.name: scheduler.ModelInfo(model.name, model.size_bytes, model.prefill_tokens_per_s,
                                                            scenario.migration_overhead_s, model.gpus)
                            for model in scenario.models}
        self.instances: dict[str, Instance] = {}
        self.busy: dict[Instance, None] = {}  # serving a request, in the order they started
        # model -> its instances loading to serve waiting requests (not migration destinations)
        self.loading: dict[str, dict[Instance, None]] = {name: {} for name in self.models}
        self.idle_by_model: dict[str, dict[Instance, None]] = {name: {} for name in self.models}
        self.holders: dict[str, dict[Node, None]] = {name: {} for name in self.models}  # nodes with a local copy
        self._next_id = 0
        self.allocated_gpus, self.gpu_seconds, self._accounted_at = 0, 0.0, 0.0
        # What the scheduler sees of each node (free slots are GPUs), kept up to date incrementally: a
        # decision rebuilds only the nodes that changed since.
        self._infos: list[scheduler.NodeInfo | None] = [None] * len(self.nodes)
        self._stale: set[int] = set(range(len(self.nodes)))
        self._queued: set[int] = set()  # nodes whose loading queue had not drained at the last look
        self.lengths = scenario.workload.lengths
        for index, model in enumerate(scenario.models):
            for spec in home_nodes(specs, model, index):
                node = self.node_by_id[spec.id]
                node.ssd.add(model.name, model.size_bytes)
                node.ssd.pinned.add(model.name)
                node.tier_of[model.name] = "ssd"
                self.holders[model.name][node] = None

    # --- what the scheduler sees ---

    def node_infos(self, now: float) -> list[scheduler.NodeInfo]:
        """Every node as the scheduler sees it, in node order."""
        for index in self._queued | self._stale:
            self.node_info(self.nodes[index], now)
        return self._infos

    def node_info(self, node: Node, now: float) -> scheduler.NodeInfo:
        index = node.index
        if index in self._stale:
            self._stale.discard(index)
            info = scheduler.NodeInfo(node.id, node.reclaimable, dict(node.tier_of), node.bandwidth,
                                      max(0.0, node.loader_free_at - now))
        elif index in self._queued:  # only the queue's wait moved
            last = self._infos[index]
            info = scheduler.NodeInfo(last.id, last.free_slots, last.tier_of, last.bandwidth,
                                      max(0.0, node.loader_free_at - now))
        else:
            return self._infos[index]
        if node.loader_free_at <= now:
            self._queued.discard(index)
        self._infos[index] = info
        return info

    def snapshot(self, now: float, migration: bool = True, claims: dict[str, int] | None = None, pending: int = 0,
                 placing: str | None = None) -> scheduler.Snapshot:
        """Every node and every instance a slot can be freed from: by waiting for its request's expected end
        (what a controller can know: the tokens so far and the dataset's length distribution, not the true
        length) or, with `migration`, by moving it. A loading instance ends a mean request after it is ready (it
        serves the waiting request it was started for first); only those of the model being placed (`placing`) are
        listed, as only its requests wait for them. `claims`: instance -> waiting requests of its
        model queued for it: each pushes its end back by a mean request, and it stays where they wait.
        `pending`: other requests waiting for GPUs (the price of a migration's GPU time). With `placing`, only the
        instances on nodes without room for that model are listed: GPUs are freed (by a wait or a migration) only
        there, and a node with room is decided without them."""
        claims = claims or {}
        lengths, instances = self.lengths, []
        need = self.models[placing].gpus if placing else None
        for instance in self.busy:
            if need is not None and instance.node.reclaimable >= need:
                continue
            queued = claims.get(instance.id)
            if instance.migratable:
                model = instance.model
                tokens = instance.tokens(now)
                prefill_left = max(0.0, instance.decode_start_s - now)
                generated = tokens - instance.request.input_tokens
                remaining, likely = (prefill_left + estimate(generated, lengths.output_mean, lengths.output_cv,
                                                             lengths.max_tokens) / model.decode_tokens_per_s
                                     for estimate in (scheduler.expected_remaining_tokens,
                                                      scheduler.median_remaining_tokens))
                if queued:
                    remaining += queued * self.mean_request_s(model)
                instances.append(scheduler.InstanceInfo(instance.id, instance.node.id, model.name, tokens,
                                                        migration and not queued, remaining, likely))
        for instance in self.loading[placing] if placing else ():
            if instance.node.reclaimable >= need:
                continue
            remaining = max(0.0, instance.ready_s - now) + (1 + claims.get(instance.id, 0)) * self.mean_request_s(
                instance.model)
            instances.append(scheduler.InstanceInfo(instance.id, instance.node.id, instance.model.name, 0, False,
                                                    remaining, loading=True))
        return scheduler.Snapshot(tuple(self.node_infos(now)), self.model_infos, tuple(instances), pending=pending)

    def mean_request_s(self, model: ModelSpec) -> float:
        """How long a request of the dataset's mean lengths holds an instance of `model`."""
        return (self.lengths.input_mean / model.prefill_tokens_per_s
                + self.lengths.output_mean / model.decode_tokens_per_s)

    def _changed(self, node: Node) -> None:
        self._stale.add(node.index)

    # --- physics ---

    def tier(self, node: Node, model: ModelSpec) -> str:
        return node.tier_of.get(model.name, "remote") if self.local_cache else "remote"

    def load_seconds(self, node: Node, model: ModelSpec, tier: str | None = None) -> tuple[float, str]:
        """How long moving the checkpoint into GPU memory takes (queue excluded), and from which tier (default:
        the fastest holding it)."""
        tier = tier or self.tier(node, model)
        truth = scheduler.NodeInfo(node.id, 0, {model.name: tier}, node.bandwidth)
        return scheduler.load_time(truth, self.model_infos[model.name], {})

    def recompute_seconds(self, instance: Instance, now: float) -> float:
        """A migration destination re-prefills the request's tokens, plus the fixed handover cost."""
        info = scheduler.InstanceInfo(instance.id, instance.node.id, instance.model.name, instance.tokens(now))
        return scheduler.migration_time(info, self.model_infos[instance.model.name])

    def enqueue_load(self, node: Node, seconds: float, queued_at: float) -> float:
        """Put a load of `seconds` on the node's loading queue at `queued_at`; returns when it is done."""
        node.loader_free_at = max(queued_at, node.loader_free_at) + seconds
        self._queued.add(node.index)
        return node.loader_free_at

    def store(self, node: Node, model: ModelSpec, now: float) -> None:
        """A load went through the node's SSD and DRAM tiers: both now hold the checkpoint (LRU)."""
        if not self.local_cache:
            return
        for evicted in node.ssd.add(model.name, model.size_bytes, now):
            if node.tier_of.get(evicted) == "ssd":
                self._forget(node, evicted)
        for evicted in node.dram.add(model.name, model.size_bytes, now):
            if evicted in node.ssd:
                node.tier_of[evicted] = "ssd"
            else:
                self._forget(node, evicted)
        for tier in (node.dram, node.ssd):
            if model.name in tier:
                node.tier_of[model.name] = "dram" if tier is node.dram else "ssd"
                self.holders[model.name][node] = None
                break
        self._changed(node)

    def _forget(self, node: Node, model_name: str) -> None:
        del node.tier_of[model_name]
        del self.holders[model_name][node]

    # --- instances and GPUs ---

    def new_instance(self, model: ModelSpec, node: Node) -> Instance:
        instance = Instance(f"i{self._next_id}", model, node)
        self._next_id += 1
        self.instances[instance.id] = instance
        return instance

    def take_gpus(self, node: Node, count: int, now: float) -> None:
        """Give `count` GPUs of `node` to a new instance: free ones first, then scale down idle instances,
        the longest idle first."""
        while node.free_gpus < count:
            self.end(next(iter(node.idle)), now)
        node.free_gpus -= count
        self._account(now, count)
        self._changed(node)

    def free_gpus(self, node: Node, count: int, now: float) -> None:
        node.free_gpus += count
        self._account(now, -count)
        self._changed(node)

    def end(self, instance: Instance, now: float) -> None:
        """Scale an instance down; its GPUs go back to the node."""
        self.set_state(instance, "gone", now)
        del self.instances[instance.id]
        self.free_gpus(instance.node, instance.gpus, now)
        if self.local_cache and instance.model.name in instance.node.dram:
            instance.node.dram.add(instance.model.name, instance.model.size_bytes)  # just used: most recent

    def set_state(self, instance: Instance, state: str, now: float) -> None:
        """Move an instance between loading, idle, busy and gone, keeping the per-node and per-model indexes."""
        node, old = instance.node, instance.state
        self.loading[instance.model.name].pop(instance, None)
        if old == "idle":
            del node.idle[instance]
            del self.idle_by_model[instance.model.name][instance]
            node.idle_gpus -= instance.gpus
        elif old == "busy":
            del node.busy[instance]
            del self.busy[instance]
        if state == "idle":
            node.idle[instance] = None
            self.idle_by_model[instance.model.name][instance] = None
            node.idle_gpus += instance.gpus
            instance.idle_since_s = now
        elif state == "busy":
            node.busy[instance] = None
            self.busy[instance] = None
        instance.state = state
        self._changed(node)

    def _account(self, now: float, change: int) -> None:
        """GPU-seconds: the integral over time of GPUs held by any instance (loading, serving or idle)."""
        self.gpu_seconds += self.allocated_gpus * (now - self._accounted_at)
        self._accounted_at, self.allocated_gpus = now, self.allocated_gpus + change
