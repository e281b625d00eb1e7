"""The discrete-event loop: requests arrive, instances load, serve, migrate, idle and scale down.

A request goes to an idle instance of its model if there is one (a warm start). Otherwise the platform
scales up one instance per waiting request (Knative-style, one request per instance at a time), asking
the policy where; a waiting request takes whichever instance of its model frees up first. If no node
has room, the model waits until an instance goes idle somewhere (idle instances are scaled down on
demand). Time to first token = wait + startup + prefill of the prompt.

An instance's startup on node n: its GPUs are free at t (the decision, or when a migrating request has
left); the load is queued on the node's loader (one FIFO) at t with prefetch, else once the container is
up at t + container_start; the instance is ready at max(load done, t + container_start).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from sllm_faas.controller.keepalive import CostKeepAlive, FixedKeepAlive
from sllm_faas.controller.simulator.cluster import Cluster, Instance, Node
from sllm_faas.controller.simulator.config import ModelSpec, Scenario
from sllm_faas.controller.simulator.policies import Placement, Policy, make_policy
from sllm_faas.controller.simulator.workload import Request, generate

REPLAN_MIN_S = 0.1  # a wait expected to end at once is checked again after this


@dataclass
class RunResult:
    scenario: str
    policy: str
    rate: float
    ttft_s: np.ndarray                 # per served request, in request order
    gpu_seconds: float
    cold_starts: Counter = field(default_factory=Counter)  # tier loaded from -> instance starts
    warm_starts: int = 0               # requests served by an idle instance on arrival
    migrations: int = 0                # requests handed over to another node
    unserved: int = 0
    simulated_s: float = 0.0
    wall_s: float = 0.0

    @property
    def mean(self) -> float:
        return float(self.ttft_s.mean())

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.ttft_s, q))


class Simulation:
    def __init__(self, scenario: Scenario, policy: str | Policy, requests: list[Request], rate: float | None = None,
                 keepalive: FixedKeepAlive | CostKeepAlive | None = None) -> None:
        self.scenario, self.requests = scenario, requests
        self.rate = scenario.workload.rate if rate is None else rate
        self.policy = make_policy(policy, scenario.seed) if isinstance(policy, str) else policy
        self.cluster = Cluster(scenario, local_cache=self.policy.local_cache)
        self.now = 0.0
        self._events: list = []
        self._sequence = 0
        self.waiting: dict[str, deque[Request]] = {name: deque() for name in self.cluster.models}
        self.starting: Counter = Counter()   # model -> instances loading for waiting requests
        self.blocked: dict[str, None] = {}   # models that found no room, oldest first
        # model -> per waiting request that waits for room: the running instances it counts on (one instance
        # ending serves or frees room for one request, so the next request decides without it)
        self.claims: dict[str, list[tuple[str, ...]]] = {name: [] for name in self.cluster.models}
        self.replan_at: dict[str, float] = {}  # model -> when its waits are decided again
        self.ttft = np.full(len(requests), np.nan)
        self.cold_starts: Counter = Counter()
        self.warm_starts = self.migrations = 0
        self.keepalive = keepalive or FixedKeepAlive(scenario.keep_alive_s)
        self.in_flight: Counter = Counter()    # model -> requests arrived and not finished
        self.idle_from: dict[str, float] = {}  # model -> when its last request finished (none in flight since)

    def run(self) -> RunResult:
        started = time.perf_counter()
        for request in self.requests:
            self._at(request.arrival_s, self._arrive, request)
        while self._events:
            self.now, _, handler, argument = heapq.heappop(self._events)
            handler(argument)
        served = ~np.isnan(self.ttft)
        return RunResult(self.scenario.name, self.policy.name, self.rate, self.ttft[served], self.cluster.gpu_seconds,
                         self.cold_starts, self.warm_starts, self.migrations, int((~served).sum()), self.now,
                         time.perf_counter() - started)

    def _at(self, when: float, handler, argument) -> None:
        self._sequence += 1  # equal times run in scheduling order: deterministic
        heapq.heappush(self._events, (when, self._sequence, handler, argument))

    # --- requests ---

    def _arrive(self, request: Request) -> None:
        if not self.in_flight[request.model] and request.model in self.idle_from:
            self.keepalive.observe(request.model, self.now - self.idle_from[request.model])
        self.in_flight[request.model] += 1
        idle = self.cluster.idle_by_model[request.model]
        if idle:
            self.warm_starts += 1
            self._serve(next(reversed(idle)), request)  # the most recently idle: the others may expire
            return
        self.waiting[request.model].append(request)
        self._scale(self.cluster.models[request.model])

    def _scale(self, model: ModelSpec) -> None:
        """Start one instance per waiting request that no starting instance, and no instance it waits for,
        will take."""
        name, claims = model.name, self.claims[model.name]
        while len(self.waiting[name]) > self.starting[name] + len(claims):
            placement = self.policy.place(self.cluster, model, self.now, self._claims(), self._pending(name))
            if placement is None:
                self.blocked.setdefault(name)
                return
            if placement.wait_s is not None:
                # waiting for a local slot is expected to beat every load elsewhere: the request waits for room
                # and is decided again if none comes in time. A request that queues for an instance of its model
                # is the only one that instance serves next: the next waiting request decides knowing it.
                when = self.now + max(placement.wait_s, REPLAN_MIN_S)
                if when < self.replan_at.get(name, float("inf")):
                    self.replan_at[name] = when
                    self._at(when, self._replan, name)
                self.blocked.setdefault(name)
                if len(placement.wait_for) > 1 or self.cluster.instances[placement.wait_for[0]].model is not model:
                    return
                claims.append(placement.wait_for)
                continue
            self.starting[name] += 1
            self._start(model, placement)
        if len(self.waiting[name]) <= self.starting[name]:
            self.blocked.pop(name, None)

    def _pending(self, name: str) -> int:
        """Requests other than the one being placed for `name` that wait for GPUs: neither an instance on its way
        nor a running instance they queue for will take them (only blocked models and `name` can have any)."""
        return sum(max(0, len(self.waiting[model]) - self.starting[model] - len(self.claims[model]))
                   for model in {name, *self.blocked}) - 1

    def _claims(self) -> dict[str, int]:
        """Instance -> waiting requests of its model queued for it."""
        return Counter(ids[0] for waits in self.claims.values() for ids in waits)

    def _serve(self, instance: Instance, request: Request) -> None:
        self.cluster.set_state(instance, "busy", self.now)
        instance.request = request
        prefill_s = request.input_tokens / instance.model.prefill_tokens_per_s
        self.ttft[request.id] = self.now + prefill_s - request.arrival_s
        instance.decode_start_s = self.now + prefill_s
        instance.finish_s = instance.decode_start_s + request.output_tokens / instance.model.decode_tokens_per_s
        self._at(instance.finish_s, self._finish, (instance, request))

    def _finish(self, event: tuple[Instance, Request]) -> None:
        instance, request = event
        if instance.request is not request:
            return  # the request was handed over to a migration destination, which finishes it
        instance.request = None
        instance.migrating_to = None  # finished before any handover: the destination will just idle
        self._release(instance)
        self.in_flight[request.model] -= 1
        if not self.in_flight[request.model]:
            self.idle_from[request.model] = self.now
        if instance.successor is not None:
            self._hand_gpus_to_successor(instance)
        else:
            self._idle(instance)

    def _release(self, instance: Instance) -> None:
        """The instance's request ended, as the waits counting on it expected: they are no longer waits."""
        for claims in self.claims.values():
            if claims:
                claims[:] = [ids for ids in claims if instance.id not in ids]

    def _idle(self, instance: Instance) -> None:
        """A ready instance with nothing to do: take a waiting request, else wait for one until keep-alive."""
        name, waiting = instance.model.name, self.waiting[instance.model.name]
        if waiting:
            self._serve(instance, waiting.popleft())
            if len(waiting) <= self.starting[name]:
                self.blocked.pop(name, None)  # what it waited for room for is served or on its way
                self.claims[name].clear()
            return
        self.cluster.set_state(instance, "idle", self.now)
        self._keep(instance)
        self._retry_blocked(instance.node)

    def _keep(self, instance: Instance) -> None:
        """How long the idle instance stays: the keep-alive policy's window, or until its pre-warm window ends.
        A model gone quiet whose next request is not expected before the pre-warm is released at once, its
        checkpoint held in DRAM, and brought back in time for it. The node's DRAM holds the checkpoint as long as
        the decision wants it warm (the node loader's `hold_until`)."""
        if instance.keep_until is not None:  # a pre-warmed instance: its window was decided when it was started
            until, instance.keep_until = instance.keep_until, None
            self._at(until, self._expire, (instance, self.now))
            return
        name, model, node = instance.model.name, instance.model, instance.node
        restart_s, ssd_restart_s = (self.scenario.container_start_s + self.cluster.load_seconds(node, model, tier)[0]
                                    for tier in ("dram", "ssd"))
        decision = self.keepalive.decide(name, restart_s, model.gpus, ssd_restart_s)
        warm_until = self.now + decision.warm_s
        node.dram.held_until[name] = warm_until
        if decision.prewarm_s > 0 and not self.in_flight[name]:
            until = self.now + decision.prewarm_s + decision.keep_s
            for idle in list(self.cluster.idle_by_model[name]):
                idle.node.dram.held_until[name] = warm_until
                self.cluster.end(idle, self.now)
            self._at(self.now + decision.prewarm_s - restart_s, self._prewarm, (name, self.now, until))
            return
        self._at(self.now + decision.prewarm_s + decision.keep_s, self._expire, (instance, self.now))

    def _prewarm(self, event: tuple[str, float, float]) -> None:
        """Start an instance of a model still quiet since `idle_from`, idle until `until` unless a request comes."""
        name, idle_from, until = event
        if self.in_flight[name] or self.idle_from.get(name) != idle_from or self.starting[name]:
            return
        placement = self.policy.place(self.cluster, self.cluster.models[name], self.now)
        if placement is None or placement.wait_s is not None or placement.migrate is not None:
            return  # no room now: the next request starts one as usual
        self.starting[name] += 1
        self._start(self.cluster.models[name], placement).keep_until = until

    def _replan(self, name: str) -> None:
        if self.replan_at.get(name) == self.now:
            del self.replan_at[name]
            self._decide_again(name)

    def _decide_again(self, name: str) -> None:
        """Drop the model's waits and decide its waiting requests afresh."""
        self.claims[name].clear()
        self._scale(self.cluster.models[name])

    def _expire(self, event: tuple[Instance, float]) -> None:
        instance, idle_since = event
        if instance.state == "idle" and instance.idle_since_s == idle_since:
            self.cluster.end(instance, self.now)

    def _retry_blocked(self, node: Node) -> None:
        """`node` has more room: retry the models that found none, oldest first. Only `node` changed, so a
        model needing more GPUs than it now offers would fail again (with no side effect): skip those."""
        for name in list(self.blocked):
            if node.reclaimable == 0:
                return
            if self.cluster.models[name].gpus <= node.reclaimable:
                self._decide_again(name)

    # --- instance startup and migration ---

    def _start(self, model: ModelSpec, placement: Placement) -> Instance:
        instance = self.cluster.new_instance(model, placement.node)
        moved = placement.migrate
        if moved is None:
            self.cluster.take_gpus(placement.node, model.gpus, self.now)
            self._load(instance)
            return instance
        # migrate, then load: the moved request's model starts on the destination; our GPUs come when it leaves
        instance.state = "waiting"
        instance.reserved_gpus = max(0, model.gpus - moved.gpus)
        self.cluster.take_gpus(placement.node, instance.reserved_gpus, self.now)
        moved.successor = instance
        destination = self.cluster.new_instance(moved.model, placement.migrate_to)
        self.cluster.take_gpus(placement.migrate_to, moved.gpus, self.now)
        destination.migration_source, moved.migrating_to = moved, destination
        self._load(destination)
        return instance

    def _load(self, instance: Instance) -> None:
        """The GPUs are the instance's from now: queue the load and start the container."""
        node, container_s = instance.node, self.scenario.container_start_s
        seconds, tier = self.cluster.load_seconds(node, instance.model)
        self.cold_starts[tier] += 1
        queued_at = self.now if self.policy.prefetch else self.now + container_s
        loaded_at = self.cluster.enqueue_load(node, seconds, queued_at)
        instance.state, instance.ready_s = "loading", max(loaded_at, self.now + container_s)
        if instance.migration_source is None:
            self.cluster.loading[instance.model.name][instance] = None  # its model's waiting requests may count on it
        self._at(instance.ready_s, self._ready, instance)

    def _ready(self, instance: Instance) -> None:
        self.cluster.store(instance.node, instance.model, self.now)
        source = instance.migration_source
        if source is None:
            self.starting[instance.model.name] -= 1
            self._idle(instance)
        elif source.migrating_to is instance:
            self._at(self.now + self.cluster.recompute_seconds(source, self.now), self._handover, instance)
        else:
            self._handover(instance)

    def _handover(self, destination: Instance) -> None:
        """The destination has recomputed the request's KV cache: it takes over; the source's GPUs go to the
        instance that waited for them."""
        source, destination.migration_source = destination.migration_source, None
        if source.migrating_to is not destination:  # the request finished during the migration
            self._idle(destination)
            return
        request = source.request
        source.migrating_to = source.request = None
        destination.request, destination.decode_start_s = request, source.decode_start_s
        destination.finish_s = source.finish_s
        self.cluster.set_state(destination, "busy", self.now)
        self._at(destination.finish_s, self._finish, (destination, request))
        self.migrations += 1
        self._hand_gpus_to_successor(source)

    def _hand_gpus_to_successor(self, instance: Instance) -> None:
        successor = instance.successor
        self.cluster.end(instance, self.now)
        self.cluster.take_gpus(successor.node, successor.gpus - successor.reserved_gpus, self.now)
        self._load(successor)
        if instance.gpus > successor.gpus - successor.reserved_gpus:
            self._retry_blocked(successor.node)  # the moved instance freed more GPUs than the new one needs


def simulate(scenario: Scenario, policy: str, requests: list[Request], rate: float | None = None,
             keepalive: FixedKeepAlive | CostKeepAlive | None = None) -> RunResult:
    """Replay `requests` on a fresh cluster under `policy` (keep-alive: the scenario's fixed window by default)."""
    return Simulation(scenario, policy, requests, rate, keepalive).run()


def run_policies(scenario: Scenario, rate: float | None = None) -> list[RunResult]:
    """One trace at `rate` (default: the scenario's), replayed under each of the scenario's policies."""
    requests = generate(scenario, rate)
    return [simulate(scenario, policy, requests, rate) for policy in scenario.policies]
