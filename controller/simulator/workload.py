"""Request traces: which model is asked for when, and how many tokens go in and come out.

Shaped after the Azure Functions trace (Shahrad et al., "Serverless in the Wild", ATC'20): popularity is
heavily skewed (Zipf over functions) and each function's arrivals are bursty (gamma inter-arrival times
with a coefficient of variation above 1; cv = 1 is Poisson). Token lengths are lognormal with a dataset's
mean and spread. One seed gives one trace, which every policy replays.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from sllm_faas.controller.simulator.config import TRACE_DIR, TRACES, Scenario, TokenLengths, Workload


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    arrival_s: float
    model: str
    input_tokens: int
    output_tokens: int


def generate(scenario: Scenario, rate: float | None = None) -> list[Request]:
    """`scenario.workload.requests` requests at `rate` per second (default: the scenario's), arrival order."""
    workload = scenario.workload
    rate = workload.rate if rate is None else rate
    rng = np.random.default_rng(scenario.seed)
    names = [model.name for model in scenario.models]
    shares = popularity(len(names), workload.zipf_s, rng)
    if workload.trace:
        return replay(workload.trace, workload.requests, rate, names, shares, rng)
    horizon = workload.requests / rate
    while True:
        times, models = _arrivals(rng, shares, rate, horizon, workload)
        if len(times) >= workload.requests:
            break
        horizon *= 1.5  # too few arrivals by chance: draw a longer trace (same seed, so still deterministic)
    order = np.lexsort((models, times))[:workload.requests]
    inputs = _lengths(rng, workload.lengths.input_mean, workload.lengths.input_cv, len(order), workload.lengths)
    outputs = _lengths(rng, workload.lengths.output_mean, workload.lengths.output_cv, len(order), workload.lengths)
    return [Request(i, float(times[k]), names[models[k]], int(inputs[i]), int(outputs[i]))
            for i, k in enumerate(order)]


def replay(trace: str, count: int, rate: float, names: list[str], shares: np.ndarray, rng: np.random.Generator
           ) -> list[Request]:
    """The first `count` requests of a real trace with their own arrival times and token counts; time is
    scaled uniformly so the mean rate is `rate` (burst shapes kept). The trace names no function: each
    request goes to one drawn from the Zipf popularity `shares` (seeded), the shape of the Azure Functions
    trace's skew (Shahrad et al., ATC'20)."""
    seconds, inputs, outputs = _read_trace(trace)
    seconds, inputs, outputs = seconds[:count], inputs[:count], outputs[:count]
    native_rate = (len(seconds) - 1) / seconds[-1] if len(seconds) > 1 and seconds[-1] > 0 else rate
    arrivals = seconds * (native_rate / rate)
    models = rng.choice(len(names), size=len(seconds), p=shares)
    return [Request(i, float(arrivals[i]), names[models[i]], int(inputs[i]), max(1, int(outputs[i])))
            for i in range(len(seconds))]


@functools.cache
def _read_trace(trace: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds since the first request, context tokens, generated tokens) of a vendored trace, time order."""
    with open(TRACE_DIR / TRACES[trace], newline="") as handle:
        rows = list(csv.DictReader(handle))
    stamps = np.array([datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp() for row in rows])
    order = np.argsort(stamps, kind="stable")
    inputs = np.array([int(row["ContextTokens"]) for row in rows])[order]
    outputs = np.array([int(row["GeneratedTokens"]) for row in rows])[order]
    return stamps[order] - stamps[order][0], inputs, outputs


def popularity(count: int, zipf_s: float, rng: np.random.Generator) -> np.ndarray:
    """Each model's share of requests: Zipf over a random ranking, so popularity is independent of size."""
    ranks = rng.permutation(count) + 1
    weights = 1.0 / ranks.astype(float) ** zipf_s
    return weights / weights.sum()


def _arrivals(rng: np.random.Generator, shares: np.ndarray, rate: float, horizon: float,
              workload: Workload) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times before `horizon` of every model's own renewal process, and each arrival's model index."""
    times, models = [], []
    for index, share in enumerate(shares):
        model_rate = rate * share
        expected = model_rate * horizon
        drawn = np.empty(0)
        while drawn.size == 0 or drawn[-1] < horizon:
            gaps = _gaps(rng, model_rate, int(expected * 1.2) + 16, workload)
            drawn = np.concatenate([drawn, (drawn[-1] if drawn.size else 0.0) + np.cumsum(gaps)])
        kept = drawn[drawn < horizon]
        times.append(kept)
        models.append(np.full(kept.size, index))
    return np.concatenate(times), np.concatenate(models)


def _gaps(rng: np.random.Generator, model_rate: float, count: int, workload: Workload) -> np.ndarray:
    if workload.arrival == "poisson":
        return rng.exponential(1.0 / model_rate, count)
    shape = 1.0 / workload.cv**2  # gamma with mean 1/rate and the given cv
    return rng.gamma(shape, 1.0 / (model_rate * shape), count)


def _lengths(rng: np.random.Generator, mean: float, cv: float, count: int, limits: TokenLengths) -> np.ndarray:
    """Lognormal token counts with this mean and coefficient of variation, in [1, max_tokens]."""
    sigma = math.sqrt(math.log1p(cv**2))
    values = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, count)
    return np.clip(np.rint(values), 1, limits.max_tokens).astype(int)
