"""Start a real `sllm-faas controller` (gunicorn) for tests, and write node records the way loaders do."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests
from process_group import stop_group

from sllm_faas.runtime.embedded_redis import free_tcp_port

GB = 10**9


class ControllerProcess:
    def __init__(self, root: Path, redis_url: str, prefix: str, token: str | None = None, insecure: bool = False,
                 **extra: str) -> None:
        """A controller with `token` (a fresh random one by default: it refuses to start without credentials),
        or none at all with `insecure` (--insecure-no-auth)."""
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "" if insecure else token or secrets.token_hex(16)
        self.log_path = root / f"controller-{self.port}.log"
        self.args = [sys.executable, "-m", "sllm_faas", "controller", "--host", "127.0.0.1", "--port", str(self.port),
                     "--redis-url", redis_url, "--key-prefix", prefix, "--workers", "1"]
        self.args += ["--insecure-no-auth"] if insecure else ["--token", self.token]
        for key, value in extra.items():
            self.args += ["--" + key.replace("_", "-"), value]
        self.process: subprocess.Popen | None = None
        self.log = None

    def start(self, timeout: float = 30) -> ControllerProcess:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log_path.read_text()
                try:
                    if requests.get(self.url + "/healthz", timeout=5).status_code == 200:
                        return self
                except requests.RequestException:
                    time.sleep(0.05)
            raise TimeoutError("controller did not start")
        except BaseException:
            self.stop()  # a start that fails leaves nothing running
            raise

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def post(self, path: str, body, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=self.headers(), timeout=30, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers(), timeout=30)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, headers=self.headers(), timeout=30)

    def stop(self) -> None:
        if self.process:
            stop_group(self.process)
        if self.log:
            self.log.close()


def publish_node(client, prefix: str, node: str, *, slots: int = 1, dram=(), ssd=(), gpu=(), bw_remote: float = 1 * GB,
                 bw_ssd: float = 2 * GB, bw_dram: float = 10 * GB, address: str = "", ttl: int = 60,
                 queue: dict[str, float] | None = None) -> None:
    """A node record with every documented field, as `sllm-faas loader` publishes it."""
    record = {"node_id": node, "address": address, "heartbeat_at": f"{time.time():.3f}", "schema_version": "2",
              "remote": "dir:/models", "ssd_capacity": str(100 * GB), "ssd_used": "0", "dram_capacity": str(16 * GB),
              "dram_used": "0", "gpu_capacity": "0", "gpu_used": "0", "bw_remote": f"{bw_remote:.0f}",
              "bw_ssd": f"{bw_ssd:.0f}", "bw_dram": f"{bw_dram:.0f}", "bw_gpu": "", "queue_length": "0",
              "gpus": json.dumps([]), "slots": str(slots)}
    pipe = client.pipeline()
    pipe.sadd(prefix + "nodes", node)
    pipe.hset(f"{prefix}node:{node}", mapping=record)
    pipe.expire(f"{prefix}node:{node}", ttl)
    for tier, models in (("dram", dram), ("ssd", ssd), ("gpu", gpu)):
        if models:
            pipe.sadd(f"{prefix}node:{node}:models:{tier}", *models)
    if queue:
        pipe.zadd(f"{prefix}node:{node}:queue", queue)
    pipe.execute()


def publish_model(client, prefix: str, model: str, size_bytes: int) -> None:
    client.hset(f"{prefix}model:{model}", mapping={"size_bytes": str(size_bytes), "partitions": "1",
                                                   "format_version": "3"})
