"""Keep-alive decisions from the controller to the node loaders: the tracker's hand-computed decisions, the
record in a real Redis, and a real loader daemon ordering its evictions and pre-staging by them."""

from __future__ import annotations

import time

import pytest
from loader_daemon import LoaderDaemon
from schema_doc import documented_schema
from test_node_loader import events, make_model, wait_for

from sllm_faas.common.tiers import Tier
from sllm_faas.controller.keepalive import RANGE_S, CostKeepAlive, KeepAliveTracker
from sllm_faas.controller.scheduler import ModelInfo, NodeInfo, Snapshot
from sllm_faas.controller.simulator.cluster import CacheTier as SimulatedTier
from sllm_faas.redis_schema import keepalive as records
from sllm_faas.redis_schema.keepalive import KeepAliveRecord
from sllm_faas.redis_schema.keys import Keys
from sllm_faas.redis_schema.records import InstanceRecord, RecordError
from sllm_faas.runtime.node_loader.tiers import Tier as CacheTier

GB = 10**9
SNAPSHOT = Snapshot((NodeInfo("n1", 1, {}, {"dram": 10 * GB}),), {"m": ModelInfo("m", 4 * GB)})


def instance(active: int, node: str = "n1") -> InstanceRecord:
    return InstanceRecord(id="i1", node=node, model="m", function="f", address="http://x", state="ready",
                          active=active, tokens=0, decode_tokens_per_s=0.0, prefill_tokens_per_s=0.0,
                          heartbeat_at=0.0)


def test_tracker_decides_when_a_model_goes_idle_from_its_idle_times():
    tracker = KeepAliveTracker(CostKeepAlive(60.0, exchange_rate=10.0), container_start_s=2.0)
    assert tracker.update([instance(1)], SNAPSHOT, 0.0) == []          # busy
    # idle at t=10: no histogram yet, the fixed 60 s, instance kept on its GPU; restart = 2 s + 4 GB / 10 GB/s
    assert tracker.update([instance(0)], SNAPSHOT, 10.0) == [KeepAliveRecord("m", "n1", Tier.GPU, 60.0, 0.0, 2.4, 10.0)]
    assert tracker.update([instance(0)], SNAPSHOT, 15.0) == []         # still idle: decided once
    assert tracker.update([instance(1)], SNAPSHOT, 40.0) == []         # back: an idle time of 30 s
    now = 40.0
    for _ in range(9):  # nine more idle times of 30 s: ten, a representative histogram
        tracker.update([instance(0)], SNAPSHOT, now + 1)
        now += 31
        tracker.update([instance(1)], SNAPSHOT, now)
    decision = tracker.update([instance(0)], SNAPSHOT, now + 1)[0]
    # Every idle time is in the bin [30, 31). Keeping to 31 s: 10 x 2.4 saved - 31 GPU-s = -7; nothing: 0. A pre-warm
    # ready at 30 s, from 30 - 2.4 = 27.6 s to 31 s: 24 - 3.4 = 20.6, the best: release at once, checkpoint in DRAM.
    assert decision == KeepAliveRecord("m", "n1", Tier.DRAM, 1.0, 30.0, 2.4, now + 1)
    assert (decision.prestage_at, decision.hold_until) == (pytest.approx(now + 1 + 27.6), now + 1 + 31.0)


def test_tracker_holds_a_model_in_dram_when_its_restart_from_ssd_lands_in_the_tail():
    # 140 GB over the node's measured 6 GB/s from SSD: 2 s + 23.3 s, past TAIL_RESTART_S (10 s). No histogram yet:
    # kept on its GPUs for the fixed 60 s, its DRAM copy held for the histogram's whole range (4 h).
    snapshot = Snapshot((NodeInfo("n1", 4, {}, {"dram": 25 * GB, "ssd": 6 * GB}),),
                        {"m": ModelInfo("m", 140 * GB, gpus=4)})
    tracker = KeepAliveTracker(CostKeepAlive(60.0, exchange_rate=10.0), container_start_s=2.0)
    tracker.update([instance(1)], snapshot, 0.0)
    decision = tracker.update([instance(0)], snapshot, 10.0)[0]
    assert decision == KeepAliveRecord("m", "n1", Tier.GPU, 60.0, 0.0, 7.6, 10.0, RANGE_S)
    assert decision.hold_until == 10.0 + RANGE_S
    # the same model on a node twice as fast from SSD: 2 s + 11.7 s, still the tail; at 20 GB/s (9 s): no hold
    fast = Snapshot((NodeInfo("n1", 4, {}, {"dram": 25 * GB, "ssd": 20 * GB}),), snapshot.models)
    tracker.update([instance(1)], fast, 20.0)
    assert tracker.update([instance(0)], fast, 30.0)[0].hold_s == 0.0


