"""Keep-alive from each model's idle times (controller/keepalive.py): hand-computed decisions."""

import pytest

from controller.keepalive import RANGE_S, FixedKeepAlive, HybridHistogram, IdleHistogram, KeepAlive, decide


def histogram(*idle_s: float) -> IdleHistogram:
    result = IdleHistogram()
    for value in idle_s:
        result.add(value)
    return result


def test_head_and_tail_give_prewarm_and_window():
    # idle times 100.x s: head = tail = the 100 s bin's upper edge, 101 s; pre-warm 101 x 0.9 = 90.9 s,
    # window until 101 x 1.1 = 111.1 s, so 20.2 s after the pre-warm; a 5 s restart is worth releasing for
    got = decide(histogram(*[100.5] * 10), fixed_s=60, restart_s=5)
    assert got.tier == "dram" and got.prewarm_s == pytest.approx(90.9) and got.keep_s == pytest.approx(20.2)


def test_a_prewarm_shorter_than_a_restart_keeps_the_instance():
    # 9 idle times of 2 s and one of 300 s: head 3 s (x 0.9 = 2.7 s, under a 5 s restart), tail 301 s x 1.1
    got = decide(histogram(*[2.0] * 9, 300.0), fixed_s=60, restart_s=5)
    assert got == KeepAlive(0.0, pytest.approx(331.1), "gpu")


def test_without_a_usable_histogram_the_fixed_window():
    assert decide(histogram(*[100.0] * 9), 60, 5) == KeepAlive(0.0, 60, "gpu")             # too few
    assert decide(histogram(*[100.0] * 5, *[RANGE_S] * 6), 60, 5) == KeepAlive(0.0, 60, "gpu")  # mostly beyond


def test_policies_learn_per_model():
    hybrid, fixed = HybridHistogram(60), FixedKeepAlive(600)
    for _ in range(10):
        hybrid.observe("a", 100.5)
        fixed.observe("a", 100.5)
    assert hybrid.decide("a", 5).tier == "dram" and hybrid.decide("b", 5) == KeepAlive(0.0, 60, "gpu")
    assert fixed.decide("a", 5) == KeepAlive(0.0, 600, "gpu")
