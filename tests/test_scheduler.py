"""The pure scheduler core, on hand-computed snapshots."""

from __future__ import annotations

import math

import pytest

from sllm_faas.controller.scheduler import (
    Action,
    InstanceInfo,
    ModelInfo,
    NodeInfo,
    Plan,
    Snapshot,
    cluster_bandwidths,
    rank,
)

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
    assert ranked[0].plan() == Plan(Action.LOAD, "a", "dram", 0.4, 0.4)
    assert ranked[0].plan().as_json() == {"action": "load", "node": "a", "tier": "dram", "estimate_s": 0.4,
                                          "load_s": 0.4}


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
    assert ranked[1].plan().estimate_s is None and ranked[1].plan().as_json()["estimate_s"] is None


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
    assert best.plan().action is Action.MIGRATE_THEN_LOAD
    assert best.plan().as_json() == {"action": "migrate_then_load", "node": "a", "tier": "dram",
                                     "estimate_s": 0.8, "load_s": 0.4, "instance": "short", "to": "b",
                                     "migrate_s": 0.4}
    assert (ranked[1].node, ranked[1].estimate_s) == ("b", 4.0)


def test_a_migration_must_beat_every_other_way_by_its_price():
    # "a" holds m in DRAM, its slot taken by "other" (likely 100 s more); "b" is free, remote only.
    other = ModelInfo("other", 2 * GB, prefill_tokens_per_s=2000.0, migration_overhead_s=0.1)
    nodes = (NodeInfo("a", 0, {"m": "dram"}, dict(BW)), NodeInfo("b", 1, {}, dict(BW)))
    running = (InstanceInfo("i", "a", "other", tokens=2000, remaining_s=100.0),)
    ranked = rank(Snapshot(nodes, {"m": MODEL, "other": other}, running), "m")
    # move: 2000 / 2000 + 0.1 = 1.1 s recompute + "other" from b's remote 2 GB / 1 GB/s = 2 s: 3.1 s; then m from
    # a's DRAM 0.4 s: 3.5 s, sooner than m from b's remote (4 s). But the move holds b's GPU for 3.1 s, priced at
    # 3.1 x (1 + 0 pending) s of delay: 6.6 > 4, so loading on b ranks first.
    assert [(d.node, d.migrate, d.estimate_s, d.price_s) for d in ranked] == [
        ("b", None, 4.0, 0.0), ("a", "i", pytest.approx(3.5), pytest.approx(3.1))]
    # b's store link four times slower: m from b's remote takes 16 s, the move 1.1 + 8 = 9.1 s (priced 9.1):
    # migrating still frees a at 9.1 s, m is loaded at 9.5 s, 18.6 priced, and loading on b (16 s) wins again;
    # with b holding "other" in DRAM the move is 1.1 + 0.2 = 1.3 s: 1.7 + 1.3 = 3.0 s priced beats 16 s.
    slow = {**BW, "remote": 0.25 * GB}
    nodes = (NodeInfo("a", 0, {"m": "dram"}, dict(BW)), NodeInfo("b", 1, {}, slow))
    assert rank(Snapshot(nodes, {"m": MODEL, "other": other}, running), "m")[0].node == "b"
    nodes = (NodeInfo("a", 0, {"m": "dram"}, dict(BW)), NodeInfo("b", 1, {"other": "dram"}, slow))
    best = rank(Snapshot(nodes, {"m": MODEL, "other": other}, running), "m")[0]
    assert (best.node, best.migrate, best.migrate_to) == ("a", "i", "b")
    assert (best.estimate_s, best.price_s) == (pytest.approx(1.7), pytest.approx(1.3))


