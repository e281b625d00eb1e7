"""Measured tier bandwidths (bytes/s): the `b` of the scheduler's `q + n/b`, never a constant.

Each tier starts from a small cache-bypassing probe. The probe only reads, while a staging also
writes the copy into the next tier, so the first real transfer replaces the probe's value and later
ones follow an exponential moving average.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
from pathlib import Path

SMOOTHING = 0.3  # weight of the newest observation
MIN_OBSERVED_BYTES = 4 << 20  # smaller transfers measure per-file overheads, not bandwidth


class Bandwidths:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._probed: set[str] = set()  # tiers whose value is still the probe's

    def observe(self, tier: str, nbytes: int, seconds: float, probe: bool = False) -> None:
        if nbytes < MIN_OBSERVED_BYTES or seconds <= 0:
            return
        rate = nbytes / seconds
        with self._lock:
            previous = None if tier in self._probed else self._values.get(tier)
            self._values[tier] = rate if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * rate
            if probe:
                self._probed.add(tier)
            else:
                self._probed.discard(tier)

    def get(self, tier: str) -> float | None:
        with self._lock:
            return self._values.get(tier)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


def probe_write_read(directory: Path, nbytes: int) -> float:
    """Read bandwidth of `directory`'s filesystem for data not in the page cache (O_DIRECT where
    allowed, else a buffered read after dropping the file's cached pages)."""
    nbytes = max(4096, nbytes // 4096 * 4096)
    block = mmap.mmap(-1, min(nbytes, 16 << 20))
    block.write(os.urandom(len(block)) if len(block) <= 1 << 20 else b"\xa5" * len(block))
    fd, path = tempfile.mkstemp(dir=directory, prefix=".probe-")
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, block[: min(len(block), nbytes - written)])
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        start = time.perf_counter()
        done = 0
        while done < nbytes:
            count = os.preadv(fd, [block], done)
            if count == 0:
                break
            done += count
        return done / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
        block.close()
