"""DRAM tier: map partition files copy-on-write; every process on the node shares the same pages.

MAP_PRIVATE keeps the tensors writable (torch needs that) while reads share the page cache /
tmpfs pages; a write would copy one page for that process only, never change the file.
MADV_POPULATE_READ (Linux 5.14+) builds the page tables up front, without breaking sharing,
so the first forward pass takes no page faults.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from runtime.checkpoint.format import Manifest

MADV_POPULATE_READ = 22


def map_partition(path: str | os.PathLike, size: int, populate: bool = True) -> torch.Tensor:
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if populate:
        try:
            mapping.madvise(MADV_POPULATE_READ)
        except OSError:  # older kernels: ask for read-ahead instead
            mapping.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive


def map_partitions(directory: str | os.PathLike, manifest: Manifest, populate: bool = True) -> list[torch.Tensor]:
    directory = Path(directory)
    return [map_partition(directory / part.file, part.size, populate) for part in manifest.partitions]
