"""Function logs for the gateway's `GET /system/logs`, as OpenFaaS's log provider API serves them.

Each instance writes WORKDIR/logs/<instance>.log (an instance id is `<function>-<8 hex digits>`), and the
files stay after the instance stops. A request gets newline-delimited JSON messages
`{"name", "namespace", "instance", "timestamp", "text"}`: the last `tail` lines over the function's files
(capped at MAX_TAIL, read from at most TAIL_BYTES of each file), then with `follow` the lines appended
since, until the client leaves or FOLLOW_MAX_S passes. The files carry no time per line: `timestamp` is
when the gateway read the line.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

MAX_TAIL = 10_000          # lines per request, whatever `tail` asks
TAIL_BYTES = 4 << 20       # read from the end of each file for the tail
READ_BYTES = 1 << 20       # read per file and poll while following
FOLLOW_MAX_S = 600.0       # a follow ends after this, like faas-cli's own request timeout
POLL_S = 0.25
KEEPALIVE_S = 5.0          # a blank line while nothing is written: a client that left is noticed
MAX_FOLLOWERS = 8          # follows at once (each holds a gateway thread); more get 429
FOLLOWERS = threading.BoundedSemaphore(MAX_FOLLOWERS)


def request_stream(log_dir: Path, function: str, query: Mapping[str, str]) -> Iterator[bytes] | None:
    """The messages for a query `tail=N&follow=true&instance=ID` (ValueError naming a bad parameter), or None
    when MAX_FOLLOWERS follows run already."""
    raw_tail = query.get("tail") or "-1"
    try:
        tail = int(raw_tail)
    except ValueError:
        raise ValueError(f"tail={raw_tail!r} is not an integer (<= 0: the last {MAX_TAIL} lines)") from None
    follow = (query.get("follow") or "false").lower()
    if follow not in ("1", "true", "0", "false"):
        raise ValueError(f"follow={follow!r} is not true/false/1/0")
    if follow in ("0", "false"):
        return stream(log_dir, function, tail, False, query.get("instance"))
    if not FOLLOWERS.acquire(blocking=False):
        return None

    def followed() -> Iterator[bytes]:
        try:
            yield from stream(log_dir, function, tail, True, query.get("instance"))
        finally:
            FOLLOWERS.release()

    return followed()


def instance_logs(log_dir: Path, function: str, instance: str | None = None) -> list[Path]:
    """The function's log files (running and stopped instances), oldest first; only `instance`'s if given."""
    pattern = re.compile(re.escape(function) + r"-[0-9a-f]{8}\.log")
    files = []
    for path in log_dir.glob(f"{function}-*.log"):
        if pattern.fullmatch(path.name) and instance in (None, path.stem):
            try:
                files.append((path.stat().st_mtime, path.name, path))
            except OSError:   # removed meanwhile
                continue
    return [path for *_, path in sorted(files)]


def message(function: str, instance: str, text: str) -> bytes:
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return (json.dumps({"name": function, "namespace": "openfaas-fn", "instance": instance, "timestamp": stamp,
                        "text": text}) + "\n").encode()


def _lines(data: bytes) -> list[str]:
    return data.decode(errors="replace").splitlines()


def stream(log_dir: Path, function: str, tail: int, follow: bool, instance: str | None = None,
           follow_max_s: float = FOLLOW_MAX_S) -> Iterator[bytes]:
    """The messages of one /system/logs request (see the module docstring)."""
    tail = min(tail, MAX_TAIL) if tail > 0 else MAX_TAIL
    offsets: dict[Path, int] = {}
    recent: list[tuple[str, str]] = []
    for path in instance_logs(log_dir, function, instance):
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            data = handle.read(TAIL_BYTES)
        end = data.rfind(b"\n") + 1    # a partial last line is sent once it is complete
        offsets[path] = size - len(data) + end
        lines = _lines(data[:end])
        if size > TAIL_BYTES and lines:
            lines = lines[1:]          # the first line read is cut
        recent.extend((path.stem, line) for line in lines[-tail:])
    for name, text in recent[-tail:]:
        yield message(function, name, text)
    if not follow:
        return
    deadline = time.monotonic() + follow_max_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        sent = False
        for path in instance_logs(log_dir, function, instance):   # new instances' files too
            offset = offsets.setdefault(path, 0)
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read(READ_BYTES)
            except OSError:   # removed meanwhile
                continue
            end = data.rfind(b"\n") + 1 or (len(data) if len(data) == READ_BYTES else 0)  # a huge line: cut
            if not end:
                continue
            offsets[path] = offset + end
            for text in _lines(data[:end]):
                yield message(function, path.stem, text)
                sent = True
        if sent:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield b"\n"
            quiet_since = time.monotonic()
        time.sleep(POLL_S)
