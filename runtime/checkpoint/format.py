"""The sllm checkpoint format (docs/FORMAT.md): manifest schema and its validation.

A checkpoint is a directory holding `manifest.json`, raw partition files and the HF config and
tokenizer files. Nothing here reads tensor bytes: the manifest is validated completely, against
the partition files' real sizes, before any loader allocates or maps anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllm_faas.common import jsonbody

FORMAT_NAME = "sllm-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
# Tensors start on 256-byte boundaries: enough for AVX-512 loads (64 B), CUDA's allocation
# alignment (256 B) that cuBLAS and TMA prefer, and any element size.
TENSOR_ALIGNMENT = 256
# Partitions are padded to whole 4 KiB blocks so a whole-file O_DIRECT read is always legal.
BLOCK_SIZE = 4096
MAX_MANIFEST_BYTES = 64 << 20
MAX_NDIM = 16
MAX_NAME_CHARS = 1024
INT64_MAX = 2**63 - 1  # sizes, offsets and dimensions beyond this cannot index a tensor or a file

# The allow-list: manifest dtype name -> bytes per element. Nothing else is ever interpreted. The torch dtypes
# they name are in runtime/checkpoint/dtypes.py: the spec imports no torch, so the control plane (controller,
# node loader) reads manifests without it.
DTYPE_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}

_PARTITION_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; names the file and the field at fault."""

    def __init__(self, path: str | os.PathLike, field_name: str, problem: str) -> None:
        self.path = str(path)
        self.field = field_name
        self.problem = problem
        super().__init__(f"{self.path}: {field_name}: {problem}")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "partition": self.partition,
                "offset": self.offset, "nbytes": self.nbytes}


@dataclass(frozen=True)
class PartitionEntry:
    file: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    tensors: dict[str, TensorEntry]
    partitions: list[PartitionEntry]
    aliases: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    extra_files: list[PartitionEntry] = field(default_factory=list)  # config/tokenizer files, checksummed too
    version: int = FORMAT_VERSION
    alignment: int = TENSOR_ALIGNMENT

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "alignment": self.alignment,
            "source": self.source,
            "partitions": [p.to_json() for p in self.partitions],
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "aliases": self.aliases,
            "extra_files": [f.to_json() for f in self.extra_files],
        }

    @property
    def files(self) -> list[PartitionEntry]:
        """Every file of the checkpoint but the manifest: what a copy or a download must bring."""
        return [*self.partitions, *self.extra_files]


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _reject_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(path, key, "duplicate key in manifest")
            result[key] = value
        return result

    return hook


