"""Where the examples keep what they build: outside the repository, keyed by the caller's versions, built once.

Weights are never committed; CI builds each version once.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SLLM_FAAS_CACHE", Path.home() / ".cache" / "sllm-faas"))


def cached_checkpoint(base: Path, export_hf: Callable[[Path], None]) -> dict[str, Path]:
    """Paths {"hf": ..., "sllm": ...} under `base`: `export_hf(folder)` writes the HF folder, which is then
    converted to the sllm format; each only when the cache lacks it (the checkpoint is keyed by the writer's
    format and layout versions, `base` by whatever the caller's recipe depends on)."""
    from sllm_faas.runtime.checkpoint import CheckpointError, convert, read_manifest
    from sllm_faas.runtime.checkpoint.format import FORMAT_VERSION
    from sllm_faas.runtime.checkpoint.writer import LAYOUT_VERSION

    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:  # one builder at a time (parallel test workers, two shells)
        fcntl.flock(lock, fcntl.LOCK_EX)
        sllm = base / f"sllm-v{FORMAT_VERSION}.{LAYOUT_VERSION}"
        hf = base / "hf"
        if not (hf / "config.json").exists():
            partial = base / f".hf.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            export_hf(partial)
            shutil.rmtree(hf, ignore_errors=True)
            os.rename(partial, hf)
        try:
            read_manifest(sllm)
        except CheckpointError:
            convert(hf, sllm, overwrite=True, progress=sys.stderr.isatty())
        return {"hf": hf, "sllm": sllm}


def prepare_cli(description: str, prepare: Callable[[Path | None], dict[str, Path]]) -> int:
    """An example's `prepare.py` command line: build what the cache lacks, print the checkpoint (or HF) path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: $SLLM_FAAS_CACHE or ~/.cache/sllm-faas)")
    parser.add_argument("--hf", action="store_true", help="print the HF folder instead of the checkpoint")
    args = parser.parse_args()
    paths = prepare(args.cache_dir)
    print(paths["hf" if args.hf else "sllm"])
    return 0
