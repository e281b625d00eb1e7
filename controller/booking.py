"""Atomic slot booking and queue recording, as one Lua script run by Redis.

Check-then-act from two controllers would race; inside one script Redis runs nothing else, so the
check (a slot is free on a live node) and the act (hold it; add the pending load to the node's queue)
cannot interleave with another controller's. Keys: redis_schema/SCHEMA.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from sllm_faas.redis_schema.keys import EVENTS_MAXLEN, Keys

# KEYS: node hash, slot ledger, queue, events stream, waiting set
# ARGV: now, booking id, hold until, queue member ("" = nothing to stage), estimated finish, queue ttl,
#       waiting member this booking places ("" = none), events maxlen, then the event's field/value pairs
_BOOK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local slots = tonumber(redis.call('HGET', KEYS[1], 'slots') or '')
if not slots then  -- as redis_schema/records.py: one per GPU, or 1 without GPUs
  local ok, gpus = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'gpus') or '[]')
  slots = (ok and type(gpus) == 'table' and #gpus > 0) and #gpus or 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= slots then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[1])) + 3600)
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('ZREM', KEYS[5], ARGV[7])
end
if #ARGV > 8 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', unpack(ARGV, 9))
end
return 1
"""


class NodeGone(RuntimeError):
    """The node's record expired (its loader stopped heartbeating)."""


@dataclass(frozen=True)
class Booking:
    id: str
    node: str
    expires_at: float


class Booker:
    def __init__(self, client: redis.Redis, keys: Keys, hold_s: float = 120.0, queue_ttl_s: int = 600) -> None:
        self.client, self.keys, self.hold_s, self.queue_ttl_s = client, keys, hold_s, queue_ttl_s
        self._script = client.register_script(_BOOK)

    def book(self, node: str, booking_id: str, stage: str | None = None, finish_at: float | None = None,
             event: dict[str, str] | None = None, placed: str | None = None) -> Booking | None:
        """Hold a slot on `node` for `hold_s` (an instance takes it over when it registers); None if the node
        is full. `stage` ("MODEL@TIER") is added to the node's queue with `finish_at` unless already there;
        `event` goes to the events stream and `placed` (a caller's member) leaves `Keys.waiting`, in the same
        step."""
        now = time.time()
        k = self.keys
        pairs = [item for pair in (event or {}).items() for item in pair]
        result = self._script(keys=[k.node(node), k.node_slots(node), k.node_queue(node), k.events, k.waiting],
                              args=[f"{now:.6f}", booking_id, f"{now + self.hold_s:.6f}", stage or "",
                                    f"{finish_at or now:.6f}", self.queue_ttl_s, placed or "", EVENTS_MAXLEN,
                                    *pairs])
        if result == -1:
            raise NodeGone(f"node {node}: no live record ({k.node(node)} expired)")
        return Booking(booking_id, node, now + self.hold_s) if result == 1 else None

    def cancel(self, booking: Booking) -> int:
        """1 if the hold was there and is gone, 0 if it was not (expired, taken over, or never made)."""
        return self.client.zrem(self.keys.node_slots(booking.node), booking.id)