def test_only_its_own_model_waits_for_a_loading_instance():
    # "a" is full with an instance still loading (ends 1 s from now, after its first request); "b" loads m from
    # remote in 4 s. A request of m waits for a loading instance of m (served warm at 1 s); a loading instance of
    # another model frees no GPU anyone counts on, so "a" is infeasible for m there.
    other = ModelInfo("other", 2 * GB, prefill_tokens_per_s=2000.0)
    nodes = (NodeInfo("a", 0, {"m": "dram"}, dict(BW)), NodeInfo("b", 1, {}, dict(BW)))
    own = Snapshot(nodes, {"m": MODEL}, (InstanceInfo("i", "a", "m", 0, False, 1.0, loading=True),))
    best = rank(own, "m")[0]
    assert (best.node, best.wait_for, best.estimate_s, best.tier) == ("a", ("i",), 1.0, "gpu")
    foreign = Snapshot(nodes, {"m": MODEL, "other": other},
                       (InstanceInfo("i", "a", "other", 0, False, 1.0, loading=True),))
    assert [(d.node, d.feasible) for d in rank(foreign, "m")] == [("b", True), ("a", False)]


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

    from sllm_faas.controller.scheduler import shortlist

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
    snapshot, indexed = Snapshot(nodes, models, instances), Snapshot(nodes, models, instances)
    indexed.index_holders()  # as the controller's cache does after each read
    for name in names:
        assert shortlist(snapshot, name)[0] == rank(snapshot, name)[0] == shortlist(indexed, name)[0]


def test_updated_snapshot_patches_its_node_index():
    snapshot = Snapshot((node("a"), node("b")), {})
    assert snapshot.node_by_id["a"] == node("a")
    busy = NodeInfo("a", 0)
    copy = snapshot.updated(nodes={"a": busy, "ghost": node("ghost")})
    assert copy.node_by_id == {"a": busy, "b": node("b")} == {n.id: n for n in copy.nodes}
    assert snapshot.node_by_id["a"] == node("a")  # the original is untouched


@pytest.mark.parametrize("seed", range(300))
def test_plans_first_decision_is_the_full_rankings_with_full_nodes_waits_and_migrations(seed):
    """The fast path (shortlist, frontiers of free and of full nodes, full nodes pruned by the best other load,
    destinations looked up only where a move can still win) decides exactly what ranking every node decides, on
    crowded snapshots: most nodes full, multi-GPU models, instances to wait for or move, requests pending; and so
    it does without the instances on nodes with room for the model."""
    import random

    from sllm_faas.controller.scheduler import plans

    rng = random.Random(seed)
    names = [f"m{i}" for i in range(rng.randint(1, 15))]
    models = {n: ModelInfo(n, rng.choice([1, 4, 16, 70]) * GB, rng.choice([None, 500.0, 5000.0, 20000.0]),
                           rng.choice([0.05, 0.1]), rng.choice([1, 1, 2, 4])) for n in names}
    count = rng.randint(1, 60)
    held = [{m: rng.choice(["ssd", "dram", "gpu"]) for m in rng.sample(names, rng.randint(0, min(4, len(names))))}
            for _ in range(count)]
    instances = []
    for k in range(rng.randint(0, 60)):
        remaining = rng.choice([None, rng.random() * 30, rng.random() * 300])
        where, model = rng.randrange(count), rng.choice(names)
        held[where][model] = "gpu"  # a node running an instance holds its model on GPU
        likely = None if remaining is None else rng.choice([None, remaining * rng.random()])
        instances.append(InstanceInfo(f"i{k}", f"n{where}", model, rng.randint(1, 3000), rng.random() < 0.8,
                                      remaining, likely, loading=rng.random() < 0.1))
    nodes = tuple(NodeInfo(f"n{i}", rng.choice([0, 0, 0, 1, 2, 4]), held[i],
                           {"remote": rng.choice([None, 1 * GB, 1 * GB, 3 * GB, 1.1 * GB]),
                            "ssd": rng.choice([None, 2 * GB]), "dram": rng.choice([10 * GB, 12 * GB])},
                           rng.choice([0.0, 0.0, 0.5, 3.0, rng.random() * 5])) for i in range(count))
    snapshot = Snapshot(nodes, models, tuple(instances), pending=rng.choice([0, 0, 1, 5, 30]))
    for name in names:
        expected = next((d for d in rank(snapshot, name) if d.feasible), None)
        assert next(iter(plans(snapshot, name)), None) == expected
        # the simulator lists only the instances on nodes without room for the model placed (cluster.snapshot)
        room = {n.id for n in nodes if n.free_slots >= models[name].gpus}
        trimmed = Snapshot(nodes, models, tuple(i for i in instances if i.node not in room), pending=snapshot.pending)
        assert next(iter(plans(trimmed, name)), None) == expected


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


