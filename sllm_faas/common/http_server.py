"""The one way our services run gunicorn: a threaded worker that slow clients cannot exhaust.

gunicorn's gthread worker gives a connection a thread as soon as its first byte arrives, and that
thread then blocks until the whole request has come, without a deadline: 40 clients that each send half
a request head hold 40 threads, and health checks and metrics hang behind them. `Worker` keeps a
connection in the worker's poller (no thread) until its complete request head has arrived:

- the head must end (``\\r\\n\\r\\n``) within `HEAD_LIMIT` bytes, else the client gets 431 and is closed;
- it must arrive within SLLM_HTTP_HEADER_TIMEOUT_S of the connection becoming readable (the first
  request, or the next one on a kept-alive connection), else the connection is closed;
- a body with a Content-Length up to `BODY_BUFFER_LIMIT` is read in the poller too, within
  SLLM_HTTP_BODY_TIMEOUT_S of the head's end, so a client that sends a whole head and then stalls its body
  holds no thread either (before any route, so also before authentication);
- only then is it handed to a thread, whose socket has a timeout of SLLM_HTTP_BODY_TIMEOUT_S for every
  read (a larger or chunked body, or one after `Expect: 100-continue`) and write (a client that stops
  reading a stream).

The head bytes are read rather than peeked: the poller is level-triggered, so bytes left in the socket
would wake it again at once. They are given back to gunicorn's parser before it reads.
TLS connections (the controller with --tls-cert) are handed over at once: their bytes are encrypted
until the handshake, which happens in the thread; the socket timeout still bounds each read there.

`run` is the launcher every service uses (serve, loader, controller, and `python -m sllm_faas.common.http_server`
for the local gateway); each keeps its own binds, workers and threads. `Admission` is WSGI middleware that
answers requests beyond a limit at once with 503 and Retry-After instead of queueing them for a thread.
"""

from __future__ import annotations

import errno
import os
import selectors
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from sllm_faas.common.settings import SettingsError, resolve, setting

WORKER_CLASS = "sllm_faas.common.http_server.Worker"
HEAD_LIMIT = 64 * 1024  # bytes of request line + headers; gunicorn's own limits are 8190 per line, 100 fields
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 30\r\n\r\nrequest head over 65536 bytes\n")


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    """The worker's deadlines (README.md, environment variables): variables only, since gunicorn starts the worker."""

    header_timeout_s: float = setting("SLLM_HTTP_HEADER_TIMEOUT_S", "a connection's request head must arrive within "
                                      "this", 10.0, kind="duration", above=0, flag=None)
    body_timeout_s: float = setting("SLLM_HTTP_BODY_TIMEOUT_S", "each later socket read or write must complete "
                                    "within this", 30.0, kind="duration", above=0, flag=None)


BODY_BUFFER_LIMIT = 1 << 20  # bodies up to this size are read before a thread is given (module doc)


def _head_end(head: bytearray) -> int:
    """The offset just past the request head's blank line within the limit, or -1 while it has not come."""
    end = head.find(b"\r\n\r\n", 0, HEAD_LIMIT + 4)
    return end + 4 if end >= 0 else -1


