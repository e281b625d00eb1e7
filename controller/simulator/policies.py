"""Placement policies compared on the same trace. Each answers one question: where does a new instance of
this model start (and, for ours, which running request moves away to make room)?

The startup-time policies do not estimate anything here: they build a `Snapshot` and call
`controller.scheduler.rank`, the code the controller runs, and take its first decision the cluster can
carry out. The others are the schedulers people run today, which look at GPU availability only.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import controller.scheduler as scheduler
from controller.simulator.cluster import Cluster, Instance, Node
from controller.simulator.config import ModelSpec

RELEASE_BANDWIDTH = 25e9  # ServerlessLLM's released scheduler assumes this for every node and tier


@dataclass(frozen=True)
class Placement:
    node: Node
    migrate: Instance | None = None  # a running instance to move off `node` first
    migrate_to: Node | None = None


class Policy:
    name = ""
    local_cache = True   # nodes keep checkpoints in DRAM and SSD after a load
    prefetch = False     # the loader starts on the decision, in parallel with the container start

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def place(self, cluster: Cluster, model: ModelSpec, now: float) -> Placement | None:
        """Where a new instance of `model` starts, or None if no node can take it now."""
        raise NotImplementedError


class RandomPolicy(Policy):
    """Availability only: any node with enough GPUs, uniformly at random."""
    name = "random"

    def place(self, cluster: Cluster, model: ModelSpec, now: float) -> Placement | None:
        able = [node for node in cluster.nodes if node.reclaimable >= model.gpus]
        return Placement(self.rng.choice(able)) if able else None


class LeastAllocated(Policy):
    """Kubernetes' default scoring (NodeResourcesFit, LeastAllocated): the node with the largest share of its
    GPUs unallocated (an idle instance still holds its GPUs); ties are broken at random, as kube-scheduler does."""
    name = "least-allocated"

    def place(self, cluster: Cluster, model: ModelSpec, now: float) -> Placement | None:
        best, best_score = [], -1.0
        for node in cluster.nodes:
            if node.reclaimable < model.gpus:
                continue
            score = node.free_gpus / node.gpus
            if score > best_score:
                best, best_score = [node], score
            elif score == best_score:
                best.append(node)
        return Placement(self.rng.choice(best)) if best else None


class KServeLike(LeastAllocated):
    """KServe on Kubernetes: the default scheduler, and every instance downloads its model from the remote
    store (the storage initializer's volume goes away with the pod)."""
    name = "kserve-like"
    local_cache = False


class Ours(Policy):
    """The scheduler core on the full picture: every node and tier, each node's measured bandwidths, its
    loading queue, and migration of running requests; the loader starts staging on the decision."""
    name = "ours"
    prefetch = True
    migration = True

    def place(self, cluster: Cluster, model: ModelSpec, now: float) -> Placement | None:
        ranked = scheduler.rank(cluster.snapshot(model, now), model.name)
        if not ranked or math.isinf(ranked[0].estimate_s):
            return None  # no node has room, so no migration destination either
        if self.migration:
            # A migration adds to the full node's own load time, so only full nodes that load faster than the
            # best free node can win one: rank again with their running instances (exact, and it keeps a
            # decision linear in the nodes even when most of a large cluster is busy).
            bound = ranked[0].estimate_s
            contenders = frozenset(d.node for d in ranked if math.isinf(d.estimate_s) and d.load_s < bound)
            if contenders:
                ranked = scheduler.rank(cluster.snapshot(model, now, contenders), model.name)
        return first_feasible(cluster, ranked, model)


class OursNoMigration(Ours):
    """Ours without live migration: what locality and calibration alone bring."""
    name = "ours-no-migration"
    migration = False


class ServerlessLLMRelease(Policy):
    """ServerlessLLM's released storage-aware scheduler (sllm 0.8): only nodes holding the checkpoint
    locally are candidates (a request waits for one of them), every tier is assumed to deliver 25 GB/s,
    migration is off (broken in that release); it does ask the loader to prefetch when it decides.
    Runs `rank` on a snapshot transformed accordingly."""
    name = "sllm-release"
    prefetch = True

    def place(self, cluster: Cluster, model: ModelSpec, now: float) -> Placement | None:
        constant = dict.fromkeys(scheduler.TIERS, RELEASE_BANDWIDTH)
        local = tuple(dataclasses.replace(cluster.node_info(node, model.gpus, now), bandwidth=constant)
                      for node in cluster.holders[model.name])
        if not local:
            return None
        ranked = scheduler.rank(scheduler.Snapshot(local, cluster.model_infos), model.name)
        return first_feasible(cluster, ranked, model)


def first_feasible(cluster: Cluster, ranked: list[scheduler.Decision], model: ModelSpec) -> Placement | None:
    """The best-ranked decision the cluster can carry out. The scheduler counts slots in units of the
    requested model's GPUs, so a migration is checked here: the moved instance needs its own GPU count at
    the destination, and the freed GPUs plus the node's spare ones must fit the new instance."""
    for decision in ranked:
        if math.isinf(decision.estimate_s):
            return None
        node = cluster.node_by_id[decision.node]
        if decision.migrate is None:
            return Placement(node)
        moved, destination = cluster.instances[decision.migrate], cluster.node_by_id[decision.migrate_to]
        if (moved.migratable and destination is not node and destination.reclaimable >= moved.gpus
                and node.reclaimable + moved.gpus >= model.gpus):
            return Placement(node, moved, destination)
    return None


POLICIES: dict[str, type[Policy]] = {policy.name: policy for policy in (
    RandomPolicy, LeastAllocated, KServeLike, ServerlessLLMRelease, Ours, OursNoMigration)}


def make_policy(name: str, seed: int) -> Policy:
    return POLICIES[name](seed)
