"""Child processes that cannot outlive their parent (no orphans after a crash or SIGKILL)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when the thread that spawned it exits, so spawn
    from a thread that lives as long as the child should (the main thread, or a dedicated spawner)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _proc_stats() -> list[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) for every process."""
    stats = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stats.append((int(entry.name), handle.read().rsplit(")", 1)[1].split()))
        except OSError:
            continue
    return stats


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies aside) is left in the process group `pgid`."""
    return any(int(fields[2]) == pgid and fields[0] != "Z" for _pid, fields in _proc_stats())


def stop_process_group(process: subprocess.Popen, grace_s: float, reap_s: float = 5.0) -> None:
    """SIGTERM the group led by `process` (started with start_new_session=True), wait up to `grace_s` for
    the leader, then SIGKILL the whole group: children the leader left behind die too. Returns once no
    process of the group is left (or `reap_s` more seconds passed)."""
    pgid = process.pid
    if process.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + reap_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def children_by_parent() -> dict[int, set[int]]:
    """Every live process's children, from one pass over /proc (zombies left out)."""
    children: dict[int, set[int]] = {}
    for pid, fields in _proc_stats():
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), set()).add(pid)
    return children
