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


def test_a_model_whose_restart_from_ssd_lands_in_the_tail_is_held_in_dram_past_its_window():
    # the idle times of test_keep_only_while_it_pays: keep 1 s on the GPU. A restart from SSD of 25 s (> 10 s,
    # TAIL_RESTART_S) would land in the tail: the DRAM copy outlasts 99% of the idle times. 99% of ten is 9.9: the
    # tenth idle time, 100.5 s, ends by 101 s (its bin's upper edge).
    idle = histogram(*[0.5] * 5, *[100.5] * 5)
    got = decide(idle, 60, restart_s=4, gpus=4, exchange_rate=10, ssd_restart_s=25)
    assert got == KeepAlive(0.0, pytest.approx(1.0), "gpu", hold_s=101.0) and got.warm_s == 101.0
    # 9 s from SSD is no tail: held as long as the GPU window, as before
    assert decide(idle, 60, restart_s=4, gpus=4, exchange_rate=10, ssd_restart_s=9).warm_s == pytest.approx(1.0)
    # a hold never ends before the window: a pre-warm window to 6 s over idle times that all end by 6 s
    got = decide(histogram(*[5.5] * 10), 60, restart_s=4, gpus=1, exchange_rate=10, ssd_restart_s=25)
    assert (got.prewarm_s, got.hold_s, got.warm_s) == (pytest.approx(5.0), pytest.approx(6.0), pytest.approx(6.0))
    # no representative histogram yet: the fixed window on the GPU, the DRAM copy for the histogram's whole range
    assert decide(histogram(100.0), 60, 5, ssd_restart_s=25) == KeepAlive(0.0, 60, "gpu", hold_s=RANGE_S)


def test_covering_reads_the_share_of_idle_times_ended_by_a_bins_upper_edge():
    idle = histogram(0.2, 3.7, 3.9, 10.0, RANGE_S + 1)  # one beyond the range: never covered inside it
    assert [idle.covering(share) for share in (0.2, 0.21, 0.6, 0.8, 0.81, 1.0)] == [1.0, 4.0, 4.0, 11.0, RANGE_S,
                                                                                   RANGE_S]
