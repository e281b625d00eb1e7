"""What one instance knows of the migrations it takes part in, as source or destination.

Each migration is a `MigrationStatus` (GET /_/migration/<id> returns it); `Migrations` keeps them by id,
counts them in the instance's metrics registry, and writes incidents that happen after a handover
to the migration's Redis record when the instance has Redis (SLLM_REDIS_URL).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from sllm_faas.common.settings import DEFAULT_KEY_PREFIX

if TYPE_CHECKING:
    from sllm_faas.common.metrics import Metrics

log = logging.getLogger("sllm.migration")

PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ROUND_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
KEEP_FINISHED = 256  # finished migrations remembered for status queries


class MigrationStatus:
    """One migration seen from this instance; `state` moves forward only, each move is an event."""

    TERMINAL = ("completed", "recovered", "aborted", "failed")

    def __init__(self, migration_id: str, role: str, request: str | None, peer: str, state: str) -> None:
        self.id, self.role, self.request, self.peer, self.state = migration_id, role, request, peer, state
        self.outcome: str | None = None  # a code: handed_over, destination_timeout, finished_first, ...
        self.error: str | None = None
        self.incident: str | None = None
        self.rounds = 0
        self.tokens_recomputed = 0
        self.prefill_s = 0.0  # destination: time spent prefilling the tokens sent
        self.pause_s: float | None = None  # source: paused -> the first token relayed from the destination
        self.duration_s: float | None = None  # source: start -> handover
        self.same_numerics: bool | None = None
        self.created_at = time.time()
        self.started = time.monotonic()
        self.events: list[dict[str, Any]] = [{"t": 0.0, "state": state, "detail": ""}]
        self.lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self.state in self.TERMINAL

    def move(self, state: str, detail: str = "") -> None:
        self.state = state
        self.events.append({"t": round(time.monotonic() - self.started, 4), "state": state, "detail": detail})

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "request": self.request, "peer": self.peer, "state": self.state,
                "outcome": self.outcome, "error": self.error, "incident": self.incident, "rounds": self.rounds,
                "tokens_recomputed": self.tokens_recomputed, "prefill_s": round(self.prefill_s, 4),
                "pause_s": None if self.pause_s is None else round(self.pause_s, 4),
                "duration_s": None if self.duration_s is None else round(self.duration_s, 4),
                "same_numerics": self.same_numerics, "created_at": round(self.created_at, 3),
                "events": list(self.events)}


class Migrations:
    """This instance's migrations by id, their metrics, and their incidents."""

    def __init__(self, metrics: Metrics, redis_url: str | None = None, key_prefix: str = DEFAULT_KEY_PREFIX,
                 instance_id: str = "") -> None:
        """`redis_url`: where incidents are written (none: they stay in the status, metrics and log)."""
        self.redis_url, self.key_prefix, self.instance_id = redis_url, key_prefix, instance_id
        self._by_id: dict[str, MigrationStatus] = {}
        self._lock = threading.Lock()
        self._records = None  # sllm_faas.runtime.migration.record.MigrationRecords, made on the first incident
        m = metrics
        self.migrations = m.counter("sllm_migrations_total", "Live migrations this instance took part in, by role "
                                    "and outcome.", ("role", "outcome"))
        self.pause = m.histogram("sllm_migration_pause_seconds", "Source: how long a migrated request's tokens "
                                 "stopped, from the pause to the first token relayed from the destination.",
                                 PAUSE_BUCKETS)
        self.duration = m.histogram("sllm_migration_duration_seconds", "Source: migration start to handover.",
                                    DURATION_BUCKETS)
        self.rounds = m.histogram("sllm_migration_rounds", "Token transfers per migration, the final one included.",
                                  ROUND_BUCKETS)
        self.recomputed = m.counter("sllm_migration_tokens_recomputed_total", "Tokens sent to (source) or "
                                    "prefilled by (destination) migration destinations.", ("role",))
        self.incidents = m.counter("sllm_migration_incidents_total", "Failures after a handover, by kind.", ("kind",))

    def add(self, status: MigrationStatus) -> MigrationStatus:
        """Register `status`; returns the one already registered under its id, if any."""
        with self._lock:
            existing = self._by_id.get(status.id)
            if existing is not None:
                return existing
            self._by_id[status.id] = status
            finished = [s for s in self._by_id.values() if s.finished]
            for old in finished[:max(0, len(finished) - KEEP_FINISHED)]:
                del self._by_id[old.id]
            return status

    def get(self, migration_id: str) -> MigrationStatus | None:
        return self._by_id.get(migration_id)

    def all(self) -> list[MigrationStatus]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda s: s.created_at)

    def active_for(self, request_id: str) -> MigrationStatus | None:
        """The source-side migration of `request_id` that is still running, if any."""
        return next((s for s in self.all() if s.role == "source" and s.request == request_id and not s.finished),
                    None)

    def end(self, status: MigrationStatus, state: str, outcome: str, error: str | None = None) -> None:
        """Finish a migration once, and count it."""
        with status.lock:
            if status.finished:
                return
            status.outcome, status.error = outcome, error
            status.move(state, error or outcome)
        self.migrations.labels(status.role, outcome).inc()
        self.recomputed.labels(status.role).inc(status.tokens_recomputed)
        if status.role == "source" and status.rounds:
            self.rounds.observe(status.rounds)
        if status.duration_s is not None:
            self.duration.observe(status.duration_s)
        if status.pause_s is not None:
            self.pause.observe(status.pause_s)
        log.info("migration %s (%s of request %s) %s: %s", status.id, status.role, status.request, state,
                 error or outcome)

    def incident(self, status: MigrationStatus, kind: str, detail: str) -> None:
        """A failure after the handover: kept in the status, counted, logged and written to the Redis record."""
        status.incident = kind
        status.move(status.state, f"incident {kind}: {detail}")
        self.incidents.labels(kind).inc()
        log.warning("migration %s: %s: %s", status.id, kind, detail)
        if not self.redis_url:
            return
        try:
            if self._records is None:
                from sllm_faas.common.redis_client import connect
                from sllm_faas.redis_schema.keys import Keys
                from sllm_faas.runtime.migration.record import MigrationRecords

                client = connect(self.redis_url)
                self._records = MigrationRecords(client, Keys(self.key_prefix))
            by = f"{status.role}:{self.instance_id}"
            self._records.annotate(status.id, by, detail, incident=kind, incident_at=f"{time.time():.3f}")
        except Exception as exc:  # Redis is a mirror: the incident is still in the status, metrics and log
            log.warning("migration %s: could not record the incident in Redis: %s", status.id, exc)
