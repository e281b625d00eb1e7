"""Chaos across real network boundaries: Redis, the controller and two node loaders each run as a separate host
in a network namespace made by this test (veth pairs on a Linux bridge in the root namespace, where the test and
its placement clients run). Partitions are blackhole routes on both ends of a path, so packets in flight are lost
rather than refused, and healing removes them.

Needs root and `ip netns`; skipped cleanly elsewhere. Loaders listen on Unix sockets, which are files and so
reachable from every namespace (the controller kicks staging through them, as on a real node).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass

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
    placed_events,
    redis_server,
    unclean,
    wait_until,
)

PREFIX = "sllm:"
SLOTS = {"node-1": 2, "node-2": 2}


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


class NetLab:
    """Namespaces on one bridge; everything it made is removed by close(), whatever failed in between."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.bridge = f"sfbr{self.tag}"
        taken = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
        third = next((n for n in range(200, 250) if f"10.213.{n}." not in taken), None)
        if third is None:
            pytest.skip("no free 10.213.x.0/24 subnet for the test network")
        self.net = f"10.213.{third}"
        self.hosts: dict[str, tuple[str, str]] = {}  # role -> (namespace, address)
        self._namespaces: list[str] = []
        self._bridge_made = False

    def create_bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        _ip("addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, role: str) -> tuple[str, str]:
        index = len(self.hosts) + 1
        ns, address = f"sllmf{self.tag}-{role}", f"{self.net}.{10 + index}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)
        outside, inside = f"sf{self.tag}h{index}", f"sf{self.tag}n{index}"
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("addr", "add", f"{address}/24", "dev", inside, ns=ns)
        _ip("link", "set", inside, "up", ns=ns)
        self.hosts[role] = (ns, address)
        return ns, address

    def partition(self, a: str, b: str) -> None:
        """Packets between hosts a and b are dropped both ways (blackhole routes at both ends)."""
        (ns_a, ip_a), (ns_b, ip_b) = self.hosts[a], self.hosts[b]
        _ip("route", "add", "blackhole", f"{ip_b}/32", ns=ns_a)
        _ip("route", "add", "blackhole", f"{ip_a}/32", ns=ns_b)

    def heal(self, a: str, b: str) -> None:
        (ns_a, ip_a), (ns_b, ip_b) = self.hosts[a], self.hosts[b]
        _ip("route", "del", "blackhole", f"{ip_b}/32", ns=ns_a, check=False)
        _ip("route", "del", "blackhole", f"{ip_a}/32", ns=ns_b, check=False)

    def close(self) -> None:
        for ns in self._namespaces:
            leftover = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in leftover:  # only processes inside our own namespace: ones this test started
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair, with it
        if self._bridge_made:
            _ip("link", "del", self.bridge, check=False)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"sllmf-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


@dataclass
class Lab:
    net: NetLab
    client: redis.Redis
    url: str
    loaders: dict[str, tuple[Proc, str]]
    controller: Proc

    def node_live(self, node: str) -> bool:
        return bool(self.client.exists(f"{PREFIX}node:{node}"))

    def healthz(self) -> int:
        return requests.get(self.url + "/healthz", timeout=10).status_code


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("netns-chaos")
    store = root / "store"
    make_model(store, MODEL, 256)
    net = NetLab()
    procs: list[Proc] = []
    client = None
    try:
        net.create_bridge()
        redis_ns, redis_ip = net.add_host("redis")
        ctl_ns, ctl_ip = net.add_host("ctl")
        node_hosts = {node: net.add_host(node) for node in SLOTS}
        redis_url = f"redis://{redis_ip}:6379/0"
        procs.append(redis_server(root / "redis", redis_ip, 6379, netns=redis_ns))
        client = redis.Redis(host=redis_ip, port=6379, decode_responses=True, socket_timeout=5,
                             socket_connect_timeout=5)
        loaders = {}
        for node, (ns, _) in node_hosts.items():
            proc, sock = loader(root / node, node, str(store), redis_url, PREFIX, netns=ns, slots=SLOTS[node])
            procs.append(proc)
            loaders[node] = (proc, sock)
        ctl = controller(root, redis_url, PREFIX, "0.0.0.0", 8090, netns=ctl_ns, workers=1, probe_host=ctl_ip)
        procs.append(ctl)
        for node, (_, sock) in loaders.items():  # the model in DRAM on both nodes: its size is then known
            loader_client(sock, timeout=30).stage_and_wait(MODEL, "dram", timeout=60)
            wait_until(lambda n=node: client.sismember(f"{PREFIX}node:{n}:models:dram", MODEL), 15,
                       f"{node} publishing {MODEL} in DRAM")
        yield Lab(net, client, f"http://{ctl_ip}:8090", loaders, ctl)
    finally:
        for proc in reversed(procs):
            proc.stop()
        if client is not None:
            client.close()
        net.close()


def test_a_node_partitioned_from_redis_gets_no_placements_then_rejoins(lab):
    monitor = LedgerMonitor(lab.client, PREFIX, SLOTS).start()
    driver = Driver(lab.url, SLOTS, threads=3).start()
    healed = False
    try:
        driver.wait_for(lambda a: a.node == "node-1", 20, "a placement on node-1 before the partition")
        lab.net.partition("node-1", "redis")
        partitioned_at = time.time()
        wait_until(lambda: not lab.node_live("node-1"), 15, "node-1's record to expire while partitioned")
        gone_at = time.time()
        driver.wait_for(placed_after(gone_at), 15,
                        "a placement (on node-2) while node-1 is cut off")
        time.sleep(1.0)  # keep placing while node-1 is away
        assert not lab.node_live("node-1"), "node-1 published through a partition"
        lab.net.heal("node-1", "redis")
        healed, healed_at = True, time.time()
        wait_until(lambda: lab.node_live("node-1"), 15, "node-1's record to return after healing")
        rejoined = driver.wait_for(lambda a: a.node == "node-1" and a.started > healed_at, 20,
                                   "a placement on node-1 after healing")
    finally:
        if not healed:
            lab.net.heal("node-1", "redis")
        driver.stop()
        monitor.stop()
    answers = driver.snapshot()
    assert not unclean(answers), describe(unclean(answers))
    assert not driver.violations, driver.violations
    assert monitor.samples > 10 and not monitor.violations, monitor.violations
    during = [a for a in answers if a.kind == "place" and gone_at < a.started and a.ended < healed_at]
    assert during and all(a.node != "node-1" for a in during), describe([a for a in during if a.node == "node-1"])
    late_events = [e for e in placed_events(lab.client, PREFIX)
                   if e["node"] == "node-1" and gone_at < float(e["ts"]) < healed_at]
    assert not late_events, late_events
    # nothing lost: every booking handed out outside the partition window was still in Redis when given back
    cancels = [a for a in answers if a.kind == "cancel" and not partitioned_at <= a.started <= healed_at]
    assert cancels and all(a.status == 200 and a.body["cancelled"] is True for a in cancels), describe(
        [a for a in cancels if a.status != 200])
    assert rejoined.body["booking"]
    assert lab.loaders["node-1"][0].alive() and lab.loaders["node-2"][0].alive()


def test_a_controller_cut_off_from_redis_answers_503_and_recovers(lab):
    wait_until(lambda: lab.node_live("node-1") and lab.node_live("node-2"), 15, "both nodes live")
    monitor = LedgerMonitor(lab.client, PREFIX, SLOTS).start()
    driver = Driver(lab.url, SLOTS, threads=3, timeout_s=40).start()
    healed = False
    try:
        driver.wait_for(placed_after(0), 15, "a placement before the partition")
        lab.net.partition("ctl", "redis")
        cut_at = time.time()
        refused = driver.wait_for(lambda a: a.kind == "place" and a.status == 503 and a.started > cut_at, 45,
                                  "a 503 from the controller cut off from Redis")
        assert "Redis" in refused.body["error"]
        assert lab.healthz() == 200  # liveness does not depend on Redis
        stuck = requests.get(lab.url + "/v1/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=40)
        assert stuck.status_code == 503 and "error" in stuck.json()
        lab.net.heal("ctl", "redis")
        healed, healed_at = True, time.time()
        driver.wait_for(placed_after(healed_at), 30,
                        "a placement after healing")
    finally:
        if not healed:
            lab.net.heal("ctl", "redis")
        driver.stop()
        monitor.stop()
    answers = driver.snapshot()
    assert not unclean(answers), describe(unclean(answers))
    assert not driver.violations, driver.violations
    assert monitor.samples > 10 and not monitor.violations, monitor.violations
    assert all(a.ended - a.started < 40 for a in answers)
    assert lab.controller.alive()
