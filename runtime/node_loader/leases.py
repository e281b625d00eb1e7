"""Leases pin a model in the node's tiers while an instance uses it; unrenewed leases expire.

With a `path`, the leases are also a file, rewritten atomically on every change, and read back at start:
a loader that restarts (crash, upgrade, OOM kill) still knows which models are mapped by running
instances, and their keepers' renewals keep working with the ids they hold.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sllm_faas.common import jsonbody

log = logging.getLogger("sllm.loader")
MAX_LEASE_FILE_BYTES = 16 << 20


@dataclass
class Lease:
    id: str
    model: str
    holder: str
    ttl_s: float
    expires_at: float

    def as_dict(self) -> dict:
        return {"id": self.id, "model": self.model, "holder": self.holder, "ttl_s": self.ttl_s,
                "expires_at": self.expires_at}


class UnknownLease(KeyError):
    pass


class Leases:
    def __init__(self, clock=time.time, path: str | os.PathLike | None = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self._leases = self._load(self.path)

    @staticmethod
    def _load(path: Path) -> dict[str, Lease]:
        """The leases saved by an earlier run; a file that cannot be read is logged and ignored."""
        from sllm_faas.runtime.checkpoint.format import CheckpointError, read_regular

        try:
            doc = jsonbody.loads(read_regular(path, MAX_LEASE_FILE_BYTES, "leases"), str(path))
            leases = {entry["id"]: Lease(str(entry["id"]), str(entry["model"]), str(entry["holder"]),
                                         float(entry["ttl_s"]), float(entry["expires_at"]))
                      for entry in doc["leases"]}
        except FileNotFoundError:
            return {}
        except (OSError, CheckpointError, jsonbody.JsonError, KeyError, TypeError, ValueError) as exc:
            log.warning("leases file %s ignored: %s", path, exc)
            return {}
        return leases

    def _save(self) -> None:
        """Write the leases to a temporary file, fsync, rename: a crash leaves the old or the new set."""
        if self.path is None:
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(temporary, "w") as handle:
            json.dump({"leases": [asdict(lease) for lease in self._leases.values()]}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, self.path)

    def acquire(self, model: str, holder: str, ttl_s: float) -> Lease:
        lease = Lease(secrets.token_hex(8), model, holder, ttl_s, self._clock() + ttl_s)
        with self._lock:
            self._leases[lease.id] = lease
            self._save()
        return lease

    def renew(self, lease_id: str) -> Lease:
        with self._lock:
            self._expire()
            lease = self._leases.get(lease_id)
            if lease is None:
                raise UnknownLease(lease_id)
            lease.expires_at = self._clock() + lease.ttl_s
            self._save()
            return lease

    def release(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._save()
        if lease is None:
            raise UnknownLease(lease_id)
        return lease

    def retain(self, keep) -> list[Lease]:
        """Drop the leases whose model `keep(model)` rejects (no longer on the node); returns them."""
        with self._lock:
            return self._drop(lambda lease: not keep(lease.model))

    def _expire(self) -> list[Lease]:
        now = self._clock()
        return self._drop(lambda lease: lease.expires_at <= now)

    def _drop(self, doomed) -> list[Lease]:
        """Remove the leases `doomed(lease)` selects and persist once; the caller holds the lock."""
        dropped = [lease for lease in self._leases.values() if doomed(lease)]
        for lease in dropped:
            del self._leases[lease.id]
        if dropped:
            self._save()
        return dropped

    def expire(self) -> list[Lease]:
        """Drop leases whose holders stopped renewing; returns them (for events)."""
        with self._lock:
            return self._expire()

    def is_leased(self, model: str) -> bool:
        with self._lock:
            self._expire()
            return any(lease.model == model for lease in self._leases.values())

    def all(self) -> list[Lease]:
        with self._lock:
            self._expire()
            return list(self._leases.values())
