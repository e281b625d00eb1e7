"""Reads the cluster from Redis into the scheduler's Snapshot (the I/O edge of the pure core).

One server-side script reads every node, its tier sets, queue and slot ledger, and every instance.
With 1,000 nodes that takes tens of milliseconds, so decisions use a snapshot at most `max_age_s` old
(refreshed in the background) plus this controller's own bookings since; the booking itself is checked
atomically in Redis (controller/booking.py), so a stale snapshot can cost a retry, never a double booking.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field

import redis

from sllm_faas.common.tiers import Tier
from sllm_faas.controller.scheduler import InstanceInfo, ModelInfo, NodeInfo, Snapshot
from sllm_faas.redis_schema.keys import ID, LUA_KEY, Keys
from sllm_faas.redis_schema.records import InstanceRecord, NodeRecord, RecordError

log = logging.getLogger("sllm.controller")

WAITING_READ = 1024  # members of `Keys.waiting` a read returns (to tell a caller's own); all of them are counted


@dataclass(frozen=True)
class ClusterView:
    """A Snapshot plus what the controller needs around it: how to reach each node's loader."""

    snapshot: Snapshot
    nodes: dict[str, NodeRecord]
    instances: dict[str, InstanceRecord]
    queues: dict[str, list[tuple[str, float]]]
    read_at: float
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was left out (malformed record)
    holds: dict[str, set[str]] = field(default_factory=dict)  # node -> live members of its slot ledger
    waiting: frozenset[str] = frozenset()  # live members of `Keys.waiting`: placements waiting for GPUs

    def as_dict(self) -> dict:
        """What `GET /v1/cluster` and `sllm-faas status --json` show."""
        nodes = [{**vars(self.nodes[n.id]), "free_slots": n.free_slots, "queue_wait_s": n.queue_wait_s,
                  "models": n.tier_of, "queue": self.queues.get(n.id, [])} for n in self.snapshot.nodes]
        return {"read_at": self.read_at, "nodes": nodes, "instances": [vars(i) for i in self.instances.values()],
                "waiting": sorted(self.waiting), "skipped": self.skipped}


# One server-side pass over the cluster, returned as one JSON string: a pipeline of ~7 commands per node
# costs ~30 us of client-side reply parsing each (0.25 s for 1,000 nodes); this costs Redis a few ms.
# KEYS: nodes set, instances set, waiting set. ARGV: now, the key templates of _templates (redis_schema LUA_KEY),
# then how many waiting members to return (all are counted).
_READ = LUA_KEY + """
local now = ARGV[1]
local node_key, gpu_key, dram_key, ssd_key = key(ARGV[2]), key(ARGV[3]), key(ARGV[4]), key(ARGV[5])
local queue_key, slots_key, instance_key, model_key = key(ARGV[6]), key(ARGV[7]), key(ARGV[8]), key(ARGV[9])
local nodes, instances = {}, {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  nodes[#nodes + 1] = {node, redis.call('HGETALL', node_key(node)), redis.call('SMEMBERS', gpu_key(node)),
    redis.call('SMEMBERS', dram_key(node)), redis.call('SMEMBERS', ssd_key(node)),
    redis.call('ZRANGE', queue_key(node), 0, -1, 'WITHSCORES'),
    redis.call('ZRANGEBYSCORE', slots_key(node), '(' .. now, '+inf')}
end
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  instances[#instances + 1] = {instance, redis.call('HGETALL', instance_key(instance))}
end
local sizes, seen = {}, {}
local function size_of(model)
  if not seen[model] then
    seen[model] = true
    local size = redis.call('HGET', model_key(model), 'size_bytes')
    if size then sizes[#sizes + 1] = model; sizes[#sizes + 1] = size end
  end
end
for _, row in ipairs(nodes) do
  for tier = 3, 5 do for _, model in ipairs(row[tier]) do size_of(model) end end
end
for _, row in ipairs(instances) do
  local fields = row[2]
  for i = 1, #fields, 2 do if fields[i] == 'model' then size_of(fields[i + 1]) end end
end
local waiting = {redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf'),
  redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf', 'LIMIT', 0, ARGV[10])}
return cjson.encode({nodes, instances, sizes, waiting})
"""


