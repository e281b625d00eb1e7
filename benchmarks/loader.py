"""Node loader: SSD -> DRAM staging speed against a plain copy, single-flight under load, status latency.

    python benchmarks/loader.py [--size 1GiB] [--runs 5] [--dram-root /dev/shm] [--memory asis] [--json OUT]

Runs a real `sllm-faas loader` (gunicorn, Unix socket) against a local-directory store and the Redis
at $REDIS_URL (else 127.0.0.1:6379, else an embedded one). In the same run:
- O_DIRECT: the disk's bandwidth: the SSD tier's copy of the model read cold with parallel O_DIRECT preads into
          a pre-touched buffer (what staging can at best reach);
- copy:   `cp -r` of the model directory from the SSD tier to /dev/shm, source pages evicted first;
- stage:  the loader's SSD -> DRAM staging of the same directory, source pages evicted first;
- single-flight: 50 concurrent stage requests for one new model -> stage_started events;
- status: 1,000 sequential GET /v1/status over the socket, p50/p99 latency.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import (  # noqa: E402
    evict_page_cache,
    machine_info,
    now_utc,
    parallel_direct_read,
    redis_url,
    results_path,
    write_model,
    write_results,
)
from loader_daemon import LoaderDaemon  # noqa: E402

from sllm_faas.common.units import parse_size  # noqa: E402
from sllm_faas.redis_schema.keys import Keys  # noqa: E402
from sllm_faas.runtime.loader.direct import allocate_buffer  # noqa: E402
from sllm_faas.runtime.loader.policy import MADV_POPULATE_WRITE  # noqa: E402
from sllm_faas.runtime.loader.tiers import tmpfs_huge_pages  # noqa: E402

TARGETS = {"stage_vs_copy": 0.8, "stage_vs_odirect": 0.9, "status_p99_ms": 5.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dram-root", type=Path, default=Path("/dev/shm"),
                        help="the tmpfs that holds the DRAM tier (a tmpfs mounted huge=advise, within_size or "
                             "always stages with the mapped plan)")
    parser.add_argument("--memory", choices=("recycled", "idle", "asis"), default="asis",
                        help="state of free memory before each copy and staging (load.py's settle_memory): "
                             "recycled (host-backed, like bare metal), idle (handed back to the hypervisor), asis")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settle = (lambda: None) if args.memory == "asis" else functools.partial(
        importlib.import_module("load").settle_memory, args.memory, args.size)

    work = Path(tempfile.mkdtemp(prefix="sllm-loader-bench-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="sllm-loader-bench-", dir=args.dram_root))
    huge_pages = tmpfs_huge_pages(shm)
    url, embedded = redis_url()
    prefix = f"sllm-bench-{os.getpid()}:"
    daemon = None
    try:
        write_model(work / "remote" / "model", args.size)
        (work / "node").mkdir()
        daemon = LoaderDaemon(work / "node", work / "remote", url, prefix, dram_budget=str(3 * args.size),
                              ssd_budget=str(4 * args.size), dram_dir=str(shm / "dram")).start()
        assert daemon.wait_job(daemon.client.stage("model", "ssd"), 600)["state"] == "done"
        ssd_copy = work / "node" / "ssd" / "model"
        files = sorted(ssd_copy.iterdir())
        target = allocate_buffer(sum(-(-p.stat().st_size // mmap.PAGESIZE) * mmap.PAGESIZE for p in files))
        target.madvise(MADV_POPULATE_WRITE)  # pre-touched: the reads measure the disk, not first touch
        odirect, copies, stages = [], [], []
        for _ in range(args.runs):  # interleaved: all see the same disk and memory state
            evict_page_cache(files)
            odirect.append(sum(p.stat().st_size for p in files) / parallel_direct_read(files, target) / 1e9)
            evict_page_cache(ssd_copy.iterdir())
            settle()
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(ssd_copy), str(shm / "copy")], check=True)
            copies.append(time.perf_counter() - start)
            shutil.rmtree(shm / "copy")
            evict_page_cache(ssd_copy.iterdir())
            settle()
            job = daemon.wait_job(daemon.client.stage("model", "dram"), 600)
            assert job["state"] == "done", job
            stages.append(job["finished_at"] - job["started_at"])
            daemon.client.request("POST", "/v1/evict", {"model": "model", "tier": "dram"})

        write_model(work / "remote" / "burst", 256 << 20)
        with ThreadPoolExecutor(50) as pool:
            jobs = list(pool.map(lambda _: daemon.client.stage("burst", "dram"), range(50)))
        daemon.wait_job(jobs[0], 600)
        client = redis.Redis.from_url(url, decode_responses=True)
        started = sum(1 for _, e in client.xrange(Keys(prefix).events) if e["kind"] == "stage_started"
                      and e["model"] == "burst")

        latencies = []
        for _ in range(1000):
            start = time.perf_counter()
            daemon.client.status()
            latencies.append((time.perf_counter() - start) * 1000)
        latencies.sort()
        for key in client.scan_iter(match=Keys(prefix).every):
            client.delete(key)
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        if embedded is not None:
            embedded.stop()

    copy_s, stage_s, odirect_gbps = statistics.median(copies), statistics.median(stages), statistics.median(odirect)
    report = {
        "date": now_utc(), "machine": machine_info(Path("/var/tmp")), "size_bytes": args.size, "runs": args.runs,
        "copy_s": copy_s, "stage_s": stage_s, "copy_samples": copies, "stage_samples": stages,
        "stage_vs_copy": copy_s / stage_s, "odirect_gbps": odirect_gbps, "odirect_samples_gbps": odirect,
        "stage_vs_odirect": args.size / stage_s / 1e9 / odirect_gbps,
        "single_flight": {"requests": 50, "distinct_jobs": len({j["id"] for j in jobs}), "stagings_started": started},
        "status_ms": {"p50": latencies[len(latencies) // 2], "p99": latencies[int(len(latencies) * 0.99) - 1]},
        "dram_root": str(args.dram_root), "dram_huge_pages": huge_pages, "memory": args.memory, "targets": TARGETS,
    }
    lines = [
        f"# Node loader, {report['date']}", "",
        f"{report['machine']['cpu_model']}, {report['machine']['nproc']} CPUs; {args.size / 2**30:.2f} GiB model, "
        f"{args.runs} runs each, medians, page cache of the source evicted before each run; DRAM tier on "
        f"{args.dram_root}, a tmpfs with huge pages {huge_pages!r}; free memory before each copy: {args.memory}.", "",
        f"- SSD -> DRAM: loader staging {stage_s:.3f} s ({args.size / stage_s / 1e9:.2f} GB/s) vs `cp -r` "
        f"{copy_s:.3f} s ({args.size / copy_s / 1e9:.2f} GB/s): {report['stage_vs_copy']:.2f}x of the copy bandwidth "
        f"(target >= {TARGETS['stage_vs_copy']}); {100 * report['stage_vs_odirect']:.0f}% of the parallel O_DIRECT "
        f"read bandwidth {odirect_gbps:.2f} GB/s (8 threads, 16 MiB, same run; target >= "
        f"{100 * TARGETS['stage_vs_odirect']:.0f}%)",
        f"- 50 concurrent stage requests: {report['single_flight']['distinct_jobs']} job, "
        f"{started} staging started (target: exactly 1)",
        f"- GET /v1/status over the socket: p50 {report['status_ms']['p50']:.2f} ms, "
        f"p99 {report['status_ms']['p99']:.2f} ms (target p99 < {TARGETS['status_p99_ms']} ms)",
    ]
    print("\n".join(lines))
    write_results(args.json or results_path("loader"), report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
