"""Checksum verification: run on request (staging, `sllm-faas verify`), never on the hot load path."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sllm_faas.runtime.checkpoint.format import CheckpointError, Manifest, PartitionEntry, open_regular, read_manifest

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike, size: int | None = None) -> str:
    """SHA-256 of a regular file; with `size`, the file must have exactly that many bytes, and no byte past
    it is read (a file that grows while it is hashed cannot make the read endless)."""
    fd, actual = open_regular(path)
    if size is not None and actual != size:
        os.close(fd)
        raise CheckpointError(path, "size", f"file has {actual} bytes, manifest says {size}")
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    left = actual if size is None else size
    with open(fd, "rb", buffering=0) as handle:
        while left and (count := handle.readinto(view[:min(_CHUNK, left)])):
            digest.update(view[:count])  # hashlib releases the GIL, so partitions hash in parallel
            left -= count
    return digest.hexdigest()


def verify_partition(directory: Path, partition: PartitionEntry) -> None:
    try:
        actual = sha256_file(directory / partition.file, partition.size)
    except OSError as exc:
        raise CheckpointError(directory / partition.file, "file", f"cannot read: {exc.strerror or exc}") from None
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
