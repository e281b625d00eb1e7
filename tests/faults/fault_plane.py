"""Shared parts of the fault-injection suite: real redis-server, controller and loader processes (optionally
inside network namespaces), a concurrent placement driver that records every answer, and the ledger checks.

Nothing here is mocked: the processes are the `sllm-faas` CLI verbs, Redis is the `redis-server` binary, and
the invariants are read from the documented keys (redis_schema/SCHEMA.md).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests
from process_group import stop_group

from sllm_faas.runtime.node_loader.client import LoaderClient

REPO = Path(__file__).resolve().parents[2]
TOKEN = "fault-suite-token"
MODEL = "tiny"


# -- the CLI's current surface (other work adds auth flags; use what exists) -------------------------------
@functools.cache
def cli_flags(verb: str) -> frozenset[str]:
    out = subprocess.run([sys.executable, "-m", "sllm_faas", verb, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", out.stdout))


def auth_args(verb: str, token: str = TOKEN) -> list[str]:
    """`--token T` where the verb has it; `--insecure-no-auth` only where a token flag does not exist."""
    flags = cli_flags(verb)
    args = ["--token", token] if "--token" in flags else (["--insecure-no-auth"] if "--insecure-no-auth" in flags
                                                           else [])
    if verb == "controller" and "--loader-token" in flags:
        args += ["--loader-token", token]
    return args


def auth_env(token: str = TOKEN) -> dict[str, str]:
    return {**os.environ, "SLLM_LOADER_TOKEN": token, "SLLM_CONTROLLER_TOKEN": token, "PYTHONUNBUFFERED": "1"}


def loader_client(address: str, timeout: float = 10.0) -> LoaderClient:
    """A loader client that sends the token if this version's client takes one."""
    if "token" in inspect.signature(LoaderClient).parameters:
        return LoaderClient(address, timeout=timeout, token=TOKEN)
    return LoaderClient(address, timeout=timeout)


def make_model(store: Path, name: str, kib: int, seed: int = 0) -> int:
    """A real checkpoint (runtime/checkpoint/writer.py) in the store; returns its size in bytes."""
    import torch

    from sllm_faas.runtime.checkpoint import save_state_dict

    generator = torch.Generator().manual_seed(seed)
    manifest = save_state_dict({"w": torch.randn(kib * 256, generator=generator), "b": torch.arange(8)},
                               store / name)
    return manifest.total_bytes