def test_records_round_trip_in_redis_with_the_documented_fields(redis_ns):
    keys = Keys(redis_ns.prefix)
    now = round(time.time(), 3)  # times are stored to the millisecond
    record = KeepAliveRecord("m", "node-a", Tier.DRAM, 120.0, 300.0, 2.5, now)
    assert records.publish(redis_ns.client, keys, [record]) == 1
    assert records.read(redis_ns.client, keys, ["m", "absent"]) == {"m": record}
    fields = set(redis_ns.client.hkeys(keys.keepalive("m")))
    assert fields == documented_schema()["sllm:keepalive:<model>"]
    assert redis_ns.client.hget(keys.keepalive("m"), "prestage_at") == f"{now + 297.5:.3f}"
    assert 420 + 60 - 2 <= redis_ns.client.ttl(keys.keepalive("m")) <= 420 + 60 + 1  # a minute after hold_until
    held = KeepAliveRecord("m", "node-a", Tier.GPU, 5.0, 0.0, 7.5, now, 900.0)  # a tail model: DRAM past the window
    records.publish(redis_ns.client, keys, [held])
    assert records.read(redis_ns.client, keys, ["m"]) == {"m": held}
    assert redis_ns.client.hget(keys.keepalive("m"), "hold_until") == f"{now + 900:.3f}"
    assert 900 + 60 - 2 <= redis_ns.client.ttl(keys.keepalive("m")) <= 900 + 60 + 1
    kept = KeepAliveRecord("m", "node-a", Tier.GPU, 60.0, 0.0, 2.5, now)    # a newer decision replaces it whole
    records.publish(redis_ns.client, keys, [kept])
    assert redis_ns.client.hget(keys.keepalive("m"), "prestage_at") == ""
    assert records.read(redis_ns.client, keys, ["m"]) == {"m": kept}
    redis_ns.client.hset(keys.keepalive("m"), "tier", "ssd")               # malformed: left out, not raised
    assert records.read(redis_ns.client, keys, ["m"]) == {}
    records.publish(redis_ns.client, keys, [held])
    redis_ns.client.hset(keys.keepalive("m"), "hold_s", "forever")         # so is a hold that is not a number
    assert records.read(redis_ns.client, keys, ["m"]) == {}
    with pytest.raises(RecordError, match="hold_s.*'forever'"):
        KeepAliveRecord.from_hash(keys.keepalive("m"), redis_ns.client.hgetall(keys.keepalive("m")))


def test_eviction_order_follows_the_keep_alive_wishes(tmp_path):
    now = time.time()
    holds = {"a": now + 50, "c": now + 100, "d": now - 1}                   # d's window has ended: no wish left
    tier = CacheTier("dram", tmp_path, 1 << 20, hold_until=lambda model: holds.get(model, 0.0))
    for model in ("a", "b", "c", "d"):                                      # least recently used first: a, b, c, d
        tier.touch(model)
        time.sleep(0.001)
    assert tier.eviction_order(["a", "b", "c", "d"], now) == ["b", "d", "a", "c"]
    assert CacheTier("ssd", tmp_path / "x", 1).eviction_order([]) == []
    # the simulator's DRAM tier evicts in the same order (one function, redis_schema.keepalive.eviction_key)
    simulated = SimulatedTier(4.0)
    for model in ("a", "b", "c", "d"):
        simulated.add(model, 1.0, now)
    simulated.held_until.update(holds)
    assert simulated.add("e", 4.0, now) == ["b", "d", "a", "c"]   # room for e: all four go, in that order


@pytest.fixture
def loader(tmp_path, redis_ns):
    store = tmp_path / "remote"
    for name in ("m1", "m2", "m3", "m4", "m5", "m6"):
        make_model(store, name, 3)
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, store, redis_ns.url, redis_ns.prefix, dram_budget="7MiB").start()
    yield daemon
    daemon.stop()


def test_loader_evicts_what_the_policy_least_wants_kept(loader, redis_ns):
    keys = Keys(redis_ns.prefix)
    for name in ("m1", "m2"):
        assert loader.wait_job(loader.client.stage(name, "dram"))["state"] == "done"
    # m1 is the least recently used, but the controller wants it warm here for ten minutes (and m2 elsewhere)
    records.publish(redis_ns.client, keys, [KeepAliveRecord("m1", "node-a", Tier.GPU, 600.0, 0.0, 2.0, time.time()),
                                            KeepAliveRecord("m2", "node-b", Tier.GPU, 600.0, 0.0, 2.0, time.time())])
    wait_for(lambda: "m1" in loader.client.status()["keepalive"])
    assert set(loader.client.status()["keepalive"]) == {"m1"}              # m2's wish is for node-b
    assert loader.wait_job(loader.client.stage("m3", "dram"))["state"] == "done"
    assert set(loader.client.status()["tiers"]["dram"]["models"]) == {"m1", "m3"}
    assert [e["model"] for e in events(redis_ns, "evicted")] == ["m2"]


def test_loader_pre_stages_before_a_predicted_arrival(loader, redis_ns):
    keys = Keys(redis_ns.prefix)
    for name in ("m4", "m5", "m6"):
        assert loader.wait_job(loader.client.stage(name, "ssd"))["state"] == "done"
    now = time.time()
    # idle 10 s ago, wanted ready 12 s after that, restart 5 s: pre-stage at now - 3 (due). The same for m5 but on
    # node-b; m6's pre-stage is 100 s away. All three are read in one heartbeat.
    records.publish(redis_ns.client, keys, [KeepAliveRecord("m4", "node-a", Tier.DRAM, 100.0, 12.0, 5.0, now - 10),
                                            KeepAliveRecord("m5", "node-b", Tier.DRAM, 100.0, 12.0, 5.0, now - 10),
                                            KeepAliveRecord("m6", "node-a", Tier.DRAM, 100.0, 115.0, 5.0, now - 10)])
    wait_for(lambda: loader.client.where("m4")["tier"] == "dram")
    assert [e["model"] for e in events(redis_ns, "prestage")] == ["m4"]
    job = loader.wait_job(loader.client.job(events(redis_ns, "prestage")[0]["job"]))
    assert (job["state"], job["tier"], job["step"]) == ("done", "dram", "ssd->dram")  # the typed step, as shown
    assert loader.client.where("m5")["tier"] == "ssd" and loader.client.where("m6")["tier"] == "ssd"
    assert not [e for e in events(redis_ns, "stage_queued") if e["model"] in ("m5", "m6") and e["tier"] == "dram"]
    wait_for(lambda: len(events(redis_ns, "stage_queued", "m4")) == 2)    # ssd earlier, dram now; and only once
