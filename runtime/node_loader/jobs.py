"""Staging jobs: one per (model, target tier) at a time, run in arrival order by one worker."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from sllm_faas.common.tiers import Tier

_ids = itertools.count(1)


@dataclass(frozen=True)
class Step:
    """One staging step: a checkpoint copied from `source` into the next faster tier, `target`."""
    source: Tier
    target: Tier

    def __str__(self) -> str:
        return f"{self.source}->{self.target}"  # as the API shows it


@dataclass
class StageJob:
    model: str
    tier: str
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")
    state: str = "queued"  # queued -> running -> done | failed
    total_bytes: int = 0
    done_bytes: int = 0
    step: Step | None = None  # the step running now (the last one, once done)
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    estimated_finish: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes

    def finish(self, error: str | None = None) -> None:
        self.state = "failed" if error else "done"
        self.error = error
        self.finished_at = time.time()
        self.finished.set()

    def as_dict(self) -> dict:
        progress = self.done_bytes / self.total_bytes if self.total_bytes else (1.0 if self.state == "done" else 0.0)
        eta = None
        if self.estimated_finish is not None and self.state in ("queued", "running"):
            eta = max(0.0, self.estimated_finish - time.time())
        return {"id": self.id, "model": self.model, "tier": self.tier, "state": self.state,
                "step": str(self.step) if self.step else "",
                "total_bytes": self.total_bytes, "done_bytes": self.done_bytes, "progress": round(progress, 4),
                "eta_s": None if eta is None else round(eta, 3), "error": self.error,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at}
