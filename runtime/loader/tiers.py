"""Where a checkpoint's bytes are now, which decides how to load them.

"dram": on tmpfs/ramfs, or every page already in the page cache -> map it, copy nothing.
"ssd": anything else -> read it with large parallel direct-I/O requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
from pathlib import Path

from sllm_faas.common.tiers import Tier
from sllm_faas.runtime.checkpoint.format import Manifest, open_regular

TMPFS_MAGIC, RAMFS_MAGIC = 0x01021994, 0x858458F6
_MEMORY_FILESYSTEMS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs", 0x958458F6: "hugetlbfs"}
SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
PR_GET_THP_DISABLE = 42
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = mmap.PAGESIZE
_MINCORE_PAGES = 4096  # pages asked about per mincore(2) call: 16 MiB


def filesystem_type(path: str | os.PathLike) -> int:
    """statfs(2) f_type of the filesystem holding `path`."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64 and arm64
    if _libc.statfs(os.fsencode(os.fspath(path)), buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def on_memory_filesystem(path: str | os.PathLike) -> bool:
    return filesystem_type(path) in _MEMORY_FILESYSTEMS


def mount_options(mountinfo: bytes, device: int) -> list[str]:
    """The filesystem options ("super options", the third field after the " - " separator; proc(5)) of the
    filesystem `device` (a path's st_dev), from /proc/self/mountinfo as read, in bytes: its lines name the
    device as MAJOR:MINOR in their third field. Matching the device, not the mount point, needs no path parsing
    (escapes, bytes that are not UTF-8, a mount hidden under another) and finds every mount of that filesystem,
    whose super options are the same. Empty when no line names it."""
    wanted = f"{os.major(device)}:{os.minor(device)}".encode()
    for line in mountinfo.split(b"\n"):
        fields, _, filesystem = line.partition(b" - ")
        fields, filesystem = fields.split(b" "), filesystem.split(b" ")
        if len(fields) >= 3 and fields[2] == wanted and len(filesystem) >= 3:
            return filesystem[2].decode(errors="replace").split(",")
    return []


def tmpfs_huge_pages(path: str | os.PathLike) -> str:
    """Which pages new files under `path` get: "always" 2 MiB pages (a tmpfs mounted huge=always or within_size,
    or any tmpfs where the kernel forces it: shmem_enabled "force"), "advise" (huge=advise: 2 MiB pages where a
    mapping asks for them, 4 KiB ones for writes) or "never" (4 KiB pages, or not a tmpfs; shmem_enabled "deny"
    everywhere, and in a process whose huge pages are turned off: prctl PR_SET_THP_DISABLE, inherited).
    Decides the staging copy's plan: with 2 MiB pages the disk reads straight into the file (512 page
    allocations a GiB, not 262,144)."""
    if filesystem_type(path) != TMPFS_MAGIC or _libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1:
        return "never"
    try:
        selected = re.search(r"\[(\w+)\]", SHMEM_ENABLED.read_text())
    except OSError:  # a kernel without transparent huge pages
        return "never"
    if selected and selected.group(1) in ("force", "deny"):
        return "always" if selected.group(1) == "force" else "never"
    with open("/proc/self/mountinfo", "rb") as handle:
        options = mount_options(handle.read(), os.stat(path).st_dev)
    if "huge=advise" in options:
        return "advise"
    return "always" if "huge=always" in options or "huge=within_size" in options else "never"


def fully_cached(path: str | os.PathLike) -> bool:
    """Whether every page of a file is in the page cache, via mincore(2); touches no data. A file read from disk
    is found out at its first missing pages (~0.1 ms), not after the whole file (~11 ms a GiB)."""
    fd, size = open_regular(path)
    try:
        if size == 0:
            return True
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        try:
            vector = (ctypes.c_ubyte * min(-(-size // PAGE), _MINCORE_PAGES))()
            for offset in range(0, size, _MINCORE_PAGES * PAGE):
                length = min(size - offset, _MINCORE_PAGES * PAGE)
                if _libc.mincore(ctypes.c_void_p(address + offset), length, vector) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), str(path))
                if 0 in bytes(vector)[:-(-length // PAGE)]:  # bit 0 = resident; other bits are reserved, 0
                    return False
            return True
        finally:
            _libc.munmap(ctypes.c_void_p(address), size)
    finally:
        os.close(fd)


def current_tier(directory: str | os.PathLike, manifest: Manifest) -> Tier:
    """DRAM when every partition is memory-resident, else SSD."""
    directory = Path(directory)
    if on_memory_filesystem(directory):
        return Tier.DRAM
    return Tier.DRAM if all(fully_cached(directory / part.file) for part in manifest.partitions) else Tier.SSD
