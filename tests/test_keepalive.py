"""Keep-alive on cost from each model's idle times (controller/keepalive.py): hand-computed decisions."""

import pytest

from sllm_faas.controller.keepalive import RANGE_S, CostKeepAlive, FixedKeepAlive, IdleHistogram, KeepAlive, decide


def histogram(*idle_s: float) -> IdleHistogram:
    result = IdleHistogram()
    for value in idle_s:
        result.add(value)
    return result


def test_concentrated_idle_times_prewarm():
    # ten idle times of 5.5 s (counted at the bin's upper edge, 6 s); restart 4 s, exchange rate 10: a request
    # finding an instance is worth 40 GPU-s. Keeping 6 s: 40 - 6 = 34. Pre-warm ready at 5 s (the bin's lower
    # edge) holds the GPU from 1 s to 6 s: 40 - 5 = 35. Pre-warm wins: release, back at 5 s, kept 1 s more.
    got = decide(histogram(*[5.5] * 10), fixed_s=60, restart_s=4, gpus=1, exchange_rate=10)
    assert got == KeepAlive(pytest.approx(5.0), pytest.approx(1.0), "dram")


def test_keep_only_while_it_pays():
    # five idle times of 0.5 s (edge 1 s) and five of 100.5 s (edge 101 s); worth 40 GPU-s per request.
    # keep 1 s: 0.5 x 40 - E[min(G, 1)] = 20 - 1 = 19; keep 101 s: 40 - (1 + 100 x 0.5) = -11;
    # pre-warm at 100 s (GPU from 96 s): 0.5 x 40 - 0.5 x 5 = 17.5. Keep 1 s on the GPU.
    assert decide(histogram(*[0.5] * 5, *[100.5] * 5), 60, restart_s=4, gpus=1, exchange_rate=10) == KeepAlive(
        0.0, pytest.approx(1.0), "gpu")
    # four GPUs cost four times as much: keep 1 s: 20 - 4 = 16, pre-warm: 20 - 4 x 2.5 = 10: still keep 1 s
    assert decide(histogram(*[0.5] * 5, *[100.5] * 5), 60, restart_s=4, gpus=4, exchange_rate=10).keep_s == 1.0
    # a cheap restart is not worth any GPU time: worth 0.1 x 4 = 0.4 < the 1 GPU-s of keeping; release at once
    assert decide(histogram(*[0.5] * 5, *[100.5] * 5), 60, restart_s=4, gpus=1, exchange_rate=0.1) == KeepAlive(
        0.0, 0.0, "gpu")


def test_without_a_usable_histogram_the_fixed_window():
    assert decide(histogram(*[100.0] * 9), 60, 5) == KeepAlive(0.0, 60, "gpu")             # too few
    assert decide(histogram(*[100.0] * 5, *[RANGE_S] * 6), 60, 5) == KeepAlive(0.0, 60, "gpu")  # mostly beyond


def test_policies_learn_per_model():
    cost, fixed = CostKeepAlive(60, exchange_rate=10), FixedKeepAlive(600)
    for _ in range(10):
        cost.observe("a", 5.5)
        fixed.observe("a", 5.5)
    assert cost.decide("a", 4).tier == "dram" and cost.decide("b", 4) == KeepAlive(0.0, 60, "gpu")
    assert fixed.decide("a", 4) == KeepAlive(0.0, 600, "gpu")
