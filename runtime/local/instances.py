"""Function instances of the local cluster: `sllm-faas serve` processes started "on" a node, i.e. with
that node's loader socket, id and slot booking, and stopped when scaled down.

Processes are spawned from one long-lived thread with PR_SET_PDEATHSIG, so they die with the gateway
even if it is killed; a clean stop sends SIGTERM (the runtime releases its lease and slot) and SIGKILL
after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from runtime.embedded_redis import free_tcp_port
from runtime.processes import die_with_parent


class InstanceFailed(RuntimeError):
    pass


@dataclass
class Instance:
    id: str
    function: str
    node: str
    url: str
    process: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.time)
    ready: threading.Event = field(default_factory=threading.Event)
    cold_start: dict | None = None     # the runtime's breakdown from /_/ready
    placement: dict = field(default_factory=dict)  # the controller's decision: tier, estimate_s, booking
    failure: str | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"id": self.id, "node": self.node, "url": self.url, "pid": self.process.pid,
                "ready": self.ready.is_set(), "in_flight": self.in_flight, "cold_start": self.cold_start,
                "placement": self.placement,
                "failure": self.failure, "started_at": self.started_at}


class InstanceLauncher:
    def __init__(self, log_dir: Path, base_env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.base_env = base_env
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sllm-spawner")  # lives as long as us

    def start(self, instance_id: str, function: str, node: str, build: Path, model: str, env: dict[str, str]
              ) -> Instance:
        port = free_tcp_port()
        url = f"http://127.0.0.1:{port}"
        environment = {**os.environ, **env, **self.base_env, "SLLM_INSTANCE_ID": instance_id, "SLLM_NODE_ID": node,
                       "SLLM_FUNCTION_NAME": function, "SLLM_ADVERTISE_URL": url, "SLLM_MODEL": model}
        log_path = self.log_dir / f"{instance_id}.log"
        command = [sys.executable, "-m", "runtime.cli", "serve", model, "--port", str(port), "--host", "127.0.0.1",
                   "--app", "index:app"]

        def spawn() -> subprocess.Popen:
            with open(log_path, "ab") as log:
                return subprocess.Popen(command, cwd=build, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=die_with_parent)  # noqa: PLW1509

        process = self._spawner.submit(spawn).result()
        return Instance(instance_id, function, node, url, process, log_path)

    @staticmethod
    def wait_ready(instance: Instance, timeout_s: float) -> Instance:
        """Poll /_/ready until 200 (keeping the cold-start breakdown) or the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if instance.process.poll() is not None:
                instance.failure = f"exited with {instance.process.returncode} (log: {instance.log_path})"
                raise InstanceFailed(f"instance {instance.id}: {instance.failure}")
            try:
                response = requests.get(instance.url + "/_/ready", timeout=2)
                body = response.json()
                if response.status_code == 200:
                    instance.cold_start = body.get("cold_start")
                    instance.ready.set()
                    return instance
                if body.get("error"):
                    instance.failure = body["error"]
                    raise InstanceFailed(f"instance {instance.id}: {body['error']}")
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.02)
        instance.failure = f"not ready after {timeout_s:.0f} s (log: {instance.log_path})"
        raise InstanceFailed(f"instance {instance.id}: {instance.failure}")

    @staticmethod
    def stop(instance: Instance, grace_s: float = 10.0) -> None:
        if instance.process.poll() is None:
            instance.process.send_signal(signal.SIGTERM)
            try:
                instance.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                instance.process.kill()
                instance.process.wait()
