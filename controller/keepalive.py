"""Keep-alive per model from its own arrivals: the hybrid histogram policy (Shahrad et al., "Serverless in the
Wild", ATC'20), extended with the tier a checkpoint is kept warm in.

For each model, a histogram of its idle times (from its last request ending to its next arrival). When enough
of them are in range, its head (5th percentile) and tail (99th) say when the next request is likely:

    prewarm  = head x (1 - margin)   release the GPUs at once, have an instance ready again by then
    keep     = tail x (1 + margin) - prewarm   and keep it that long

A pre-warm shorter than what a release saves (a restart: container start + load from DRAM) keeps the instance
on the GPU instead (prewarm 0). Between release and pre-warm the checkpoint stays in host DRAM, evicted last
until the window ends; with no usable histogram (too few idle times, or too many beyond the range) the policy
keeps the fixed window it was given and no tier is protected. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

HEAD, TAIL = 5.0, 99.0        # percentiles of idle times (ATC'20)
MARGIN = 0.1                  # ATC'20: 10% below the head, 10% above the tail
MIN_SAMPLES = 10              # fewer idle times than this: not representative
MAX_OUT_OF_RANGE = 0.5        # a larger share of idle times beyond the range: not representative
RANGE_S = 4 * 3600.0          # ATC'20: four hours of one-minute bins; here one-second bins


@dataclass(frozen=True)
class KeepAlive:
    prewarm_s: float   # after the model goes idle: release its GPUs at once and be ready again by then (0: keep)
    keep_s: float      # how long an instance stays idle (after the pre-warm, if any) before it is scaled down
    tier: str          # where the checkpoint waits: "gpu" (instance kept), "dram" (pinned in host memory), "ssd"


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

    def percentile(self, q: float) -> float:
        """Upper edge of the bin holding the q-th percentile of the in-range idle times."""
        rank, seen = q / 100 * (self.count - self.out_of_range), 0
        for second in sorted(self.bins):
            seen += self.bins[second]
            if seen >= rank:
                return second + 1.0
        return RANGE_S

    @property
    def representative(self) -> bool:
        return self.count >= MIN_SAMPLES and self.out_of_range <= MAX_OUT_OF_RANGE * self.count


def decide(histogram: IdleHistogram, fixed_s: float, restart_s: float) -> KeepAlive:
    """The model's keep-alive: `fixed_s` without a usable histogram; `restart_s` is what bringing an instance
    back costs (container start + load from DRAM, the scheduler's `load_time`): a shorter pre-warm keeps it."""
    if not histogram.representative:
        return KeepAlive(0.0, fixed_s, "gpu")
    prewarm = histogram.percentile(HEAD) * (1 - MARGIN)
    tail = histogram.percentile(TAIL) * (1 + MARGIN)
    if prewarm <= restart_s:
        return KeepAlive(0.0, tail, "gpu")
    return KeepAlive(prewarm, tail - prewarm, "dram")


class HybridHistogram:
    """Per-model histograms and decisions; `fixed_s` until a model's histogram is representative."""

    def __init__(self, fixed_s: float) -> None:
        self.fixed_s = fixed_s
        self.histograms: dict[str, IdleHistogram] = {}

    def observe(self, model: str, idle_s: float) -> None:
        self.histograms.setdefault(model, IdleHistogram()).add(idle_s)

    def decide(self, model: str, restart_s: float) -> KeepAlive:
        return decide(self.histograms.get(model) or IdleHistogram(), self.fixed_s, restart_s)


class FixedKeepAlive:
    """Knative's (60 s) or OpenFaaS's (10 min) one window for every model."""

    def __init__(self, window_s: float) -> None:
        self.fixed_s = window_s

    def observe(self, model: str, idle_s: float) -> None:
        """A fixed window learns nothing."""

    def decide(self, model: str, restart_s: float) -> KeepAlive:
        return KeepAlive(0.0, self.fixed_s, "gpu")
