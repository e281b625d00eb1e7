"""Placement: rank the nodes for a model (controller/scheduler.py), book the best one that still has a
slot (controller/booking.py), and tell its loader to start staging at once, so the model moves toward
the fast tier while the platform is still creating the container.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from sllm_faas.common.names import validate_model_name
from sllm_faas.common.tiers import Tier
from sllm_faas.controller.booking import Booker, NodeGone
from sllm_faas.controller.cluster import ClusterCache
from sllm_faas.controller.scheduler import Decision, ModelInfo, Snapshot, plans, rank
from sllm_faas.redis_schema.keys import EVENTS_MAXLEN, Keys, waiting_member
from sllm_faas.redis_schema.records import Event, ModelRecord
from sllm_faas.runtime.node_loader.client import LoaderClient

log = logging.getLogger("sllm.controller")

WAITING_TTL_S = 30.0  # a refused caller counts as waiting for GPUs this long after its last refusal


class UnknownModel(LookupError):
    """No size is known for the model: no loader has seen it and the model store does not hold it."""


class NoCapacity(RuntimeError):
    """Every node is full and no migration can free a slot."""


@dataclass(frozen=True)
class Placement:
    model: str
    decision: Decision
    booking: str | None               # slot booking id the instance takes over (SLLM_BOOKING_ID)
    staging: str | None               # "MODEL@TIER" the node's loader was asked to stage, if any
    loader: str = ""                  # the node loader's address (its node record's `address`)
    ranked: list[Decision] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model": self.model, **self.decision.plan().as_json(), "booking": self.booking, "staging": self.staging,
                "loader": self.loader}


def target_tier(gpu_capacity: int) -> Tier:
    """Where instances on a node read weights from: its GPU tier when it has one, else host DRAM."""
    return Tier.GPU if gpu_capacity > 0 else Tier.DRAM


class Placer:
    def __init__(self, client: redis.Redis, keys: Keys, cache: ClusterCache, booker: Booker,
                 model_store: str | None = None, loader_timeout_s: float = 5.0, loader_token: str = "") -> None:
        self.client, self.keys, self.cache, self.booker = client, keys, cache, booker
        self.store = None
        if model_store:
            from sllm_faas.runtime.node_loader.store import open_store

            self.store = open_store(model_store)
        self.loader_timeout_s, self.loader_token = loader_timeout_s, loader_token
        self._kicks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sllm-stage-kick")
        self._ids = random.Random(os.urandom(16))  # booking ids: unique across controllers, no syscall each
        self.on_kick_failure: Callable[[], None] = lambda: None  # the service counts them (a Prometheus counter)
        self._last_priced: tuple[Snapshot, int, Snapshot] | None = None  # (read's snapshot, pending, repriced)

    # -- estimates (no side effects) ------------------------------------------------------------
    def model_info(self, model: str, size_hint: int | None = None) -> ModelInfo:
        validate_model_name(model)
        snapshot = self.cache.view().snapshot
        if model in snapshot.models:
            return snapshot.models[model]
        size = self.client.hget(self.keys.model(model), "size_bytes")
        if size is None and self.store is not None:
            size = self._size_from_store(model)
        if size is None:
            size = size_hint
        if size is None:
            raise UnknownModel(f"model {model!r}: size unknown: no node loader has staged it"
                               + (f" and the model store {self.store.describe()} does not hold it" if self.store
                                  else " and no --model-store is configured") + "; pass size_bytes")
        return ModelInfo(model, int(size))

    def _size_from_store(self, model: str) -> int | None:
        from sllm_faas.runtime.checkpoint.format import CheckpointError, parse_manifest
        from sllm_faas.runtime.node_loader.store import StoreError

        try:
            manifest = parse_manifest(self.store.read_manifest(model), f"{self.store.describe()}/{model}")
        except (StoreError, CheckpointError, OSError):
            return None
        self.client.hset(self.keys.model(model), mapping=ModelRecord.of(manifest).to_hash())
        return manifest.total_bytes

    def _snapshot_with(self, model: str, size_hint: int | None) -> Snapshot:
        info = self.model_info(model, size_hint)
        snapshot = self.cache.view().snapshot
        return snapshot if model in snapshot.models else self.cache.add_model(info)

    def estimate(self, model: str, size_hint: int | None = None, booked_node: str | None = None,
                 demand: str | None = None) -> list[Decision]:
        """Every node, ranked (the extender and `sllm-faas place` show them all). `booked_node`: the node
        whose slot the asking pod already holds (booked by the webhook), so that slot counts as free to it.
        `demand`: the asking caller's member of `Keys.waiting`, not counted among those who price its migrations."""
        snapshot = self._priced_for(model, size_hint, demand)
        own = snapshot.node_by_id.get(booked_node or "")
        if own is not None:
            snapshot = snapshot.updated(nodes={own.id: dataclasses.replace(own, free_slots=own.free_slots + 1)})
        return rank(snapshot, model)

    # -- decisions (book + stage) -------------------------------------------------------------
    def place(self, model: str, *, size_hint: int | None = None, candidates: set[str] | None = None,
              book_slot: bool = True, owner: str = "", caller: str = "") -> Placement:
        """Book the best node that still has a slot and start staging there; try the next best when a
        concurrent decision took the slot first. `book_slot=False` only prefetches (scale-up alerts). A plan
        that migrates an instance away first books nothing: the slot frees when that instance hands over
        (the caller runs the migration, controller/migration.py).

        A `caller` (of function `owner`) that is refused, or told to wait for another model's instance, is kept
        in `Keys.waiting` until it is placed or WAITING_TTL_S passes without a new refusal; every decision prices
        a migration's GPU time by the other callers there (the scheduler's `pending`), as the simulator prices
        it by the requests that wait for GPUs. Callers that name no `caller` count once per function."""
        began = time.monotonic()
        demand = waiting_member(model, owner, caller) if book_slot else None
        placement = self._place_on_view(model, size_hint, candidates, book_slot, owner, demand)
        if placement is None and self.cache.may_have_freed(began):
            # Our bookings since the last read count as taken, but another worker may have given them back:
            # refuse only on a read that began after them (one such read serves every refusal waiting on it).
            self.cache.refresh(unless_since=began)
            placement = self._place_on_view(model, size_hint, candidates, book_slot, owner, demand)
        if demand is not None and (placement is None or self._waits_for_gpus(model, placement.decision)):
            self.note_waiting([demand])
        if placement is None:
            raise NoCapacity(f"model {model!r}: no node has a free slot"
                             + (" among the candidates" if candidates is not None else "")
                             + " and no running instance can be migrated to free one")
        return placement

    def note_waiting(self, members: list[str]) -> None:
        """Count these callers as waiting for GPUs (members of `Keys.waiting`) for the next WAITING_TTL_S."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(self.keys.waiting, "-inf", now)
        pipe.zadd(self.keys.waiting, dict.fromkeys(members, now + WAITING_TTL_S))
        pipe.execute()

    def track_waiting(self, model: str, best: Decision | None, demand: str) -> None:
        """A caller that asks again (a pod the scheduler retries) with `best`, its best plan on the nodes it may
        run on: while that is none, infeasible or a wait for GPUs, it stays counted among the waiting callers for
        another WAITING_TTL_S; once a node can take it, it no longer waits."""
        if best is None or not best.feasible or self._waits_for_gpus(model, best):
            self.note_waiting([demand])
        else:
            self.client.zrem(self.keys.waiting, demand)

    def _waits_for_gpus(self, model: str, decision: Decision) -> bool:
        """Whether a plan waits for another model's (or a gone) instance to free GPUs, rather than for an instance
        of `model` that serves the caller next."""
        instances = self.cache.view().instances
        return any(i not in instances or instances[i].model != model for i in decision.wait_for)

    def _priced(self, snapshot: Snapshot, pending: int) -> Snapshot:
        """`snapshot` with `pending` callers waiting besides the one deciding: a caller already waiting sees one
        fewer than the read counted. Kept per read, so its migration options are priced once, not per retry."""
        if pending == snapshot.pending:
            return snapshot
        last = self._last_priced
        if last is not None and last[0] is snapshot and last[1] == pending:
            return last[2]
        priced = snapshot.updated(pending=pending)
        self._last_priced = (snapshot, pending, priced)
        return priced

    def _priced_for(self, model: str, size_hint: int | None, demand: str | None) -> Snapshot:
        """The cached view's snapshot, with `model` in it, priced by the waiting callers other than `demand`."""
        snapshot = self._snapshot_with(model, size_hint)
        view = self.cache.view()
        return self._priced(snapshot, view.snapshot.pending - (demand in view.waiting))

    def _place_on_view(self, model: str, size_hint: int | None, candidates: set[str] | None, book_slot: bool,
                       owner: str, demand: str | None) -> Placement | None:
        """One pass of `place` over the cached view's plans: the first that books (or needs no booking), or None.
        `demand`: the caller's member of `Keys.waiting`, if any (not one of the others it waits among)."""
        snapshot = self._priced_for(model, size_hint, demand)
        view = self.cache.view()
        options = plans(snapshot, model)  # the simulator takes its decisions from the same path
        for decision in options:
            if candidates is not None and decision.node not in candidates:
                continue
            record = view.nodes.get(decision.node)
            if record is None:
                continue
            tier = target_tier(record.capacity.get(Tier.GPU, 0))
            staging = None if decision.tier in (Tier.GPU, tier) else f"{model}@{tier}"
            # an unmeasured bandwidth makes the estimate infinite: queue it as the hold time, not forever
            finish_at = time.time() + min(decision.estimate_s, self.booker.hold_s)
            booking = None
            placed = demand if demand is not None and not self._waits_for_gpus(model, decision) else None
            if book_slot and not (decision.migrate or decision.wait_for):
                booking_id = f"b-{self._ids.getrandbits(64):016x}"
                try:
                    held = self.booker.book(decision.node, booking_id, staging, finish_at,
                                            event=self._event(model, decision, booking_id, owner), placed=placed)
                except NodeGone:
                    continue
                if held is None:
                    continue
                booking = booking_id
                self.cache.note_booking(decision.node, booking_id, finish_at)
            else:  # a prefetch, or a slot that a migration frees: nothing to book yet, stage anyway
                pipe = self.client.pipeline()
                if staging:
                    pipe.zadd(self.keys.node_queue(decision.node), {staging: finish_at}, nx=True)
                if placed:
                    pipe.zrem(self.keys.waiting, placed)
                pipe.xadd(self.keys.events, self._event(model, decision, "", owner), maxlen=EVENTS_MAXLEN,
                          approximate=True)
                pipe.execute()
            if staging:
                self._kicks.submit(self._kick, record.address, model, tier)
            return Placement(model, decision, booking, staging, record.address, options.ranked)
        return None

    def _event(self, model: str, decision: Decision, booking: str, owner: str) -> dict[str, str]:
        plan = decision.plan()
        return Event(decision.node, "placed", model, decision.tier, time.time(),
                     {"booking": booking, "estimate_s": str(plan.estimate_s), "plan": json.dumps(plan.as_json()),
                      "owner": owner}).to_fields()

    def _kick(self, address: str, model: str, tier: str) -> None:
        """Ask the node's loader to stage; failures are logged and counted, the instance stages on start."""
        if not address:
            return
        try:
            LoaderClient(address, timeout=self.loader_timeout_s, token=self.loader_token or None).stage(model, tier)
        except Exception as exc:  # runs in a pool: a failure must be counted and logged, never swallowed
            self.on_kick_failure()
            log.warning("could not start staging %s on %s: %s", model, address, exc)