def test_slots_are_gpus_and_a_wait_or_migration_must_free_enough_of_them():
    big = ModelInfo("big", size_bytes=4 * GB, prefill_tokens_per_s=1000.0, gpus=2)
    small = ModelInfo("small", size_bytes=2 * GB, prefill_tokens_per_s=1000.0, migration_overhead_s=0.1)
    nodes = (NodeInfo("a", 1, {"big": "dram", "small": "dram"}, dict(BW)),   # 1 GPU free: not enough alone
             NodeInfo("b", 1, {"small": "dram"}, dict(BW)))
    snapshot = Snapshot(nodes, {"big": big, "small": small}, (InstanceInfo("s", "a", "small", tokens=100),))
    best = rank(snapshot, "big")[0]
    # moving s (1 GPU) to b: 100 / 1000 + 0.1 + 2 GB / 10 GB/s = 0.4 s; then big loads on a from DRAM: 0.4 s
    assert (best.node, best.migrate, best.migrate_to, best.estimate_s) == ("a", "s", "b", pytest.approx(0.8))
    assert not rank(Snapshot(nodes, {"big": big, "small": small}), "big")[0].feasible  # one GPU never fits big


def test_waiting_beats_migrating_when_the_instance_ends_sooner():
    small = ModelInfo("small", size_bytes=2 * GB, prefill_tokens_per_s=1000.0, migration_overhead_s=0.1)
    nodes = (NodeInfo("a", 0, {"m": "dram"}, dict(BW)), NodeInfo("b", 1, {"small": "dram"}, dict(BW)))
    models = {"m": MODEL, "small": small}
    ending = Snapshot(nodes, models, (InstanceInfo("s", "a", "small", tokens=100, remaining_s=0.3),))
    best = rank(ending, "m")[0]
    # waiting 0.3 s then the 0.4 s DRAM load (0.7 s) beats moving s (0.4 s, then 0.4 s), and b's 4 s remote load
    assert (best.node, best.wait_for, best.migrate, best.estimate_s) == ("a", ("s",), None, pytest.approx(0.7))
    assert best.plan().action is Action.WAIT_THEN_LOAD and best.plan().as_json()["action"] == "wait_then_load"
    lasting = Snapshot(nodes, models, (InstanceInfo("s", "a", "small", tokens=100, remaining_s=30.0),))
    assert rank(lasting, "m")[0].migrate == "s"  # migrating only where it frees the GPUs sooner
    same = Snapshot(nodes, models, (InstanceInfo("own", "a", "m", tokens=100, remaining_s=0.3),))
    assert (rank(same, "m")[0].wait_for, rank(same, "m")[0].estimate_s) == (("own",), 0.3)  # it serves warm


def test_expected_remaining_tokens():
    from sllm_faas.controller.scheduler import expected_remaining_tokens

    assert expected_remaining_tokens(0, 300.0, 1.0, 2048) == 300.0       # nothing known: the mean
    assert expected_remaining_tokens(100, 300.0, 0.0, 2048) == 200.0     # no spread: the rest of the mean
    assert expected_remaining_tokens(2000, 300.0, 1.0, 2048) <= 48.0     # never past the cap
    # E[L - k | L > k] by numerical integration of the lognormal density, k = 200 (mean 300, cv 1)
    sigma = math.sqrt(math.log(2.0))
    mu = math.log(300.0) - sigma**2 / 2
    x = [200 + (i + 0.5) * 0.5 for i in range(400_000)]  # midpoints up to 200,200 tokens
    density = [math.exp(-(math.log(v) - mu) ** 2 / (2 * sigma**2)) / (v * sigma * math.sqrt(2 * math.pi)) for v in x]
    expected = sum((v - 200) * d for v, d in zip(x, density, strict=True)) / sum(density)
    assert expected_remaining_tokens(200, 300.0, 1.0, 10**9) == pytest.approx(expected, rel=1e-3)


def _one_migration_candidate(remaining_s: float, likely_s: float | None = None, pending: int = 0) -> Snapshot:
    # "a" holds m in DRAM, its slot taken by "short" (move to "b": 200 / 2000 + 0.1 = 0.2 s recompute + 0.2 s
    # reload from b's DRAM = 0.4 s); "b" is free but would load m from remote (4 s)
    models = {"m": MODEL, "other": ModelInfo("other", 2 * GB, prefill_tokens_per_s=2000.0, migration_overhead_s=0.1)}
    return Snapshot(
        (NodeInfo("a", 0, {"m": "dram", "other": "dram"}, dict(BW)), NodeInfo("b", 1, {"other": "dram"}, dict(BW))),
        models, (InstanceInfo("short", "a", "other", 200, remaining_s=remaining_s, likely_remaining_s=likely_s),),
        pending=pending)


