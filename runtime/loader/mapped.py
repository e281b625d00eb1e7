"""Map partition files copy-on-write; every process on the node shares the same pages.

MAP_PRIVATE keeps the tensors writable (torch needs that) while reads share the page cache /
tmpfs pages; a write would copy one page for that process only, never change the file.
MADV_POPULATE_READ (Linux 5.14+) builds the page tables up front, without breaking sharing, so
the first forward pass takes no page faults. It runs in parallel chunks: for files that are not
cached yet, that is parallel reads through the page cache.

This serves the DRAM tier (tmpfs, or files already cached) and, on CPU, the SSD tier too: it
touches no fresh anonymous memory, which on VMs that hand free memory back to the host is the
slowest part of a copying load (benchmarks/README.md), and it leaves the model in the page cache,
shared with every later instance on the node.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sllm_faas.runtime.checkpoint.format import CheckpointError, Manifest, open_regular
from sllm_faas.runtime.loader.tiers import fully_cached, on_memory_filesystem

MADV_POPULATE_READ = 22
DEFAULT_CHUNK = 16 << 20
DEFAULT_THREADS = 8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _populate(address: int, length: int) -> None:
    """MADV_POPULATE_READ through ctypes, which drops the GIL, so chunks populate in parallel."""
    if _libc.madvise(address, length, MADV_POPULATE_READ) != 0:
        _libc.madvise(address, length, mmap.MADV_WILLNEED)  # kernels before 5.14: read-ahead only


def map_partitions(directory: str | os.PathLike, manifest: Manifest, *, populate: bool = True,
                   threads: int = DEFAULT_THREADS, chunk: int = DEFAULT_CHUNK) -> list[torch.Tensor]:
    """One copy-on-write mapping per partition, populated in parallel chunks unless populate=False."""
    directory = Path(directory)
    resident = on_memory_filesystem(directory)
    mappings, jobs, handles = [], [], []  # jobs: (address, length) ranges to populate
    try:
        for part in manifest.partitions:
            if part.size == 0:
                mappings.append(None)
                continue
            fd, size = open_regular(directory / part.file)
            handles.append(fd)
            if size < part.size:  # mapping past the end would fault (SIGBUS) on first touch
                raise CheckpointError(directory / part.file, "size",
                                      f"file has {size} bytes, manifest says {part.size}")
            mapping = mmap.mmap(fd, part.size, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
            mappings.append(mapping)
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            # Resident pages populate fastest in parallel chunks; a file still on disk populates fastest in
            # one call, which keeps the kernel's read-ahead streaming (8 x 16 MiB chunks: 0.81 s per cold
            # GiB here, one call: 0.44 s; benchmarks/results/load-sweep-mmap-*).
            step = chunk if resident or fully_cached(directory / part.file) else part.size
            jobs += [(address + start, min(step, part.size - start)) for start in range(0, part.size, step)]
        if populate and jobs:
            with ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:
                for _ in pool.map(lambda job: _populate(*job), jobs):
                    pass
    finally:
        for fd in handles:
            os.close(fd)  # the mappings stay valid after the descriptors close
    return [torch.frombuffer(m, dtype=torch.uint8) if m is not None else torch.empty(0, dtype=torch.uint8)
            for m in mappings]