# -- processes ---------------------------------------------------------------------------------------------
class Proc:
    """One child process (and its group), optionally run inside a network namespace."""

    def __init__(self, name: str, argv: list[str], log_path: Path, netns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log_path, self.netns = name, argv, log_path, netns
        self.env = env or auth_env()
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> Proc:
        argv = ["ip", "netns", "exec", self.netns, *self.argv] if self.netns else self.argv
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=self.env)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self._close()

    def stop(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            os.killpg(self.process.pid, signal.SIGCONT)
            stop_group(self.process, timeout=10)
        self._close()

    def _close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def children(self) -> list[int]:
        """Direct children (gunicorn workers of a master)."""
        pids = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids


def wait_until(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def redis_server(root: Path, host: str, port: int, netns: str | None = None, persistent: bool = False) -> Proc:
    root.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--bind", host, "--protected-mode", "no", "--save", "",
            "--dir", str(root), "--daemonize", "no"]
    argv += ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    proc = Proc(f"redis-{port}", argv, root / f"redis-{port}.log", netns).start()
    client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        def up():
            assert proc.alive(), proc.log()
            try:
                return client.ping()
            except redis.RedisError:
                return False

        wait_until(up, 15, f"redis-server on {host}:{port}")
    except BaseException:
        proc.kill9()
        raise
    finally:
        client.close()
    return proc


def controller(root: Path, redis_url: str, prefix: str, host: str, port: int, netns: str | None = None,
               workers: int = 1, booking_ttl_s: float = 6.0, probe_host: str | None = None) -> Proc:
    argv = [sys.executable, "-m", "sllm_faas", "controller", "--host", host, "--port", str(port),
            "--redis-url", redis_url, "--key-prefix", prefix, "--workers", str(workers),
            "--snapshot-max-age-s", "0.2", "--booking-ttl-s", str(booking_ttl_s), *auth_args("controller")]
    proc = Proc(f"controller-{port}", argv, root / f"controller-{port}.log", netns).start()
    url = f"http://{probe_host or host}:{port}"
    try:
        def up():
            assert proc.alive(), proc.log()
            try:
                return requests.get(url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 60, f"controller at {url}", every=0.1)
    except BaseException:
        proc.stop()
        raise
    return proc


def loader(root: Path, node: str, remote: str, redis_url: str, prefix: str, netns: str | None = None,
           slots: int = 2, ssd_dir: Path | None = None, **extra: str) -> tuple[Proc, str]:
    """A node loader on a Unix socket (reachable from every network namespace: it is a file)."""
    root.mkdir(parents=True, exist_ok=True)
    socket_path = str(root / "loader.sock")
    argv = [sys.executable, "-m", "sllm_faas", "loader", "--node-id", node, "--remote", remote,
            "--ssd-dir", str(ssd_dir or root / "ssd"), "--dram-dir", str(root / "dram"), "--ssd-budget", "1GiB",
            "--dram-budget", "256MiB", "--redis-url", redis_url, "--key-prefix", prefix, "--socket-path",
            socket_path, "--heartbeat-s", "0.2", "--heartbeat-ttl-s", "2", "--probe-bytes", "1MiB",
            "--slots", str(slots), *auth_args("loader")]
    for key, value in extra.items():
        argv += ["--" + key.replace("_", "-"), value]
    proc = Proc(f"loader-{node}", argv, root / "loader.log", netns)
    restart_loader(proc, socket_path)
    return proc, socket_path


def restart_loader(proc: Proc, socket_path: str) -> None:
    proc.start()
    client = loader_client(socket_path, timeout=2)
    try:
        def up():
            assert proc.alive(), proc.log()
            try:
                return client.status()
            except Exception:
                return False

        wait_until(up, 60, f"{proc.name} on {socket_path}", every=0.1)
    except BaseException:
        proc.stop()
        raise


# -- the placement driver -----------------------------------------------------------------------------------
@dataclass
class Answer:
    kind: str            # "place" or "cancel"
    started: float       # time.time() when sent
    ended: float
    status: int | None   # None: no HTTP answer (the exception is in `error`)
    body: object = None
    error: str = ""

    @property
    def node(self) -> str | None:
        return self.body.get("node") if self.status == 200 and isinstance(self.body, dict) else None


@dataclass
class Driver:
    """`threads` clients, each looping: POST /v1/placements; on 200 hold the booking `hold_s`, then give it back
    with DELETE /v1/bookings. Every answer is recorded. The client-side ledger counts a booking from its 200 until
    just before its DELETE is sent, so it never counts more than Redis holds: if it ever exceeds a node's slots,
    the controller handed out one slot twice."""

    url: str
    slots: dict[str, int]
    threads: int = 3
    hold_s: float = 0.2
    timeout_s: float = 30.0
    max_requests: int = 4000
    answers: list[Answer] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    held: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._sent = 0
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    def _call(self, kind: str, method: str, path: str, body: dict | None = None) -> Answer:
        started = time.time()
        try:
            response = requests.request(method, self.url + path, json=body, headers=self.headers,
                                        timeout=self.timeout_s)
        except requests.RequestException as exc:
            answer = Answer(kind, started, time.time(), None, error=f"{type(exc).__name__}: {exc}")
        else:
            try:
                parsed = response.json()
            except ValueError:
                parsed = response.text[:300]
            answer = Answer(kind, started, time.time(), response.status_code, parsed)
        with self._lock:
            self.answers.append(answer)
        return answer

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._sent >= self.max_requests:
                    return
                self._sent += 1
            answer = self._call("place", "POST", "/v1/placements", {"model": MODEL, "function": "fault-suite"})
            if answer.status != 200 or not isinstance(answer.body, dict):
                self._stop.wait(0.05)
                continue
            node, booking = answer.body.get("node"), answer.body.get("booking")
            if not booking:
                continue
            with self._lock:
                held = self.held.setdefault(node, set())
                held.add(booking)
                if len(held) > self.slots.get(node, 0):
                    self.violations.append(f"{node}: {len(held)} bookings held at once, {self.slots.get(node)} "
                                           f"slots: {sorted(held)}")
            self._stop.wait(self.hold_s)
            with self._lock:
                held.discard(booking)
            self._call("cancel", "DELETE", f"/v1/bookings/{node}/{booking}")

    def start(self) -> Driver:
        for i in range(self.threads):
            thread = threading.Thread(target=self._loop, name=f"fault-driver-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=self.timeout_s + 5)
        assert not any(t.is_alive() for t in self._workers), "a placement client hung past its timeout"

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def wait_for(self, predicate, timeout: float, what: str) -> Answer:
        """Wait for an answer matching `predicate` (bounded)."""
        def found():
            return next((a for a in self.snapshot() if predicate(a)), None)
        try:
            return wait_until(found, timeout, what, every=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last answers:\n{describe(self.snapshot()[-6:])}") from None


def placed_after(t: float):
    """Matches a placement (not a cancel) answered 200 that was sent after `t`."""
    return lambda a: a.kind == "place" and a.status == 200 and a.started > t


def unclean(answers: list[Answer]) -> list[Answer]:
    """Answers that are not clean: no HTTP answer at all (a hang past the timeout, a reset), a 500, or a body that
    is not the documented JSON. Placements: 200 with node and booking, or 409/503 with {"error": "..."}; a 404
    would mean the model's size record was lost. Cancels: 200/404 with {"cancelled"}, or 503 with an error."""
    bad = []
    for a in answers:
        body = a.body if isinstance(a.body, dict) else {}
        error = isinstance(body.get("error"), str) and bool(body["error"])
        if a.kind == "place":
            ok = (a.status == 200 and bool(body.get("node")) and bool(body.get("booking"))) or \
                (a.status in (409, 503) and error)
        else:
            ok = (a.status in (200, 404) and "cancelled" in body) or (a.status == 503 and error)
        if not ok:
            bad.append(a)
    return bad


def describe(answers: list[Answer], limit: int = 8) -> str:
    return "\n".join(f"{a.kind} t={a.started:.2f} +{a.ended - a.started:.2f}s status={a.status} "
                     f"body={json.dumps(a.body)[:200] if a.body is not None else ''} {a.error}"
                     for a in answers[:limit])


class LedgerMonitor:
    """Samples every node's slot ledger (SCHEMA.md: a slot is held by a member whose score is in the future)
    and records any sample where a node holds more than its `slots` field allows."""

    def __init__(self, client: redis.Redis, prefix: str, slots: dict[str, int], every: float = 0.05) -> None:
        self.client, self.prefix, self.slots, self.every = client, prefix, slots, every
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-ledger", daemon=True)

    def start(self) -> LedgerMonitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                now = time.time()
                pipe = self.client.pipeline(transaction=True)
                for node in self.slots:
                    pipe.zcount(f"{self.prefix}node:{node}:slots", f"({now}", "+inf")
                counts = pipe.execute()
            except redis.RedisError:
                continue  # Redis is what the test takes away; the driver's own ledger still checks
            self.samples += 1
            for node, count in zip(self.slots, counts, strict=True):
                if count > self.slots[node]:
                    self.violations.append(f"{node}: {count} live holds in its ledger, {self.slots[node]} slots")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def placed_events(client: redis.Redis, prefix: str) -> list[dict]:
    return [fields for _, fields in client.xrange(prefix + "events") if fields.get("kind") == "placed"]
