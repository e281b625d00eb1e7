"""A tmpfs mounted for one test or session, as a node's DRAM tier can be (mounting needs CAP_SYS_ADMIN, as root
has; the test is skipped where it cannot be mounted)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(point: Path, options: str) -> Iterator[Path]:
    """A tmpfs with mount `options` at the existing directory `point` for the block, unmounted after it."""
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "sllm-test", str(point)],
                                 capture_output=True, text=True)
        problem = mounted.stderr.strip() if mounted.returncode else ""
    except OSError as exc:  # no mount(8)
        problem = str(exc)
    if problem:
        pytest.skip(f"cannot mount a tmpfs here: {problem}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "--lazy", str(point)], check=True)
