"""The migration record in Redis (`sllm:migration:<id>`, redis_schema/SCHEMA.md): a state machine that
only its owner advances, with an event log in the same hash.

    pending -> started -> transferring -> completed | aborted | failed     (any live state may end early)

Every transition is one Lua script: it checks the owner (or takes over when the owner's lease has
expired and the caller asks to), checks the state it moves from, appends an event and writes the
fields, atomically. A controller that died therefore leaves a record another controller can finish
or abort (controller/migration.py, `Migrator.recover`). Instances append incidents that happen after
the handover (`annotate`), which need no ownership.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis

from sllm_faas.redis_schema.keys import Keys
from sllm_faas.redis_schema.records import MIGRATION_LIVE as LIVE
from sllm_faas.redis_schema.records import MIGRATION_TERMINAL as TERMINAL
from sllm_faas.redis_schema.records import MigrationEvent, MigrationRecord

KEEP_S = 7 * 24 * 3600  # an ended record, and its id in the index, are kept this long

# KEYS[1] record; ARGV: owner, now, lease_until, takeover ("1"/"0"), allowed states ("a,b" or ""), new state,
# event JSON ("" for none: a lease renewal), then field/value pairs. Returns {status, previous state or owner}.
_TRANSITION = """
local key = KEYS[1]
local current = redis.call('HGET', key, 'state')
if not current then return {'missing', ''} end
local holder = redis.call('HGET', key, 'owner') or ''
if holder ~= ARGV[1] then
  local lease = tonumber(redis.call('HGET', key, 'lease_until') or '0') or 0
  if ARGV[4] ~= '1' or lease >= tonumber(ARGV[2]) then return {'not_owner', holder} end
end
if ARGV[5] ~= '' then
  local allowed = false
  for state in string.gmatch(ARGV[5], '[^,]+') do
    if state == current then allowed = true end
  end
  if not allowed then return {'bad_state', current} end
end
if ARGV[7] ~= '' then
  local events = redis.call('HGET', key, 'events')
  if not events or events == '' or events == '[]' then events = '[' .. ARGV[7] .. ']'
  else events = string.sub(events, 1, -2) .. ',' .. ARGV[7] .. ']' end
  redis.call('HSET', key, 'events', events)
end
redis.call('HSET', key, 'state', ARGV[6], 'owner', ARGV[1], 'lease_until', ARGV[3], 'updated_at', ARGV[2])
for i = 8, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
return {'ok', current}
"""

# KEYS[1] record; ARGV: event JSON, then field/value pairs. Appends without ownership (incidents).
_ANNOTATE = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local events = redis.call('HGET', key, 'events')
if not events or events == '' or events == '[]' then events = '[' .. ARGV[1] .. ']'
else events = string.sub(events, 1, -2) .. ',' .. ARGV[1] .. ']' end
redis.call('HSET', key, 'events', events)
for i = 2, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
return 1
"""


class NotOwner(RuntimeError):
    """Another controller owns the migration now (ours let its lease lapse): stop driving it."""


class StateConflict(RuntimeError):
    """The record is not in a state the transition starts from (or it does not exist)."""


def _event(state: str, by: str, detail: str) -> str:
    return MigrationEvent(time.time(), state, by, detail).to_json()


def _pairs(fields: dict[str, Any]) -> list[str]:
    return [v for item in MigrationRecord.encode_fields(**fields).items() for v in item]


class MigrationRecords:
    """Reads and writes `sllm:migration:<id>` records and the `sllm:migrations` index."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self._transition = client.register_script(_TRANSITION)
        self._annotate = client.register_script(_ANNOTATE)

    def create(self, migration_id: str, owner: str, lease_s: float, fields: dict[str, Any]) -> dict[str, str]:
        """A new record in state `pending`, owned by `owner`, with `fields` (MigrationRecord's, typed) set;
        StateConflict if the id is taken."""
        key, now = self.keys.migration(migration_id), time.time()
        record = MigrationRecord(id=migration_id, state="pending", owner=owner, lease_until=now + lease_s,
                                 created_at=now, updated_at=now,
                                 events=(MigrationEvent(now, "pending", owner, "created"),), **fields).to_hash()
        if not self.client.hsetnx(key, "id", migration_id):
            raise StateConflict(f"migration {migration_id} exists already")
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=record)
        pipe.zadd(self.keys.migrations, {migration_id: now})
        pipe.zremrangebyscore(self.keys.migrations, "-inf", now - KEEP_S)
        pipe.execute()
        return record

    def transition(self, migration_id: str, owner: str, state: str, lease_s: float, *, detail: str | None = "",
                   allowed: Iterable[str] = LIVE, takeover: bool = False, **fields: Any) -> str:
        """Move the record to `state` (from one of `allowed`), as its owner, logging an event unless `detail`
        is None (a lease renewal); returns the previous state."""
        now = time.time()
        event = "" if detail is None else _event(state, owner, detail)
        status, info = self._transition(
            keys=[self.keys.migration(migration_id)],
            args=[owner, f"{now:.3f}", f"{now + lease_s:.3f}", "1" if takeover else "0", ",".join(allowed), state,
                  event, *_pairs(fields)])
        status, info = _text(status), _text(info)
        if status == "not_owner":
            raise NotOwner(f"migration {migration_id} is owned by {info!r}")
        if status != "ok":
            raise StateConflict(f"migration {migration_id}: {'no such record' if status == 'missing' else info}")
        if state in TERMINAL:
            self.client.expire(self.keys.migration(migration_id), KEEP_S)
        return info

    def annotate(self, migration_id: str, by: str, detail: str, **fields: Any) -> bool:
        """Record an incident on a migration whoever owns it; False if there is no such record."""
        event = _event(str(fields.get("incident", "note")), by, detail)
        return bool(self._annotate(keys=[self.keys.migration(migration_id)], args=[event, *_pairs(fields)]))

    def get(self, migration_id: str) -> dict[str, str]:
        """The record as stored (what the APIs show)."""
        return self.client.hgetall(self.keys.migration(migration_id))

    def read(self, migration_id: str) -> MigrationRecord | None:
        """The record, decoded (None if there is none)."""
        key = self.keys.migration(migration_id)
        record = self.client.hgetall(key)
        return MigrationRecord.from_hash(key, record) if record else None

    def live_ids(self) -> list[str]:
        """Ids of the records not in a terminal state, oldest first."""
        ids = self.client.zrange(self.keys.migrations, 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for migration_id in ids:
            pipe.hget(self.keys.migration(migration_id), "state")
        return [i for i, state in zip(ids, pipe.execute(), strict=True) if _text(state) in LIVE]


def events_of(record: dict[str, str]) -> list[dict[str, Any]]:
    """The events of a stored record, oldest first, as dicts (t, state, by, detail)."""
    return [vars(event) for event in MigrationRecord.from_hash("migration record", record).events]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
