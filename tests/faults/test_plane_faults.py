"""Faults injected into a running controller + node loaders + Redis plane, on loopback: kill -9 and SIGSTOP of a
loader and of a controller worker while placements run, a Redis crash and restart, a full SSD tier, a remote
store that trickles bytes, and half-open clients. Each check asserts that no slot is handed out twice (the
driver's own ledger and samples of the Redis ledgers), that no booking is lost, and that every client got a clean
answer (200, 409 or 503 with a JSON error; never a 500, never a hang past its timeout).

Redis is our own `redis-server` on a free port (append-only, fsync always), never the shared one.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from fault_plane import (
    MODEL,
    TOKEN,
    Driver,
    LedgerMonitor,
    Proc,
    controller,
    describe,
    loader,
    loader_client,
    make_model,
    placed_after,
    redis_server,
    restart_loader,
    unclean,
    wait_until,
)

from sllm_faas.runtime.embedded_redis import free_tcp_port

PREFIX = "sllm:"
SLOTS = {"node-a": 2, "node-b": 2}
HOST = "127.0.0.1"


@dataclass
class Plane:
    root: Path
    store: Path
    redis_port: int
    redis: Proc
    client: redis.Redis
    controller: Proc
    url: str
    loaders: dict[str, tuple[Proc, str]]

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    def node_live(self, node: str) -> bool:
        try:
            return bool(self.client.exists(f"{PREFIX}node:{node}"))
        except redis.RedisError:
            return False

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    root = tmp_path_factory.mktemp("plane")
    store = root / "store"
    make_model(store, MODEL, 256)
    port = free_tcp_port()
    procs: list[Proc] = []
    state = None
    client = None
    try:
        procs.append(redis_server(root / "redis", HOST, port, persistent=True))
        redis_url = f"redis://{HOST}:{port}/0"
        client = redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
        loaders = {}
        for node in SLOTS:
            proc, sock = loader(root / node, node, str(store), redis_url, PREFIX, slots=SLOTS[node])
            procs.append(proc)
            loaders[node] = (proc, sock)
            loader_client(sock, timeout=30).stage_and_wait(MODEL, "dram", timeout=60)
        ctl_port = free_tcp_port()
        ctl = controller(root, redis_url, PREFIX, HOST, ctl_port, workers=2, booking_ttl_s=15)
        procs.append(ctl)
        for node in SLOTS:
            wait_until(lambda n=node: client.sismember(f"{PREFIX}node:{n}:models:dram", MODEL), 15,
                       f"{node} publishing {MODEL}")
        state = Plane(root, store, port, procs[0], client, ctl, f"http://{HOST}:{ctl_port}", loaders)
        yield state
    finally:
        if state is not None:  # a restarted Redis or loader replaced the objects in `procs`
            procs = [state.redis, state.controller, *(p for p, _ in state.loaders.values())]
        for proc in reversed(procs):
            proc.stop()
        if client is not None:
            client.close()


def check_run(driver: Driver, monitor: LedgerMonitor) -> list:
    answers = driver.snapshot()
    assert not unclean(answers), describe(unclean(answers))
    assert not driver.violations, driver.violations
    assert monitor.samples > 5 and not monitor.violations, monitor.violations
    return answers


@pytest.mark.parametrize("fault", ["kill9", "sigstop"])
def test_a_loader_killed_or_stopped_gets_no_placements_and_rejoins(plane, fault):
    proc, sock = plane.loaders["node-a"]
    wait_until(lambda: plane.node_live("node-a") and plane.node_live("node-b"), 15, "both nodes live")
    monitor = LedgerMonitor(plane.client, PREFIX, SLOTS).start()
    driver = Driver(plane.url, SLOTS, threads=3).start()
    resumed = False
    try:
        driver.wait_for(lambda a: a.node == "node-a", 15, "a placement on node-a before the fault")
        if fault == "kill9":
            proc.kill9()
        else:
            os.killpg(proc.process.pid, signal.SIGSTOP)
        wait_until(lambda: not plane.node_live("node-a"), 15, "node-a's record to expire")
        gone_at = time.time()
        driver.wait_for(placed_after(gone_at), 15, "a placement while node-a is away")
        back_at = time.time()  # from here node-a may be back: a restarted loader publishes before its socket answers
        if fault == "kill9":
            restart_loader(proc, sock)  # same directories: it rebuilds its state from disk
        else:
            os.killpg(proc.process.pid, signal.SIGCONT)
        resumed = True
        wait_until(lambda: plane.node_live("node-a"), 15, "node-a's record to return")
        driver.wait_for(lambda a: a.node == "node-a" and a.started > back_at, 20, "a placement on node-a again")
    finally:
        if not resumed and fault == "sigstop":
            os.killpg(proc.process.pid, signal.SIGCONT)
        driver.stop()
        monitor.stop()
    answers = check_run(driver, monitor)
    away = [a for a in answers if a.kind == "place" and gone_at < a.started and a.ended < back_at]
    assert away and all(a.node != "node-a" for a in away), describe([a for a in away if a.node == "node-a"])
    cancels = [a for a in answers if a.kind == "cancel"]
    assert cancels and all(a.status == 200 and a.body["cancelled"] for a in cancels), describe(
        [a for a in cancels if a.status != 200])  # every booking handed out was still there to give back
    where = loader_client(sock).where(MODEL)
    assert where["tier"] == "dram"  # staged data survived the fault
    assert requests.get(plane.url + "/healthz", timeout=10).status_code == 200


def _live_holds(plane: Plane) -> dict[str, list[str]]:
    now = time.time()
    return {node: plane.client.zrangebyscore(f"{PREFIX}node:{node}:slots", f"({now}", "+inf") for node in SLOTS}


def test_the_controller_worker_killed_mid_placements_loses_no_booking(plane):
    wait_until(lambda: plane.node_live("node-a") and plane.node_live("node-b"), 15, "both nodes live")
    workers = plane.controller.children()
    assert len(workers) == 2, workers  # the default: bookings cross workers (made in one, given back in another)
    monitor = LedgerMonitor(plane.client, PREFIX, SLOTS).start()
    driver = Driver(plane.url, SLOTS, threads=4, hold_s=0.05).start()
    try:
        driver.wait_for(placed_after(0), 15, "placements before the kill")
        time.sleep(0.3)
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.time()
        wait_until(lambda: [p for p in plane.controller.children() if p != workers[0]], 30,
                   "gunicorn to replace the killed worker")
        driver.wait_for(placed_after(killed_at + 0.5), 30, "placements after the kill")
        time.sleep(0.5)
    finally:
        driver.stop()
        monitor.stop()
    answers = driver.snapshot()
    dropped = [a for a in answers if a.status is None]
    # only requests in flight in the killed worker can go unanswered (the listening socket stays with the
    # master, so later ones wait for the new worker): at most one per client, all at the kill
    assert len(dropped) <= driver.threads, describe(dropped)
    assert all(abs(a.started - killed_at) < 5 for a in dropped), describe(dropped)
    rest = [a for a in answers if a.status is not None]
    assert not unclean(rest), describe(unclean(rest))
    assert not driver.violations and not monitor.violations, (driver.violations, monitor.violations)
    # every booking a client was given went back cleanly; what is left in the ledgers was booked by a request
    # that died with the worker (it expires with its booking TTL): no more than the requests that got no answer
    orphans = [b for holds in _live_holds(plane).values() for b in holds]
    assert len(orphans) <= len(dropped), (orphans, describe(dropped))
    assert plane.controller.alive()
    wait_until(lambda: not any(_live_holds(plane).values()), 25, "orphaned bookings to expire")


def test_the_controller_workers_stopped_and_continued_answer_everyone(plane):
    wait_until(lambda: plane.node_live("node-a") and plane.node_live("node-b"), 15, "both nodes live")
    workers = plane.controller.children()
    monitor = LedgerMonitor(plane.client, PREFIX, SLOTS).start()
    driver = Driver(plane.url, SLOTS, threads=4, timeout_s=30).start()
    try:
        driver.wait_for(placed_after(0), 15, "placements before the stop")
        for worker in workers:  # every worker, so requests surely wait on a stopped one
            os.kill(worker, signal.SIGSTOP)
        stopped_at = time.time()
        time.sleep(1.5)
        for worker in workers:
            os.kill(worker, signal.SIGCONT)
        driver.wait_for(placed_after(stopped_at + 1.5), 15, "placements after SIGCONT")
    finally:
        for worker in workers:
            os.kill(worker, signal.SIGCONT)
        driver.stop()
        monitor.stop()
    answers = check_run(driver, monitor)
    waited = [a for a in answers if a.started < stopped_at + 1.0 < a.ended]
    assert waited, "no request was held by the stopped worker: the fault did not bite"
    assert plane.controller.children() == workers  # the same worker carried on: nothing was restarted


def test_bookings_cancelled_through_another_worker_free_their_slots(plane):
    wait_until(lambda: plane.node_live("node-a") and plane.node_live("node-b"), 15, "both nodes live")
    port = free_tcp_port()
    ctl = controller(plane.root, plane.redis_url, PREFIX, HOST, port, workers=2)
    try:
        driver = Driver(f"http://{HOST}:{port}", SLOTS, threads=4, hold_s=0.05, max_requests=150).start()
        try:
            driver.wait_for(lambda a: a.kind == "cancel", 15, "a booking given back")
            time.sleep(2.0)
        finally:
            driver.stop()
        assert not unclean(driver.snapshot()) and not driver.violations
        wait_until(lambda: not any(_live_holds(plane).values()), 15, "every ledger to be empty")
        time.sleep(1.0)  # several cluster reads (every 0.2 s) later
        for _ in range(4):  # 4 slots free in Redis: each worker must find one
            placed = requests.post(f"http://{HOST}:{port}/v1/placements", json={"model": MODEL},
                                   headers=plane.headers(), timeout=30)
            assert placed.status_code == 200, (placed.text, _live_holds(plane))
            body = placed.json()
            gone = requests.delete(f"http://{HOST}:{port}/v1/bookings/{body['node']}/{body['booking']}",
                                   headers=plane.headers(), timeout=30)
            assert gone.status_code == 200
    finally:
        ctl.stop()


def test_redis_crash_and_restart_keeps_every_booking(plane):
    wait_until(lambda: plane.node_live("node-a") and plane.node_live("node-b"), 15, "both nodes live")
    held = requests.post(plane.url + "/v1/placements", json={"model": MODEL}, headers=plane.headers(), timeout=30)
    assert held.status_code == 200, held.text
    kept = held.json()
    kept_key = f"{PREFIX}node:{kept['node']}:slots"
    kept_until = plane.client.zscore(kept_key, kept["booking"])
    assert kept_until is not None
    monitor = LedgerMonitor(plane.client, PREFIX, SLOTS).start()
    # the driver books around the kept slot: one fewer on its node, so a second hand-out of it shows at once
    driver = Driver(plane.url, {**SLOTS, kept["node"]: SLOTS[kept["node"]] - 1}, threads=3).start()
    restarted = False
    keeping = threading.Event()

    def keep() -> None:  # the instance that took the slot over heartbeats it, as runtime instances do (XX: never
        while not keeping.wait(1.0):  # re-creating a hold that was lost)
            try:
                plane.client.zadd(kept_key, {kept["booking"]: time.time() + 15}, xx=True)
            except redis.RedisError:
                pass

    keeper = threading.Thread(target=keep, daemon=True)
    keeper.start()
    try:
        driver.wait_for(placed_after(0), 15, "placements before the crash")
        kept_until = plane.client.zscore(kept_key, kept["booking"])
        plane.redis.kill9()
        crashed_at = time.time()
        down = driver.wait_for(lambda a: a.kind == "place" and a.status == 503 and a.started > crashed_at, 20,
                               "a 503 while Redis is down")
        assert "Redis unavailable" in down.body["error"]
        for _, sock in plane.loaders.values():  # the loaders notice, and keep serving without Redis
            status = wait_until(lambda s=sock: (lambda st: st if st["redis"] is False else None)(
                loader_client(s).status()), 15, "the loader to report Redis down")
            assert status["tiers"]["dram"]["models"].get(MODEL)
        plane.redis = redis_server(plane.root / "redis", HOST, plane.redis_port, persistent=True)
        restarted, back_at = True, time.time()
        # nothing lost: the booking made before the crash is back, with the same expiry
        assert plane.client.zscore(kept_key, kept["booking"]) >= kept_until
        wait_until(lambda: plane.node_live("node-a") and plane.node_live("node-b"), 15, "loaders republishing")
        driver.wait_for(placed_after(back_at), 20,
                        "placements after the restart")
        time.sleep(1.0)  # keep placing against the restarted Redis while the monitor samples its ledgers
    finally:
        if not restarted:
            plane.redis = redis_server(plane.root / "redis", HOST, plane.redis_port, persistent=True)
        driver.stop()
        monitor.stop()
        keeping.set()
        keeper.join(timeout=10)
    check_run(driver, monitor)
    gone = requests.delete(f"{plane.url}/v1/bookings/{kept['node']}/{kept['booking']}", headers=plane.headers(),
                           timeout=30)
    assert gone.status_code == 200 and gone.json()["cancelled"] is True
    assert plane.client.get(PREFIX + "schema_version") == "2"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs: a disk that really fills up (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    target = tmp_path / "full-ssd"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(target)], capture_output=True,
                             text=True, timeout=20)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=20)


def test_a_full_ssd_fails_the_job_cleanly_and_the_loader_carries_on(plane, small_tmpfs, tmp_path):
    store = tmp_path / "store"
    make_model(store, "huge", 4096, seed=1)    # 4 MiB: cannot fit on the 3 MiB disk
    make_model(store, "fits", 512, seed=2)     # 0.5 MiB: fits
    proc, sock = loader(tmp_path / "node", "node-full", str(store), plane.redis_url, "full:", ssd_dir=small_tmpfs)
    try:
        client = loader_client(sock)
        job = client.stage("huge", "ssd")
        deadline = time.monotonic() + 30
        while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            job = client.job(job["id"])
        assert job["state"] == "failed", job
        assert "No space left" in job["error"] or "space" in job["error"].lower(), job["error"]
        assert sorted(p.name for p in small_tmpfs.iterdir()) == [], "a partial download was left on the full disk"
        assert client.where("huge")["tier"] == "remote"
        assert client.request("GET", "/healthz")[0] == 200
        assert client.stage_and_wait("fits", "ssd", timeout=30)["state"] == "done"
        assert client.where("fits")["tier"] == "ssd"
        failed = [f for _, f in plane.client.xrange("full:events") if f["kind"] == "stage_failed"]
        assert [f["model"] for f in failed] == ["huge"] and failed[0]["error"] == job["error"]
        assert proc.alive()
    finally:
        proc.stop()
        for key in plane.client.scan_iter(match="full:*"):
            plane.client.delete(key)


class TrickleStore(http.server.ThreadingHTTPServer):
    """A static HTTP model store (GET BASE/MODEL/FILE, with Range) that sends the files of `slow_model` 4 KiB every
    0.1 s until `release` is set, then at full speed."""

    daemon_threads = True

    def __init__(self, root: Path, slow_model: str) -> None:
        self.root, self.slow_model, self.release = root, slow_model, threading.Event()
        super().__init__((HOST, 0), _TrickleHandler)


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    server: TrickleStore

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        parts = self.path.strip("/").split("/")
        path = self.server.root.joinpath(*parts)
        if len(parts) != 2 or ".." in parts or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        slow = parts[0] == self.server.slow_model and parts[1] != "manifest.json"
        deadline = time.monotonic() + 60
        try:
            for offset in range(start, len(data), 4096):
                self.wfile.write(data[offset:offset + 4096])
                if slow and not self.server.release.is_set() and time.monotonic() < deadline:
                    self.server.release.wait(0.1)
        except OSError:
            pass


@pytest.fixture
def trickle_store(tmp_path):
    root = tmp_path / "http-store"
    make_model(root, "slow", 1024, seed=3)
    make_model(root, "quick", 256, seed=4)
    server = TrickleStore(root, "slow")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_slow_remote_store_does_not_block_staging_another_model(plane, trickle_store, tmp_path):
    url = f"http://{HOST}:{trickle_store.server_address[1]}"
    proc, sock = loader(tmp_path / "node", "node-slow", url, plane.redis_url, "slow:")
    try:
        client = loader_client(sock)
        slow = client.stage("slow", "ssd")
        wait_until(lambda: client.job(slow["id"])["done_bytes"] > 0, 15, "the slow download to start")
        quick = client.stage("quick", "ssd")
        deadline = time.monotonic() + 10
        while quick["state"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            quick = client.job(quick["id"])
        slow_now = client.job(slow["id"])
        trickle_store.release.set()  # let the slow one finish, whatever happened above
        assert slow_now["state"] == "running", slow_now  # it really was still trickling
        assert quick["state"] == "done", quick
        assert client.where("quick")["tier"] == "ssd"
        assert client.stage_and_wait("slow", "ssd", timeout=30)["state"] == "done"
    finally:
        trickle_store.release.set()
        proc.stop()
        for key in plane.client.scan_iter(match="slow:*"):
            plane.client.delete(key)


def test_half_open_clients_do_not_stop_the_controller_answering(plane):
    port = int(plane.url.rsplit(":", 1)[1])
    sockets = []
    try:
        for _ in range(48):  # more than 2 workers x 8 threads
            conn = socket.create_connection((HOST, port), timeout=5)
            conn.sendall(b"POST /v1/placements HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            sockets.append(conn)
        time.sleep(0.5)
        assert requests.get(plane.url + "/healthz", timeout=5).status_code == 200
        placed = requests.post(plane.url + "/v1/placements", json={"model": MODEL}, headers=plane.headers(),
                               timeout=10)
        assert placed.status_code in (200, 409), placed.text
        if placed.status_code == 200:
            body = placed.json()
            requests.delete(f"{plane.url}/v1/bookings/{body['node']}/{body['booking']}", headers=plane.headers(),
                            timeout=10)
    finally:
        for conn in sockets:
            conn.close()
    # once they are gone it answers again, whatever happened above (bounded)
    def healthy() -> bool:
        try:
            return requests.get(plane.url + "/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(healthy, 30, "healthz again")
