"""`sllm-faas doctor`: can this machine run sllm-faas, and how fast can it load?

Each check returns a Check; a failed *required* check makes the command exit 1 with one line
naming what is missing and how to fix it. Optional facts (CUDA, GPUs, O_DIRECT) are reported
but do not fail the run unless asked (--require-gpu).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from sllm_faas.runtime.loader.tiers import tmpfs_huge_pages

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def check_torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", False, True, f"torch is not importable ({exc}); pip install torch")
    cuda = torch.cuda.is_available()
    details = {"version": torch.__version__, "cuda_available": cuda, "cuda_build": torch.version.cuda}
    if cuda:
        details["cuda_devices"] = torch.cuda.device_count()
    return Check("torch", True, True, f"torch {torch.__version__}, CUDA {'usable' if cuda else 'not usable'}",
                 details)


def check_cuda(required: bool) -> Check:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("cuda", True, required, f"{len(names)} CUDA device(s): {', '.join(names)}",
                     {"devices": names})
    return Check("cuda", False, required, "CUDA is not usable (CPU-only torch build or no driver)")


def check_gpus_nvml() -> Check:
    from sllm_faas.runtime.node_loader.gpus import NvmlUnavailable, nvml_gpus

    try:
        gpus = nvml_gpus()
    except NvmlUnavailable as exc:
        return Check("nvml", False, False, str(exc))
    return Check("nvml", True, False, f"{len(gpus)} GPU(s) via NVML", {"gpus": gpus})


def check_shm(path: str = "/dev/shm") -> Check:
    try:
        stats = os.statvfs(path)
    except OSError as exc:
        return Check("shm", False, True, f"{path} is missing ({exc.strerror}); mount a tmpfs there")
    total, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    writable = os.access(path, os.W_OK)
    huge = tmpfs_huge_pages(path)
    summary = (f"{path}: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free, "
               + {"always": "2 MiB pages", "advise": "2 MiB pages where asked (huge=advise)"}.get(
                   huge, "4 KiB pages (a DRAM tier mounted huge=advise stages faster)"))
    if not writable:
        return Check("shm", False, True, f"{path} is not writable by this user", {"total": total, "free": free})
    return Check("shm", True, True, summary, {"path": path, "total": total, "free": free, "huge_pages": huge})


def supports_o_direct(directory: str) -> tuple[bool, str]:
    """Write and read back one aligned block with O_DIRECT in `directory`."""
    if not hasattr(os, "O_DIRECT"):
        return False, "this OS has no O_DIRECT"
    block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT requires
    block.write(b"s" * 4096)
    fd, path = tempfile.mkstemp(dir=directory, prefix=".sllm-odirect-")
    os.close(fd)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwritev(fd, [block], 0)
            os.preadv(fd, [block], 0)
        finally:
            os.close(fd)
        return True, "supported"
    except OSError as exc:
        return False, f"refused ({exc.strerror}); loads use buffered reads there"
    finally:
        os.unlink(path)
        block.close()


def check_o_direct(directory: str) -> Check:
    if not os.path.isdir(directory):
        return Check("o_direct", False, True, f"directory {directory} does not exist")
    try:
        ok, why = supports_o_direct(directory)
    except OSError as exc:
        return Check("o_direct", False, True, f"cannot write in {directory}: {exc.strerror}")
    return Check("o_direct", ok, False, f"O_DIRECT in {directory}: {why}", {"directory": directory})


def check_redis(url: str) -> Check:
    import redis

    from sllm_faas.common.redis_client import connect

    client = connect(url, decode=False)
    try:
        info = client.info("server")
    except redis.RedisError as exc:
        return Check("redis", False, True,
                     f"Redis at {url} does not answer ({exc}); start one or set REDIS_URL / --redis-url")
    finally:
        client.close()
    version = info.get("valkey_version") or info.get("redis_version")
    flavour = "valkey" if "valkey_version" in info else "redis"
    return Check("redis", True, True, f"{flavour} {version} answers at {url}",
                 {"url": url, "server": flavour, "version": version})


def run_checks(redis_url: str, directory: str, require_gpu: bool = False) -> list[Check]:
    checks = [check_torch()]
    if checks[0].ok:
        checks.append(check_cuda(require_gpu))
    checks += [check_gpus_nvml(), check_shm(), check_o_direct(directory), check_redis(redis_url)]
    return checks


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                        help="Redis to probe (default: $REDIS_URL or %(default)s)")
    parser.add_argument("--dir", default=".", help="directory to probe for O_DIRECT (default: current)")
    parser.add_argument("--require-gpu", action="store_true", help="fail when CUDA is not usable")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    checks = run_checks(args.redis_url, args.dir, args.require_gpu)
    failed = [c for c in checks if c.required and not c.ok]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            mark = "ok  " if check.ok else ("FAIL" if check.required else "--  ")
            print(f"[{mark}] {check.name:9} {check.summary}")
            for gpu in check.details.get("gpus", []):
                print(f"           GPU{gpu['index']}: {gpu['name']}, {gpu['memory_free'] / 2**30:.1f}"
                      f" of {gpu['memory_total'] / 2**30:.1f} GiB free")
    for check in failed:
        print(f"doctor: missing requirement: {check.name}: {check.summary}", file=sys.stderr)
    return 1 if failed else 0
