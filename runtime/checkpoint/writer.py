"""Writing checkpoints: stream tensors into aligned partitions, then publish atomically.

Everything is written under a hidden `.NAME.partial-PID-TOKEN` sibling and renamed into place
only after every byte, the manifest and the directory are fsynced. A killed conversion leaves at
most that hidden directory (without a manifest, so nothing can load it); the next conversion to
the same destination removes leftovers whose writer is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from sllm_faas import __version__
from sllm_faas.runtime.checkpoint.dtypes import DTYPE_NAMES, DTYPES
from sllm_faas.runtime.checkpoint.format import (
    BLOCK_SIZE,
    MANIFEST_NAME,
    TENSOR_ALIGNMENT,
    CheckpointError,
    Manifest,
    PartitionEntry,
    TensorEntry,
    padded,
)
from sllm_faas.runtime.checkpoint.sources import Source, SourceTensor, from_state_dict, open_source
from sllm_faas.runtime.checkpoint.verify import sha256_file

DEFAULT_PARTITION_SIZE = 1 << 30
# Bumped whenever the writer lays tensors out differently (caches of converted models key on it).
LAYOUT_VERSION = 3
# Tensors a decoder multiplies by the same input: written back to back so that, when no alignment
# padding falls between them, one view covers the group and one matmul replaces two or three.
FUSION_GROUPS = (
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
)
_CONVERTIBLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ZEROS = bytes(max(BLOCK_SIZE, TENSOR_ALIGNMENT))


@dataclass
class _Placed:
    source: SourceTensor
    entry: TensorEntry


def order_for_fusion(tensors: list[SourceTensor]) -> list[SourceTensor]:
    """Source order, except that members of a fusion group follow their first member, in group order."""
    by_name = {t.name: t for t in tensors}
    ordered, emitted = [], set()
    for tensor in tensors:
        if tensor.name in emitted:
            continue
        group = [tensor.name]
        for suffixes in FUSION_GROUPS:
            for suffix in suffixes:
                if tensor.name.endswith(suffix):
                    prefix = tensor.name[: -len(suffix)]
                    group = [prefix + s for s in suffixes if prefix + s in by_name]
        for name in group:
            if name not in emitted:
                ordered.append(by_name[name])
                emitted.add(name)
    return ordered


def plan_layout(tensors: list[SourceTensor], target_dtype: torch.dtype | None,
                partition_size: int) -> tuple[list[_Placed], list[int]]:
    """Assign each tensor a partition and aligned offset, in source order; returns the placements and
    the padded size of each partition. A tensor larger than partition_size gets a partition of its own."""
    placed: list[_Placed] = []
    sizes: list[int] = []
    fill = 0
    for tensor in tensors:
        dtype = target_dtype if target_dtype is not None and tensor.dtype in _CONVERTIBLE else tensor.dtype
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(tensor.name, "dtype", f"{dtype} is not supported by the format")
        nbytes = dtype.itemsize
        for dim in tensor.shape:
            nbytes *= dim
        offset = padded(fill, TENSOR_ALIGNMENT)
        if not sizes or (fill and offset + nbytes > partition_size):
            sizes.append(0)
            offset = 0
        fill = offset + nbytes
        sizes[-1] = padded(fill, BLOCK_SIZE)
        entry = TensorEntry(tensor.name, DTYPE_NAMES[dtype], tuple(tensor.shape), len(sizes) - 1, offset, nbytes)
        placed.append(_Placed(tensor, entry))
    return placed, sizes


def _tensor_bytes(tensor: torch.Tensor, entry: TensorEntry, origin: str) -> memoryview:
    data = tensor.detach().to("cpu")
    if tuple(data.shape) != entry.shape:
        raise CheckpointError(origin, entry.name, f"shape {tuple(data.shape)} differs from the header's {entry.shape}")
    data = data.to(DTYPES[entry.dtype]).contiguous().reshape(-1)
    return memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(destination: Path) -> list[Path]:
    """Delete `.NAME.partial-PID-*` siblings left by writers that no longer run."""
    removed = []
    for leftover in destination.parent.glob(f".{destination.name}.partial-*"):
        pid = leftover.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def write_checkpoint(source: Source, destination: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     partition_size: int = DEFAULT_PARTITION_SIZE, progress: bool = False,
                     overwrite: bool = False) -> Manifest:
    """Write `source` as a checkpoint directory at `destination`, atomically."""
    from tqdm import tqdm

    destination = Path(destination)
    if partition_size < BLOCK_SIZE:
        raise CheckpointError(destination, "partition_size", f"must be at least {BLOCK_SIZE} bytes")
    if destination.exists() and not overwrite:
        raise CheckpointError(destination, "destination", "already exists (use --overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(destination)
    placed, sizes = plan_layout(order_for_fusion(source.tensors), dtype, partition_size)
    staging = destination.parent / f".{destination.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                   desc=f"convert {destination.name}")
        with bar:
            partitions = [_write_partition(staging, index, size, [p for p in placed if p.entry.partition == index],
                                           source, bar) for index, size in enumerate(sizes)]
        extra_files = []
        for aux in source.aux_files:
            shutil.copyfile(aux, staging / aux.name)
            extra_files.append(PartitionEntry(aux.name, (staging / aux.name).stat().st_size,
                                              sha256_file(staging / aux.name)))
        manifest = Manifest(
            tensors={p.entry.name: p.entry for p in placed}, partitions=partitions, aliases=dict(source.aliases),
            source={**source.description, "dtype": DTYPE_NAMES.get(dtype) if dtype else "unchanged",
                    "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "writer": f"sllm-faas {__version__}", "layout": LAYOUT_VERSION},
            extra_files=extra_files,
        )
        _write_manifest(staging, manifest)
        _publish(staging, destination, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_partition(staging: Path, index: int, size: int, placed: list[_Placed], source: Source,
                     bar) -> PartitionEntry:
    name = f"part-{index:05d}.bin"
    digest = hashlib.sha256()
    origin = source.description.get("path", source.description.get("kind", "source"))
    position = 0
    with open(staging / name, "wb", buffering=0) as handle:
        def emit(chunk: memoryview | bytes) -> None:
            nonlocal position
            digest.update(chunk)
            written = 0
            while written < len(chunk):
                written += handle.write(chunk[written:])
            position += len(chunk)
            bar.update(len(chunk))

        for item in placed:
            while position < item.entry.offset:
                emit(_ZEROS[: min(len(_ZEROS), item.entry.offset - position)])
            emit(_tensor_bytes(item.source.read(), item.entry, origin))
        while position < size:
            emit(_ZEROS[: min(len(_ZEROS), size - position)])
        os.fsync(handle.fileno())
    return PartitionEntry(name, size, digest.hexdigest())


def _write_manifest(staging: Path, manifest: Manifest) -> None:
    with open(staging / MANIFEST_NAME, "w") as handle:
        json.dump(manifest.to_json(), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    for aux in staging.iterdir():
        if aux.suffix != ".bin" and aux.name != MANIFEST_NAME:
            with open(aux, "rb") as copied:
                os.fsync(copied.fileno())
    _fsync_dir(staging)


def _publish(staging: Path, destination: Path, overwrite: bool) -> None:
    retired = None
    if overwrite and destination.exists():
        retired = destination.parent / f".{destination.name}.retired-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(destination, retired)
    os.rename(staging, destination)
    _fsync_dir(destination.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def convert(src: str | os.PathLike, dst: str | os.PathLike, **options) -> Manifest:
    """Convert a .safetensors file or an HF model folder; options as for write_checkpoint."""
    return write_checkpoint(open_source(src), dst, **options)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], dst: str | os.PathLike, **options) -> Manifest:
    """Save an in-memory state dict; tensors that share storage are stored once and declared as aliases."""
    return write_checkpoint(from_state_dict(state_dict), dst, **options)
