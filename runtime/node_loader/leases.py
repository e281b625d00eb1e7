"""Leases pin a model in the node's tiers while an instance uses it; unrenewed leases expire."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass


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
    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}

    def acquire(self, model: str, holder: str, ttl_s: float) -> Lease:
        lease = Lease(secrets.token_hex(8), model, holder, ttl_s, self._clock() + ttl_s)
        with self._lock:
            self._leases[lease.id] = lease
        return lease

    def renew(self, lease_id: str) -> Lease:
        with self._lock:
            self._expire()
            lease = self._leases.get(lease_id)
            if lease is None:
                raise UnknownLease(lease_id)
            lease.expires_at = self._clock() + lease.ttl_s
            return lease

    def release(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise UnknownLease(lease_id)
        return lease

    def _expire(self) -> list[Lease]:
        now = self._clock()
        expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in expired:
            del self._leases[lease.id]
        return expired

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
