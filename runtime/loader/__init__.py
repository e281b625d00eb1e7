"""Load a converted checkpoint: one entry point, the strategy picked by where the bytes are.

    from sllm_faas.runtime.loader import load
    tensors = load("/dev/shm/sllm/smollm2")            # dict[str, torch.Tensor]
    tensors = load(path, device="cuda")                 # pinned-ring pipeline to the GPU

Strategies (one module each): "mmap" (runtime/loader/mapped.py): shared copy-on-write mappings,
populated in parallel; "direct" (runtime/loader/direct.py): parallel O_DIRECT reads into fresh
huge-page memory, also the reader of the GPU pipeline (runtime/loader/gpu.py); "direct-4k": the same
reads into 4 KiB pages. "auto" on the CPU maps what is already in memory and, from disk, reads directly
into whichever page size the memory found now favours (runtime/loader/policy.py: a first-touch probe,
once per process). benchmarks/README.md has the
measurements behind the choice.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from sllm_faas.runtime.checkpoint.format import read_manifest
from sllm_faas.runtime.checkpoint.verify import verify as verify_checksums
from sllm_faas.runtime.loader.tiers import current_tier

if TYPE_CHECKING:
    import torch

STRATEGIES = ("auto", "mmap", "direct", "direct-4k", "buffered")


def source_tier(directory: str | os.PathLike) -> str:
    """Where a load of `directory` reads from now: "dram" (tmpfs or fully cached) or "ssd"."""
    return current_tier(directory, read_manifest(directory))


def load(directory: str | os.PathLike, device: torch.device | str = "cpu", *, strategy: str = "auto",
         verify: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint at `directory`, as views into one buffer per partition.

    The manifest is validated against the partition files before any byte is mapped or read;
    checksums are checked only with verify=True (the node loader verifies when it stages).
    """
    import torch  # here: the node loader's staging copy imports sllm_faas.runtime.loader.direct and needs no torch

    from sllm_faas.runtime.loader.views import tensor_views

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    manifest = verify_checksums(directory) if verify else read_manifest(directory)
    device = torch.device(device)
    if device.type == "cuda":
        from sllm_faas.runtime.loader.gpu import load_to_gpu

        buffers = load_to_gpu(directory, manifest, device, direct=strategy != "buffered")
    else:
        watch = None
        if strategy == "auto":
            from sllm_faas.runtime.loader.policy import cpu_strategy, huge_page_watch

            strategy = cpu_strategy(directory, manifest)
            watch = huge_page_watch() if strategy == "direct" else None
        if strategy == "mmap":
            from sllm_faas.runtime.loader.mapped import map_partitions

            buffers = map_partitions(directory, manifest)
        else:
            from sllm_faas.runtime.loader.direct import read_partitions

            buffers = read_partitions(directory, manifest, direct=strategy != "buffered",
                                      hugepages=strategy != "direct-4k", watch=watch)
        if device.type != "cpu":
            buffers = [buffer.to(device) for buffer in buffers]
    return tensor_views(manifest, buffers)


__all__ = ["STRATEGIES", "load", "source_tier"]
