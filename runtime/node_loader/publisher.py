"""Publishes the node's state to Redis for the scheduler (keys: redis_schema/SCHEMA.md).

Redis is a mirror, never the source of truth: when it is down the loader keeps serving, keeps
up to 1,000 events in memory, and republishes everything on the next heartbeat that succeeds.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import redis

from sllm_faas.common.redis_client import connect, unreachable
from sllm_faas.common.tiers import HELD, SLOWEST_FIRST, Tier
from sllm_faas.redis_schema.keys import EVENTS_MAXLEN, SCHEMA_VERSION, Keys
from sllm_faas.redis_schema.records import Event, ModelRecord, NodeRecord
from sllm_faas.runtime.checkpoint.format import CheckpointError, read_manifest
from sllm_faas.runtime.node_loader.gpus import NvmlUnavailable, nvml_gpus

log = logging.getLogger("sllm.loader")


class RedisPublisher:
    def __init__(self, url: str, node_id: str, address: str, keys: Keys | None = None) -> None:
        self.client = connect(url)
        self.node_id, self.address = node_id, address
        self.keys = keys or Keys()
        self.healthy = False
        self._pending: collections.deque[dict[str, str]] = collections.deque(maxlen=1000)
        self._lock = threading.Lock()
        self._gpus: list[dict[str, Any]] | None = None
        self._queue_members: set[str] = set()  # queue entries of ours published last time

    def _gpu_inventory(self) -> list[dict[str, Any]]:
        if self._gpus is None:
            try:
                self._gpus = nvml_gpus()
            except NvmlUnavailable:
                self._gpus = []
        return self._gpus

    def node_record(self, loader) -> NodeRecord:
        status = loader.status()
        idle = {"capacity": 0, "used": 0}
        tiers = {tier: status["tiers"].get(tier, idle) for tier in HELD}
        return NodeRecord(node_id=self.node_id, address=self.address, heartbeat_at=time.time(),
                          slots=loader.config.slots or len(self._gpu_inventory()) or 1,
                          bandwidth={tier: status["bandwidths"].get(tier) for tier in SLOWEST_FIRST},
                          capacity={tier: info["capacity"] for tier, info in tiers.items()},
                          used={tier: info["used"] for tier, info in tiers.items()},
                          gpus=self._gpu_inventory(), queue_length=len(status["queue"]), remote=status["remote"])

    def publish_node(self, loader) -> bool:
        """One heartbeat: node hash, tier model sets and queue, all expiring unless refreshed. Events kept
        through an outage go first, so a reader who sees the state they led to can also read them."""
        ttl = max(1, int(loader.config.heartbeat_ttl_s))
        k = self.keys
        try:
            self._flush_events()
            pipe = self.client.pipeline(transaction=True)
            held: dict[str, str] = {}  # model -> a tier holding it here, to republish its size if Redis lost it
            pipe.set(k.schema_version, SCHEMA_VERSION, nx=True)
            pipe.sadd(k.nodes, self.node_id)
            pipe.delete(k.node(self.node_id))
            pipe.hset(k.node(self.node_id), mapping=self.node_record(loader).to_hash())
            pipe.expire(k.node(self.node_id), ttl)
            for tier in HELD:
                key = k.node_models(self.node_id, tier)
                models = list(loader.tiers[tier].models()) if tier in loader.tiers else \
                    list(loader.gpu.status()["models"]) if loader.gpu is not None else []
                pipe.delete(key)
                if models:
                    pipe.sadd(key, *models)
                    pipe.expire(key, ttl)
                if tier != Tier.GPU:
                    held.update(dict.fromkeys(models, tier))
            # the controller adds the loads it decided to this queue too: replace only what we wrote
            queue_key = k.node_queue(self.node_id)
            queue = {f"{j['model']}@{j['tier']}": j["estimated_finish"] or time.time() for j in loader.queue_snapshot()}
            finished = self._queue_members - set(queue)
            if finished:
                pipe.zrem(queue_key, *finished)
            if queue:
                pipe.zadd(queue_key, queue)
            pipe.expire(queue_key, ttl)
            pipe.execute()
            self._queue_members = set(queue)
            self._republish_lost_models(loader, held)
        except redis.RedisError as exc:
            self.healthy = unreachable(log, self.healthy, exc)
            return False
        if not self.healthy:
            log.info("published node %s to Redis", self.node_id)
        self.healthy = True
        return True

    def _republish_lost_models(self, loader, held: dict[str, str]) -> None:
        """The size record of every model held here that Redis no longer has (a Redis restarted without its
        data): without it the controller cannot place the model, although this node holds it."""
        if not held:
            return
        names = list(held)
        exists = self.client.pipeline(transaction=False)
        for model in names:
            exists.exists(self.keys.model(model))
        for model, present in zip(names, exists.execute(), strict=True):
            if not present:
                try:
                    manifest = read_manifest(loader.tiers[held[model]].path(model))
                except (CheckpointError, OSError) as exc:  # evicted meanwhile, or damaged: staging reports it
                    log.warning("cannot republish %s: %s", model, exc)
                    continue
                self.model_info(model, manifest)

    def model_info(self, model: str, manifest) -> None:
        try:
            self.client.hset(self.keys.model(model), mapping=ModelRecord.of(manifest).to_hash())
        except redis.RedisError:
            self.healthy = False

    def event(self, kind: str, model: str, tier: str, **fields: Any) -> None:
        entry = Event(self.node_id, kind, model, tier, time.time(), fields).to_fields()
        with self._lock:
            self._pending.append(entry)
        if self.healthy:
            try:
                self._flush_events()
            except redis.RedisError:
                self.healthy = False

    def _flush_events(self) -> None:
        with self._lock:
            while self._pending:
                self.client.xadd(self.keys.events, self._pending[0], maxlen=EVENTS_MAXLEN, approximate=True)
                self._pending.popleft()

    def withdraw(self) -> None:
        """On clean shutdown: the node leaves the scheduler's view at once instead of at TTL expiry."""
        k = self.keys
        try:
            self.client.delete(k.node(self.node_id), k.node_queue(self.node_id),
                               *(k.node_models(self.node_id, t) for t in HELD))
            self.client.srem(k.nodes, self.node_id)
        except redis.RedisError:
            pass
