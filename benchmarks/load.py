#!/usr/bin/env python3
"""Load-time benchmark: our checkpoint loader against safetensors, torch.load(mmap), runai-model-streamer,
tensorizer and fastsafetensors (the `bench` extra, installed by the benchmark itself).

    python benchmarks/load.py [--size 1GiB] [--runs 5] [--modes cold,warm,shm] [--loaders a,b,...]
                              [--json OUT] [--workdir DIR] [--sweep]

Every sample runs in a fresh subprocess (this file with --child) that imports everything first and
times only the load call plus touching every page of every tensor, so lazy loaders pay for their
page faults too. The same run measures the machine's physical limits (O_DIRECT read bandwidth,
memcpy, first touch of fresh memory) so the loader's numbers can be judged against them.
See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    evict_page_cache,
    filesystem_of,
    install_bench_extra,
    machine_info,
    parallel_direct_read,
    read_text,
)

from sllm_faas.common.units import parse_size  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_WORKDIR = Path("/var/tmp/sllm-bench")
PAGE = mmap.PAGESIZE
MiB = 1 << 20
SEED = 0
CHECKPOINT_VERSION = 1  # bump when the synthetic model or the files written change
MODES = ("cold", "warm", "shm")
MEMORY_STATES = ("recycled", "idle", "asis")
IDLE_S = 4.0  # longer than the kernel's free page reporting delay (2 s), so freed memory is back with the host
IDLE_MAX_S = 20.0
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")
SCRATCH_NAME = "scratch.bin"  # next to the formats: read and dropped to recycle page-cache memory
TARGETS = {"cold_vs_peer": 0.9, "cold_vs_odirect": 0.9, "shm_vs_safetensors": 1.1, "second_anon": 0.05}


# --------------------------------------------------------------------------------------------------
# Loaders: which file format each one reads, and which module must be importable for it to run.


@dataclass(frozen=True)
class LoaderSpec:
    name: str
    fmt: str  # key of Checkpoint.path(): "sllm", "safetensors", "pt" or "tensorizer"
    module: str
    peer: bool  # a competitor (counts for "best peer"), as opposed to one of our strategies


LOADERS: dict[str, LoaderSpec] = {spec.name: spec for spec in (
    LoaderSpec("sllm-auto", "sllm", "sllm_faas.runtime.loader", False),
    LoaderSpec("sllm-mmap", "sllm", "sllm_faas.runtime.loader", False),
    LoaderSpec("sllm-direct", "sllm", "sllm_faas.runtime.loader", False),
    LoaderSpec("sllm-direct-4k", "sllm", "sllm_faas.runtime.loader", False),
    LoaderSpec("safetensors", "safetensors", "safetensors", True),
    LoaderSpec("torch-mmap", "pt", "torch", True),
    LoaderSpec("runai-streamer", "safetensors", "runai_model_streamer", True),
    LoaderSpec("tensorizer", "tensorizer", "tensorizer", True),
    LoaderSpec("fastsafetensors", "safetensors", "fastsafetensors", True),
)}
DEFAULT_LOADERS = tuple(LOADERS)


def importable(module: str) -> bool:
    """True when `module` could be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Child side: load, touch every page, report. Everything here runs in the fresh subprocess.

_KEEP_ALIVE: list[Any] = []  # loader objects whose lifetime must cover the tensors (peers' file buffers)


def sllm_loader(name: str, path: str, options: dict[str, Any]) -> Callable[[], dict[str, torch.Tensor]]:
    """Our loader; with options, the strategy's module is called directly with those keyword knobs
    (read_partitions: threads, chunk, hugepages; map_partitions: populate, threads, chunk)."""
    import sllm_faas.runtime.loader.policy  # noqa: F401  imported here, run inside the timer: sllm-auto pays for its probe
    from sllm_faas.runtime.checkpoint import read_manifest
    from sllm_faas.runtime.loader import load
    from sllm_faas.runtime.loader.direct import read_partitions
    from sllm_faas.runtime.loader.mapped import map_partitions
    from sllm_faas.runtime.loader.views import tensor_views

    strategy = name.removeprefix("sllm-")
    if not options:
        return lambda: load(path, strategy=strategy)
    if strategy not in ("direct", "mmap"):
        raise ValueError(f"options are not supported for {name}")

    def load_with_knobs() -> dict[str, torch.Tensor]:
        manifest = read_manifest(path)
        if strategy == "direct":
            return tensor_views(manifest, read_partitions(path, manifest, **options))
        return tensor_views(manifest, map_partitions(path, manifest, **options))
    return load_with_knobs


def peer_loader(name: str, path: str) -> Callable[[], dict[str, torch.Tensor]]:
    """A competitor's load call; its imports happen here, before the timer."""
    if name == "safetensors":
        from safetensors.torch import load_file

        return lambda: load_file(path)
    if name == "torch-mmap":
        return lambda: torch.load(path, mmap=True, weights_only=True)
    if name == "runai-streamer":
        from runai_model_streamer import SafetensorsStreamer

        def stream() -> dict[str, torch.Tensor]:  # with no memory limit set, the tensors outlive the streamer
            with SafetensorsStreamer() as streamer:
                streamer.stream_file(path)
                return dict(streamer.get_tensors())
        return stream
    if name == "tensorizer":
        from tensorizer import TensorDeserializer

        return lambda: dict(TensorDeserializer(path, device="cpu"))
    if name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        def copy_files() -> dict[str, torch.Tensor]:
            loader = SafeTensorsFileLoader(SingleGroup(), torch.device("cpu"), nogds=True)
            loader.add_filenames({0: [path]})
            files = loader.copy_files_to_device()
            _KEEP_ALIVE.extend([loader, files])
            return {key: files.get_tensor(key) for key in files.key_to_rank_lidx}
        return copy_files
    raise ValueError(f"unknown loader {name!r}")