def _want(path: Path, field_name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; never accept it where a number is meant.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CheckpointError(path, field_name, f"expected {names}, got {type(value).__name__}")
    return value


def _nonneg_int(path: Path, field_name: str, value: Any) -> int:
    _want(path, field_name, value, int)
    if not 0 <= value <= INT64_MAX:
        raise CheckpointError(path, field_name, f"must be >= 0 and <= 2**63 - 1, got {value}")
    return value


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Parse and validate manifest bytes; no file other than the manifest is consulted."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(path, "manifest", f"{len(raw)} bytes exceeds the {MAX_MANIFEST_BYTES} byte limit")
    try:  # the shared hostile-JSON parser: depth, huge integers, NaN, lone surrogates, bad UTF-8
        jsonbody.loads(raw, "manifest", MAX_MANIFEST_BYTES)
    except jsonbody.JsonError as exc:
        raise CheckpointError(path, "manifest", f"invalid JSON ({exc.message})") from None
    # that parse accepted the document, so this one is safe; it only adds the duplicate-key check
    doc = json.loads(raw, object_pairs_hook=_reject_duplicate_keys(path))
    _want(path, "manifest", doc, dict)
    if doc.get("format") != FORMAT_NAME:
        raise CheckpointError(path, "format", f"expected {FORMAT_NAME!r}, got {doc.get('format')!r}")
    version = doc.get("version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise CheckpointError(path, "version", f"unsupported version {version!r}; this build reads "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    alignment = _nonneg_int(path, "alignment", doc.get("alignment", TENSOR_ALIGNMENT))
    if alignment == 0 or alignment & (alignment - 1):
        raise CheckpointError(path, "alignment", f"must be a power of two, got {alignment}")
    source = _want(path, "source", doc.get("source", {}), dict)

    seen_files: set[str] = set()
    partitions = [_parse_file(path, f"partitions[{i}]", entry, seen_files, BLOCK_SIZE)
                  for i, entry in enumerate(_want(path, "partitions", doc.get("partitions"), list))]
    extra_files = [_parse_file(path, f"extra_files[{i}]", entry, seen_files, 1)
                   for i, entry in enumerate(_want(path, "extra_files", doc.get("extra_files", []), list))]

    tensors: dict[str, TensorEntry] = {}
    for name, spec in _want(path, "tensors", doc.get("tensors"), dict).items():
        tensors[name] = _parse_tensor(path, name, spec, partitions)
    _check_no_overlap(path, tensors)

    aliases = _want(path, "aliases", doc.get("aliases", {}), dict)
    for alias, target in aliases.items():
        _want(path, f"aliases.{alias}", target, str)
        if alias in tensors:
            raise CheckpointError(path, f"aliases.{alias}", "alias name is also a stored tensor")
        if target not in tensors:
            raise CheckpointError(path, f"aliases.{alias}", f"target {target!r} is not a stored tensor")
    return Manifest(tensors, partitions, aliases, source, extra_files, version, alignment)


def _parse_file(path: Path, where: str, entry: Any, seen: set[str], size_multiple: int) -> PartitionEntry:
    _want(path, where, entry, dict)
    name = _want(path, f"{where}.file", entry.get("file"), str)
    if not _PARTITION_FILE.match(name) or name in (".", "..") or name == MANIFEST_NAME:
        raise CheckpointError(path, f"{where}.file", f"{name!r} is not a plain file name")
    if name in seen:
        raise CheckpointError(path, f"{where}.file", f"{name!r} is listed twice")
    seen.add(name)
    size = _nonneg_int(path, f"{where}.size", entry.get("size"))
    if size % size_multiple:
        raise CheckpointError(path, f"{where}.size", f"{size} is not a multiple of {size_multiple}")
    digest = _want(path, f"{where}.sha256", entry.get("sha256"), str)
    if not _SHA256.match(digest):
        raise CheckpointError(path, f"{where}.sha256", "not a lowercase hex SHA-256 digest")
    return PartitionEntry(name, size, digest)


def _parse_tensor(path: Path, name: str, spec: Any, partitions: list[PartitionEntry]) -> TensorEntry:
    where = f"tensors.{name}"
    if not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
        raise CheckpointError(path, where, "tensor names must be 1 to 1024 characters without NUL")
    _want(path, where, spec, dict)
    dtype = _want(path, f"{where}.dtype", spec.get("dtype"), str)
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(path, f"{where}.dtype", f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_SIZES)}")
    shape = _want(path, f"{where}.shape", spec.get("shape"), list)
    if len(shape) > MAX_NDIM:
        raise CheckpointError(path, f"{where}.shape", f"{len(shape)} dimensions exceeds {MAX_NDIM}")
    for dim in shape:
        _nonneg_int(path, f"{where}.shape", dim)
    partition = _nonneg_int(path, f"{where}.partition", spec.get("partition"))
    if partition >= len(partitions):
        raise CheckpointError(path, f"{where}.partition", f"index {partition} but only {len(partitions)} partitions")
    offset = _nonneg_int(path, f"{where}.offset", spec.get("offset"))
    nbytes = _nonneg_int(path, f"{where}.nbytes", spec.get("nbytes"))
    itemsize = DTYPE_SIZES[dtype]
    if math.prod(shape) * itemsize != nbytes:
        raise CheckpointError(path, f"{where}.nbytes", f"{nbytes} but shape {shape} of {dtype} needs "
                              f"{math.prod(shape) * itemsize}")
    if offset % itemsize:
        raise CheckpointError(path, f"{where}.offset", f"{offset} is not aligned to the {itemsize}-byte element")
    limit = partitions[partition].size
    if offset + nbytes > limit:
        raise CheckpointError(path, f"{where}.offset", f"range {offset}+{nbytes} ends past partition "
                              f"{partitions[partition].file} of {limit} bytes")
    return TensorEntry(name, dtype, tuple(shape), partition, offset, nbytes)


def _check_no_overlap(path: Path, tensors: dict[str, TensorEntry]) -> None:
    ranges = sorted((t.partition, t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (part_a, _, end_a, name_a), (part_b, start_b, _, name_b) in zip(ranges, ranges[1:], strict=False):
        if part_a == part_b and start_b < end_a:
            raise CheckpointError(path, f"tensors.{name_b}", f"overlaps {name_a} (declare shared data in 'aliases')")


def _require_regular(path: str | os.PathLike, mode: int, field_name: str) -> None:
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else f"mode {mode:o}")
        raise CheckpointError(path, field_name, f"is {kind}, not a regular file")


def open_regular(path: str | os.PathLike, field_name: str = "file", flags: int = 0) -> tuple[int, int]:
    """Open `path` read-only as (fd, size), refusing anything but a regular file (after symlinks).

    A FIFO would block a reader forever, /dev/zero never ends, a directory fails later with a raw
    error; O_NONBLOCK makes the open of a FIFO return at once (regular files ignore the flag), then
    fstat decides on what was opened, not on a name that could change in between. Every reader of
    checkpoint and store files opens through here. Open errors (missing file, EINVAL for O_DIRECT)
    propagate as OSError for the caller to word; a wrong file type is a CheckpointError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    try:
        info = os.fstat(fd)
        _require_regular(path, info.st_mode, field_name)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def read_regular(path: str | os.PathLike, limit: int, field_name: str = "file") -> bytes:
    """The whole of a regular file of at most `limit` bytes; CheckpointError if it is larger."""
    fd, size = open_regular(path, field_name)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(path, field_name, f"exceeds the {limit} byte limit")
    return data


def read_manifest(directory: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate `DIR/manifest.json`; with check_files, also each partition's real size and type."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES, "manifest")
    except FileNotFoundError:
        raise CheckpointError(path, "manifest", "missing: not an sllm checkpoint (convert it with "
                              "`sllm-faas convert`)") from None
    except OSError as exc:
        raise CheckpointError(path, "manifest", f"cannot read: {exc.strerror or exc}") from None
    manifest = parse_manifest(raw, path)
    if check_files:
        for part in manifest.files:
            part_path = directory / part.file
            try:
                info = os.stat(part_path)
            except FileNotFoundError:
                raise CheckpointError(part_path, "file", "file listed in the manifest is missing") from None
            except OSError as exc:
                raise CheckpointError(part_path, "file", f"cannot stat: {exc.strerror or exc}") from None
            _require_regular(part_path, info.st_mode, "file")
            if info.st_size != part.size:
                raise CheckpointError(part_path, "size", f"file has {info.st_size} bytes, manifest says {part.size} "
                                      "(truncated or replaced)")
    return manifest
