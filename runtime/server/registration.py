"""Publishes this runtime instance to Redis, so the controller can count its slot, see its load and
reach it (for migration). Keys: redis_schema/SCHEMA.md (`sllm:instance:<id>`, `sllm:node:<node>:slots`).

Redis is a mirror: when it is down the instance keeps serving and publishes again on the next beat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from sllm_faas.common.redis_client import connect, unreachable
from sllm_faas.redis_schema.keys import Keys, validate_id, validate_node_id
from sllm_faas.redis_schema.records import InstanceRecord

log = logging.getLogger("sllm.runtime")


class InstanceRegistration:
    """Heartbeats `sllm:instance:<id>` (expires after 3 missed beats) and holds a slot in the node's ledger.

    `describe` returns the live fields of the InstanceRecord (state, model, load); it is called on every beat.
    """

    def __init__(self, settings, describe: Callable[[], dict[str, Any]]) -> None:
        self.instance_id = validate_id(settings.instance_id, "instance id (SLLM_INSTANCE_ID)")
        self.node_id = validate_node_id(settings.node_id)
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.describe = describe
        self.ttl_s = 3 * settings.heartbeat_s
        self.client = connect(settings.redis_url)
        self.healthy = False
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sllm-registration", daemon=True)

    def start(self) -> InstanceRegistration:
        self.publish()
        self._thread.start()
        return self

    def record(self) -> InstanceRecord:
        s = self.settings
        return InstanceRecord(id=self.instance_id, node=self.node_id, address=s.advertise_url,
                              function=s.function_name, started_at=self.started_at, heartbeat_at=time.time(),
                              **self.describe())

    def publish(self) -> bool:
        k, now = self.keys, time.time()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(k.instance(self.instance_id), mapping=self.record().to_hash())
            pipe.expire(k.instance(self.instance_id), self.ttl_s)
            pipe.sadd(k.instances, self.instance_id)
            pipe.zadd(k.node_slots(self.node_id), {self.instance_id: now + self.ttl_s})
            pipe.expire(k.node_slots(self.node_id), self.ttl_s + 3600)
            if self.settings.booking_id:  # the controller's hold on our slot becomes ours
                pipe.zrem(k.node_slots(self.node_id), self.settings.booking_id)
            pipe.execute()
        except redis.RedisError as exc:
            self.healthy = unreachable(log, self.healthy, exc)
            return False
        self.healthy = True
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.publish()
            except Exception:  # a bug in describe() must not stop the heartbeat (the slot would look free)
                log.exception("publishing the instance record failed")

    def withdraw(self) -> None:
        """On exit: free the slot and drop the record now rather than at expiry."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)  # a beat in flight would put the record back after the delete
        k = self.keys
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(k.instance(self.instance_id))
            pipe.srem(k.instances, self.instance_id)
            pipe.zrem(k.node_slots(self.node_id), self.instance_id)
            pipe.execute()
        except redis.RedisError:
            pass