def _templates(keys: Keys) -> list[str]:
    """The key templates _READ builds its keys from, in its ARGV order."""
    return [keys.node(ID), *(keys.node_models(ID, tier) for tier in (Tier.GPU, Tier.DRAM, Tier.SSD)),
            keys.node_queue(ID), keys.node_slots(ID), keys.instance(ID), keys.model(ID)]


def _as_dict(flat: list | dict) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}  # cjson encodes {} for an empty table


def read_cluster(client: redis.Redis, keys: Keys, previous: ClusterView | None = None) -> ClusterView:
    """Everything the scheduler needs, from one server-side read. Expired members are pruned from the sets.

    Node and instance ids come from our own sets (written by validated code), so their keys are built from
    the key templates (here and in the script) without re-validating them. Node records whose heartbeat did
    not change since `previous` are reused rather than decoded again (about half, with 2 s heartbeats and a
    read a second)."""
    now = time.time()
    templates = _templates(keys)
    raw = client.eval(_READ, 3, keys.nodes, keys.instances, keys.waiting, f"{now:.6f}", *templates, WAITING_READ)
    node_key, instance_key = templates[0], templates[6]
    node_rows, instance_rows, sizes, (waiting_count, waiting) = json.loads(raw)
    waiting = frozenset(waiting or ())
    nodes: dict[str, NodeRecord] = {}
    infos, queues, skipped, gone = [], {}, {}, []
    holds: dict[str, set[str]] = {}
    for node, record, gpu, dram, ssd, queue, held in sorted(node_rows or [], key=lambda row: row[0]):
        record = _as_dict(record)
        if not record:
            gone.append(node)
            continue
        known = previous.nodes.get(node) if previous else None
        try:
            if known is not None and f"{known.heartbeat_at:.3f}" == record.get("heartbeat_at"):
                parsed = known
            else:
                parsed = NodeRecord.from_hash(node_key.replace(ID, node), record)
        except RecordError as exc:
            skipped[node_key.replace(ID, node)] = str(exc)
            continue
        nodes[node] = parsed
        tier_of = (dict.fromkeys(ssd or [], Tier.SSD) | dict.fromkeys(dram or [], Tier.DRAM)
                   | dict.fromkeys(gpu or [], Tier.GPU))
        entries = [(member, float(score)) for member, score in _as_dict(queue).items()]
        queues[node] = entries
        wait = max([score - now for _, score in entries], default=0.0)
        holds[node] = set(held or [])
        infos.append(NodeInfo(node, parsed.slots - len(holds[node]), tier_of, parsed.bandwidth, max(0.0, wait)))

    instances: dict[str, InstanceRecord] = {}
    stale = []
    for instance, record in sorted(instance_rows or [], key=lambda row: row[0]):
        record = _as_dict(record)
        if not record:
            stale.append(instance)
            continue
        try:
            instances[instance] = InstanceRecord.from_hash(instance_key.replace(ID, instance), record)
        except RecordError as exc:
            skipped[instance_key.replace(ID, instance)] = str(exc)
    if gone or stale:
        pipe = client.pipeline(transaction=False)
        if gone:
            pipe.srem(keys.nodes, *gone)
        if stale:
            pipe.srem(keys.instances, *stale)
        pipe.execute()
    running = tuple(InstanceInfo(i.id, i.node, i.model, i.tokens, migratable=i.state == "ready" and bool(i.address))
                    for i in instances.values())
    rates: dict[str, list[float]] = {}
    for instance in instances.values():
        if instance.prefill_tokens_per_s:
            rates.setdefault(instance.model, []).append(instance.prefill_tokens_per_s)
    models = {name: ModelInfo(name, int(size), statistics.median(rates[name]) if name in rates else None)
              for name, size in _as_dict(sizes).items() if size.isdigit()}
    return ClusterView(Snapshot(tuple(infos), models, running, pending=waiting_count), nodes, instances, queues, now,
                       skipped, holds, waiting)


