"""Slow clients against our gunicorn worker (sllm_faas/common/http_server.py), on real servers: half-open connections
and long streams must not starve health checks and metrics (issue #13, items 5-6)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from process_group import stop_group
from test_runtime_hostile import started

from sllm_faas.runtime.embedded_redis import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: sllm\r\nContent-Type: application/json\r\n"


def half_open(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each send part of a request head, then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(PARTIAL_HEAD)
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (after any reply it sends first)."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if sock.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


@pytest.fixture(scope="module")
def runtime(smollm2, tmp_path_factory):
    """`sllm-faas serve` with the default app (no handler), the default thread budget and SLLM_MAX_BATCH."""
    port = free_tcp_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "SLLM_TORCH_THREADS": "1", "SLLM_SERVED_MODEL_NAME": "smollm2",
           "SLLM_HTTP_HEADER_TIMEOUT_S": "60"}  # the half-open connections outlive the test's checks
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "sllm_faas", "serve", str(smollm2["sllm"]), "--port",
                                    str(port), "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                if requests.get(url + "/_/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        else:
            raise TimeoutError("the runtime never became ready")
        yield port, url
    finally:
        stop_group(process)


class Stream(threading.Thread):
    def __init__(self, url: str, index: int) -> None:
        super().__init__(daemon=True)
        self.url, self.index = url, index
        self.status = self.retry_after = None
        self.body = ""
        self.start()

    def run(self) -> None:
        with requests.post(self.url + "/v1/completions", json={"prompt": f"Count from {self.index}:", "max_tokens": 8,
                                                                "temperature": 0, "stream": True, "ignore_eos": True},
                           stream=True, timeout=300) as response:
            self.status, self.retry_after = response.status_code, response.headers.get("Retry-After")
            self.body = response.text


def test_half_open_connections_and_32_streams_leave_health_and_metrics_answering(runtime):
    port, url = runtime
    idle = half_open(port, 100)
    try:
        streams = [Stream(url, i) for i in range(32)]
        time.sleep(0.5)  # the streams are in: generating, queued, or refused
        assert requests.get(url + "/_/health", timeout=5).json() == {"status": "ok"}
        assert "vllm:num_requests_running" in requests.get(url + "/metrics", timeout=5).text
        for stream in streams:
            stream.join(timeout=300)
        finished = [s for s in streams if s.status == 200]
        refused = [s for s in streams if s.status == 503]
        assert len(finished) + len(refused) == 32, [(s.status, s.body[:200]) for s in streams]
        assert len(finished) >= 8 and all(s.body.endswith("data: [DONE]\n\n") for s in finished)
        assert all(s.retry_after == "1" and '"code": "overloaded"' in s.body for s in refused)
        assert requests.get(url + "/_/health", timeout=5).status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_default_handler_streams_on_invoke(runtime):
    _, url = runtime
    response = requests.post(url + "/", json={"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0,
                                              "stream": True}, timeout=120)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    assert response.text.startswith("data: {") and response.text.endswith("data: [DONE]\n\n")
    streamed = "".join(re.findall(r'"text": "([^"]*)"', response.text))
    plain = requests.post(url + "/", json={"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0},
                          timeout=120).json()
    assert streamed == plain["choices"][0]["text"]


def test_header_deadline_closes_half_open_connections_and_big_heads_get_431(tmp_path):
    server = started(tmp_path, SLLM_HTTP_HEADER_TIMEOUT_S="1", SLLM_HTTP_BODY_TIMEOUT_S="1")
    try:
        [slow] = half_open(server.port, 1)
        assert closed_by_server(slow, within=10)
        big = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        big.sendall(b"GET /_/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000)
        assert big.recv(64).startswith(b"HTTP/1.1 431")
        no_body = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        no_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert closed_by_server(no_body, within=10)  # the body deadline: a reply, or not, then the close
        with requests.Session() as session:  # kept-alive connections go back through the head wait
            assert [session.get(server.url + "/_/health", timeout=5).status_code for _ in range(3)] == [200] * 3
    finally:
        server.stop()


def test_controller_healthz_answers_beside_96_half_open_connections(tmp_path, redis_ns):
    from controller_process import ControllerProcess

    controller = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix).start()
    idle = half_open(controller.port, 96)
    try:
        assert requests.get(controller.url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in idle:
            sock.close()
        controller.stop()


def test_http_settings_are_documented():
    readme = (ROOT / "README.md").read_text()
    for source in ("sllm_faas/common/http_server.py", "runtime/server/settings.py"):
        for name in set(re.findall(r'"(SLLM_[A-Z_]+)"', (ROOT / source).read_text())):
            assert f"`{name}`" in readme, f"{name} ({source}) is not in README.md"


def test_stalled_bodies_hold_no_thread_before_authentication(tmp_path, redis_ns):
    """A whole head, then a body that never finishes: read in the poller, so even 48 of them (each past the
    controller's auth, with a valid token) leave /healthz answering, and each is closed at the body deadline."""
    from controller_process import ControllerProcess

    controller = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix).start()
    head = (f"POST /v1/placements HTTP/1.1\r\nHost: sllm\r\nAuthorization: Bearer {controller.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    stalled = []
    try:
        for _ in range(48):
            sock = socket.create_connection(("127.0.0.1", controller.port), timeout=10)
            sock.sendall(head + b'{"model": "')
            stalled.append(sock)
        assert requests.get(controller.url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in stalled:
            sock.close()
        controller.stop()