def touch_every_page(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page of every distinct tensor; returns a layout-independent checksum.

    The same for every loader: a lazy loader pays its page faults here, an eager one pays nothing.
    Because each tensor is sampled from its own first byte, equal bytes give equal checksums.
    """
    seen: set[tuple[int, int]] = set()
    checksum = 0
    for tensor in tensors.values():
        if tensor.numel() == 0 or (tensor.data_ptr(), tensor.nbytes) in seen:
            continue
        seen.add((tensor.data_ptr(), tensor.nbytes))
        flat = (tensor if tensor.is_contiguous() else tensor.contiguous()).reshape(-1).view(torch.uint8)
        checksum += int(flat[::PAGE].sum()) + int(flat[-1])
    return checksum


def proc_status() -> dict[str, float]:
    """Memory counters of this process from /proc/self/status, in MB (10^6 bytes)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values


def run_child(loader: str, path: str, options: dict[str, Any], memory: str, hold: bool) -> None:
    """Time one load + touch and print the result as one JSON line; with hold, wait for stdin EOF."""
    spec = LOADERS[loader]
    load = sllm_loader(loader, path, options) if spec.fmt == "sllm" else peer_loader(loader, path)
    files = files_of(Path(path))
    settle_memory(memory, sum(p.stat().st_size for p in files), Path(path).parent / SCRATCH_NAME)
    resident = resident_fraction(files)
    reset_peak_rss()
    before = proc_status()
    start = time.perf_counter()
    tensors = load()
    loaded = time.perf_counter()
    checksum = touch_every_page(tensors)
    end = time.perf_counter()
    after = proc_status()
    resident_after = resident_fraction(files)
    nbytes = sum(t.nbytes for t in {(t.data_ptr(), t.nbytes): t for t in tensors.values()}.values())
    result = {"loader": loader, "seconds": end - start, "load_s": loaded - start, "touch_s": end - loaded,
              "tensors": len(tensors), "bytes": nbytes, "checksum": checksum, "peak_rss_mb": after["VmHWM"],
              "rss_before_mb": before["VmRSS"], "anon_before_mb": before["RssAnon"],
              "anon_after_mb": after["RssAnon"], "file_after_mb": after["RssFile"],
              "shmem_after_mb": after["RssShmem"], "resident_before": resident,
              "resident_after": resident_after}
    if loader == "sllm-auto":
        result["auto_choice"] = auto_choice()
    print(json.dumps(result), flush=True)
    if hold:
        sys.stdin.read()


def auto_choice() -> str:
    """What sllm-auto did: "mmap (in memory)" without a probe, else the probe's choice and its measurements."""
    from sllm_faas.runtime.loader import policy

    if not policy.memory_probe.cache_info().currsize:
        return "mmap (in memory)"
    probe = policy.memory_probe()
    return f"{policy.choose(probe)} (huge {probe.hugepage_gbps:.2f} GB/s, 4 KiB {probe.small_gbps:.2f} GB/s)"


def files_of(path: Path) -> list[Path]:
    """The regular files of a checkpoint path: the file itself, or those in the directory."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def resident_fraction(files: Sequence[Path]) -> float:
    return cached_bytes(files) / max(1, sum(p.stat().st_size for p in files))


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS, so the peak reflects the load, not settle_memory()."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# The synthetic checkpoint: Llama-shaped, bf16, fixed seed, written in every format once and reused.


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    layers: int

    def tensors(self) -> Iterable[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}."
            yield prefix + "self_attn.q_proj.weight", (h, h)
            yield prefix + "self_attn.k_proj.weight", (kv, h)
            yield prefix + "self_attn.v_proj.weight", (kv, h)
            yield prefix + "self_attn.o_proj.weight", (h, h)
            yield prefix + "mlp.gate_proj.weight", (i, h)
            yield prefix + "mlp.up_proj.weight", (i, h)
            yield prefix + "mlp.down_proj.weight", (h, i)
            yield prefix + "input_layernorm.weight", (h,)
            yield prefix + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def nbytes(self) -> int:
        return sum(2 * _numel(shape) for _, shape in self.tensors())


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def llama_shape_for(size: int, vocab: int = 32000) -> LlamaShape:
    """The widest Llama-like shape that still has at least 4 layers at `size` bytes of bf16."""
    for hidden in (8192, 4096, 2048, 1024, 512, 256):
        intermediate = 256 * -(-hidden * 8 // 3 // 256)
        kv_dim = hidden // 4  # grouped-query attention, 4 query heads per KV head
        per_layer = 2 * (2 * hidden * hidden + 2 * kv_dim * hidden + 3 * hidden * intermediate + 2 * hidden)
        fixed = 2 * (2 * vocab * hidden + hidden)
        if fixed + 4 * per_layer <= size or hidden == 256:
            return LlamaShape(hidden, intermediate, kv_dim, vocab, max(1, round((size - fixed) / per_layer)))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Checkpoint:
    """The same model in every format, under one root directory."""

    root: Path

    def path(self, fmt: str) -> Path:
        return self.root / {"sllm": "sllm", "safetensors": "model.safetensors", "pt": "model.pt",
                            "tensorizer": "model.tensors"}[fmt]

    def files(self, fmt: str) -> list[Path]:
        """Regular files holding that format (what has to be evicted, warmed or copied)."""
        return files_of(self.path(fmt))

    def partition_files(self) -> list[Path]:
        from sllm_faas.runtime.checkpoint import read_manifest

        return [self.path("sllm") / part.file for part in read_manifest(self.path("sllm")).partitions]


def ensure_checkpoint(workdir: Path, size: int, formats: set[str]) -> tuple[Checkpoint, LlamaShape]:
    """Reuse the files under workdir when the marker matches size, seed and version; else (re)write them."""
    shape = llama_shape_for(size)
    checkpoint = Checkpoint(workdir / f"llama-{format_size(size)}")
    marker = checkpoint.root / "marker.json"
    wanted = {"version": CHECKPOINT_VERSION, "size": size, "seed": SEED, "shape": asdict(shape)}
    if marker.exists() and json.loads(marker.read_text()) != wanted:
        shutil.rmtree(checkpoint.root)
    missing = sorted(fmt for fmt in formats if not (marker.exists() and checkpoint.path(fmt).exists()))
    if missing:
        checkpoint.root.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        print(f"writing {format_size(shape.nbytes)} checkpoint ({shape.layers} layers, hidden {shape.hidden}) "
              f"as {', '.join(missing)} under {checkpoint.root}", flush=True)
        write_formats(checkpoint, shape, missing)
        marker.write_text(json.dumps(wanted))
    write_scratch(checkpoint.root / SCRATCH_NAME, shape.nbytes)
    return checkpoint, shape


def write_scratch(path: Path, size: int) -> None:
    """A file of `size` bytes of zeros (real blocks, not a hole) for settle_memory() to read and drop."""
    if path.exists() and path.stat().st_size == size:
        return
    zeros = bytes(16 * MiB)
    with open(path, "wb") as handle:
        for start in range(0, size, len(zeros)):
            handle.write(zeros[:min(len(zeros), size - start)])
        handle.flush()
        os.fsync(handle.fileno())


def write_formats(checkpoint: Checkpoint, shape: LlamaShape, formats: Sequence[str]) -> None:
    """Generate the state dict once (one copy in memory) and write each missing format from it."""
    torch.manual_seed(SEED)
    state = {name: torch.randn(dims, dtype=torch.bfloat16) for name, dims in shape.tensors()}
    for fmt in formats:
        target = checkpoint.path(fmt)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        started = time.perf_counter()
        if fmt == "sllm":
            from sllm_faas.runtime.checkpoint import save_state_dict

            save_state_dict(state, target)
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(target))
        elif fmt == "pt":
            torch.save(state, target)
        elif fmt == "tensorizer":
            from tensorizer import TensorSerializer

            serializer = TensorSerializer(str(target))
            serializer.write_state_dict(state)
            serializer.close()
        fsync_files(checkpoint.files(fmt))
        print(f"  {fmt}: {time.perf_counter() - started:.1f} s", flush=True)
    del state


def fsync_files(files: Iterable[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stage_on_shm(checkpoint: Checkpoint, formats: Iterable[str], root: Path) -> Checkpoint:
    """Copy the given formats to tmpfs (the DRAM tier)."""
    staged = Checkpoint(root)
    root.mkdir(parents=True)
    for fmt in formats:
        source, target = checkpoint.path(fmt), staged.path(fmt)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    return staged


# --------------------------------------------------------------------------------------------------
# Page-cache state before each sample.


def cached_bytes(files: Sequence[Path]) -> int:
    """Bytes of `files` now in the page cache, per fincore(1)."""
    output = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                            check=True, capture_output=True, text=True).stdout
    return sum(int(line.split()[0]) for line in output.splitlines() if line.strip())


def make_cold(files: Sequence[Path], attempts: int = 5) -> str | None:
    """Evict until fincore reports nothing cached; a warning when it never gets there."""
    left = 0
    for _ in range(attempts):
        evict_page_cache(files)
        left = cached_bytes(files)
        if left == 0:
            return None
        time.sleep(0.2)
    return f"{left} bytes of {', '.join(p.name for p in files)} still cached after {attempts} evictions"


def make_warm(files: Sequence[Path], attempts: int = 3) -> str | None:
    """Read the files through the page cache (like cat) until fincore sees them whole; else a warning."""
    buffer = bytearray(16 * MiB)
    total = sum(p.stat().st_size for p in files)
    resident = 0
    for _ in range(attempts):
        for path in files:
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
        resident = cached_bytes(files)
        if resident >= total:
            return None
    return f"only {resident} of {total} bytes cached after reading them {attempts} times"


# --------------------------------------------------------------------------------------------------
# Physical limits, measured in this (parent) process.


def anonymous_buffer(size: int, hugepages: bool | None) -> mmap.mmap:
    """Private anonymous memory; hugepages True/False advises THP on/off, None leaves the default."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hugepages is not None:
        buffer.madvise(mmap.MADV_HUGEPAGE if hugepages else mmap.MADV_NOHUGEPAGE)
    return buffer


def pretouch(buffer: mmap.mmap) -> None:
    tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    tensor[::PAGE].fill_(0)
    del tensor


def settle_memory(state: str, size: int, scratch: Path | None = None) -> None:
    """Put the free memory the next `size`-byte allocation will get into a known state.

    Under a hypervisor with free page reporting (virtio-balloon, e.g. Firecracker) memory that was
    freed a few seconds ago has been handed back to the host, and touching it again costs a host
    fault per 4 KiB: "idle" waits for that to happen (a node that sat idle), "recycled" faults in
    and frees `size` bytes first so the load reuses host-backed pages (as on bare metal): as huge
    anonymous pages and, when a `scratch` file exists, as page cache of the same filesystem (read,
    then dropped), so copying and mapping loaders both find memory of the shape they allocate.
    """
    if state == "idle":
        wait_for_page_reporting()
    elif state == "recycled":
        if scratch is not None and scratch.exists():
            make_warm([scratch], attempts=1)
            evict_page_cache([scratch])
        buffer = anonymous_buffer(size + 64 * MiB, hugepages=True)
        pretouch(buffer)
        buffer.close()


def wait_for_page_reporting() -> None:
    """Sleep IDLE_S, then until the kernel's count of reported free memory stops growing (at most IDLE_MAX_S).

    Reporting runs in bursts (a few hundred MiB every 2 s here), so "stopped" means unchanged over 2.5 s.
    """
    time.sleep(IDLE_S)
    deadline = time.monotonic() + IDLE_MAX_S - IDLE_S
    last = read_text(str(REPORTED_KIB))
    while last is not None and time.monotonic() < deadline:
        time.sleep(2.5)
        now = read_text(str(REPORTED_KIB))
        if now == last:
            break
        last = now


def measure_direct_read(files: Sequence[Path], runs: int, buffer_kind: str, memory: str,
                        warnings: list[str]) -> list[float]:
    """GB/s samples of cold parallel O_DIRECT reads into a "pretouched" buffer (pure I/O) or a fresh one
    per sample, "fresh-hugepage" or "fresh-4k" (I/O plus first-touch faults: what the direct loader pays)."""
    total = sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)
    kept = anonymous_buffer(total, hugepages=True) if buffer_kind == "pretouched" else None
    if kept is not None:
        pretouch(kept)
    samples = []
    for _ in range(runs):
        if warning := make_cold(files):
            warnings.append(f"limits: {warning}")
        settle_memory(memory, total)
        target = kept or anonymous_buffer(total, hugepages=buffer_kind == "fresh-hugepage")
        samples.append(sum(p.stat().st_size for p in files) / parallel_direct_read(files, target) / 1e9)
        if kept is None:
            target.close()
    return samples


