"""The node loader sidecar, as a real daemon on a Unix socket, with real files and real Redis."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
import torch
from loader_daemon import LoaderDaemon
from prom import value
from schema_doc import assert_keys_documented

from sllm_faas.redis_schema import Keys
from sllm_faas.runtime.checkpoint import read_manifest, save_state_dict
from sllm_faas.runtime.embedded_redis import EmbeddedRedis, free_tcp_port

ROOT = Path(__file__).resolve().parent.parent


def make_model(store: Path, name: str, mib: int) -> Path:
    torch.manual_seed(len(name))
    count = max(1, mib) * (1 << 20) // 4
    return save_state_dict({"w": torch.randn(count), "b": torch.arange(10)}, store / name)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "remote"


@pytest.fixture
def daemon(tmp_path, store, redis_ns):
    make_model(store, "small", 1)
    instance = LoaderDaemon(tmp_path / "node", store, redis_ns.url, redis_ns.prefix)
    (tmp_path / "node").mkdir()
    instance.start()
    yield instance
    instance.stop()


def events(redis_ns, kind: str | None = None, model: str | None = None) -> list[dict]:
    entries = [fields for _, fields in redis_ns.client.xrange(Keys(redis_ns.prefix).events)]
    return [e for e in entries if (kind is None or e["kind"] == kind) and (model is None or e["model"] == model)]


def test_stage_where_lease_release(daemon):
    job = daemon.wait_job(daemon.client.stage("small", "dram"))
    assert job["state"] == "done" and job["progress"] == 1.0
    where = daemon.client.where("small")
    assert where["tier"] == "dram" and where["tiers"] == ["dram", "ssd"]
    assert read_manifest(where["path"]).tensors["w"].nbytes == 1 << 20
    lease = daemon.client.lease("small", "test")
    status, answer = daemon.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})
    assert status == 409 and "leased" in answer["error"]
    daemon.client.release(lease["id"])
    assert daemon.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})[1]["freed_bytes"] > 0
    assert daemon.client.where("small")["tier"] == "ssd"


def test_fifty_concurrent_stage_requests_share_one_staging(daemon, store, redis_ns):
    make_model(store, "big", 96)
    with ThreadPoolExecutor(50) as pool:
        jobs = list(pool.map(lambda _: daemon.client.stage("big", "dram"), range(50)))
    assert len({j["id"] for j in jobs}) == 1
    assert daemon.wait_job(jobs[0])["state"] == "done"
    assert len(events(redis_ns, "stage_started", "big")) == 1
    assert len(events(redis_ns, "staged", "big")) == 1


def test_lru_eviction_skips_leased_models(tmp_path, store, redis_ns):
    for name in ("m1", "m2", "m3"):
        make_model(store, name, 3)
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, store, redis_ns.url, redis_ns.prefix, dram_budget="7MiB").start()
    try:
        for name in ("m1", "m2"):
            assert daemon.wait_job(daemon.client.stage(name, "dram"))["state"] == "done"
        daemon.client.lease("m1", "instance-1")  # m1 is the least recently used, but leased
        assert daemon.wait_job(daemon.client.stage("m3", "dram"))["state"] == "done"
        dram = daemon.client.status()["tiers"]["dram"]["models"]
        assert set(dram) == {"m1", "m3"}
        assert [e["model"] for e in events(redis_ns, "evicted")] == ["m2"]
        # everything left is leased or needed: a fourth model cannot fit, and says why
        daemon.client.lease("m3", "instance-3")
        failed = daemon.wait_job(daemon.client.stage("m2", "dram"))
        assert failed["state"] == "failed" and "leased" in failed["error"]
    finally:
        daemon.stop()


def test_budget_overflow_is_a_clear_error(tmp_path, store, redis_ns):
    make_model(store, "huge", 8)
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, store, redis_ns.url, redis_ns.prefix, dram_budget="4MiB").start()
    try:
        job = daemon.wait_job(daemon.client.stage("huge", "dram"))
        assert job["state"] == "failed"
        assert "huge needs" in job["error"] and "budget is 4194304" in job["error"]
        assert daemon.client.where("huge")["tier"] == "ssd"  # the SSD step completed; DRAM never half-filled
        assert not list((node / "dram").iterdir())
    finally:
        daemon.stop()


def test_lease_expires_without_renewal(daemon, redis_ns):
    daemon.wait_job(daemon.client.stage("small", "dram"))
    lease = daemon.client.lease("small", "killed-instance", ttl_s=0.5)
    assert daemon.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})[0] == 409
    time.sleep(1.0)
    assert daemon.client.request("POST", f"/v1/leases/{lease['id']}/renew")[0] == 404
    assert daemon.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})[0] == 200
    deadline = time.monotonic() + 5
    while not events(redis_ns, "lease_expired") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert events(redis_ns, "lease_expired")[0]["holder"] == "killed-instance"


def test_renewed_lease_survives(daemon):
    from sllm_faas.runtime.node_loader.client import LeaseKeeper

    daemon.wait_job(daemon.client.stage("small", "dram"))
    keeper = LeaseKeeper(daemon.client, daemon.client.lease("small", "live-instance", ttl_s=0.6))
    time.sleep(1.5)
    assert daemon.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})[0] == 409
    keeper.stop()
    assert daemon.client.status()["leases"] == []


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "", "a" * 300, "a\x00b", ".hidden", "a/b", "..", 7, "m\n"])
def test_bad_model_names_are_rejected(daemon, name):
    status, answer = daemon.client.request("POST", "/v1/stage", {"model": name, "tier": "dram"})
    assert status == 400 and "invalid model name" in answer["error"]
    assert daemon.client.status()["queue"] == []


def test_bad_requests(daemon):
    assert daemon.client.request("POST", "/v1/stage", {"model": "small", "tier": "floppy"})[0] == 400
    assert daemon.client.request("POST", "/v1/stage", {"model": "missing", "tier": "dram"})[0] == 202
    assert daemon.client.request("GET", "/v1/jobs/job-999999")[0] == 404
    assert daemon.client.request("POST", "/v1/leases", {"model": "nowhere", "holder": "x"})[0] == 404
    status, _ = daemon.client.request("POST", "/v1/stage", {"model": "x" * 100_000})
    assert status == 413


def test_missing_model_fails_its_job(daemon):
    job = daemon.wait_job(daemon.client.stage("missing", "dram"))
    assert job["state"] == "failed" and "not in the store" in job["error"]


def test_corrupt_download_is_rejected(tmp_path, store, redis_ns, daemon):
    model = make_model(store, "corrupt", 2)
    part = store / "corrupt" / model.partitions[0].file
    data = bytearray(part.read_bytes())
    data[12345] ^= 0x01
    part.write_bytes(bytes(data))
    job = daemon.wait_job(daemon.client.stage("corrupt", "ssd"))
    assert job["state"] == "failed" and "checksum mismatch" in job["error"]
    assert daemon.client.where("corrupt")["tier"] == "remote"
    assert not any(p.name.startswith(".corrupt") or p.name == "corrupt" for p in (daemon.root / "ssd").iterdir())


def test_kill_9_mid_staging_then_restart(tmp_path, store, redis_ns):
    make_model(store, "slow", 384)
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, store, redis_ns.url, redis_ns.prefix, dram_budget="2GiB").start()
    daemon.client.stage("slow", "dram")
    deadline = time.monotonic() + 30
    partial = []
    while not partial and time.monotonic() < deadline:
        partial = [p for tier in ("ssd", "dram") for p in (node / tier).glob(".slow.partial-*")]
        time.sleep(0.002)
    daemon.kill()
    assert partial, "staging never started"
    assert not (node / "ssd" / "slow").exists() or read_manifest(node / "ssd" / "slow")
    assert not (node / "dram" / "slow").exists()
    restarted = LoaderDaemon(node, store, redis_ns.url, redis_ns.prefix, dram_budget="2GiB").start()
    try:
        leftovers = [p.name for tier in ("ssd", "dram") for p in (node / tier).iterdir() if p.name.startswith(".")]
        assert leftovers == []
        assert restarted.client.where("slow")["tier"] in ("remote", "ssd")
        assert restarted.wait_job(restarted.client.stage("slow", "dram"))["state"] == "done"
    finally:
        restarted.stop()


def test_restart_rebuilds_state_from_disk(daemon, tmp_path, store, redis_ns):
    daemon.wait_job(daemon.client.stage("small", "dram"))
    daemon.stop()
    again = LoaderDaemon(daemon.root, store, redis_ns.url, redis_ns.prefix).start()
    try:
        assert again.client.where("small")["tiers"] == ["dram", "ssd"]
    finally:
        again.stop()


def test_redis_down_and_back(tmp_path, store):
    make_model(store, "small", 1)
    port = free_tcp_port()
    server = EmbeddedRedis(port=port)
    server.start()
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, store, server.url, "sllm:").start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        wait_for(lambda: client.exists("sllm:node:node-a"))
        server.stop()
        job = daemon.wait_job(daemon.client.stage("small", "dram"))  # local service goes on
        assert job["state"] == "done" and daemon.client.status()["redis"] is False
        server = EmbeddedRedis(port=port)
        server.start()
        wait_for(lambda: client.sismember("sllm:node:node-a:models:dram", "small"))
        kinds = [fields["kind"] for _, fields in client.xrange("sllm:events")]
        assert "staged" in kinds  # events from the outage were kept and delivered
    finally:
        daemon.stop()
        server.stop()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_published_keys_match_the_documented_schema(daemon, redis_ns):
    daemon.wait_job(daemon.client.stage("small", "dram"))
    daemon.client.lease("small", "x")
    wait_for(lambda: redis_ns.client.sismember(redis_ns.prefix + "node:node-a:models:dram", "small"))
    assert_keys_documented(redis_ns.client, redis_ns.prefix)
    node = redis_ns.client.hgetall(redis_ns.prefix + "node:node-a")
    assert float(node["heartbeat_at"]) > time.time() - 10 and int(node["dram_used"]) > 0
    assert 0 < redis_ns.client.ttl(redis_ns.prefix + "node:node-a") <= 2
    assert float(node["bw_ssd"]) > 0 and float(node["bw_dram"]) > 0


def test_node_record_expires_when_heartbeats_stop(daemon, redis_ns):
    wait_for(lambda: redis_ns.client.exists(redis_ns.prefix + "node:node-a"))
    daemon.kill()
    time.sleep(2.5)
    assert not redis_ns.client.exists(redis_ns.prefix + "node:node-a")


def test_loader_metrics(daemon):
    status, _ = daemon.client.request("GET", "/healthz")
    assert status == 200
    deadline = time.monotonic() + 10
    while not daemon.client.status()["redis"]:  # the first heartbeat publishes a moment after the API is up
        assert time.monotonic() < deadline, "the loader never published to Redis"
        time.sleep(0.05)
    connection_text = _raw_get(daemon.socket, "/metrics")
    for name in ("sllm_loader_tier_used_bytes", "sllm_loader_bandwidth_bytes_per_second", "sllm_loader_queue_length"):
        assert name in connection_text
    assert value(connection_text, "sllm_loader_redis_up") == 1


def _raw_get(socket_path: str, path: str) -> str:
    from sllm_faas.runtime.node_loader.client import _UnixConnection

    connection = _UnixConnection(socket_path, 5)
    connection.request("GET", path)
    return connection.getresponse().read().decode()



def test_runtime_stages_through_the_loader_and_leases(tmp_path, redis_ns, smollm2):
    from test_runtime_server import ROOT as REPO
    from test_runtime_server import Server, shrinkwrap

    store = tmp_path / "remote"
    shutil.copytree(smollm2["sllm"], store / "smollm2")
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, store, redis_ns.url, redis_ns.prefix).start()
    build = shrinkwrap(tmp_path, "fn", REPO / "templates" / "sllm-python" / "function")
    try:
        first = Server(build, "smollm2", SLLM_LOADER_SOCKET=daemon.socket)
        try:
            breakdown = first.wait_ready()["cold_start"]
            assert breakdown["tier"] == "remote" and breakdown["staging_wait_s"] > 0
            holders = [lease["holder"] for lease in daemon.client.status()["leases"]]
            assert len(holders) == 1
            second = Server(build, "smollm2", SLLM_LOADER_SOCKET=daemon.socket)
            try:
                assert second.wait_ready()["cold_start"]["tier"] == "dram"
                assert len(daemon.client.status()["leases"]) == 2
            finally:
                second.stop()
            answer = requests.post(first.url + "/v1/completions", json={"prompt": "Paris is", "max_tokens": 3},
                                   timeout=60)
            assert answer.status_code == 200
        finally:
            first.stop()
        assert daemon.client.status()["leases"] == []  # released at exit, not left to expire
        assert daemon.client.where("smollm2")["tier"] == "dram"
    finally:
        daemon.stop()
