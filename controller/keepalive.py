"""Keep-alive per model, chosen on cost from its own idle times (the histogram of Shahrad et al., "Serverless in
the Wild", ATC'20, with the window priced instead of read off fixed percentiles).

For each model, a histogram of its idle times G (from its last request ending to its next arrival). When the
model goes idle, a policy (pre-warm at p, keep until T, p <= T) costs and saves:

    GPU-seconds  = gpus x E[(min(G, T) - s)+] = gpus x integral from s to T of P(G > t) dt
                   (s = p - restart: an instance pre-warmed to be ready at p holds its GPUs from s; s = 0 keeps it)
    delay saved  = restart x P(p <= G <= T)   (a request in the window finds an instance; others restart it)

and the policy chosen maximises `exchange_rate x delay saved - GPU-seconds`. The exchange rate says how many
GPU-seconds one second of a user's cold-start delay is worth (`EXCHANGE_RATE`, a deployment's choice, not a
measured quantity: the controller's `--keepalive-exchange-rate`; the benchmark traces the whole range as a
Pareto curve). `restart` is what bringing the
instance back costs (container start + load from the tier the checkpoint waits in, the scheduler's
`load_time`). The objective splits into a term in T and a term in p, so the best policy is one pass over the
histogram's bins. Keeping (p = 0) leaves the instance on the GPU; a pre-warm (p > 0) releases it at once and
holds the checkpoint in host DRAM (evicted last) until the window ends. Without a usable histogram (too few
idle times, or too many beyond the range) the fixed window.

The warm tier prices the tail, not the mean. A model whose restart from SSD takes longer than `TAIL_RESTART_S`
(a 70B model: 2 s + 141 GB at 6 GB/s) puts every cold start that misses DRAM in the tail of time to first token,
while its DRAM copy costs no GPU time. Its checkpoint is held in DRAM until `TAIL_COVERAGE` of its idle times
have ended (`hold_s`; the histogram's range while it is not representative; both settable:
`--keepalive-tail-restart-s`, `--keepalive-tail-coverage`), however short its GPU window; other
models are held as long as their window. Pure: no clock, no I/O (the controller publishes the decisions,
`KeepAliveTracker`; the node loaders apply them, redis_schema/keepalive.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from sllm_faas.common.tiers import Tier
from sllm_faas.controller.scheduler import ModelInfo, NodeInfo, Snapshot, load_time
from sllm_faas.redis_schema.keepalive import KeepAliveRecord
from sllm_faas.redis_schema.records import InstanceRecord

EXCHANGE_RATE = 3.0           # GPU-seconds one second of cold-start delay is worth (the controller's default:
                              # --keepalive-exchange-rate; docs/SIMULATOR.md)
MIN_SAMPLES = 10              # fewer idle times than this: not representative
MAX_OUT_OF_RANGE = 0.5        # a larger share of idle times beyond the range: not representative
RANGE_S = 4 * 3600.0          # ATC'20: four hours of one-minute bins; here one-second bins
DEFAULT_KEEP_ALIVE_S = 60.0   # until a model's histogram is representative: Knative's stable window
CONTAINER_START_S = 2.0       # process start to serving, before the load (benchmarks/results/coldstart-*: ~1.5 s + pod)
TAIL_RESTART_S = 10.0         # a restart from SSD slower than this lands in the p99 (azure-conv: 7-17 s at fixed 60 s)
TAIL_COVERAGE = 0.99          # such a model's DRAM copy outlasts this share of its idle times


@dataclass(frozen=True)
class KeepAlive:
    prewarm_s: float   # after the model goes idle: release its GPUs at once and be ready again by then (0: keep)
    keep_s: float      # how long an instance stays idle (after the pre-warm, if any) before it is scaled down
    tier: str          # where the checkpoint waits: "gpu" (instance kept), "dram" (pinned in host memory)
    hold_s: float = 0.0  # after the model goes idle: keep its checkpoint in host DRAM this long, if past the window

    @property
    def warm_s(self) -> float:
        """How long after the model goes idle its checkpoint is wanted warm (GPU, then DRAM)."""
        return max(self.prewarm_s + self.keep_s, self.hold_s)


class IdleHistogram:
    """Idle times of one model in one-second bins up to RANGE_S; longer ones are only counted."""

    def __init__(self) -> None:
        self.bins: Counter[int] = Counter()
        self.count = self.out_of_range = 0

    def add(self, idle_s: float) -> None:
        self.count += 1
        if idle_s >= RANGE_S:
            self.out_of_range += 1
        else:
            self.bins[int(idle_s)] += 1

    @property
    def representative(self) -> bool:
        return self.count >= MIN_SAMPLES and self.out_of_range <= MAX_OUT_OF_RANGE * self.count

    def covering(self, share: float) -> float:
        """The shortest window (a bin's upper edge) that `share` of the idle times end within; RANGE_S if none."""
        ended = 0
        for second in sorted(self.bins):
            ended += self.bins[second]
            if ended >= share * self.count:
                return second + 1.0
        return RANGE_S


def decide(histogram: IdleHistogram, fixed_s: float, restart_s: float, gpus: int = 1,
           exchange_rate: float = EXCHANGE_RATE, ssd_restart_s: float = 0.0, tail_restart_s: float = TAIL_RESTART_S,
           tail_coverage: float = TAIL_COVERAGE) -> KeepAlive:
    """The model's keep-alive on cost and its DRAM hold on the tail (module docstring); `ssd_restart_s`: the
    restart once the checkpoint has left DRAM."""
    window = _window(histogram, fixed_s, restart_s, gpus, exchange_rate)
    if ssd_restart_s <= tail_restart_s:
        return window
    hold_s = histogram.covering(tail_coverage) if histogram.representative else RANGE_S
    return dataclasses.replace(window, hold_s=max(hold_s, window.warm_s))


def _window(histogram: IdleHistogram, fixed_s: float, restart_s: float, gpus: int,
            exchange_rate: float) -> KeepAlive:
    """Pre-warm and keep on cost; an idle time in a bin counts at its upper edge."""
    if not histogram.representative:
        return KeepAlive(0.0, fixed_s, "gpu")
    worth = exchange_rate * restart_s  # GPU-seconds a request finding an instance is worth
    total, seen, area, last = histogram.count, 0, 0.0, 0.0
    # per bin edge e: F(e) = P(G <= e) and A(e) = integral of P(G > t) from 0 to e
    edges: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
    for second in sorted(histogram.bins):
        edge = second + 1.0
        area += (edge - last) * (total - seen) / total
        seen += histogram.bins[second]
        edges.append((edge, seen / total, area))
        last = edge
    # keep until T = edges[j]: gain(j) = worth x F(T) - gpus x A(T); best_after[i]: the best j >= i
    gains = [worth * fraction - gpus * held for _, fraction, held in edges]
    best_after = [len(edges) - 1] * len(edges)
    for j in range(len(edges) - 2, -1, -1):
        best_after[j] = j if gains[j] > gains[best_after[j + 1]] else best_after[j + 1]

    # pre-warm ready by p = the lower edge of an occupied bin i: idle times in the bins before it find no instance
    # (F of the bin before); the GPUs are held from p - restart on. p = 0: keep, nothing lost, nothing released.
    positions = [edge for edge, _, _ in edges]
    best = (gains[best_after[0]], 0.0, edges[best_after[0]][0])
    for i in range(1, len(edges)):
        prewarm = edges[i][0] - 1.0
        start = prewarm - restart_s
        if start <= 0:
            continue
        below = edges[bisect.bisect_left(positions, start) - 1]  # the last edge before `start`
        held = below[2] + (start - below[0]) * (1 - below[1])   # P(G > t) is constant between edges
        net = gains[best_after[i]] - (worth * edges[i - 1][1] - gpus * held)
        if net > best[0]:
            best = (net, prewarm, edges[best_after[i]][0])
    _, prewarm, until = best
    if prewarm > 0:
        return KeepAlive(prewarm, until - prewarm, "dram")
    return KeepAlive(0.0, until, "gpu")


class CostKeepAlive:
    """Per-model histograms and cost-chosen decisions; `fixed_s` until a model's histogram is representative."""

    def __init__(self, fixed_s: float, exchange_rate: float = EXCHANGE_RATE, tail_restart_s: float = TAIL_RESTART_S,
                 tail_coverage: float = TAIL_COVERAGE) -> None:
        self.fixed_s, self.exchange_rate = fixed_s, exchange_rate
        self.tail_restart_s, self.tail_coverage = tail_restart_s, tail_coverage
        self.histograms: dict[str, IdleHistogram] = {}

    def observe(self, model: str, idle_s: float) -> None:
        self.histograms.setdefault(model, IdleHistogram()).add(idle_s)

    def decide(self, model: str, restart_s: float, gpus: int = 1, ssd_restart_s: float = 0.0) -> KeepAlive:
        return decide(self.histograms.get(model) or IdleHistogram(), self.fixed_s, restart_s, gpus,
                      self.exchange_rate, ssd_restart_s, self.tail_restart_s, self.tail_coverage)


class FixedKeepAlive:
    """Knative's (60 s) or OpenFaaS's (10 min) one window for every model."""

    def __init__(self, window_s: float) -> None:
        self.fixed_s = window_s

    def observe(self, model: str, idle_s: float) -> None:
        """A fixed window learns nothing."""

    def decide(self, model: str, restart_s: float, gpus: int = 1, ssd_restart_s: float = 0.0) -> KeepAlive:
        return KeepAlive(0.0, self.fixed_s, "gpu")


class KeepAliveTracker:
    """The controller's side of the policy: learns each model's idle times from the instance records it reads
    (a model is busy while any of its instances has requests `active`, idle from the first read that finds none) and,
    when a model goes idle, decides its keep-alive for publication (`sllm:keepalive:<model>`). Idle times are as
    fine as the reads are frequent. Pure: the caller passes the time and publishes."""

    def __init__(self, policy: CostKeepAlive, container_start_s: float = CONTAINER_START_S) -> None:
        self.policy, self.container_start_s = policy, container_start_s
        self.idle_since: dict[str, float] = {}  # model -> when it was first found idle
        self.last_node: dict[str, str] = {}     # model -> a node where it last served

    def update(self, instances: Iterable[InstanceRecord], snapshot: Snapshot, now: float) -> list[KeepAliveRecord]:
        """Observe one read of the instance records; returns the decisions for the models that went idle since."""
        active: dict[str, int] = {}
        for instance in instances:
            active[instance.model] = active.get(instance.model, 0) + instance.active
            if instance.active:
                self.last_node[instance.model] = instance.node
        decided = []
        for model, count in sorted(active.items()):
            if count:
                since = self.idle_since.pop(model, None)
                if since is not None:
                    self.policy.observe(model, now - since)
            elif model not in self.idle_since:
                self.idle_since[model] = now
                decided.append(self._decide(model, snapshot, now))
        return decided

    def _decide(self, model: str, snapshot: Snapshot, now: float) -> KeepAliveRecord:
        node_id = self.last_node.get(model, "")
        info, node = snapshot.models.get(model), snapshot.node_by_id.get(node_id)
        restart_s, ssd_restart_s = (self._restart(info, node, snapshot, tier) for tier in (Tier.DRAM, Tier.SSD))
        decision = self.policy.decide(model, restart_s, info.gpus if info else 1, ssd_restart_s)
        return KeepAliveRecord(model, node_id, Tier(decision.tier), decision.keep_s, decision.prewarm_s, restart_s, now,
                               decision.hold_s)

    def _restart(self, info: ModelInfo | None, node: NodeInfo | None, snapshot: Snapshot, tier: Tier) -> float:
        """Container start + loading the model from `tier` on the node, at its measured bandwidth (unknown: none)."""
        if info is None or node is None:
            return self.container_start_s
        in_tier = NodeInfo(node.id, 0, {info.name: tier}, node.bandwidth)
        load_s = load_time(in_tier, info, snapshot.fallback_bandwidths)[0]
        return self.container_start_s + (load_s if math.isfinite(load_s) else 0.0)
