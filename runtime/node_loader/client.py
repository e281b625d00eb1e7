"""What a function instance (over the node's Unix socket) and the controller (over TCP, `host:port`)
use to talk to a node loader."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from typing import Any


class LoaderUnavailable(RuntimeError):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class LoaderClient:
    def __init__(self, address: str, timeout: float = 10.0, token: str | None = None) -> None:
        """`address`: a Unix socket path, or `host:port` (the node record's `address` field). Over TCP the
        loader wants its bearer token: `token`, else $SLLM_LOADER_TOKEN (the controller's staging kick)."""
        self.address, self.timeout = address, timeout
        self.token = token if token is not None else os.environ.get("SLLM_LOADER_TOKEN") or None

    def _connect(self) -> http.client.HTTPConnection:
        if self.address.startswith("/"):
            return _UnixConnection(self.address, self.timeout)
        return http.client.HTTPConnection(self.address, timeout=self.timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict[str, Any]]:
        connection = self._connect()
        try:
            headers = {"Content-Type": "application/json"}
            if self.token and not self.address.startswith("/"):
                headers["Authorization"] = f"Bearer {self.token}"
            connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException) as exc:
            raise LoaderUnavailable(f"node loader at {self.address}: {exc}") from None
        finally:
            connection.close()

    def _ok(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        status, answer = self.request(method, path, body)
        if status >= 400:
            raise LoaderUnavailable(f"node loader refused {method} {path}: {answer.get('error', status)}")
        return answer

    def stage(self, model: str, tier: str = "dram") -> dict[str, Any]:
        return self._ok("POST", "/v1/stage", {"model": model, "tier": tier})

    def job(self, job_id: str) -> dict[str, Any]:
        return self._ok("GET", f"/v1/jobs/{job_id}")

    def where(self, model: str) -> dict[str, Any]:
        return self._ok("GET", f"/v1/models/{model}")

    def stage_and_wait(self, model: str, tier: str = "dram", timeout: float = 600.0, poll: float = 0.02) -> dict:
        job = self.stage(model, tier)
        deadline = time.monotonic() + timeout
        while job["state"] not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise LoaderUnavailable(f"staging {model} to {tier} did not finish in {timeout:.0f}s")
            time.sleep(poll)
            job = self.job(job["id"])
        if job["state"] == "failed":
            raise LoaderUnavailable(f"staging {model} to {tier} failed: {job['error']}")
        return job

    def lease(self, model: str, holder: str, ttl_s: float | None = None) -> dict[str, Any]:
        return self._ok("POST", "/v1/leases", {"model": model, "holder": holder, "ttl_s": ttl_s})

    def renew(self, lease_id: str) -> dict[str, Any]:
        return self._ok("POST", f"/v1/leases/{lease_id}/renew")

    def release(self, lease_id: str) -> dict[str, Any]:
        return self._ok("DELETE", f"/v1/leases/{lease_id}")

    def status(self) -> dict[str, Any]:
        return self._ok("GET", "/v1/status")


class LeaseKeeper:
    """Renews a lease at a third of its TTL until stopped; a killed instance simply stops renewing."""

    def __init__(self, client: LoaderClient, lease: dict[str, Any]) -> None:
        self.client, self.lease = client, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sllm-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease["ttl_s"] / 3):
            try:
                self.client.renew(self.lease["id"])
            except LoaderUnavailable:
                continue  # the loader restarts or is busy: try again next period

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if release:
            try:
                self.client.release(self.lease["id"])
            except LoaderUnavailable:
                pass
