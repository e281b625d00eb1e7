"""GPU path: disk or DRAM -> a bounded ring of pinned host buffers -> GPU, reads overlapped with copies.

The model never has to fit in pinned memory: `slots` pinned buffers of `chunk` bytes are reused
round-robin. Reader threads fill slot i+k while the copy engine drains slot i on a side stream;
a slot is refilled only after the event recorded behind its last copy has completed.

A GPU-resident copy made by one process (the node loader) can be imported by another through
CUDA IPC: `export_ipc` describes the partition buffers as JSON-safe handles, `import_ipc` maps them.
"""

from __future__ import annotations

import base64
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sllm_faas.runtime.checkpoint.format import CheckpointError, Manifest
from sllm_faas.runtime.loader.direct import open_for_reading, read_exact

DEFAULT_CHUNK = 64 << 20
DEFAULT_SLOTS = 4


def load_to_gpu(directory: str | os.PathLike, manifest: Manifest, device: torch.device | str = "cuda", *,
                chunk: int = DEFAULT_CHUNK, slots: int = DEFAULT_SLOTS, threads: int | None = None,
                direct: bool = True) -> list[torch.Tensor]:
    """One uint8 CUDA buffer per partition, filled through the pinned ring."""
    device = torch.device(device)
    directory = Path(directory)
    chunk = max(4096, chunk // 4096 * 4096)  # O_DIRECT needs block-multiple lengths and offsets
    destinations = [torch.empty(part.size, dtype=torch.uint8, device=device) for part in manifest.partitions]
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    ring_views = [memoryview(slot.numpy()) for slot in ring]
    copied = [None] * slots  # CUDA event behind each slot's last copy
    stream = torch.cuda.Stream(device)
    fds = []
    try:
        work = []
        for index, part in enumerate(manifest.partitions):
            if part.size == 0:
                continue
            path = str(directory / part.file)
            fd, _ = open_for_reading(path, direct)
            fds.append(fd)
            work += [(index, fd, start, min(chunk, part.size - start), path) for start in range(0, part.size, chunk)]
        with ThreadPoolExecutor(threads or min(slots, os.cpu_count() or 1)) as pool:
            def start_read(step: int) -> Future:
                slot = step % slots
                if copied[slot] is not None:
                    copied[slot].synchronize()  # the copy out of this slot must finish before we overwrite it
                _, fd, start, length, path = work[step]
                return pool.submit(read_exact, fd, ring_views[slot][:length], start, path)

            reads = [start_read(step) for step in range(min(slots, len(work)))]
            for step, (index, _, start, length, _) in enumerate(work):
                reads[step].result()
                slot = step % slots
                with torch.cuda.stream(stream):
                    destinations[index][start:start + length].copy_(ring[slot][:length], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                copied[slot] = event
                if step + slots < len(work):
                    reads.append(start_read(step + slots))
        stream.synchronize()
    finally:
        for fd in fds:
            os.close(fd)
    return destinations


def export_ipc(buffers: list[torch.Tensor]) -> dict[str, Any]:
    """Describe CUDA partition buffers so another process can map them (JSON-safe)."""
    handles = []
    for buffer in buffers:
        if buffer.device.type != "cuda":
            raise ValueError("export_ipc takes CUDA buffers")
        storage = buffer.untyped_storage()
        (device, handle, size, offset, ref_handle, ref_offset, event_handle, sync) = storage._share_cuda_()
        handles.append({"device": device, "handle": base64.b64encode(handle).decode(), "size": size,
                        "offset": offset, "ref_handle": base64.b64encode(ref_handle).decode(),
                        "ref_offset": ref_offset, "event_handle": base64.b64encode(event_handle or b"").decode(),
                        "event_sync_required": sync, "nbytes": buffer.numel()})
    return {"kind": "cuda-ipc", "pid": os.getpid(), "buffers": handles}


def import_ipc(description: dict[str, Any], manifest: Manifest) -> list[torch.Tensor]:
    """Map buffers exported by `export_ipc` in another process; sizes are checked against the manifest."""
    if description.get("kind") != "cuda-ipc":
        raise CheckpointError("<ipc>", "kind", f"expected 'cuda-ipc', got {description.get('kind')!r}")
    entries = description.get("buffers", [])
    if len(entries) != len(manifest.partitions):
        raise CheckpointError("<ipc>", "buffers", f"{len(entries)} buffers for {len(manifest.partitions)} partitions")
    buffers = []
    for part, entry in zip(manifest.partitions, entries, strict=True):
        if entry["nbytes"] != part.size:
            raise CheckpointError("<ipc>", part.file, f"exported {entry['nbytes']} bytes, manifest says {part.size}")
        storage = torch.UntypedStorage._new_shared_cuda(
            entry["device"], base64.b64decode(entry["handle"]), entry["size"], entry["offset"],
            base64.b64decode(entry["ref_handle"]), entry["ref_offset"],
            base64.b64decode(entry["event_handle"]) or None, entry["event_sync_required"])
        buffers.append(torch.empty(0, dtype=torch.uint8, device=f"cuda:{entry['device']}")
                       .set_(storage, 0, (part.size,), (1,)))
    return buffers
