"""The node loader against hostile stores, racing clients and restarts (issue #13 points 3, 4, 8, 9, 11, 17; the
TCP token; issue #14 point 6). Real files, a real HTTP store, real loader processes; no mocks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from flask import Flask, Response
from loader_daemon import LoaderDaemon
from werkzeug.serving import make_server

from sllm_faas.runtime.checkpoint import save_state_dict
from sllm_faas.runtime.checkpoint.format import MAX_MANIFEST_BYTES, CheckpointError
from sllm_faas.runtime.embedded_redis import free_tcp_port
from sllm_faas.runtime.node_loader.api import create_app
from sllm_faas.runtime.node_loader.client import LoaderClient, LoaderUnavailable
from sllm_faas.runtime.node_loader.config import LoaderConfig
from sllm_faas.runtime.node_loader.service import LoaderError, NodeLoader
from sllm_faas.runtime.node_loader.store import HttpStore, LocalStore, StoreError

ROOT = Path(__file__).resolve().parent.parent


def make_model(store: Path, name: str, floats: int = 1024):
    return save_state_dict({"w": torch.arange(floats, dtype=torch.float32)}, store / name)


def in_process_loader(tmp_path: Path, remote: str, **settings) -> NodeLoader:
    config = LoaderConfig(node_id="node-a", remote=remote, ssd_dir=str(tmp_path / "ssd"),
                          dram_dir=str(tmp_path / "dram"), probe_bytes=1 << 20, **settings)
    return NodeLoader(config).start(probe=False)


def wait(job, timeout: float = 30.0):
    assert job.finished.wait(timeout), f"job {job.id} ({job.model} -> {job.tier}) still {job.state} after {timeout}s"
    return job


class ByteServer:
    """A real HTTP store whose answers are given per path: bytes, or a generator (for trickles and floods)."""

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}
        app = Flask("hostile-store")

        @app.get("/<model>/<name>")
        def serve(model: str, name: str):
            body = self.routes.get(f"{model}/{name}")
            if body is None:
                return "missing", 404
            return Response(body() if callable(body) else body)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve_dir(self, directory: Path, model: str) -> None:
        for path in directory.iterdir():
            self.routes[f"{model}/{path.name}"] = path.read_bytes()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def byte_server():
    server = ByteServer()
    yield server
    server.close()


# -- point 3: one bad manifest must not stop staging on the node ------------------------------------------------
def test_hostile_remote_manifest_fails_its_job_and_staging_goes_on(tmp_path):
    store = tmp_path / "remote"
    make_model(store, "good")
    for name, text in (("deep", "[" * 100_000 + "]" * 100_000), ("bigint", '{"format": ' + "9" * 5000 + "}")):
        (store / name).mkdir()
        (store / name / "manifest.json").write_text(text)
    loader = in_process_loader(tmp_path, str(store), stage_workers=1)
    try:
        deep, bigint = loader.stage("deep", "ssd"), loader.stage("bigint", "ssd")
        good = loader.stage("good", "dram")
        assert wait(deep).state == "failed" and "nested deeper" in deep.error and "deep" in deep.error
        assert wait(bigint).state == "failed" and "invalid JSON" in bigint.error
        assert wait(good).state == "done"
        assert loader.dead_loops() == []
    finally:
        loader.stop()


def test_healthz_is_503_naming_a_dead_background_loop(tmp_path):
    make_model(tmp_path / "remote", "good")
    loader = in_process_loader(tmp_path, str(tmp_path / "remote"))
    client = create_app(loader).test_client()
    assert client.get("/healthz").status_code == 200
    loader.stop()  # the loops end; a process still answering must not claim to be healthy
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert "sllm-loader-stage-worker-0" in answer.json["error"] and "heartbeat" in answer.json["error"]


# -- point 17: the API answers 400 to deep JSON -----------------------------------------------------------------
def test_loader_api_deep_json_body_is_400_not_500(tmp_path):
    make_model(tmp_path / "remote", "good")
    loader = in_process_loader(tmp_path, str(tmp_path / "remote"))
    try:
        client = create_app(loader).test_client()
        answer = client.post("/v1/stage", data='{"model": ' + "[" * 20_000 + "]" * 20_000 + "}",
                             content_type="application/json")
        assert answer.status_code == 400 and "nested deeper" in answer.json["error"]
        answer = client.post("/v1/leases", data='{"model": "good", "holder": "\\ud800"}',
                             content_type="application/json")
        assert answer.status_code == 400 and "surrogate" in answer.json["error"]
    finally:
        loader.stop()


def test_lease_ttl_zero_is_refused_not_silently_the_default(tmp_path):
    make_model(tmp_path / "remote", "good")
    loader = in_process_loader(tmp_path, str(tmp_path / "remote"))
    try:
        loader.stage("good", "ssd")
        deadline = time.monotonic() + 30
        while loader.where("good")["tier"] != "ssd":
            assert time.monotonic() < deadline, "staging never finished"
            time.sleep(0.05)
        client = create_app(loader).test_client()
        for ttl in (0, 0.0, -1, 3601):
            answer = client.post("/v1/leases", json={"model": "good", "holder": "h", "ttl_s": ttl})
            assert answer.status_code == 400 and "ttl_s" in answer.json["error"], (ttl, answer.json)
        assert client.post("/v1/leases", json={"model": "good", "holder": "h"}).status_code == 201
    finally:
        loader.stop()


# -- point 4: downloads are bounded by the manifest ------------------------------------------------------------
def test_local_store_partition_larger_than_declared_is_refused_not_copied(tmp_path):
    (tmp_path / "remote" / "m").mkdir(parents=True)
    (tmp_path / "remote" / "m" / "part-00000.bin").write_bytes(b"\1" * (4 << 20))
    destination = tmp_path / "out.bin"
    with pytest.raises((StoreError, CheckpointError), match="4194304 bytes, manifest says 4096"):
        LocalStore(tmp_path / "remote").fetch("m", "part-00000.bin", destination, 4096, lambda n: None)
    assert not destination.exists() or destination.stat().st_size == 0


def test_http_store_sending_more_than_declared_is_stopped_and_removed(tmp_path, byte_server):
    byte_server.routes["m/part-00000.bin"] = b"\1" * (4 << 20)
    destination = tmp_path / "out.bin"
    written = []
    with pytest.raises(StoreError, match="more than the 4096 bytes the manifest declares"):
        HttpStore(byte_server.url).fetch("m", "part-00000.bin", destination, 4096, written.append)
    assert not destination.exists() and sum(written) <= 4096


def test_remote_manifest_over_the_size_limit_is_not_read_into_memory(tmp_path, byte_server):
    mebibytes = MAX_MANIFEST_BYTES // (1 << 20) + 2
    byte_server.routes["m/manifest.json"] = lambda: (b" " * (1 << 20) for _ in range(mebibytes))
    with pytest.raises(StoreError, match="exceeds the"):
        HttpStore(byte_server.url).read_manifest("m")
    (tmp_path / "remote" / "m").mkdir(parents=True)
    with open(tmp_path / "remote" / "m" / "manifest.json", "wb") as handle:
        handle.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match="exceeds the"):
        LocalStore(tmp_path / "remote").read_manifest("m")


# -- point 9: a trickling store has a deadline and does not block other models -----------------------------------
def trickle(stop: threading.Event):
    def body():
        while not stop.wait(0.3):
            yield b"x"
    return body


def test_trickling_store_hits_the_overall_transfer_deadline(tmp_path, byte_server):
    stop = threading.Event()
    byte_server.routes["m/part-00000.bin"] = trickle(stop)
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match="transfer deadline"):
            HttpStore(byte_server.url, timeout=30, transfer_timeout_s=1.5).fetch(
                "m", "part-00000.bin", tmp_path / "out.bin", 4096, lambda n: None)
    finally:
        stop.set()
    assert time.monotonic() - started < 30  # bounded by the deadline, not by the 30 s per-read timeout


def test_slow_store_does_not_block_staging_of_other_models(tmp_path, byte_server):
    make_model(tmp_path / "models", "slow")
    make_model(tmp_path / "models", "fast")
    byte_server.serve_dir(tmp_path / "models" / "slow", "slow")
    byte_server.serve_dir(tmp_path / "models" / "fast", "fast")
    stop = threading.Event()
    byte_server.routes["slow/part-00000.bin"] = trickle(stop)
    loader = in_process_loader(tmp_path, byte_server.url, transfer_timeout_s=60)
    try:
        slow = loader.stage("slow", "ssd")
        deadline = time.monotonic() + 10
        while slow.state != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        fast = loader.stage("fast", "dram")
        assert wait(fast, 20).state == "done", fast.error
        assert slow.state == "running"
        assert loader.stage("slow", "ssd") is slow  # single flight still holds with several workers
    finally:
        stop.set()
        loader.stop()


# -- point 11: lease grants and evictions are one decision -----------------------------------------------------------
def attempt(gate: threading.Barrier, results: dict, key: str, call, *args) -> None:
    gate.wait()
    try:
        results[key] = call(*args)
    except LoaderError as exc:
        results[key] = exc.status


def test_evict_racing_lease_never_leaves_a_lease_on_an_evicted_model(tmp_path):
    source = tmp_path / "models" / "m"
    make_model(tmp_path / "models", "m")
    loader = in_process_loader(tmp_path, str(tmp_path / "models"))
    ssd = loader.tiers["ssd"]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so the two decisions interleave
    try:
        both = 0
        for _ in range(300):
            staging = ssd.root / f".m.partial-{uuid.uuid4().hex}"
            staging.mkdir()
            for path in source.iterdir():
                (staging / path.name).write_bytes(path.read_bytes())
            ssd.publish(staging, "m")
            results: dict[str, object] = {}
            gate = threading.Barrier(2)
            threads = [threading.Thread(target=attempt, args=(gate, results, "evict", loader.evict, "m", "ssd")),
                       threading.Thread(target=attempt, args=(gate, results, "lease", loader.lease, "m", "racer"))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            leased = not isinstance(results["lease"], int)
            evicted = isinstance(results["evict"], int) and results["evict"] > 1000
            both += leased and evicted
            if leased:
                loader.release(results["lease"].id)
            if ssd.has("m"):
                ssd.remove("m")
        assert both == 0, f"{both} of 300 rounds leased a model that was evicted at the same time"
    finally:
        sys.setswitchinterval(interval)
        loader.stop()


# -- point 8: leases survive a loader restart -----------------------------------------------------------------------
def daemon_holding_small(tmp_path, redis_ns) -> tuple[LoaderDaemon, Path]:
    """A real loader process (and its node folder) that has staged the model "small" into DRAM."""
    make_model(tmp_path / "remote", "small")
    node = tmp_path / "node"
    node.mkdir()
    daemon = LoaderDaemon(node, tmp_path / "remote", redis_ns.url, redis_ns.prefix).start()
    try:
        assert daemon.wait_job(daemon.client.stage("small", "dram"))["state"] == "done"
    except BaseException:
        daemon.stop()
        raise
    return daemon, node


def test_lease_survives_loader_kill_and_restart(tmp_path, redis_ns):
    daemon, node = daemon_holding_small(tmp_path, redis_ns)
    try:
        lease = daemon.client.lease("small", "instance-1", ttl_s=60)
    finally:
        daemon.kill()
    again = LoaderDaemon(node, tmp_path / "remote", redis_ns.url, redis_ns.prefix).start()
    try:
        status, answer = again.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})
        assert status == 409 and "leased" in answer["error"]
        assert again.client.renew(lease["id"])["holder"] == "instance-1"
        again.client.release(lease["id"])
        assert again.client.request("POST", "/v1/evict", {"model": "small", "tier": "dram"})[0] == 200
    finally:
        again.stop()


def test_model_sizes_lost_by_a_redis_restart_are_republished(tmp_path, redis_ns):
    """A Redis restarted without its data loses `model:<name>`; the controller could then not place a model the
    node still holds. Each heartbeat republishes what is missing."""
    daemon, _ = daemon_holding_small(tmp_path, redis_ns)
    try:
        key = redis_ns.key("model:small")
        size = redis_ns.client.hget(key, "size_bytes")
        assert size and int(size) > 0
        redis_ns.client.delete(key)
        deadline = time.monotonic() + 10
        while redis_ns.client.hget(key, "size_bytes") != size:
            assert time.monotonic() < deadline, "the model's size was never republished"
            time.sleep(0.05)
    finally:
        daemon.stop()


# -- the TCP API needs a token ---------------------------------------------------------------------------------
def loader_cli(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    (tmp_path / "remote").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "sllm_faas", "loader", "--node-id", "node-a", "--remote",
                           str(tmp_path / "remote"), "--ssd-dir", str(tmp_path / "ssd"), *flags],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_loader_refuses_tcp_without_a_token(tmp_path):
    result = loader_cli(tmp_path, "--socket-path", str(tmp_path / "l.sock"), "--tcp", "127.0.0.1:1")
    assert result.returncode == 2 and "needs --token" in result.stderr and "--insecure-no-auth" in result.stderr


def test_loader_tcp_api_requires_the_bearer_token(tmp_path, redis_ns):
    make_model(tmp_path / "remote", "small")
    node = tmp_path / "node"
    node.mkdir()
    port = free_tcp_port()
    daemon = LoaderDaemon(node, tmp_path / "remote", redis_ns.url, redis_ns.prefix, tcp=f"127.0.0.1:{port}",
                          token="s3cret").start()
    try:
        anonymous = LoaderClient(f"127.0.0.1:{port}", token="")
        status, answer = anonymous.request("GET", "/v1/status")
        assert status == 401 and "Bearer" in answer["error"]
        assert LoaderClient(f"127.0.0.1:{port}", token="wrong").request("GET", "/v1/status")[0] == 401
        assert anonymous.request("GET", "/healthz")[0] == 200  # probes need no secret
        assert LoaderClient(f"127.0.0.1:{port}", token="s3cret").status()["node_id"] == "node-a"
        assert daemon.client.status()["node_id"] == "node-a"  # the Unix socket needs no token
        with pytest.raises(LoaderUnavailable):
            anonymous.stage("small")
    finally:
        daemon.stop()


# -- issue #14 point 6: the DRAM budget must fit the cgroup when the DRAM tier is tmpfs -----------------------------
def test_dram_budget_over_the_cgroup_memory_limit_on_tmpfs_is_refused(tmp_path):
    from sllm_faas.runtime.node_loader.config import check_dram_budget

    dram = Path("/dev/shm") / f"sllm-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("1048576\n")
    try:
        config = LoaderConfig(node_id="node-a", remote=str(tmp_path), ssd_dir=str(tmp_path / "ssd"),
                              dram_dir=str(dram), dram_budget=8 << 20, cgroup_root=str(tmp_path / "cg"))
        with pytest.raises(ValueError, match="dram_budget 8388608 bytes exceeds .* memory limit 1048576 bytes"):
            check_dram_budget(config)
        result = loader_cli(tmp_path, "--dram-dir", str(dram), "--dram-budget", "8MiB", "--cgroup-root",
                            str(tmp_path / "cg"), "--socket-path", str(tmp_path / "l.sock"))
        assert result.returncode == 2 and "8388608" in result.stderr and "1048576" in result.stderr
        (tmp_path / "cg" / "memory.max").write_text("max\n")
        check_dram_budget(config)  # no limit: accepted
    finally:
        dram.rmdir()


def test_new_loader_settings_are_documented():
    readme = (ROOT / "README.md").read_text()
    deploy = (ROOT / "deploy" / "README.md").read_text()
    for setting in ("--token", "--insecure-no-auth", "--stage-workers", "--transfer-timeout-s", "--cgroup-root",
                    "SLLM_LOADER_TOKEN", "SLLM_LOADER_STAGE_WORKERS", "SLLM_LOADER_TRANSFER_TIMEOUT_S",
                    "SLLM_LOADER_CGROUP_ROOT", "_leases.json", "64 MiB"):
        assert setting in readme, f"README.md does not mention {setting}"
    for setting in ("SLLM_LOADER_TOKEN", "sllm-loader-token", "SLLM_LOADER_STAGE_WORKERS",
                    "SLLM_LOADER_TRANSFER_TIMEOUT_S", "SLLM_LOADER_CGROUP_ROOT"):
        assert setting in deploy, f"deploy/README.md does not mention {setting}"