def test_migration_priced_by_the_requests_pending_for_gpus():
    # idle cluster: wait 2 s - move 0.4 s > 0.4 s: migrate, m then loads from DRAM: 0.4 + 0.4 = 0.8 s
    best = rank(_one_migration_candidate(2.0), "m")[0]
    assert (best.node, best.migrate, best.estimate_s) == ("a", "short", pytest.approx(0.8))
    # three more requests want GPUs: the move's 0.4 s of b's GPUs costs 0.4 x (1 + 3) = 1.6 s, not under the
    # 1.6 s it saves: wait for "short" instead (2 s, then 0.4 s from DRAM), still ahead of b's remote load (4 s)
    best = rank(_one_migration_candidate(2.0, pending=3), "m")[0]
    assert (best.node, best.migrate, best.wait_for, best.estimate_s) == ("a", None, ("short",), pytest.approx(2.4))
    assert rank(_one_migration_candidate(2.0, pending=2), "m")[0].migrate == "short"  # 1.2 s < 1.6 s: still pays


def test_migration_needs_the_request_likely_to_outlast_it():
    # expected 2 s left (a heavy tail's mean) but as likely as not under 0.7 s: 0.7 - 0.4 < 0.4, the move would
    # more often than not cost more than it saves: wait (2 s + 0.4 s) though the mean says migrate
    best = rank(_one_migration_candidate(2.0, likely_s=0.7), "m")[0]
    assert (best.migrate, best.wait_for, best.estimate_s) == (None, ("short",), pytest.approx(2.4))
    assert rank(_one_migration_candidate(2.0, likely_s=0.9), "m")[0].migrate == "short"


def test_median_remaining_tokens():
    from sllm_faas.controller.scheduler import median_remaining_tokens

    assert median_remaining_tokens(0, 300.0, 1.0, 10**9) == pytest.approx(300.0 / math.sqrt(2))  # exp(mu)
    assert median_remaining_tokens(100, 300.0, 0.0, 2048) == 200.0     # no spread: the rest of the mean
    assert median_remaining_tokens(2000, 300.0, 1.0, 2048) <= 48.0     # never past the cap
    # P(L > k + x) = P(L > k) / 2 for the lognormal with mean 300, cv 1 (sigma^2 = ln 2), k = 200
    sigma = math.sqrt(math.log(2.0))
    mu = math.log(300.0) - sigma**2 / 2
    survival = lambda v: 0.5 * math.erfc((math.log(v) - mu) / (sigma * math.sqrt(2)))  # noqa: E731
    x = median_remaining_tokens(200, 300.0, 1.0, 10**9)
    assert survival(200 + x) == pytest.approx(survival(200) / 2, rel=1e-9)
    assert x < 252.1  # under the conditional mean (expected_remaining_tokens(200, ...) = 252.1)


def test_plans_rank_every_node_only_when_the_shortlist_is_used_up(monkeypatch):
    """The first decision comes from the shortlist; ranking all nodes (O(n) per decision) waits until a caller
    has tried every shortlisted node. It ran at the first decision, which made each decision ~6x slower."""
    from sllm_faas.controller import scheduler

    nodes = (node("a", "dram"),) + tuple(node(f"r{i}", None) for i in range(50))
    snapshot = Snapshot(nodes, {"m": MODEL})
    calls = []
    full_rank = scheduler.rank
    monkeypatch.setattr(scheduler, "rank", lambda *args: calls.append(args) or full_rank(*args))
    options = scheduler.plans(snapshot, "m")
    decisions = iter(options)
    assert next(decisions).node == "a" and calls == []
    taken = [next(decisions) for _ in range(len(options.ranked) - 1)]
    assert calls == [] and len(taken) == len(options.ranked) - 1
    rest = list(decisions)   # every shortlisted node was taken meanwhile: now the full ranking
    assert len(calls) == 1 and {d.node for d in rest}.isdisjoint(d.node for d in options.ranked)
    assert len(options.ranked) + len(rest) == len(nodes)
