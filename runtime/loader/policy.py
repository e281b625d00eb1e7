"""Which CPU strategy a load uses, decided by where the bytes are and by measuring fresh memory now.

From tmpfs or a fully cached file, mapping copies nothing: always "mmap". From disk the load reads with
parallel O_DIRECT requests (they keep the disk busier than the page cache's read-ahead) into fresh
anonymous memory, and what differs is the page size that memory comes in. On bare metal, or on a VM whose
free memory is still host-backed, a fresh 2 MiB page costs one zeroing (~11 GB/s on the development VM):
"direct" (MADV_HUGEPAGE) loads at disk speed. On a VM whose balloon has reported free memory back to the
host (free page reporting hands over whole free 2 MiB blocks, so it is huge pages that come back first),
each fresh huge page costs 512 host faults (~0.3-0.45 GB/s) while 4 KiB pages still come at 1.2-2.4 GB/s:
"direct-4k". Mapping the file from disk is slower than both there (0.5 GB/s in that state: one read-ahead
stream, and the page cache's pages cost the same host faults; benchmarks/README.md, "Memory state").
Which state a node is in depends on what it did in the last seconds, so no fixed choice is right: the
probe first-touches a few fresh pages of each size, and huge pages are chosen when they come in at least
DIRECT_MARGIN times faster. Ties go to 4 KiB pages, which also covers THP off or fragmented memory (both
probes then measure 4 KiB). A probe gets the blocks the host still backs, which the allocator hands out
first, so a "direct" load keeps timing its huge pages and goes on in 4 KiB pages once they turn slow
(`direct.HugePageWatch`).

The probe costs ~1 ms (~15 ms when huge pages are slow) and runs once per process: a serving
process loads once.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from sllm_faas.common.tiers import Tier
from sllm_faas.runtime.checkpoint.format import Manifest
from sllm_faas.runtime.loader.direct import HUGE_PAGE, MADV_POPULATE_WRITE, HugePageWatch
from sllm_faas.runtime.loader.tiers import current_tier

HUGE_PROBE_BYTES = 6 << 20  # 3 huge pages: ~0.3 ms when host-backed, ~13 ms when each costs 512 host faults
SMALL_PROBE_BYTES = 3 << 19  # 3 x 128 small pages, ~0.5 ms
PROBE_PIECES = 3  # each probe is timed in this many pieces; their median is the rate (one slow piece is noise)
# A load's page faults add to its reads (direct-4k took 0.633 s where the disk read 1 GiB in 0.44 s and 4 KiB
# pages first-touch at ~4.4 GB/s: 0.44 + 0.24 s), so the faster page size wins, by whatever margin; this one
# only keeps the probe's noise (its 4 KiB rate spans 2.3-4.8 GB/s on one host) from picking the slower. At 2.0
# the probe chose 4 KiB pages in 2 of 5 loads where huge pages came 1.7-2.0x faster, and those took 0.56-0.59 s
# against 0.476 s for huge pages (Intel SPR host, recycled memory, 2026-12-01).
DIRECT_MARGIN = 1.25
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class MemoryProbe:
    """First-touch speed of fresh anonymous memory, GB/s, as 2 MiB pages and as 4 KiB pages."""

    hugepage_gbps: float
    small_gbps: float


def choose(probe: MemoryProbe) -> str:
    """The CPU strategy for a load from disk, given what fresh memory costs now."""
    return "direct" if probe.hugepage_gbps >= DIRECT_MARGIN * probe.small_gbps else "direct-4k"


def cpu_strategy(directory: str | os.PathLike, manifest: Manifest, probe: MemoryProbe | None = None) -> str:
    """"mmap", "direct" or "direct-4k" for loading `directory` onto the CPU; `probe` defaults to this process's."""
    if current_tier(directory, manifest) == Tier.DRAM:
        return "mmap"
    return choose(probe if probe is not None else memory_probe())


def huge_page_watch(probe: MemoryProbe | None = None) -> HugePageWatch:
    """For a "direct" load the probe chose: go on in 4 KiB pages where huge pages turn out no faster than the
    DIRECT_MARGIN the choice asked of them (the probe's few pages were the host-backed ones). `probe`: another
    than this process's (a daemon that copies for hours, the node loader, measures before each copy)."""
    return HugePageWatch(DIRECT_MARGIN * (probe or memory_probe()).small_gbps)


@functools.cache
def memory_probe() -> MemoryProbe:
    """This process's measurement of fresh memory (taken on first use)."""
    return measure_memory()


def measure_memory() -> MemoryProbe:
    """Fresh memory's first-touch speed now, in both page sizes (~1 ms; ~15 ms when huge pages are slow)."""
    if not transparent_hugepages_available():
        return MemoryProbe(hugepage_gbps=0.0, small_gbps=first_touch_gbps(SMALL_PROBE_BYTES, hugepages=False))
    return MemoryProbe(hugepage_gbps=first_touch_gbps(HUGE_PROBE_BYTES, hugepages=True),
                       small_gbps=first_touch_gbps(SMALL_PROBE_BYTES, hugepages=False))


def transparent_hugepages_available() -> bool:
    """MADV_HUGEPAGE is honoured unless THP is "never" (or absent)."""
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


def first_touch_gbps(size: int, hugepages: bool) -> float:
    """GB/s of faulting in fresh private anonymous memory advised for huge or small pages: `size` bytes in
    PROBE_PIECES pieces (whole huge pages for huge), the median piece's rate.

    One piece can be slow for reasons that do not say what the load will meet (a 2 MiB block the host took
    back, a compaction stall): a single 4 MiB probe measured huge pages at 2.4 GB/s where the load got them
    at 20, and chose 4 KiB pages, twice as slow (benchmarks/results/load-2026-12-01-python-svc-zen5)."""
    piece = size // PROBE_PIECES
    buffer = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE if hugepages else mmap.MADV_NOHUGEPAGE)
        anchor = ctypes.c_char.from_buffer(buffer)
        start = -ctypes.addressof(anchor) % HUGE_PAGE  # pieces on huge page boundaries
        del anchor
        seconds = []
        for offset in range(start, start + piece * PROBE_PIECES, piece):
            began = time.perf_counter()
            try:
                buffer.madvise(MADV_POPULATE_WRITE, offset, piece)
            except OSError:  # kernels before 5.14: one write per page
                for page in range(offset, offset + piece, mmap.PAGESIZE):
                    buffer[page] = 1
            seconds.append(time.perf_counter() - began)
        return piece / max(statistics.median(seconds), 1e-9) / 1e9
    finally:
        buffer.close()
