"""The node loader's core: tiers, staging jobs, leases and bandwidths, with no HTTP in sight.

Staging a model to a tier runs the steps it still needs, each into a hidden staging directory
that is verified, fsynced and renamed into place:
    remote -> ssd   download, resumable, every file checked against the manifest's SHA-256
    ssd -> dram     in-kernel copy into tmpfs
    dram -> gpu     pinned-ring upload, shared with instances through CUDA IPC (GPU nodes only)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from sllm_faas.common.names import validate_model_name
from sllm_faas.common.tiers import HELD, SLOWEST_FIRST
from sllm_faas.common.tiers import Tier as TierName  # a tier's name; node_loader.tiers.Tier is its directory
from sllm_faas.redis_schema import keepalive as keepalive_records
from sllm_faas.redis_schema.keepalive import KeepAliveRecord
from sllm_faas.runtime.checkpoint.format import MANIFEST_NAME, CheckpointError, Manifest, parse_manifest
from sllm_faas.runtime.checkpoint.verify import sha256_file
from sllm_faas.runtime.loader.tiers import TMPFS_MAGIC, filesystem_type, tmpfs_huge_pages
from sllm_faas.runtime.node_loader.bandwidth import Bandwidths, probe_write_read
from sllm_faas.runtime.node_loader.config import LoaderConfig
from sllm_faas.runtime.node_loader.jobs import StageJob, Step
from sllm_faas.runtime.node_loader.leases import Lease, Leases
from sllm_faas.runtime.node_loader.store import StoreError, copy_files, open_store
from sllm_faas.runtime.node_loader.tiers import BudgetError, Tier

log = logging.getLogger("sllm.loader")
STAGEABLE = HELD
LEASES_FILE = "_leases.json"  # in the SSD dir; "_" cannot start a model name, and the tier scan skips files


class LoaderError(RuntimeError):
    """A request the loader refuses; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NodeLoader:
    def __init__(self, config: LoaderConfig, publisher=None) -> None:
        self.config = config
        self.store = open_store(config.remote, config.transfer_timeout_s)
        # one lock for every "is it pinned? then evict" and "is it here? then lease" decision, tiers included
        self._decisions = threading.RLock()
        self.tiers = {"ssd": Tier("ssd", config.ssd_dir, config.ssd_budget, self._decisions, self._hold_until),
                      "dram": Tier("dram", config.dram_dir, config.dram_budget, self._decisions, self._hold_until)}
        # the controller's keep-alive decisions for the models held here (sllm:keepalive:<model>), read each heartbeat
        self.keepalive: dict[str, KeepAliveRecord] = {}
        self._prestaged: dict[str, float] = {}  # model -> idle_since of the decision last pre-staged
        self.gpu = None
        if config.gpu_budget:
            from sllm_faas.runtime.node_loader.gpu_tier import GpuTier

            self.gpu = GpuTier(config.gpu_budget)
        self.leases = Leases(path=Path(config.ssd_dir) / LEASES_FILE)
        self.bandwidths = Bandwidths()
        self.publisher = publisher
        self.jobs: dict[str, StageJob] = {}
        self._inflight: dict[str, list[StageJob]] = collections.defaultdict(list)  # model -> unfinished jobs
        self._queue: collections.deque[StageJob] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: set[str] = set()  # models with a job on a worker now: one job per model at a time
        self.started_at = time.time()
        # (model, tier staged into, seconds) after each staging step: the API observes it as a cold-start phase
        self.on_step_staged: Callable[[str, str, float], None] = lambda model, tier, seconds: None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, probe: bool = True) -> NodeLoader:
        """Rebuild state from the directories (not from Redis), clean leftovers, calibrate, publish."""
        for tier in self.tiers.values():
            removed = tier.scan()
            if removed:
                log.info("%s tier: removed leftovers %s", tier.name, ", ".join(removed))
        for lease in self.leases.retain(lambda model: self.fastest_tier(model) != "remote"):
            log.info("lease %s of %s dropped at start: the model is no longer on this node", lease.id, lease.model)
        if filesystem_type(self.config.dram_dir) == TMPFS_MAGIC and tmpfs_huge_pages(self.config.dram_dir) == "never":
            log.info("DRAM tier %s: a tmpfs of 4 KiB pages; staging into it is bound by their allocation, mounted "
                     "huge=advise it runs at the disk's speed where memory is host-backed", self.config.dram_dir)
        if probe:
            self.calibrate()
        loops = [(self._work, f"stage-worker-{i}") for i in range(self.config.stage_workers)]
        for target, name in (*loops, (self._heartbeat, "heartbeat")):
            thread = threading.Thread(target=self._loop, args=(target,), name=f"sllm-loader-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _loop(self, step) -> None:
        """Run `step` until stopping; an exception is logged and the loop goes on, so one bad job or one bad
        publication cannot silently end staging or heartbeats for the node."""
        while not self._stopping.is_set():
            try:
                step()
            except Exception:
                log.exception("%s failed; continuing", threading.current_thread().name)
                self._stopping.wait(1.0)

    def dead_loops(self) -> list[str]:
        """Names of the background loops that are no longer running (for /healthz)."""
        return [thread.name for thread in self._threads if not thread.is_alive()]

    def calibrate(self) -> None:
        """Cache-bypassing probes per tier, so estimates start from measurements."""
        for tier in ("ssd", "dram"):
            try:
                rate = probe_write_read(self.tiers[tier].root, self.config.probe_bytes)
                self.bandwidths.observe(tier, self.config.probe_bytes, self.config.probe_bytes / rate, probe=True)
            except OSError as exc:
                log.warning("bandwidth probe of the %s tier failed: %s", tier, exc)

    # -- requests ---------------------------------------------------------------------------------
    def stage(self, model: str, tier: str) -> StageJob:
        """Bring `model` to `tier` (asynchronously); concurrent requests share one job."""
        validate_model_name(model)
        if tier not in STAGEABLE:
            raise LoaderError(f"tier must be one of {', '.join(STAGEABLE)}, got {tier!r}")
        if tier == "gpu" and self.gpu is None:
            raise LoaderError("this node has no GPU tier (gpu_budget is 0)", 409)
        with self._lock:
            for job in self._inflight[model]:
                if TierName(job.tier).faster_or_equal(tier):
                    return job
            job = StageJob(model, tier)
            self.jobs[job.id] = job
            current = self.fastest_tier(model)
            if TierName(current).faster_or_equal(tier):
                job.finish()
                return job
            if current != "remote":
                job.total_bytes = self._model_bytes(model, None) * len(self._steps(model, tier))
            self._inflight[model].append(job)
            self._queue.append(job)
            self._estimate_queue()
            self._lock.notify_all()
        self._event("stage_queued", model, tier, job=job.id)
        return job

    def fastest_tier(self, model: str) -> str:
        if self.gpu is not None and self.gpu.has(model):
            return "gpu"
        for tier in ("dram", "ssd"):
            if self.tiers[tier].has(model):
                return tier
        return "remote"

    def where(self, model: str) -> dict[str, Any]:
        validate_model_name(model)
        present = [t for t in ("gpu", "dram", "ssd") if (t == "gpu" and self.gpu and self.gpu.has(model))
                   or (t != "gpu" and self.tiers[t].has(model))]
        answer: dict[str, Any] = {"model": model, "tier": present[0] if present else "remote", "tiers": present,
                                  "paths": {t: str(self.tiers[t].path(model)) for t in present if t != "gpu"}}
        local = [t for t in present if t != "gpu"]
        answer["path"] = answer["paths"][local[0]] if local else None
        if "gpu" in present:
            answer["ipc"] = self.gpu.describe(model)
        for tier in local:
            self.tiers[tier].touch(model)
        return answer

    def lease(self, model: str, holder: str, ttl_s: float | None = None) -> Lease:
        validate_model_name(model)
        if not holder or len(holder) > 256:
            raise LoaderError("holder must be 1 to 256 characters")
        if self.fastest_tier(model) == "remote":
            raise LoaderError(f"{model} is not on this node; stage it first", 404)
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= 3600:
            raise LoaderError(f"ttl_s must be in (0, 3600], not {ttl!r}")
        with self._decisions:
            if self.fastest_tier(model) == "remote":
                raise LoaderError(f"{model} is not on this node; stage it first", 404)
            lease = self.leases.acquire(model, holder, ttl)
        self._event("leased", model, self.fastest_tier(model), lease=lease.id, holder=holder)
        return lease

    def renew(self, lease_id: str) -> Lease:
        try:
            return self.leases.renew(lease_id)
        except KeyError:
            raise LoaderError(f"no lease {lease_id!r} (expired or released)", 404) from None

    def release(self, lease_id: str) -> Lease:
        try:
            lease = self.leases.release(lease_id)
        except KeyError:
            raise LoaderError(f"no lease {lease_id!r} (expired or released)", 404) from None
        self._event("released", lease.model, "", lease=lease.id)
        return lease

    def evict(self, model: str, tier: str) -> int:
        validate_model_name(model)
        if tier not in STAGEABLE:
            raise LoaderError(f"tier must be one of {', '.join(STAGEABLE)}, got {tier!r}")
        with self._decisions:
            if self._pinned(model):
                raise LoaderError(f"{model} is leased or being staged; it cannot be evicted", 409)
            return self._evict(model, tier)

    def _evict(self, model: str, tier: str) -> int:
        """Remove `model` from `tier`; callers decide under `_decisions` that it is not pinned."""
        if tier == "gpu":
            freed = self.gpu.remove(model) if self.gpu is not None else 0
        else:
            freed = self.tiers[tier].remove(model)
        if freed:
            self._event("evicted", model, tier, bytes=freed)
        return freed

    def _pinned(self, model: str) -> bool:
        return self.leases.is_leased(model) or bool(self._inflight.get(model))

    # -- the staging worker -------------------------------------------------------------------------
    def _work(self) -> None:
        """One step of a staging worker: take the oldest queued job whose model no other worker is staging."""
        with self._lock:
            job = next((j for j in self._queue if j.state == "queued" and j.model not in self._running), None)
            if job is None:
                self._lock.wait(timeout=1.0)
                return
            job.state = "running"
            self._running.add(job.model)
        try:
            self._run(job)
        finally:
            with self._lock:
                self._running.discard(job.model)
                self._queue.remove(job)
                self._inflight[job.model].remove(job)
                if not self._inflight[job.model]:
                    del self._inflight[job.model]
                self._estimate_queue()
                self._lock.notify_all()

    def _run(self, job: StageJob) -> None:
        job.state, job.started_at = "running", time.time()
        self._event("stage_started", job.model, job.tier, job=job.id)
        try:
            remote = None
            if self.fastest_tier(job.model) == "remote":
                raw = self.store.read_manifest(job.model)
                remote = (raw, parse_manifest(raw, Path(f"{self.store.describe()}/{job.model}/{MANIFEST_NAME}")))
            steps = self._steps(job.model, job.tier)
            size = self._model_bytes(job.model, remote)
            job.total_bytes = size * len(steps)
            for step in steps:
                job.step, step_started = step, time.perf_counter()
                getattr(self, f"_stage_{step.source}_to_{step.target}")(job, size, remote)
                self.on_step_staged(job.model, step.target, time.perf_counter() - step_started)
        except Exception as exc:  # every failure fails this job, never the worker
            expected = isinstance(exc, StoreError | BudgetError | CheckpointError | OSError | LoaderError)
            error = str(exc) if expected else f"internal error: {type(exc).__name__}: {exc}"
            log.warning("staging %s to %s failed: %s", job.model, job.tier, error, exc_info=not expected)
            job.finish(error)
            self._event("stage_failed", job.model, job.tier, job=job.id, error=error)
            return
        job.finish()
        self._event("staged", job.model, job.tier, job=job.id, bytes=job.total_bytes)

    def _steps(self, model: str, target: str) -> list[Step]:
        current = self.fastest_tier(model)
        path = SLOWEST_FIRST[SLOWEST_FIRST.index(current):SLOWEST_FIRST.index(target) + 1]
        return [Step(a, b) for a, b in zip(path, path[1:], strict=False)]

    def _model_bytes(self, model: str, remote: tuple[bytes, Manifest] | None) -> int:
        if remote is not None:
            raw, manifest = remote
            return len(raw) + sum(f.size for f in manifest.files)
        local = next(t for t in ("dram", "ssd") if self.tiers[t].has(model))
        return self.tiers[local].models()[model]

    def _stage_remote_to_ssd(self, job: StageJob, size: int, remote: tuple[bytes, Manifest]) -> None:
        raw, manifest = remote
        started = time.perf_counter()
        with self.tiers["ssd"].staged(job.model, size, self._pinned_or_staging(job), self._evict) as staging:
            (staging / MANIFEST_NAME).write_bytes(raw)
            job.advance(len(raw))
            for entry in manifest.files:
                target = staging / entry.file
                self.store.fetch(job.model, entry.file, target, entry.size, job.advance)
                digest = sha256_file(target)
                if digest != entry.sha256:
                    raise StoreError(f"{job.model}/{entry.file}: checksum mismatch after download "
                                     f"(manifest {entry.sha256}, got {digest}); download rejected")
        self.bandwidths.observe("remote", size, time.perf_counter() - started)
        if self.publisher is not None:
            self.publisher.model_info(job.model, manifest)

    def _stage_ssd_to_dram(self, job: StageJob, size: int, remote: tuple[bytes, Manifest] | None) -> None:
        source = self.tiers["ssd"].path(job.model)
        started = time.perf_counter()
        with self.tiers["dram"].staged(job.model, size, self._pinned_or_staging(job), self._evict) as staging:
            copy_files([(entry, staging / entry.name) for entry in sorted(source.iterdir())], job.advance)
        self.bandwidths.observe("ssd", size, time.perf_counter() - started)

    def _stage_dram_to_gpu(self, job: StageJob, size: int, remote: tuple[bytes, Manifest] | None) -> None:
        started = time.perf_counter()
        self.gpu.upload(job.model, self.tiers["dram"].path(job.model), self._pinned_or_staging(job), self._evict)
        job.advance(size)
        self.bandwidths.observe("dram", size, time.perf_counter() - started)

    def _pinned_or_staging(self, job: StageJob):
        return lambda model: model == job.model or self._pinned(model)

    def _estimate_queue(self) -> None:
        """Estimated finish of every queued job: the bytes ahead of it over the measured bandwidth of
        the tier each job reads from. Unknown sizes or bandwidths leave the estimate (and those after) empty."""
        clock: float | None = time.time()
        for job in self._queue:
            source = job.step.source if job.step else self.fastest_tier(job.model)
            rate = self.bandwidths.get(source)
            if clock is None or not job.total_bytes or not rate:
                clock = job.estimated_finish = None
                continue
            clock += max(0, job.total_bytes - job.done_bytes) / rate
            job.estimated_finish = clock

    # -- state for Redis, status and metrics --------------------------------------------------------
    def queue_snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            self._estimate_queue()
            return [job.as_dict() | {"estimated_finish": job.estimated_finish} for job in self._queue]

    def status(self) -> dict[str, Any]:
        tiers = {name: {"dir": str(t.root), "capacity": t.budget, "used": t.used, "models": t.models()}
                 for name, t in self.tiers.items()}
        if self.gpu is not None:
            tiers["gpu"] = self.gpu.status()
        return {"node_id": self.config.node_id, "uptime_s": round(time.time() - self.started_at, 3),
                "remote": self.store.describe(), "tiers": tiers, "bandwidths": self.bandwidths.as_dict(),
                "queue": self.queue_snapshot(), "leases": [lease.as_dict() for lease in self.leases.all()],
                "keepalive": {model: record.to_hash() for model, record in self.keepalive.items()
                              if self._mine(record)},
                "redis": self.publisher.healthy if self.publisher is not None else None}

    def _heartbeat(self) -> None:
        for lease in self.leases.expire():
            self._event("lease_expired", lease.model, "", lease=lease.id, holder=lease.holder)
        if self.publisher is not None:
            self.publisher.publish_node(self)
            self._follow_keepalive()
        self._stopping.wait(self.config.heartbeat_s)

    # -- keep-alive decisions -------------------------------------------------------------------------
    def _mine(self, record: KeepAliveRecord | None) -> bool:
        return record is not None and record.node in ("", self.config.node_id)

    def _hold_until(self, model: str) -> float:
        """Until when the controller wants `model` warm on this node (0: no wish): the tiers evict it after the
        models it holds no wish for."""
        record = self.keepalive.get(model)
        return record.hold_until if self._mine(record) else 0.0

    def _follow_keepalive(self, now: float | None = None) -> None:
        """Read the decisions for the models held here; pre-stage to DRAM each one whose pre-stage time has come (a
        predicted arrival: the controller releases its GPUs at once and wants an instance ready by then)."""
        held = set(self.tiers["ssd"].models()) | set(self.tiers["dram"].models())
        try:
            self.keepalive = keepalive_records.read(self.publisher.client, self.publisher.keys, sorted(held))
        except redis.RedisError:
            return  # the last decisions read stay in force until Redis answers again
        now = time.time() if now is None else now
        for model, record in self.keepalive.items():
            due = record.prestage_at is not None and record.prestage_at <= now < record.hold_until
            if (self._mine(record) and record.tier == "dram" and due and self._prestaged.get(model) != record.idle_since
                    and not self.tiers["dram"].has(model)):
                self._prestaged[model] = record.idle_since
                job = self.stage(model, "dram")
                self._event("prestage", model, "dram", job=job.id, hold_until=f"{record.hold_until:.3f}")

    def _event(self, kind: str, model: str, tier: str, **fields: Any) -> None:
        log.info("%s %s %s %s", kind, model, tier, fields or "")
        if self.publisher is not None:
            self.publisher.event(kind, model, tier, **fields)

