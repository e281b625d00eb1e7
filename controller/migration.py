"""The migration coordinator: starts live migrations, persists their state machine in Redis, recovers them.

    migrator = Migrator(redis_client, Keys())
    record = migrator.migrate("http://10.0.0.5:8080", "cmpl-...", "http://10.0.0.7:8080")
    migrator.recover()   # after a controller restart: finish or abort what a dead coordinator left

The source instance moves the tokens itself (runtime/migration/source.py); the coordinator picks the
destination, creates the record (`pending`), tells the source (`started`), mirrors its rounds
(`transferring`) and writes the outcome (`completed`, `aborted` or `failed`), each step persisted
before the next is taken and only by the record's owner (runtime/migration/record.py). Its lease is
renewed while it works; when a coordinator dies, the migration goes on at the source, the lease
lapses, and `recover()` on any controller takes the record over and drives it to its end: a
`pending` record is started again (the source answers a repeated start with the same migration), a
later one is read from the source. Sources and destinations are base URLs or registered instance ids
(`sllm:instance:<id>`, field `address`).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any

import redis
import requests

from sllm_faas.controller.scheduler import Action, Plan
from sllm_faas.redis_schema.keys import Keys
from sllm_faas.redis_schema.records import InstanceRecord, MigrationRecord, RecordError
from sllm_faas.runtime.migration import faults
from sllm_faas.runtime.migration.protocol import auth_headers, error_text
from sllm_faas.runtime.migration.record import MigrationRecords, NotOwner, StateConflict

HANDED_OVER = ("relaying", "completed", "recovered", "failed")  # source states past the handover


class NoDestination(LookupError):
    """No registered instance can take the request (same model, ready, a free slot, another instance)."""


class Migrator:
    """Coordinates live migrations; safe to use from several threads and several controllers at once."""

    def __init__(self, client: redis.Redis, keys: Keys, *, owner: str | None = None, lease_s: float = 10.0,
                 poll_s: float = 0.05, request_timeout_s: float = 5.0) -> None:
        self.client, self.keys = client, keys
        self.records = MigrationRecords(client, keys)
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.lease_s, self.poll_s, self.request_timeout_s = lease_s, poll_s, request_timeout_s

    # -- public API ----------------------------------------------------------------------------
    def migrate(self, source: str, request_id: str, destination: str | None = None, *, threshold: int = 20,
                max_rounds: int = 8, timeout_s: float = 30.0, handover_timeout_s: float = 5.0, release: bool = False,
                reason: str = "operator", migration_id: str | None = None) -> dict[str, str]:
        """Move request `request_id` (the id its client sees) from `source` to `destination` (a base URL or an
        instance id; picked from Redis when None) and return the final record. Blocks until the handover
        or the abort: about one prefill of the request's tokens."""
        source_url, source_instance = self.resolve(source)
        if destination is None:
            destination = self.pick_destination(source_instance or source_url)
        destination_url, destination_instance = self.resolve(destination)
        if destination_url == source_url:
            raise ValueError(f"source and destination are the same instance ({source_url})")
        options = {"destination": destination_url, "threshold": threshold, "max_rounds": max_rounds,
                   "timeout_s": timeout_s, "handover_timeout_s": handover_timeout_s, "release": release}
        migration_id = migration_id or f"m-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        fields = {"request": request_id, "source": source_url, "destination": destination_url, "reason": reason,
                  "source_instance": source_instance, "destination_instance": destination_instance,
                  "options": options}
        self.records.create(migration_id, self.owner, self.lease_s, fields)
        faults.inject("controller.pending")
        return self._drive(migration_id)

    def recover(self) -> list[dict[str, str]]:
        """Take over every live migration whose owner's lease has lapsed and drive it to its end."""
        finished = []
        for migration_id in self.records.live_ids():
            record = self.records.read(migration_id)
            if record is None or record.lease_until >= time.time():
                continue  # its owner is alive (or it just ended)
            try:
                self.records.transition(migration_id, self.owner, record.state, self.lease_s,
                                        detail=f"taken over from {record.owner!r}, whose lease lapsed",
                                        allowed=(record.state,), takeover=True)
            except (NotOwner, StateConflict):
                continue  # another controller was faster
            finished.append(self._drive(migration_id))
        return finished

    def drain(self, source: str, destination: str | None = None, *, release: bool = True, reason: str = "drain",
              **options: Any) -> list[dict[str, str]]:
        """Migrate every running request of `source`, one after the other; with `release` the source gives
        its model back after the last handover (the node's slot and memory are then free)."""
        requests_here = [r for r in self.in_flight(source) if r["state"] == "running"]
        return [self.migrate(source, r["id"], destination, release=release, reason=reason, **options)
                for r in requests_here]

    def execute_plan(self, plan: Plan) -> list[dict[str, str]]:
        """Carry out the migration of a scheduler decision (`Decision.plan()`, action MIGRATE_THEN_LOAD): drain
        instance `plan.instance` to an instance on node `plan.to`. NoDestination when none is ready there yet
        (start one, then call again)."""
        if plan.action is not Action.MIGRATE_THEN_LOAD:
            raise ValueError(f"plan action {str(plan.action)!r} moves nothing")
        destination = self.pick_destination(plan.instance, node=plan.to)
        return self.drain(plan.instance, destination, release=True, reason="plan")

    def in_flight(self, target: str) -> list[dict[str, Any]]:
        """The requests in flight on an instance (GET /_/requests)."""
        url, _ = self.resolve(target)
        response = requests.get(f"{url}/_/requests", headers=auth_headers(), timeout=self.request_timeout_s)
        response.raise_for_status()
        return response.json()["data"]

    def get(self, migration_id: str) -> dict[str, str]:
        return self.records.get(migration_id)

    def resolve(self, target: str) -> tuple[str, str]:
        """(base URL, instance id or "") of a base URL or a registered instance id."""
        if target.startswith(("http://", "https://")):
            return target.rstrip("/"), ""
        address = self.client.hget(self.keys.instance(target), "address")
        if not address:
            raise LookupError(f"instance {target!r} is not registered in Redis or has no address "
                              f"({self.keys.instance(target)} field 'address'); pass its base URL instead")
        return address.rstrip("/"), target

    def pick_destination(self, source: str, node: str | None = None) -> str:
        """The ready instance with the most free slots that serves the source's model, on `node` if given,
        else preferably on another node than the source's."""
        instances = []
        for name in sorted(self.client.smembers(self.keys.instances)):
            key = self.keys.instance(name)
            try:
                instances.append(InstanceRecord.from_hash(key, self.client.hgetall(key)))
            except RecordError:
                continue  # expired (or malformed: `sllm-faas status` names it)
        me = next((i for i in instances if source in (i.id, i.address.rstrip("/"))), None)
        if me is None:
            raise NoDestination(f"the source {source!r} is not registered: name the destination")
        candidates = [i for i in instances if i.id != me.id and i.model == me.model and i.state == "ready"
                      and i.address and i.slots - i.active > 0 and (node is None or i.node == node)]
        if not candidates:
            where = f" on node {node}" if node else ""
            raise NoDestination(f"no ready instance of {me.model!r} with a free slot{where}")
        best = max(candidates, key=lambda i: (i.node != me.node, i.slots - i.active, i.id))
        return best.id

    # -- the state machine -------------------------------------------------------------------
    def _drive(self, migration_id: str) -> dict[str, str]:
        record = self.records.read(migration_id)
        try:
            if record.state == "pending" and not self._start(migration_id, record):
                return self.records.get(migration_id)
            self._follow(migration_id, record)
        except NotOwner:
            pass  # our lease lapsed and another controller owns it now: its record is the truth
        return self.records.get(migration_id)

    def _start(self, migration_id: str, record: MigrationRecord) -> bool:
        """Tell the source; a repeated start (after a crash) gets the same migration back."""
        body = {**record.options, "migration": migration_id}
        url = f"{record.source}/_/requests/{record.request}/migrate"
        try:
            response = requests.post(url, json=body, headers=auth_headers(), timeout=self.request_timeout_s)
        except requests.RequestException as exc:
            self._end(migration_id, "failed", "source_unreachable", f"could not reach the source: {exc}")
            return False
        if response.status_code not in (200, 202):
            self._end(migration_id, "aborted", "not_migratable", f"the source refused: HTTP {response.status_code}: "
                      f"{error_text(response)}")
            return False
        self._move(migration_id, "started", "the source accepted", allowed=("pending",))
        faults.inject("controller.started")
        return True

    def _follow(self, migration_id: str, record: MigrationRecord) -> None:
        """Mirror the source's progress into the record until the handover or the abort."""
        url = f"{record.source}/_/migration/{migration_id}"
        handover_timeout_s = float(record.options.get("handover_timeout_s", 5.0))
        seen = last = handed_over_at = unreachable_since = None
        renewed = time.monotonic()
        while True:
            try:
                response = requests.get(url, headers=auth_headers(), timeout=self.request_timeout_s)
                status = response.json() if response.status_code == 200 else None
                lost = "the source no longer knows the migration (it restarted)" if response.status_code == 404 \
                    else None
                unreachable_since = None
            except (requests.RequestException, ValueError) as exc:
                unreachable_since = unreachable_since or time.monotonic()
                status = None
                lost = f"the source stopped answering: {exc}" \
                    if time.monotonic() - unreachable_since > self.lease_s else None
            if lost and handed_over_at is not None:  # it died after the handover: the destination records that
                self._end(migration_id, "completed", "handed_over", None, last)
                return
            if lost:
                self._source_lost(migration_id, record, lost)
                return
            last = status or last
            if status is not None:
                progress = {k: status.get(k) for k in ("rounds", "tokens_recomputed", "same_numerics")}
                if status["state"] in HANDED_OVER:
                    handed_over_at = handed_over_at or time.monotonic()
                    if status.get("pause_s") is not None or status["state"] != "relaying" or \
                            time.monotonic() - handed_over_at > handover_timeout_s:
                        self._end(migration_id, "completed", "handed_over", None, status)
                        return
                elif status["state"] == "aborted":
                    self._end(migration_id, "aborted", status.get("outcome") or "aborted", status.get("error"), status)
                    return
                elif progress != seen:
                    detail = f"{status['rounds']} rounds done, {status['tokens_recomputed']} tokens sent"
                    self._move(migration_id, "transferring", detail, **_fields(status))
                    if seen is None:
                        faults.inject("controller.transferring")
                    seen, renewed = progress, time.monotonic()
            if time.monotonic() - renewed > self.lease_s / 3:
                current = self.records.get(migration_id)["state"]
                self.records.transition(migration_id, self.owner, current, self.lease_s, detail=None,
                                        allowed=(current,))
                renewed = time.monotonic()
            time.sleep(self.poll_s)

    def _source_lost(self, migration_id: str, record: MigrationRecord, detail: str) -> None:
        """The source died during the transfer: its request is lost with it; free the destination's slot."""
        try:
            requests.delete(f"{record.destination}/_/migration/{migration_id}", headers=auth_headers(),
                            timeout=self.request_timeout_s)
        except requests.RequestException:
            pass  # it drops an idle staged request by itself
        self._end(migration_id, "failed", "source_lost", detail)

    def _move(self, migration_id: str, state: str, detail: str, allowed=("started", "transferring"), **fields) -> None:
        self.records.transition(migration_id, self.owner, state, self.lease_s, detail=detail, allowed=allowed,
                                **fields)

    def _end(self, migration_id: str, state: str, outcome: str, error: str | None,
             status: dict[str, Any] | None = None) -> None:
        fields = _fields(status or {})
        fields.update(outcome=outcome, error=error or "")
        if status and status.get("incident"):
            fields.update(incident=status["incident"], incident_at=time.time())
        self.records.transition(migration_id, self.owner, state, self.lease_s, detail=error or outcome, **fields)


def _fields(status: dict[str, Any]) -> dict[str, Any]:
    """The record fields mirrored from the source's status (MigrationRecord's, typed)."""
    return {name: status[name] for name in ("rounds", "tokens_recomputed", "pause_s", "duration_s", "same_numerics")
            if status.get(name) is not None}