class ClusterCache:
    """The latest ClusterView, re-read every `max_age_s` by a background thread (so no decision waits
    for the read), with this process's bookings applied on top until the next read shows them."""

    def __init__(self, client: redis.Redis, keys: Keys, max_age_s: float = 1.0) -> None:
        self.client, self.keys, self.max_age_s = client, keys, max_age_s
        self._read: ClusterView | None = None  # the last read, as Redis had it
        self._view: ClusterView | None = None  # that read plus our own bookings since
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._refresher: threading.Thread | None = None
        # our bookings: id -> (node, finish, forget at, made at on the monotonic clock)
        self._own: dict[str, tuple[str, float | None, float, float]] = {}
        self._read_started = 0.0  # monotonic time at which the last read began
        self._migrating: dict[str, float] = {}  # instances our decisions are moving -> forget at
        self._cancelled: dict[str, tuple[str, float]] = {}  # bookings we cancelled: id -> (node, forget at)

    @property
    def latest(self) -> ClusterView | None:
        """The view decisions use now, without reading Redis (None before the first read)."""
        return self._view

    def refresh(self, unless_since: float | None = None) -> ClusterView:
        """Read the cluster now; with `unless_since` (a time.monotonic() value), only if no read began at or after
        it (callers that queued on the read in progress take it instead of reading again one after another)."""
        with self._reading:
            if unless_since is not None and self._view is not None and self._read_started >= unless_since:
                return self._view
            started = time.monotonic()
            view = read_cluster(self.client, self.keys, self._read)
            view.snapshot.index_holders()  # built here, off the decision path
            with self._lock:
                self._read, self._read_started = view, started
                self._rebuild()
        return self._view

    def _refresh_forever(self) -> None:
        """Read every `max_age_s`, counted from the start of the last read, whoever made it: the first decision
        reads inline as this thread starts, and a second read right after it would confirm that decision's
        bookings at a time no one chose."""
        while True:
            try:
                self.refresh(unless_since=time.monotonic() - self.max_age_s / 2)
            except redis.RedisError:
                pass  # decisions see the error themselves once the view is too old
            except Exception:  # a bug must not silently stop the reads
                log.exception("reading the cluster failed")
            due = self._read_started + self.max_age_s - time.monotonic()
            time.sleep(due if due > 0 else self.max_age_s)  # after a failed read, a whole period

    def view(self) -> ClusterView:
        """A view at most `max_age_s` (plus one read) old; reads inline when the background reader lags
        (first call, Redis just back)."""
        entered = time.monotonic()
        if self._refresher is None:
            with self._reading:
                if self._refresher is None:
                    self._refresher = threading.Thread(target=self._refresh_forever, name="sllm-cluster-reader",
                                                       daemon=True)
                    self._refresher.start()
        view = self._view
        if view is None or time.time() - view.read_at > 2 * self.max_age_s + 1.0:
            view = self.refresh(unless_since=entered)  # or the read the starting reader began meanwhile
        return view

    def note_booking(self, node: str, booking: str, finish_at: float | None) -> None:
        """Apply a booking we just made to the cached view, so our next decision sees it before a read does.

        Bookings are matched by id against the ledgers each read returns, so one that a read already saw
        is never counted twice. The snapshot's derived indexes are carried over (Snapshot.updated)."""
        with self._lock:
            self._own[booking] = (node, finish_at, time.time() + 60.0, time.monotonic())
            view = self._view
            if view is not None and node in view.holds:  # apply just this one; reads rebuild from scratch
                booked = _booked(view.snapshot.node_by_id[node], [finish_at], time.time())
                self._view = dataclasses.replace(view, snapshot=view.snapshot.updated(nodes={node: booked}))

    def may_have_freed(self, since: float) -> bool:
        """Whether a decision begun at `since` (time.monotonic()) may have counted free slots as taken: the view
        counts bookings of ours that no read has confirmed, or a read begun since has replaced that view."""
        with self._lock:
            return bool(self._own) or self._read_started >= since

    def note_migration(self, instance: str) -> None:
        """An instance a decision has planned to move: no later decision plans it again (for 60 s, or until
        a read no longer lists it)."""
        with self._lock:
            self._migrating[instance] = time.time() + 60.0
            self._rebuild()

    def forget_booking(self, node: str, booking: str) -> None:
        """A booking we cancelled: stop counting it, also where the last read still holds it."""
        with self._lock:
            self._own.pop(booking, None)
            self._cancelled[booking] = (node, time.time() + 60.0)
            self._rebuild()

    def _rebuild(self) -> None:
        """The view from the last read plus what we did since (called with the lock held)."""
        if self._read is not None:
            self._view = self._with_own_bookings(self._read)

    def _with_own_bookings(self, view: ClusterView) -> ClusterView:
        """The read `view` plus our bookings that its ledgers do not hold yet (called with the lock held)."""
        now = time.time()
        for booking, (node, _, forget_at, made_at) in list(self._own.items()):
            # The read shows it, or a read that began after it was booked does not: either way Redis has the
            # truth (a booking given back through another worker or replica is gone from the ledger).
            if forget_at < now or booking in view.holds.get(node, ()) or made_at < self._read_started:
                del self._own[booking]
        for instance, forget_at in list(self._migrating.items()):
            if forget_at < now or instance not in view.instances:
                del self._migrating[instance]
        freed: dict[str, int] = {}
        for booking, (node, forget_at) in list(self._cancelled.items()):
            if forget_at < now or booking not in view.holds.get(node, ()):
                del self._cancelled[booking]  # a read after the cancellation: it no longer holds the slot
            else:
                freed[node] = freed.get(node, 0) + 1
        missing: dict[str, list[float | None]] = {}
        for node, finish_at, _, _ in self._own.values():
            if node in view.holds:
                missing.setdefault(node, []).append(finish_at)
        if not missing and not freed and not self._migrating:
            return view
        replaced = {node: _booked(view.snapshot.node_by_id[node], missing.get(node, []), now, freed.get(node, 0))
                    for node in missing.keys() | freed.keys()}
        snapshot = view.snapshot.updated(nodes=replaced, migrating=frozenset(self._migrating))
        return dataclasses.replace(view, snapshot=snapshot)

    def add_model(self, model: ModelInfo) -> Snapshot:
        """The cached snapshot with `model` known (its size read on demand), kept for later decisions."""
        with self._lock:
            known = self._read.snapshot.updated(models={model.name: model})
            self._read = dataclasses.replace(self._read, snapshot=known)
            self._rebuild()
            return self._view.snapshot


def _booked(info: NodeInfo, finishes: list[float | None], now: float, freed: int = 0) -> NodeInfo:
    """`info` with one slot taken per booking (and `freed` given back), its queue wait covering the loads
    the bookings started."""
    wait = max([info.queue_wait_s] + [(finish or 0.0) - now for finish in finishes])
    return dataclasses.replace(info, free_slots=info.free_slots - len(finishes) + freed, queue_wait_s=wait)


def read_migrations(client: redis.Redis, keys: Keys) -> list[dict]:
    """The latest 50 migration records (written by controller/migration.py)."""
    ids = client.zrevrange(keys.migrations, 0, 49)
    pipe = client.pipeline(transaction=False)
    for migration in ids:
        pipe.hgetall(keys.migration(migration))
    return [{"id": m, **record} for m, record in zip(ids, pipe.execute(), strict=True) if record]

