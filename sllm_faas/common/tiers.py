"""The storage tiers a checkpoint can be in, one spelling for the scheduler, the loader and Redis.

A `Tier` is a `str` (StrEnum): it compares, hashes, formats and JSON-encodes as its value, so the names
stored in Redis and shown by the APIs stay "remote", "ssd", "dram" and "gpu" (redis_schema/SCHEMA.md).
"""

from __future__ import annotations

import enum


class Tier(enum.StrEnum):
    """Where a checkpoint is, slowest first: the model store, a node's SSD, its host memory, its GPUs."""

    REMOTE = "remote"
    SSD = "ssd"
    DRAM = "dram"
    GPU = "gpu"

    @classmethod
    def parse(cls, value: object, what: str = "tier") -> Tier:
        """`value` as a Tier, or ValueError naming `what` and the accepted names."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {str(value)[:40]!r}; tiers: {', '.join(cls)}") from None

    def faster_or_equal(self, than: Tier | str) -> bool:
        return SLOWEST_FIRST.index(self) >= SLOWEST_FIRST.index(Tier(than))


SLOWEST_FIRST: tuple[Tier, ...] = (Tier.REMOTE, Tier.SSD, Tier.DRAM, Tier.GPU)
FASTEST_FIRST: tuple[Tier, ...] = SLOWEST_FIRST[::-1]
HELD: tuple[Tier, ...] = (Tier.SSD, Tier.DRAM, Tier.GPU)  # the tiers a node holds models in (and publishes)
