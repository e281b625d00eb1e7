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
probes then measure 4 KiB).

The probe costs 1-2 ms (~10 ms when huge pages are slow) and runs once per process: a serving
process loads once.
"""

from __future__ import annotations

import functools
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sllm_faas.common.tiers import Tier
from sllm_faas.runtime.checkpoint.format import Manifest
from sllm_faas.runtime.loader.tiers import current_tier

HUGE_PROBE_BYTES = 4 << 20  # 2 huge pages: ~0.4 ms when host-backed, ~9 ms when each costs 512 host faults
SMALL_PROBE_BYTES = 2 << 20  # 512 small pages, ~1 ms
DIRECT_MARGIN = 2.0
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault in (zeroed, writable) pages without a userspace loop
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


@functools.cache
def memory_probe() -> MemoryProbe:
    """This process's measurement of fresh memory (taken on first use)."""
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
    """GB/s of faulting in `size` bytes of fresh private anonymous memory advised for huge or small pages."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE if hugepages else mmap.MADV_NOHUGEPAGE)
        start = time.perf_counter()
        try:
            buffer.madvise(MADV_POPULATE_WRITE)
        except OSError:  # kernels before 5.14: one write per page
            for offset in range(0, size, mmap.PAGESIZE):
                buffer[offset] = 1
        return size / max(time.perf_counter() - start, 1e-9) / 1e9
    finally:
        buffer.close()
