"""Start a real `sllm-faas loader` (gunicorn on a Unix socket) for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from process_group import stop_group

from sllm_faas.runtime.node_loader.client import LoaderClient, LoaderUnavailable


class LoaderDaemon:
    def __init__(self, root: Path, remote: Path | str, redis_url: str, prefix: str, node: str = "node-a",
                 dram_budget: str = "1GiB", ssd_budget: str = "4GiB", **extra: str) -> None:
        self.root = root
        self.socket = str(root / "loader.sock")
        self.args = [sys.executable, "-m", "sllm_faas", "loader", "--node-id", node, "--remote", str(remote),
                     "--ssd-dir", str(root / "ssd"), "--dram-dir", str(root / "dram"), "--dram-budget", dram_budget,
                     "--ssd-budget", ssd_budget, "--redis-url", redis_url, "--key-prefix", prefix,
                     "--socket-path", self.socket, "--heartbeat-s", "0.2", "--heartbeat-ttl-s", "2",
                     "--probe-bytes", "4MiB"]
        for key, value in extra.items():
            self.args += ["--" + key.replace("_", "-"), value]
        self.process: subprocess.Popen | None = None
        self.client = LoaderClient(self.socket)

    def start(self, timeout: float = 60) -> LoaderDaemon:
        self.log = open(self.root / "loader.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, (self.root / "loader.log").read_text()
                try:
                    self.client.status()
                    return self
                except LoaderUnavailable:
                    time.sleep(0.05)
            raise TimeoutError("loader did not start")
        except BaseException:
            self.stop()  # a start that fails leaves nothing running
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group, as an OOM kill or node failure would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process:
            stop_group(self.process)
        self.log.close()

    def wait_job(self, job: dict, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.02)
            job = self.client.job(job["id"])
        return job
