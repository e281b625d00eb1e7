"""Checksum verification: run on request (staging, `sllm-faas verify`), never on the hot load path."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime.checkpoint.format import CheckpointError, Manifest, PartitionEntry, read_manifest

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])  # hashlib releases the GIL, so partitions hash in parallel
    return digest.hexdigest()


def verify_partition(directory: Path, partition: PartitionEntry) -> None:
    actual = sha256_file(directory / partition.file)
    if actual != partition.sha256:
        raise CheckpointError(directory / partition.file, "sha256",
                              f"checksum mismatch: manifest {partition.sha256}, file {actual}")


def verify(directory: str | os.PathLike, threads: int | None = None) -> Manifest:
    """Check the size and SHA-256 of every file the manifest lists; raises CheckpointError naming the first bad one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    workers = threads or min(len(manifest.files), os.cpu_count() or 1) or 1
    with ThreadPoolExecutor(workers) as pool:
        # map() yields in manifest order, so the first mismatch reported is the first listed file.
        for _ in pool.map(lambda part: verify_partition(directory, part), manifest.files):
            pass
    return manifest
