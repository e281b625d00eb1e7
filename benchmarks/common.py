"""What every benchmark records beside its numbers: the machine, the date, medians, and where results go."""

from __future__ import annotations

import json
import mmap
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def results_path(name: str, suffix: str = ".json") -> Path:
    """benchmarks/results/NAME-DATE-MACHINE.json; MACHINE is $SLLM_BENCH_KIND or the host name."""
    machine = os.environ.get("SLLM_BENCH_KIND") or socket.gethostname()
    return RESULTS_DIR / f"{name}-{datetime.now(UTC):%Y-%m-%d}-{machine}{suffix}"


def evict_page_cache(files) -> None:
    """Drop our own files' pages from the page cache (fsync first: dirty pages cannot be dropped)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def machine_info(workdir: Path) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    total_kb = int(re.search(r"^MemTotal:\s+(\d+)", meminfo, re.M).group(1))
    return {
        "hostname": socket.gethostname(), "kind": os.environ.get("SLLM_BENCH_KIND"),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "nproc": len(os.sched_getaffinity(0)), "mem_gib": round(total_kb / 2**20, 1), "kernel": platform.release(),
        "workdir_filesystem": filesystem_of(workdir), "thp_enabled": read_text("/sys/kernel/mm/transparent_hugepage/"
                                                                               "enabled"),
        "thp_defrag": read_text("/sys/kernel/mm/transparent_hugepage/defrag"),
        "free_page_reporting": free_page_reporting(), "damon_schemes": damon_schemes(),
        "python": platform.python_version(), "torch": package_version("torch"),
        "safetensors": package_version("safetensors"),
    }


def free_page_reporting() -> dict[str, Any]:
    """Whether a virtio balloon reports free pages to the hypervisor (then fresh memory can be slow to touch)."""
    enabled = False
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        features = read_text(str(device / "features")) or ""
        if read_text(str(device / "device")) == "0x0005" and len(features) > 5 and features[5] == "1":
            enabled = True  # VIRTIO_BALLOON_F_REPORTING is feature bit 5
    params = Path("/sys/module/page_reporting/parameters")
    return {"balloon_reporting": enabled, **{f"page_reporting_{p.name}": read_text(str(p))
                                             for p in sorted(params.glob("*"))}}


def damon_schemes() -> list[dict[str, Any]]:
    """Running DAMON schemes: a "pageout" one is proactive reclaim, which evicts page cache nobody touched lately."""
    schemes = []
    for context in Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/contexts/*"):
        if read_text(str(context.parent.parent / "state")) != "on":
            continue
        intervals = context / "monitoring_attrs" / "intervals"
        for scheme in sorted(context.glob("schemes/[0-9]*")):
            schemes.append({
                "operations": read_text(str(context / "operations")), "action": read_text(str(scheme / "action")),
                "min_age_intervals": read_text(str(scheme / "access_pattern/age/min")),
                "max_nr_accesses": read_text(str(scheme / "access_pattern/nr_accesses/max")),
                "aggr_us": read_text(str(intervals / "aggr_us")),
                "quota_bytes_per_reset": read_text(str(scheme / "quotas/bytes")),
                "quota_reset_ms": read_text(str(scheme / "quotas/reset_interval_ms")),
            })
    return schemes


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def filesystem_of(path: Path) -> dict[str, str]:
    """Type, device and mount point of the filesystem holding `path` (longest matching mount)."""
    resolved, best = str(path.resolve()), {"type": "?", "device": "?", "mount": "/"}
    with open("/proc/mounts") as handle:
        for line in handle:
            device, mount, fstype = line.split()[:3]
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best["mount"]):
                best = {"type": fstype, "device": device, "mount": mount}
    return best


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "samples": values}


def write_results(output: Path, report: dict[str, Any], markdown: str) -> None:
    """The run's JSON and its markdown summary side by side (OUTPUT and OUTPUT with .md)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"wrote {output} and {output.with_suffix('.md')}")


def redis_url():
    """($REDIS_URL, or 127.0.0.1:6379 if it answers; None) or (an embedded server's URL, that server, which the
    caller stops)."""
    import redis

    from sllm_faas.runtime.embedded_redis import EmbeddedRedis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return url, None
    except redis.RedisError:
        server = EmbeddedRedis()
        return server.start(), server


def write_model(directory: Path, size: int) -> None:
    """A seeded bf16 checkpoint of `size` bytes in 64 MiB tensors, 512 MiB partitions (torch imported here:
    most benchmarks never need it in their parent process)."""
    import torch

    from sllm_faas.runtime.checkpoint import save_state_dict

    torch.manual_seed(0)
    per = 64 << 20
    state = {f"w{i}": torch.randn(min(per, size - i * per) // 2).to(torch.bfloat16) for i in range(-(-size // per))}
    save_state_dict(state, directory, partition_size=512 << 20)


def install_bench_extra() -> list[str]:
    """Install pyproject.toml's `bench` extra (the peers the load benchmark compares against) into this
    interpreter with pip, torch held at constraints.txt; returns the requirements. Run every time: pip does
    nothing when they are satisfied, and a peer that cannot be installed stops the benchmark."""
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements]
    if (REPO / "constraints.txt").exists():
        command += ["-c", str(REPO / "constraints.txt")]
    print(f"installing the bench extra: {' '.join(requirements)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pip could not install the bench extra ({' '.join(requirements)}):\n"
                         f"{result.stderr.strip() or result.stdout.strip()}")
    return requirements


def parallel_direct_read(files: Sequence[Path], buffer: mmap.mmap, threads: int = 8, chunk: int = 16 << 20) -> float:
    """Seconds to read `files` with O_DIRECT preads of `chunk` bytes from `threads` threads into `buffer` (one
    page-aligned slot per file): with a pre-touched buffer, the disk's bandwidth, the ceiling of a cold load.
    A file's last request is rounded up to whole pages, as O_DIRECT wants; the read stops short at its end."""
    view = memoryview(buffer)
    fds, jobs, base = [], [], 0
    try:
        for path in files:
            size = path.stat().st_size
            slot = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            fds.append(fd := os.open(path, os.O_RDONLY | os.O_DIRECT))
            jobs += [(fd, view[base + start:base + min(start + chunk, slot)], start, min(chunk, size - start))
                     for start in range(0, size, chunk)]
            base += slot
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda job: _pread_fully(*job), jobs):
                pass
        return time.perf_counter() - start
    finally:
        for fd in fds:
            os.close(fd)
        del jobs
        view.release()


def _pread_fully(fd: int, view: memoryview, offset: int, length: int) -> None:
    done = 0
    while done < length:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(f"unexpected end of file at {offset + done}")
        done += count
