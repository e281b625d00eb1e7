"""Child processes that cannot outlive their parent (no orphans after a crash or SIGKILL)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when the thread that spawned it exits, so spawn
    from a thread that lives as long as the child should (the main thread, or a dedicated spawner)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
