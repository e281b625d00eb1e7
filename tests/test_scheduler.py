"""The pure scheduler core, on hand-computed snapshots."""

from __future__ import annotations

import math

import pytest

from controller.scheduler import InstanceInfo, ModelInfo, NodeInfo, Snapshot, cluster_bandwidths, rank

GB = 10**9
BW = {"dram": 10 * GB, "ssd": 2 * GB, "remote": 1 * GB}
MODEL = ModelInfo("m", size_bytes=4 * GB, prefill_tokens_per_s=1000.0, migration_overhead_s=0.5)


def node(node_id: str, tier: str | None = None, slots: int = 1, q: float = 0.0, bandwidth=None) -> NodeInfo:
    return NodeInfo(node_id, slots, {"m": tier} if tier else {}, dict(BW if bandwidth is None else bandwidth), q)


def test_load_estimates_are_q_plus_size_over_bandwidth():
    snapshot = Snapshot((node("c", None), node("b", "ssd", q=1.0), node("a", "dram")), {"m": MODEL})
    ranked = rank(snapshot, "m")
    assert [(d.node, d.tier, d.estimate_s) for d in ranked] == [
        ("a", "dram", 0.4),          # 4 GB / 10 GB/s
        ("b", "ssd", 3.0),           # 1 s queue + 4 GB / 2 GB/s
        ("c", "remote", 4.0),        # remote-only nodes count too: 4 GB / 1 GB/s
    ]
    assert ranked[0].plan() == {"action": "load", "node": "a", "tier": "dram", "estimate_s": 0.4, "load_s": 0.4}


def test_gpu_resident_costs_only_the_queue():
    snapshot = Snapshot((node("a", "gpu", q=0.25), node("b", "dram")), {"m": MODEL})
    assert [(d.node, d.estimate_s) for d in rank(snapshot, "m")] == [("a", 0.25), ("b", 0.4)]


def test_ties_break_by_node_id():
    snapshot = Snapshot((node("n2", "ssd"), node("n10", "ssd"), node("n1", "ssd")), {"m": MODEL})
    assert [d.node for d in rank(snapshot, "m")] == ["n1", "n10", "n2"]


def test_unmeasured_bandwidth_borrows_the_cluster_median():
    snapshot = Snapshot((node("a", "ssd", bandwidth={"ssd": 1 * GB}), node("b", "ssd", bandwidth={"ssd": 4 * GB}),
                         node("c", "ssd", bandwidth={})), {"m": MODEL})
    assert cluster_bandwidths(snapshot.nodes)["ssd"] == 2.5 * GB
    estimates = {d.node: d.estimate_s for d in rank(snapshot, "m")}
    assert estimates == {"a": 4.0, "b": 1.0, "c": 1.6}


def test_nothing_measured_anywhere_ranks_last():
    snapshot = Snapshot((node("a", None, bandwidth={}), node("b", "dram", bandwidth={"dram": 10 * GB})), {"m": MODEL})
    ranked = rank(snapshot, "m")
    assert [d.node for d in ranked] == ["b", "a"] and math.isinf(ranked[1].estimate_s)
    assert ranked[1].plan()["estimate_s"] is None


def test_busy_node_with_local_copy_migrates_the_cheapest_instance():
    # "a" holds m in DRAM but its only slot is taken; "b" is free but has nothing local.
    models = {"m": MODEL, "other": ModelInfo("other", 2 * GB, prefill_tokens_per_s=2000.0, migration_overhead_s=0.1)}
    snapshot = Snapshot(
        (NodeInfo("a", 0, {"m": "dram", "other": "dram"}, dict(BW)), NodeInfo("b", 1, {"other": "dram"}, dict(BW))),
        models,
        (InstanceInfo("long", "a", "other", tokens=4000), InstanceInfo("short", "a", "other", tokens=200)),
    )
    ranked = rank(snapshot, "m")
    # migrating "short": 200 / 2000 + 0.1 = 0.2 s, plus reloading "other" on b from DRAM: 2 GB / 10 GB/s = 0.2 s;
    # then m loads on a from DRAM: 0.4 s. Total 0.8 s < loading m on b from remote (4 s).
    best = ranked[0]
    assert (best.node, best.migrate, best.migrate_to) == ("a", "short", "b")
    assert best.estimate_s == pytest.approx(0.8)
    assert best.plan()["action"] == "migrate_then_load"
    assert (ranked[1].node, ranked[1].estimate_s) == ("b", 4.0)


def test_no_free_slot_anywhere_is_infinite():
    snapshot = Snapshot((NodeInfo("a", 0, {"m": "dram"}, dict(BW)),), {"m": MODEL},
                        (InstanceInfo("i", "a", "m", tokens=10),))
    assert math.isinf(rank(snapshot, "m")[0].estimate_s)


def test_unmeasured_bandwidth_ranks_last_but_stays_feasible_and_full_nodes_are_infeasible():
    unmeasured = node("a", None, bandwidth={})  # no node measured the remote tier: infinite estimate
    full = NodeInfo("b", 0, {"m": "dram"}, {"dram": 10 * GB}, 0.0)
    ranked = rank(Snapshot((full, unmeasured), {"m": MODEL}), "m")
    assert [(d.node, d.feasible, math.isinf(d.estimate_s)) for d in ranked] == [("a", True, True), ("b", False, True)]


@pytest.mark.parametrize("seed", range(200))
def test_shortlist_picks_the_same_best_node_as_the_full_ranking(seed):
    import random

    from controller.scheduler import shortlist

    rng = random.Random(seed)
    names = [f"m{i}" for i in range(12)]
    models = {n: ModelInfo(n, rng.choice([1, 4, 16, 70]) * GB, rng.choice([None, 500.0, 5000.0])) for n in names}
    nodes = tuple(NodeInfo(f"n{i}", rng.choice([0, 0, 1, 2]),
                           {m: rng.choice(["ssd", "dram", "gpu"]) for m in rng.sample(names, rng.randint(0, 4))},
                           {"remote": rng.choice([None, 1 * GB, 1 * GB, 3 * GB]), "ssd": rng.choice([None, 2 * GB]),
                            "dram": 10 * GB}, rng.choice([0.0, 0.0, 0.5, 3.0]))
                  for i in range(rng.randint(1, 30)))
    instances = tuple(InstanceInfo(f"i{k}", rng.choice(nodes).id, rng.choice(names), rng.randint(1, 3000),
                                   rng.random() < 0.8) for k in range(rng.randint(0, 20)))
    snapshot = Snapshot(nodes, models, instances)
    for name in names:
        assert shortlist(snapshot, name)[0] == rank(snapshot, name)[0]


def test_carried_migration_options_are_checked_against_the_current_nodes():
    moved = ModelInfo("small", size_bytes=1 * GB, prefill_tokens_per_s=1000.0)
    full = NodeInfo("a", 0, {"m": "dram"}, dict(BW), 0.0)
    spare = NodeInfo("b", 1, {"small": "dram"}, dict(BW), 0.0)
    snapshot = Snapshot((full, spare), {"m": MODEL, "small": moved}, (InstanceInfo("i1", "a", "small", 100),))
    assert rank(snapshot, "m")[0].migrate == "i1"                       # indexes built on this snapshot
    busy = snapshot.updated(nodes={"b": NodeInfo("b", 0, {"small": "dram"}, dict(BW), 0.0)})
    assert not rank(busy, "m")[0].feasible                              # b filled since: no stale plan onto it
    planned = snapshot.updated(migrating=frozenset({"i1"}))
    assert rank(planned, "m")[0].migrate is None                        # i1 is already being moved
