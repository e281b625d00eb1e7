"""Reads the cluster from Redis into the scheduler's Snapshot (the I/O edge of the pure core).

One pipelined round trip reads every node, its tier sets, queue and slot ledger, and every instance.
With 1,000 nodes that takes tens of milliseconds, so decisions use a snapshot at most `max_age_s` old
(refreshed in the background) plus this controller's own bookings since; the booking itself is checked
atomically in Redis (controller/booking.py), so a stale snapshot can cost a retry, never a double booking.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from dataclasses import dataclass, field

import redis

from controller.scheduler import InstanceInfo, ModelInfo, NodeInfo, Snapshot
from redis_schema.keys import Keys
from redis_schema.records import InstanceRecord, NodeRecord, RecordError


@dataclass(frozen=True)
class ClusterView:
    """A Snapshot plus what the controller needs around it: how to reach each node's loader."""

    snapshot: Snapshot
    nodes: dict[str, NodeRecord]
    instances: dict[str, InstanceRecord]
    queues: dict[str, list[tuple[str, float]]]
    read_at: float
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was left out (malformed record)


def read_cluster(client: redis.Redis, keys: Keys) -> ClusterView:
    """Everything the scheduler needs, from one pipelined read. Expired members are pruned from the sets."""
    now = time.time()
    node_ids = sorted(client.smembers(keys.nodes))
    instance_ids = sorted(client.smembers(keys.instances))
    pipe = client.pipeline(transaction=False)
    for node in node_ids:
        pipe.hgetall(keys.node(node))
        for tier in ("gpu", "dram", "ssd"):
            pipe.smembers(keys.node_models(node, tier))
        pipe.zrange(keys.node_queue(node), 0, -1, withscores=True)
        pipe.zcount(keys.node_slots(node), f"({now}", "+inf")
    for instance in instance_ids:
        pipe.hgetall(keys.instance(instance))
    replies = pipe.execute()

    nodes: dict[str, NodeRecord] = {}
    infos, queues, skipped, gone = [], {}, {}, []
    for i, node in enumerate(node_ids):
        record, gpu, dram, ssd, queue, held = replies[6 * i: 6 * i + 6]
        if not record:
            gone.append(node)
            continue
        try:
            parsed = NodeRecord.from_hash(keys.node(node), record)
        except RecordError as exc:
            skipped[keys.node(node)] = str(exc)
            continue
        nodes[node] = parsed
        tier_of = {m: "ssd" for m in ssd} | {m: "dram" for m in dram} | {m: "gpu" for m in gpu}
        queues[node] = [(member, score) for member, score in queue]
        wait = max([score - now for _, score in queue], default=0.0)
        infos.append(NodeInfo(node, parsed.slots - held, tier_of, parsed.bandwidth, max(0.0, wait)))

    instances: dict[str, InstanceRecord] = {}
    stale = []
    for instance, record in zip(instance_ids, replies[6 * len(node_ids):], strict=True):
        if not record:
            stale.append(instance)
            continue
        try:
            instances[instance] = InstanceRecord.from_hash(keys.instance(instance), record)
        except RecordError as exc:
            skipped[keys.instance(instance)] = str(exc)
    if gone or stale:
        pipe = client.pipeline(transaction=False)
        if gone:
            pipe.srem(keys.nodes, *gone)
        if stale:
            pipe.srem(keys.instances, *stale)
        pipe.execute()
    running = tuple(InstanceInfo(i.id, i.node, i.model, i.tokens, migratable=i.state == "ready" and bool(i.address))
                    for i in instances.values())
    names = sorted({m for info in infos for m in info.tier_of} | {i.model for i in instances.values()})
    models = read_models(client, keys, names, list(instances.values()))
    return ClusterView(Snapshot(tuple(infos), models, running), nodes, instances, queues, now, skipped)


def read_models(client: redis.Redis, keys: Keys, names: list[str], instances: list[InstanceRecord]
                ) -> dict[str, ModelInfo]:
    """ModelInfo for each name whose `sllm:model:<name>` hash gives a size; the prefill rate is the median
    measured by the instances serving it (the migration cost's a)."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hget(keys.model(name), "size_bytes")
    models = {}
    for name, size in zip(names, pipe.execute(), strict=True):
        if size and size.isdigit():
            rates = [i.prefill_tokens_per_s for i in instances if i.model == name and i.prefill_tokens_per_s]
            models[name] = ModelInfo(name, int(size), statistics.median(rates) if rates else None)
    return models


class ClusterCache:
    """The latest ClusterView, re-read every `max_age_s` by a background thread (so no decision waits
    for the read), with this process's bookings applied on top until the next read shows them."""

    def __init__(self, client: redis.Redis, keys: Keys, max_age_s: float = 0.5) -> None:
        self.client, self.keys, self.max_age_s = client, keys, max_age_s
        self._view: ClusterView | None = None
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._refresher: threading.Thread | None = None

    def refresh(self) -> ClusterView:
        with self._reading:
            view = read_cluster(self.client, self.keys)
            with self._lock:
                self._view = view
        return view

    def _refresh_forever(self) -> None:
        while True:
            try:
                self.refresh()
            except redis.RedisError:
                pass  # decisions see the error themselves once the view is too old
            time.sleep(self.max_age_s)

    def view(self) -> ClusterView:
        """A view at most `max_age_s` (plus one read) old; reads inline when the background reader lags
        (first call, Redis just back)."""
        if self._refresher is None:
            with self._reading:
                if self._refresher is None:
                    self._refresher = threading.Thread(target=self._refresh_forever, name="sllm-cluster-reader",
                                                       daemon=True)
                    self._refresher.start()
        view = self._view
        if view is None or time.time() - view.read_at > 2 * self.max_age_s + 1.0:
            view = self.refresh()
        return view

    def note_booking(self, node: str, finish_at: float | None) -> None:
        """Apply a booking we just made to the cached view, so our next decision sees it before the refresh.

        The snapshot's derived indexes are carried over (Snapshot.updated): they may be up to `max_age_s` stale
        about this node as a migration destination, which the atomic booking check covers."""
        with self._lock:
            view = self._view
            if view is None:
                return
            old = view.snapshot
            info = next((n for n in old.nodes if n.id == node), None)
            if info is None:
                return
            wait = max(info.queue_wait_s, (finish_at or 0.0) - time.time())
            booked = dataclasses.replace(info, free_slots=info.free_slots - 1, queue_wait_s=wait)
            self._view = dataclasses.replace(view, snapshot=old.updated(nodes={node: booked}))

    def add_model(self, model: ModelInfo) -> Snapshot:
        """The cached snapshot with `model` known (its size read on demand), kept for later decisions."""
        with self._lock:
            view = self._view
            snapshot = view.snapshot.updated(models={model.name: model})
            self._view = dataclasses.replace(view, snapshot=snapshot)
            return snapshot
