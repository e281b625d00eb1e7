"""A local cache tier: one directory of checkpoint directories, under a byte budget, with LRU order.

What is on disk is the truth: the tier is rebuilt by scanning its directory (at start and after a
crash); hidden `.NAME.partial-*` directories are staging leftovers and are deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sllm_faas.redis_schema.keepalive import eviction_key
from sllm_faas.runtime.checkpoint.format import CheckpointError, read_manifest


class BudgetError(RuntimeError):
    """The model cannot fit in the tier, even after evicting every unleased model."""


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


class Tier:
    def __init__(self, name: str, root: str | os.PathLike, budget: int, lock: threading.RLock | None = None,
                 hold_until: Callable[[str], float] = lambda model: 0.0) -> None:
        """`lock`: shared with the node loader, so that eviction here and lease grants there are one decision.
        `hold_until`: until when the keep-alive policy wants a model kept warm (unix seconds; 0: no wish)."""
        self.name, self.root, self.budget = name, Path(root), budget
        self.hold_until = hold_until
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = lock if lock is not None else threading.RLock()
        self._sizes: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._reserved: dict[str, int] = {}  # models being staged into this tier

    def scan(self) -> list[str]:
        """Rebuild from disk; returns the names of leftovers removed."""
        removed = []
        with self._lock:
            self._sizes.clear()
            for entry in self.root.iterdir():
                if entry.name.startswith("."):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                    removed.append(entry.name)
                    continue
                if not entry.is_dir():
                    continue
                try:
                    read_manifest(entry)  # validates, and checks every listed file's size
                except CheckpointError:
                    shutil.rmtree(entry, ignore_errors=True)  # incomplete or corrupt: never serve it
                    removed.append(entry.name)
                    continue
                self._sizes[entry.name] = directory_bytes(entry)
                self._last_used.setdefault(entry.name, entry.stat().st_atime)
        return removed

    def has(self, model: str) -> bool:
        with self._lock:
            return model in self._sizes

    def path(self, model: str) -> Path:
        return self.root / model

    def models(self) -> dict[str, int]:
        with self._lock:
            return dict(self._sizes)

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._sizes.values()) + sum(self._reserved.values())

    def touch(self, model: str) -> None:
        with self._lock:
            self._last_used[model] = time.time()

    def reserve(self, model: str, size: int, leased: Callable[[str], bool], evict: Callable[[str, str], None]) -> None:
        """Make room for `size` bytes, evicting unleased models in `eviction_order`; BudgetError if impossible."""
        with self._lock:
            if size > self.budget:
                raise BudgetError(f"{model} needs {size} bytes but the {self.name} tier's budget is {self.budget}")
            victims = self.eviction_order([m for m in self._sizes if not leased(m)])
            free = self.budget - self.used
            chosen = []
            for victim in victims:
                if free >= size:
                    break
                chosen.append(victim)
                free += self._sizes[victim]
            if free < size:
                raise BudgetError(f"{model} needs {size} bytes in the {self.name} tier; {self.budget - self.used} "
                                  f"free of {self.budget} and the rest is leased or being staged")
            for victim in chosen:
                evict(victim, self.name)
            self._reserved[model] = size

    def eviction_order(self, models: list[str], now: float | None = None) -> list[str]:
        """What the keep-alive policy says is least worth keeping first: models it holds no wish for (least recently
        used first), then those it wants warm, the soonest-ending wish first."""
        now = time.time() if now is None else now
        with self._lock:
            holds = {m: self.hold_until(m) for m in models}
            return sorted(models, key=lambda m: eviction_key(holds[m], now, self._last_used.get(m, 0)))

    def release_reservation(self, model: str) -> None:
        with self._lock:
            self._reserved.pop(model, None)

    @contextmanager
    def staged(self, model: str, size: int, leased: Callable[[str], bool],
               evict: Callable[[str, str], None]) -> Iterator[Path]:
        """Reserve room, hand out a hidden staging directory, and publish it when the block succeeds;
        on any failure the reservation and the partial directory are dropped."""
        self.reserve(model, size, leased, evict)
        staging = self.root / f".{model}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            yield staging
            read_manifest(staging)  # every listed file present with its size, before anyone can see it
            self.publish(staging, model)
        except BaseException:
            self.release_reservation(model)
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def publish(self, staging: Path, model: str) -> None:
        """Atomically make a fully written, verified directory visible under its name."""
        for entry in staging.iterdir():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        target = self.root / model
        os.rename(staging, target)
        with self._lock:
            self._reserved.pop(model, None)
            self._sizes[model] = directory_bytes(target)
            self._last_used[model] = time.time()

    def remove(self, model: str) -> int:
        with self._lock:
            size = self._sizes.pop(model, 0)
            self._last_used.pop(model, None)
        target = self.root / model
        if target.exists():
            retired = self.root / f".{model}.retired-{secrets.token_hex(4)}"
            os.rename(target, retired)  # vanish atomically, then delete at leisure
            shutil.rmtree(retired, ignore_errors=True)
        return size

