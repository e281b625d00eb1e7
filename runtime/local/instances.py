"""Function instances of the local cluster: `sllm-faas serve` processes started "on" a node, i.e. with
that node's loader socket, id and slot booking, and stopped when scaled down.

Each instance runs in a session (process group) of its own, spawned from one long-lived thread with
PR_SET_PDEATHSIG so it dies with the gateway even if the gateway is killed. A stop sends SIGTERM to the
group, waits past the instance's gunicorn graceful timeout (which we set below our wait), then SIGKILLs
whatever of the group is left: a gunicorn worker must never outlive its master, generating and holding
its slot. The instance's Redis record and slot are withdrawn here too, since a killed worker cannot.

With pools (runtime/local/pool.py), a start first takes the node's idle pre-warmed member and assigns it
the same environment, build and port a spawn would get; with none idle, or a failed assignment, it spawns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from sllm_faas.common.processes import die_with_parent, stop_process_group
from sllm_faas.redis_schema.keys import Keys
from sllm_faas.runtime.embedded_redis import free_tcp_port
from sllm_faas.runtime.local.pool import ChildProcess, Pools, reap_adopted

INSTANCE_GRACEFUL_TIMEOUT_S = 5   # gunicorn's graceful timeout inside an instance (its own default is 30)
STOP_GRACE_S = 10.0               # how long a stop waits for the group to exit before SIGKILL; > the above


class InstanceFailed(RuntimeError):
    pass


@dataclass
class Instance:
    id: str
    function: str
    node: str
    url: str
    process: subprocess.Popen | ChildProcess
    log_path: Path
    start: str = "spawn"               # or "pool": a pre-warmed member was assigned
    started_at: float = field(default_factory=time.time)
    ready: threading.Event = field(default_factory=threading.Event)
    cold_start: dict | None = None     # the runtime's breakdown from /_/ready
    placement: dict = field(default_factory=dict)  # the controller's decision: tier, estimate_s, booking
    failure: str | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"id": self.id, "node": self.node, "url": self.url, "pid": self.process.pid, "start": self.start,
                "ready": self.ready.is_set(), "in_flight": self.in_flight, "cold_start": self.cold_start,
                "placement": self.placement,
                "failure": self.failure, "started_at": self.started_at}


def probe_ready(instance: Instance, timeout_s: float = 2.0) -> tuple[int, dict]:
    """(status, body) of the instance's /_/ready; (0, {}) when it does not answer."""
    try:
        response = requests.get(instance.url + "/_/ready", timeout=timeout_s)
        body = response.json()
        return response.status_code, body if isinstance(body, dict) else {}
    except (requests.RequestException, ValueError):
        return 0, {}


class InstanceLauncher:
    def __init__(self, log_dir: Path, base_env: dict[str, str], redis_client: redis.Redis | None = None,
                 keys: Keys | None = None) -> None:
        self.log_dir = log_dir
        self.base_env = base_env
        self.redis = redis_client
        self.keys = keys
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sllm-spawner")  # lives as long as us
        self.pools: Pools | None = None

    def spawn(self, popen) -> subprocess.Popen:
        """Run `popen` on the spawner thread, whose exit (ours) is what PR_SET_PDEATHSIG children die with."""
        return self._spawner.submit(popen).result()

    def start_pools(self, nodes: list[str], size: int) -> Pools:
        self.pools = Pools(nodes, size, self.log_dir, self.spawn)
        return self.pools

    def start(self, instance_id: str, function: str, node: str, build: Path, model: str, env: dict[str, str]
              ) -> Instance:
        port = free_tcp_port()
        url = f"http://127.0.0.1:{port}"
        environment = {**os.environ, **env, **self.base_env, "SLLM_INSTANCE_ID": instance_id, "SLLM_NODE_ID": node,
                       "SLLM_FUNCTION_NAME": function, "SLLM_ADVERTISE_URL": url, "SLLM_MODEL": model,
                       "GUNICORN_CMD_ARGS": f"--graceful-timeout {INSTANCE_GRACEFUL_TIMEOUT_S}"}
        log_path = self.log_dir / f"{instance_id}.log"
        command = [sys.executable, "-m", "sllm_faas", "serve", model, "--port", str(port), "--host", "127.0.0.1",
                   "--app", "index:app"]

        member = self.pools.take(node) if self.pools else None
        if member is not None and member.assign({"env": environment, "cwd": str(build), "log": str(log_path),
                                                 "port": port, "assigned_at": time.time(), "app": "index:app"}):
            return Instance(instance_id, function, node, url, member.process, log_path, start="pool")
        if member is not None:   # died idle, or refused: it is replaced, and this start spawns
            stop_process_group(member.process, grace_s=0)

        def spawn() -> subprocess.Popen:
            with open(log_path, "ab") as log:
                return subprocess.Popen(command, cwd=build, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509

        return Instance(instance_id, function, node, url, self.spawn(spawn), log_path)

    @staticmethod
    def wait_ready(instance: Instance, timeout_s: float, on_phase: Callable[[str], None] | None = None) -> Instance:
        """Poll /_/ready until 200 (keeping the cold-start breakdown) or the process dies or time runs out;
        `on_phase` hears the runtime's step while it starts (loading, warming)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if instance.process.poll() is not None:
                instance.failure = f"exited with {instance.process.returncode} (log: {instance.log_path})"
                raise InstanceFailed(f"instance {instance.id}: {instance.failure}")
            status, body = probe_ready(instance)
            if status == 200:
                instance.cold_start = body.get("cold_start") or {}  # not None: the readiness watcher takes over
                instance.ready.set()
                return instance
            if body.get("error"):
                instance.failure = str(body["error"])
                raise InstanceFailed(f"instance {instance.id}: {instance.failure}")
            if on_phase is not None and isinstance(body.get("phase"), str):
                on_phase(body["phase"])
            time.sleep(0.02)
        instance.failure = f"not ready after {timeout_s:.0f} s (log: {instance.log_path})"
        raise InstanceFailed(f"instance {instance.id}: {instance.failure}")

    def stop(self, instance: Instance, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the instance's whole process group, then withdraw its Redis record and slot."""
        instance.ready.clear()
        stop_process_group(instance.process, grace_s)
        if self.pools is not None:
            reap_adopted(instance.process.pid)
        if self.redis is None or self.keys is None:
            return
        try:
            pipe = self.redis.pipeline()
            pipe.delete(self.keys.instance(instance.id))
            pipe.srem(self.keys.instances, instance.id)
            pipe.zrem(self.keys.node_slots(instance.node), instance.id)
            pipe.execute()
        except redis.RedisError:  # the record expires by itself after three missed heartbeats
            pass