def measure_memcpy(runs: int, size: int = 512 * MiB) -> list[float]:
    """GB/s of a single-thread copy between two pre-touched buffers (bytes copied per second)."""
    source = torch.ones(size, dtype=torch.uint8)
    target = torch.zeros(size, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            target.copy_(source)
            samples.append(size / (time.perf_counter() - start) / 1e9)
        return samples
    finally:
        torch.set_num_threads(threads)


def measure_first_touch(runs: int, hugepages: bool, memory: str, size: int = 512 * MiB) -> dict[str, Any]:
    """GB/s of writing one byte per page of fresh anonymous memory from one thread, and the fraction
    of it that ended up in huge pages (from /proc/self/smaps_rollup)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    samples, huge_fraction = [], 0.0
    try:
        for _ in range(runs):
            settle_memory(memory, size)
            buffer = anonymous_buffer(size, hugepages)
            huge_before = anon_huge_bytes()
            tensor = torch.frombuffer(buffer, dtype=torch.uint8)
            start = time.perf_counter()
            tensor[::PAGE].fill_(1)
            samples.append(size / (time.perf_counter() - start) / 1e9)
            huge_fraction = (anon_huge_bytes() - huge_before) / size
            del tensor
            buffer.close()
        return {**summary(samples), "huge_fraction": huge_fraction}
    finally:
        torch.set_num_threads(threads)


def anon_huge_bytes() -> int:
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_limits(checkpoint: Checkpoint, runs: int, warnings: list[str]) -> dict[str, Any]:
    """Physical limits; fresh-memory ones in both memory states ("idle" ones with at most 3 samples: each waits)."""
    print("measuring physical limits ...", flush=True)
    files = checkpoint.partition_files()
    idle_runs = min(runs, 3)
    limits: dict[str, Any] = {
        "odirect_read_gbps": summary(measure_direct_read(files, runs, "pretouched", "asis", warnings)),
        "memcpy_1thread_gbps": summary(measure_memcpy(runs)),
    }
    for memory, count in (("recycled", runs), ("idle", idle_runs)):
        for kind, hugepages in (("4k", False), ("hugepage", True)):
            limits[f"first_touch_{kind}_{memory}_gbps"] = measure_first_touch(count, hugepages, memory)
            limits[f"odirect_read_fresh_{kind}_{memory}_gbps"] = summary(
                measure_direct_read(files, count, f"fresh-{kind}", memory, warnings))
    limits["odirect_config"] = {"threads": 8, "chunk_mib": 16, "files": [p.name for p in files]}
    return limits


# --------------------------------------------------------------------------------------------------
# Parent side: run samples in children, collect.


def child_command(loader: str, path: Path, memory: str, options: dict[str, Any] | None = None,
                  hold: bool = False) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", loader, "--path", str(path),
               "--memory", memory]
    if options:
        command += ["--options", json.dumps(options)]
    return command + (["--hold"] if hold else [])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def parse_child_output(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError("no JSON line in the child's output")
    return json.loads(lines[-1])


def sample(loader: str, path: Path, memory: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One timed load in a fresh process; {"error": ...} instead of raising."""
    proc = subprocess.run(child_command(loader, path, memory, options), capture_output=True, text=True, env=child_env(),
                          timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    try:
        return parse_child_output(proc.stdout)
    except ValueError as exc:
        return {"error": str(exc)}


def prepare_cache(mode: str, files: Sequence[Path]) -> str | None:
    if mode == "cold":
        return make_cold(files)
    if mode == "warm":
        return make_warm(files)
    return None  # shm: the files are in tmpfs already


def run_mode(mode: str, checkpoint: Checkpoint, loaders: Sequence[str], runs: int, memory: str,
             warnings: list[str]) -> dict[str, dict[str, Any]]:
    """`runs` samples of each loader, interleaved (run 1 of every loader, then run 2, ...) to spread drift,
    each run starting one loader later, so no loader always follows the same one (what the previous sample
    freed decides how fast fresh memory is on a VM)."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
    for run in range(runs):
        for name in loaders[run % len(loaders):] + loaders[:run % len(loaders)]:
            result = prepared_sample(mode, checkpoint, name, memory, None, warnings)
            samples[name].append(result)
            shown = f"{result['seconds']:.3f} s" if "seconds" in result else f"FAILED: {result['error']}"
            print(f"  {mode:5} run {run + 1}/{runs} {name:16} {shown}", flush=True)
    return {name: aggregate(results) for name, results in samples.items()}


def prepared_sample(mode: str, checkpoint: Checkpoint, loader: str, memory: str, options: dict[str, Any] | None,
                    warnings: list[str], attempts: int = 3) -> dict[str, Any]:
    """Put the loader's files in the mode's cache state, then take one sample.

    A warm sample whose files were no longer wholly cached when its timer started (proactive reclaim,
    e.g. DAMON, can page out a file read seconds ago) is not warm: it is retried, up to `attempts`.
    """
    fmt = LOADERS[loader].fmt
    result: dict[str, Any] = {}
    for attempt in range(1, attempts + 1):
        if warning := prepare_cache(mode, checkpoint.files(fmt)):
            warnings.append(f"{mode}/{loader}: {warning}")
        result = sample(loader, checkpoint.path(fmt), memory, options)
        result["attempts"] = attempt
        if mode != "warm" or result.get("resident_before", 1.0) >= 1.0:
            break
    if mode == "warm" and result.get("resident_before", 1.0) < 1.0:
        warnings.append(f"warm/{loader}: only {100 * result['resident_before']:.2f}% cached at the start of the "
                        f"sample after {attempts} attempts")
    return result


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds (and the other medians) over the successful samples of one loader in one mode."""
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    if not good:
        return {"error": errors[0] if errors else "no samples", "errors": errors}
    median = statistics.median(r["seconds"] for r in good)
    out = {"median_s": median, "samples_s": [r["seconds"] for r in good], "bytes": good[0]["bytes"],
           "gbps": good[0]["bytes"] / median / 1e9, "checksum": good[0]["checksum"], "tensors": good[0]["tensors"]}
    for key in ("load_s", "touch_s", "peak_rss_mb", "rss_before_mb"):
        if key in good[0]:
            out[f"median_{key}"] = statistics.median(r[key] for r in good)
    out["median_peak_added_mb"] = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in good)
    out["median_anon_added_mb"] = statistics.median(r["anon_after_mb"] - r["anon_before_mb"] for r in good)
    out["min_resident_before"] = min(r["resident_before"] for r in good)
    out["max_resident_before"] = max(r["resident_before"] for r in good)
    out["retried_samples"] = sum(r["attempts"] > 1 for r in good)
    if "auto_choice" in good[0]:
        out["auto_choices"] = [r["auto_choice"] for r in good]
    if errors:
        out["errors"] = errors
    return out


def second_process_anon(staged: Checkpoint, loader: str, model_bytes: int) -> dict[str, Any]:
    """Anonymous memory a second process adds when loading a model from tmpfs that a first process holds."""
    path = staged.path(LOADERS[loader].fmt)
    holder = subprocess.Popen(child_command(loader, path, "asis", hold=True), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        first = parse_child_output(holder.stdout.readline())
        second = sample(loader, path, "asis")
        if "error" in second:
            return {"error": second["error"]}
        added = second["anon_after_mb"] - second["anon_before_mb"]
        return {"anon_added_mb": added, "percent_of_model": 100 * added * 1e6 / model_bytes,
                "first_anon_added_mb": first["anon_after_mb"] - first["anon_before_mb"],
                "second_shmem_mb": second["shmem_after_mb"], "second_seconds": second["seconds"]}
    except (ValueError, OSError) as exc:
        return {"error": f"holder failed: {exc}"}
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


SWEEPS = ("all", "direct", "mmap")


def sweep_points(which: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(mode, loader, knobs) to time: the direct reader's threads x chunk x huge pages (cold), and the
    mapping loader's populate threads x chunk (cold) and populate on/off and threads (warm, tmpfs)."""
    points: list[tuple[str, str, dict[str, Any]]] = []
    if which in ("all", "direct"):
        points += [("cold", "sllm-direct", {"threads": t, "chunk": c * MiB, "hugepages": True})
                   for t in (2, 4, 8, 16) for c in (4, 16, 64)]
        points += [("cold", "sllm-direct", {"threads": t, "chunk": 16 * MiB, "hugepages": False})
                   for t in (2, 4, 8, 16)]
    if which in ("all", "mmap"):
        points += [("cold", "sllm-mmap", {"threads": t, "chunk": c * MiB})
                   for t in (1, 2, 4, 8, 16) for c in (4, 16, 64)]
        points += [("cold", "sllm-mmap", {"threads": t, "chunk": 1 << 30}) for t in (1, 2)]  # a call per partition
        points.append(("cold", "sllm-mmap", {"populate": False}))
        for mode, threads in (("warm", (1, 8)), ("shm", (1, 2, 8))):
            points += [(mode, "sllm-mmap", {"threads": t, "chunk": 16 * MiB}) for t in threads]
            points.append((mode, "sllm-mmap", {"populate": False}))
    return points


def run_sweep(which: str, modes: Sequence[str], checkpoint: Checkpoint, staged: Checkpoint | None, runs: int,
              memory: str, warnings: list[str]) -> list[dict[str, Any]]:
    """Median of `runs` samples for every sweep point whose mode was selected."""
    out = []
    for mode, loader, options in sweep_points(which):
        if mode in modes:
            where = staged if mode == "shm" else checkpoint
            out.append({"mode": mode, "loader": loader, **options,
                        **sweep_point(mode, where, loader, options, runs, memory, warnings)})
    return out


def sweep_point(mode: str, checkpoint: Checkpoint, loader: str, options: dict[str, Any], runs: int, memory: str,
                warnings: list[str]) -> dict[str, Any]:
    results = []
    for _ in range(runs):
        results.append(prepared_sample(mode, checkpoint, loader, memory, options, warnings))
    aggregated = aggregate(results)
    shown = f"{aggregated['median_s']:.3f} s" if "median_s" in aggregated else f"FAILED: {aggregated['error']}"
    print(f"  sweep {mode:5} {loader} {options}: {shown}", flush=True)
    return aggregated


# --------------------------------------------------------------------------------------------------
# Ratios, machine description, reports.


def compute_ratios(results: dict[str, dict[str, dict[str, Any]]], limits: dict[str, Any],
                   rss: dict[str, dict[str, Any]], sllm_bytes: int) -> dict[str, Any]:
    """Our sllm-auto against the best peer per mode, against O_DIRECT cold, and the second-process RSS."""
    ratios: dict[str, Any] = {}
    for mode, per_loader in results.items():
        ours = per_loader.get("sllm-auto", {}).get("median_s")
        peers = {name: r["median_s"] for name, r in per_loader.items() if LOADERS[name].peer and "median_s" in r}
        if ours is None or not peers:
            continue
        best = min(peers, key=peers.get)
        entry = {"sllm_auto_s": ours, "best_peer": best, "best_peer_s": peers[best], "ratio": ours / peers[best],
                 "auto_choices": per_loader["sllm-auto"].get("auto_choices", [])}
        if mode == "cold":
            entry["target_ratio_max"] = TARGETS["cold_vs_peer"]
            if limits:
                gbps = sllm_bytes / ours / 1e9
                entry.update(sllm_auto_gbps=gbps, odirect_gbps=limits["odirect_read_gbps"]["median"],
                             percent_of_odirect=100 * gbps / limits["odirect_read_gbps"]["median"],
                             target_percent_min=100 * TARGETS["cold_vs_odirect"])
        if mode == "shm" and "safetensors" in peers:
            entry.update(vs_safetensors=ours / peers["safetensors"], target_vs_safetensors_max=TARGETS[
                "shm_vs_safetensors"])
        ratios[mode] = entry
    if "percent_of_model" in rss.get("sllm-auto", {}):
        ratios["second_process_anon_percent"] = rss["sllm-auto"]["percent_of_model"]
        ratios["target_second_process_anon_percent_max"] = 100 * TARGETS["second_anon"]
    return ratios


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "samples": values}


def format_size(size: int) -> str:
    """1GiB, 256MiB, or 1005.9MiB: exact binary units when they fit, else MiB with one decimal."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size / 2**20:.1f}MiB"


def results_table(results: dict[str, dict[str, dict[str, Any]]], loaders: Sequence[str]) -> list[str]:
    """Markdown table: one row per loader, median seconds and GB/s per mode."""
    modes = list(results)
    lines = ["| loader | " + " | ".join(f"{m} s | {m} GB/s" for m in modes) + " |",
             "|---|" + "---:|---:|" * len(modes)]
    for name in loaders:
        cells = []
        for mode in modes:
            r = results[mode].get(name, {})
            cells += [f"{r['median_s']:.3f}", f"{r['gbps']:.2f}"] if "median_s" in r else ["failed", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def detail_table(results: dict[str, dict[str, dict[str, Any]]], loaders: Sequence[str]) -> list[str]:
    """Where the time goes: load call vs page touching, and memory, per loader and mode."""
    lines = ["| mode | loader | load s | touch s | peak RSS MB | peak added MB | anon added MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode, per_loader in results.items():
        for name in loaders:
            r = per_loader.get(name, {})
            if "median_s" in r:
                lines.append(f"| {mode} | {name} | {r['median_load_s']:.3f} | {r['median_touch_s']:.3f} | "
                             f"{r['median_peak_rss_mb']:.0f} | {r['median_peak_added_mb']:.0f} | "
                             f"{r['median_anon_added_mb']:.0f} |")
    return lines


def ratio_lines(ratios: dict[str, Any]) -> list[str]:
    lines = []
    for mode in MODES:
        if mode not in ratios:
            continue
        r = ratios[mode]
        line = f"- {mode}: sllm-auto {r['sllm_auto_s']:.3f} s / best peer {r['best_peer']} {r['best_peer_s']:.3f} s " \
               f"= {r['ratio']:.2f}x"
        if mode == "cold":
            line += f" (target <= {r['target_ratio_max']}x)"
            if "percent_of_odirect" in r:
                line += f"; {r['sllm_auto_gbps']:.2f} GB/s = {r['percent_of_odirect']:.0f}% of O_DIRECT " \
                        f"{r['odirect_gbps']:.2f} GB/s (target >= {r['target_percent_min']:.0f}%)"
        if "vs_safetensors" in r:
            line += f"; vs safetensors {r['vs_safetensors']:.2f}x (target <= {r['target_vs_safetensors_max']}x)"
        lines.append(line)
        if r.get("auto_choices"):
            choices = collections.Counter(choice.split(" (")[0] for choice in r["auto_choices"])
            lines.append("  - sllm-auto's strategy per sample: " + ", ".join(f"{k} {v}x" for k, v in choices.items()))
    if "second_process_anon_percent" in ratios:
        lines.append(f"- second process anon RSS (sllm-auto, tmpfs): {ratios['second_process_anon_percent']:.2f}% "
                     f"of model (target < {ratios['target_second_process_anon_percent_max']:.0f}%)")
    return lines


def limit_lines(limits: dict[str, Any]) -> list[str]:
    if not limits:
        return []
    labels = {"odirect_read_gbps": "parallel O_DIRECT read, pre-touched buffer (8 threads, 16 MiB chunks)",
              "memcpy_1thread_gbps": "memcpy, 1 thread, 512 MiB"}
    for memory in ("recycled", "idle"):
        for kind, name in (("4k", "4 KiB pages"), ("hugepage", "MADV_HUGEPAGE")):
            labels[f"first_touch_{kind}_{memory}_gbps"] = f"first touch, {name}, 1 thread, {memory} memory"
            labels[f"odirect_read_fresh_{kind}_{memory}_gbps"] = f"parallel O_DIRECT read, fresh {name} buffer, " \
                                                                  f"{memory} memory"
    lines = []
    for key, label in labels.items():
        if key in limits:
            entry = limits[key]
            extra = f" (huge pages: {100 * entry['huge_fraction']:.0f}%)" if "huge_fraction" in entry else ""
            spread = f"{min(entry['samples']):.2f}-{max(entry['samples']):.2f}"
            lines.append(f"- {label}: {entry['median']:.2f} GB/s (range {spread}){extra}")
    return lines


def rss_lines(rss: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, r in rss.items():
        if "error" in r:
            lines.append(f"- {name}: failed: {r['error']}")
        else:
            lines.append(f"- {name}: second process adds {r['anon_added_mb']:.1f} MB anonymous "
                         f"({r['percent_of_model']:.2f}% of model); first process added "
                         f"{r['first_anon_added_mb']:.1f} MB")
    return lines


def sweep_lines(sweep: list[dict[str, Any]]) -> list[str]:
    """One row per sweep point, then the fastest knobs per (mode, loader)."""
    if not sweep:
        return []
    lines = ["| mode | loader | threads | chunk MiB | hugepages | populate | median s | GB/s | load s | touch s |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for p in sweep:
        knobs = [str(p.get("threads", "default")), str(p["chunk"] // MiB) if "chunk" in p else "default",
                 str(p.get("hugepages", "-" if p["loader"] != "sllm-direct" else "default")),
                 str(p.get("populate", "-" if p["loader"] == "sllm-direct" else "default"))]
        timing = (f"{p['median_s']:.3f} | {p['gbps']:.2f} | {p['median_load_s']:.3f} | {p['median_touch_s']:.3f}"
                  if "median_s" in p else "failed | - | - | -")
        lines.append(f"| {p['mode']} | {p['loader']} | " + " | ".join(knobs) + f" | {timing} |")
    lines.append("")
    for key in dict.fromkeys((p["mode"], p["loader"]) for p in sweep):
        good = [p for p in sweep if (p["mode"], p["loader"]) == key and "median_s" in p]
        if good:
            best = min(good, key=lambda p: p["median_s"])
            knobs = ", ".join(f"{k}={v // MiB if k == 'chunk' else v}" for k, v in best.items()
                              if k in ("threads", "chunk", "hugepages", "populate"))
            lines.append(f"- fastest {key[0]} {key[1]}: {knobs} ({best['median_s']:.3f} s)")
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    machine, config = report["machine"], report["config"]
    lines = [f"# Load benchmark, {report['date']}", "",
             f"{machine['cpu_model']}, {machine['nproc']} CPUs, {machine['mem_gib']} GiB, kernel {machine['kernel']}, "
             f"workdir on {machine['workdir_filesystem']['type']} ({machine['workdir_filesystem']['device']}); "
             f"THP {machine['thp_enabled']}; balloon free page reporting "
             f"{'on' if machine['free_page_reporting']['balloon_reporting'] else 'off'}; DAMON schemes: "
             f"{', '.join(d['action'] for d in machine['damon_schemes']) or 'none'}.", "",
             f"Model: {format_size(config['model_bytes'])} bf16 Llama-shaped ({config['shape']['layers']} layers, "
             f"hidden {config['shape']['hidden']}), {config['runs']} runs per loader and mode, medians; "
             f"memory state before each sample: {config['memory']}.", ""]
    if report["results"]:
        lines += ["## Load + touch every page", ""] + results_table(report["results"], config["loaders"])
        lines += ["", "## Where the time goes", ""] + detail_table(report["results"], config["loaders"])
    for title, body in (("Ratios", ratio_lines(report["ratios"])), ("Physical limits", limit_lines(report["limits"])),
                        ("Second process on tmpfs", rss_lines(report["second_process"])),
                        ("Sweep", sweep_lines(report.get("sweep", []))),
                        ("Warnings", [f"- {w}" for w in report["warnings"]])):
        if body:
            lines += ["", f"## {title}", ""] + body
    return "\n".join(lines) + "\n"


def default_output(sweep: str | None, memory: str) -> Path:
    host = os.environ.get("SLLM_BENCH_KIND") or socket.gethostname()
    stem = "load" if not sweep else "load-sweep" if sweep == "all" else f"load-sweep-{sweep}"
    stem += "" if memory == "recycled" else f"-{memory}"
    return RESULTS_DIR / f"{stem}-{datetime.now(UTC):%Y-%m-%d}-{host}.json"


def check_checksums(results: dict[str, dict[str, dict[str, Any]]], warnings: list[str]) -> None:
    """All loaders must read the same bytes: their touch checksums agree when they do."""
    seen = {(mode, name): r["checksum"] for mode, per in results.items() for name, r in per.items() if "checksum" in r}
    if len(set(seen.values())) > 1:
        warnings.append(f"checksums differ between loaders: {seen}")


# --------------------------------------------------------------------------------------------------
# Entry points.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="model size (default 1GiB)")
    parser.add_argument("--runs", type=int, default=5, help="samples per loader and mode (default 5)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of cold,warm,shm")
    parser.add_argument("--loaders", default=",".join(DEFAULT_LOADERS), help="comma list (default all); the bench "
                        "extra is installed when a peer is listed, and a peer that cannot be imported is an error")
    parser.add_argument("--json", type=Path, help="output JSON (a .md summary is written next to it)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where checkpoints live (real disk)")
    parser.add_argument("--sweep", nargs="?", const="all", choices=SWEEPS, help="instead of the comparison, time "
                        "the loader's knobs: direct threads x chunk x huge pages, mmap populate threads x chunk and "
                        "on/off (default all; --modes selects which modes' points run)")
    parser.add_argument("--memory", choices=MEMORY_STATES, default="recycled", help="state of free memory before "
                        "each sample: recycled (host-backed, like bare metal; default), idle (wait for free page "
                        "reporting to return it to the hypervisor), asis")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"), help="tmpfs for the shm mode (default "
                        "/dev/shm; e.g. a tmpfs mounted with huge=within_size)")
    parser.add_argument("--no-limits", action="store_true", help="skip the physical-limit measurements")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select_loaders(requested: str) -> list[str]:
    """The requested loaders, after installing the bench extra when a peer is among them. An unknown name, or
    a peer whose module still cannot be imported, is an error: a comparison without a peer is not one."""
    chosen = list(dict.fromkeys(filter(None, (n.strip() for n in requested.split(",")))))
    if unknown := [name for name in chosen if name not in LOADERS]:
        raise SystemExit(f"unknown loader(s) {unknown}; known: {', '.join(LOADERS)}")
    if any(LOADERS[name].peer for name in chosen):
        install_bench_extra()
    missing = [f"{name} (module {LOADERS[name].module})" for name in chosen if not importable(LOADERS[name].module)]
    if missing:
        raise SystemExit(f"cannot import {', '.join(missing)} after installing the bench extra")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.path, json.loads(args.options), args.memory, args.hold)
        return 0
    modes = [m for m in (m.strip() for m in args.modes.split(",")) if m]
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")
    loaders = sorted({p[1] for p in sweep_points(args.sweep)}) if args.sweep else select_loaders(args.loaders)
    formats = {LOADERS[name].fmt for name in loaders} | {"sllm"}
    args.workdir.mkdir(parents=True, exist_ok=True)
    if filesystem_of(args.workdir)["type"] in ("tmpfs", "ramfs"):
        print(f"warning: {args.workdir} is on {filesystem_of(args.workdir)['type']}: cold mode means nothing there")
    checkpoint, shape = ensure_checkpoint(args.workdir, args.size, formats)
    from sllm_faas.runtime.checkpoint import read_manifest

    sllm_bytes = sum(part.size for part in read_manifest(checkpoint.path("sllm")).partitions)
    warnings: list[str] = []
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(args.workdir),
        "config": {"size_requested": args.size, "model_bytes": shape.nbytes, "sllm_partition_bytes": sllm_bytes,
                   "shape": asdict(shape), "seed": SEED, "runs": args.runs, "modes": modes, "loaders": loaders,
                   "workdir": str(checkpoint.root), "sweep": args.sweep, "memory": args.memory,
                   "shm_dir": str(args.shm_dir), "shm_filesystem": filesystem_of(args.shm_dir)},
        "limits": {} if args.no_limits else measure_limits(checkpoint, args.runs, warnings),
        "results": {}, "second_process": {}, "warnings": warnings,
    }
    shm_root = args.shm_dir / f"sllm-bench-{os.getpid()}"
    try:
        staged = stage_on_shm(checkpoint, formats, shm_root) if "shm" in modes else None
        if args.sweep:
            report["sweep"] = run_sweep(args.sweep, modes, checkpoint, staged, args.runs, args.memory, warnings)
        else:
            for mode in modes:
                print(f"mode {mode}:", flush=True)
                report["results"][mode] = run_mode(mode, staged if mode == "shm" else checkpoint, loaders, args.runs,
                                                   args.memory, warnings)
            if staged is not None:
                for name in ("sllm-auto", "safetensors"):
                    if name in loaders:
                        report["second_process"][name] = second_process_anon(staged, name, shape.nbytes)
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
    check_checksums(report["results"], warnings)
    report["ratios"] = compute_ratios(report["results"], report["limits"], report["second_process"], sllm_bytes)
    write_report(report, args.json or default_output(args.sweep, args.memory))
    return 0


def write_report(report: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    markdown = markdown_report(report)
    output.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {output} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
