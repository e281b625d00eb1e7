"""The one way our processes open Redis, and the one way a heartbeat reports losing it.

Every client decodes replies to str and has both timeouts set: a Redis that stops answering must cost a
caller seconds, never a hung thread (the loader's publisher and a runtime's registration beat on, serving
from memory, until Redis is back).
"""

from __future__ import annotations

import logging

import redis


def connect(url: str, timeout_s: float = 2.0, decode: bool = True, health_check_interval_s: int = 0) -> redis.Redis:
    """A client for `url` (redis:// or rediss://) with connect and read timeouts of `timeout_s`; a long-lived
    pool may ask to PING connections idle for `health_check_interval_s` before reusing them."""
    return redis.Redis.from_url(url, decode_responses=decode, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s, health_check_interval=health_check_interval_s)


def unreachable(log: logging.Logger, was_healthy: bool, exc: redis.RedisError) -> bool:
    """A heartbeat's write failed: log it once, when Redis was reachable before, not every beat; returns the new
    health (False)."""
    if was_healthy:
        log.warning("Redis unavailable, serving on and retrying: %s", exc)
    return False