def _buffered_body(head: bytes) -> int:
    """How many body bytes to wait for in the poller: the Content-Length when it is small enough to buffer,
    else 0 (no length, chunked, `Expect: 100-continue` or a large body: the thread reads it, under the
    socket timeout). A malformed length is gunicorn's parser's to refuse, so it waits for nothing."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" or (name == b"expect" and b"100-continue" in value.lower()):
            return 0
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return 0
    return length if 0 < length <= BODY_BUFFER_LIMIT else 0


def _complete(head: bytearray) -> bool:
    """Whether `head` holds a whole request head (its blank line) within the limit, and its body when the
    body is one we buffer."""
    end = _head_end(head)
    return end >= 0 and len(head) >= end + _buffered_body(bytes(head[:end]))


class _Conn(TConn):
    """A connection that carries the request head bytes read while it waited in the poller."""

    def __init__(self, *args: Any, body_timeout: float) -> None:
        super().__init__(*args)
        self.head = bytearray()
        self.body_timeout = body_timeout

    def init(self) -> None:
        super().init()  # gunicorn makes the socket blocking (no timeout) here and in handle()
        if self.head and not self.is_http2:
            self.parser.unreader.unread(bytes(self.head))
            self.head.clear()
        self.sock.settimeout(self.body_timeout)


class Worker(ThreadWorker):
    """gthread, with the request head read in the poller under a size limit and a deadline (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            http = resolve(HttpSettings)
        except SettingsError as exc:   # the worker does not boot; gunicorn stops with the message
            raise SystemExit(str(exc)) from None
        self.header_timeout, self.body_timeout = http.header_timeout_s, http.body_timeout_s
        self.heads: dict[_Conn, float] = {}  # waiting for their head (or buffered body) -> deadline

    def accept(self, listener) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(_Conn(self.cfg, client, address, listener.getsockname(), body_timeout=self.body_timeout))

    def enqueue_req(self, conn: _Conn) -> None:
        """Every path to a thread (new, kept-alive, pipelined) goes through here: wait for the head first."""
        if self.cfg.is_ssl or conn.is_http2 or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            return super().enqueue_req(conn)  # encrypted, or HTTP/2 framing: no HTTP/1 head to look for
        if conn.parser is not None:  # a kept-alive connection: bytes read ahead belong to the next head
            conn.head[:0] = conn.parser.unreader.take_buffered()
        if not self._head_done(conn):
            conn.sock.setblocking(False)
            self.heads[conn] = time.monotonic() + self.header_timeout
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _head_done(self, conn: _Conn) -> bool:
        """Hand `conn` to a thread if its head is complete, or refuse an oversized head; False to wait on."""
        if _complete(conn.head):
            conn.data_ready = True  # the bytes are in conn.head, not on the socket: do not wait for more
            super().enqueue_req(conn)
            return True
        if _head_end(conn.head) < 0 and len(conn.head) >= HEAD_LIMIT + 4:
            try:
                conn.sock.send(HEAD_TOO_LARGE)
            except OSError:
                pass  # the client is gone or not reading: it is closed either way
            self._drop(conn)
            return True
        return False

    def _on_head_bytes(self, conn: _Conn, sock) -> None:
        try:
            data = sock.recv(HEAD_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        head_was_complete = _head_end(conn.head) >= 0
        conn.head += data
        head_complete = _head_end(conn.head) >= 0
        if data and not _complete(conn.head) and (head_complete or len(conn.head) < HEAD_LIMIT + 4):
            if head_complete and not head_was_complete:  # the head is in: the body has its own deadline
                self.heads[conn] = time.monotonic() + self.body_timeout
            return  # not yet: stay in the poller
        self.poller.unregister(sock)
        del self.heads[conn]
        if not data:  # the client closed (or reset) before sending a whole head
            return self._drop(conn)
        self._head_done(conn)

    def _drop(self, conn: _Conn) -> None:
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gunicorn's expiry of idle connections, and ours: heads past their deadline (all of them on stop)."""
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.heads.items()):
            if deadline > now and self.alive:
                continue
            del self.heads[conn]
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self._drop(conn)


class Admission:
    """WSGI middleware: at most `limit` requests for which `limited(environ)` is true run at once; the next
    ones get `refusal` (status, headers, body) at once instead of waiting for a thread. A request counts until
    its response iterable is closed, so a stream holds its place until it ends."""

    def __init__(self, app: Callable, limit: int, limited: Callable[[dict], bool],
                 refusal: tuple[str, list[tuple[str, str]], bytes]) -> None:
        self.app, self.limited, self.refusal = app, limited, refusal
        self.places = threading.BoundedSemaphore(limit)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not self.limited(environ):
            return self.app(environ, start_response)
        if not self.places.acquire(blocking=False):
            status, headers, body = self.refusal
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
            return [body]
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self.places.release()
            raise
        return _Released(result, self.places.release)


class _Released:
    """A response iterable that gives its admission place back when the server closes it."""

    def __init__(self, result: Iterable[bytes], release: Callable[[], None]) -> None:
        self.result, self.release = result, release

    def __iter__(self):
        return iter(self.result)

    def close(self) -> None:
        try:
            if hasattr(self.result, "close"):
                self.result.close()
        finally:
            self.release()


def _worker_exited(server, worker) -> None:
    """gunicorn's child_exit hook: drop the dead worker's live gauges (its counters and histograms stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def run(argv: list[str]) -> None:
    """Run gunicorn in this process with `Worker`; `argv` is gunicorn's command line (binds, workers,
    threads, timeouts, the app), without the program name.

    Every start gets a fresh private PROMETHEUS_MULTIPROC_DIR (mode 0700, removed when the server exits), set
    before any worker imports prometheus_client, so that /metrics sums every worker's values
    (sllm_faas/common/metrics.py). It replaces an inherited one: the gateway's instances must not share its dir.
    """
    import atexit
    import shutil
    import tempfile

    from gunicorn.app.wsgiapp import WSGIApplication

    metrics_dir, master = tempfile.mkdtemp(prefix="sllm-metrics-"), os.getpid()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    @atexit.register
    def remove_metrics_dir() -> None:  # workers run atexit too when they exit: only the master removes it
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    class Application(WSGIApplication):
        def load_config(self) -> None:
            super().load_config()
            self.cfg.set("child_exit", _worker_exited)

    # No control socket: gunicorn >= 25 would otherwise bind one shared path (~/.gunicorn/gunicorn.ctl) for every
    # server on the host, an unauthenticated way to resize or stop whichever master bound it last.
    sys.argv = ["gunicorn", "--worker-class", WORKER_CLASS, "--no-control-socket", *argv]
    Application("%(prog)s [OPTIONS] [APP_MODULE]").run()


if __name__ == "__main__":  # `python -m sllm_faas.common.http_server ARGS`: what `sllm-faas up` spawns for its gateway
    run(sys.argv[1:])
