"""The Redis fixture itself, against the external server and an embedded one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import redis
from conftest import LOCAL_REDIS_URL, delete_prefixed, redis_answers

from sllm_faas.runtime.embedded_redis import EmbeddedRedis


def test_namespace_isolates_and_cleans(redis_ns, redis_target):
    other = f"sllm-test-other:{os.getpid()}:keep"
    redis_ns.client.set(other, "1")
    redis_ns.client.set(redis_ns.key("a"), "1")
    redis_ns.client.hset(redis_ns.key("h"), mapping={"f": "v"})
    try:
        assert delete_prefixed(redis_ns.client, redis_ns.prefix) == 2
        assert redis_ns.client.get(other) == "1"  # someone else's key survives
    finally:
        redis_ns.client.delete(other)


@pytest.mark.skipif(not redis_answers(LOCAL_REDIS_URL), reason="no Redis server on 127.0.0.1:6379")
def test_external_server_is_preferred(redis_target):
    if os.environ.get("REDIS_URL"):
        assert redis_target.source == "env"
    else:
        assert redis_target.source == "local"
        assert redis_target.url == LOCAL_REDIS_URL


def test_embedded_server_roundtrip_and_stop():
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.xadd("s", {"k": "v"})
        assert client.xlen("s") == 1
        assert "valkey_version" in client.info("server")
        client.close()
        pid = server.pid
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_embedded_server_start_waits_out_a_slow_answer_and_names_the_port():
    """A PING that times out (a loaded host: `sllm-faas up` once died of "Timeout reading from socket") is waited
    out like a refused connection. Here the port is held by a listener that never answers: the server cannot
    bind it and exits, and start says so with the port, not with a bare timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        server = EmbeddedRedis(port=port)
        with pytest.raises(RuntimeError, match=f"embedded Redis on port {port} did not start"):
            server.start(timeout=3.0)
        assert not server.alive()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_embedded_server_dies_with_owner(sig):
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from sllm_faas.runtime.embedded_redis import EmbeddedRedis
            server = EmbeddedRedis(); server.start()
            print(server.pid, server.port, flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    server_pid, port = map(int, owner.stdout.readline().split())
    assert _alive(server_pid)
    owner.send_signal(sig)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server_pid), "embedded Redis outlived its owner"
    assert not redis_answers(f"redis://127.0.0.1:{port}/0")
