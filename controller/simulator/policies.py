"""Placement policies compared on the same trace. Each answers one question: where does a new instance of
this model start (and, for ours, which running request moves away to make room)?

The startup-time policies do not estimate or decide anything here: they build a `Snapshot` and take the
first decision of `sllm_faas.controller.scheduler.plans`, the decision path the controller's placement runs.
The others are the schedulers people run today, which look at GPU availability only.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import sllm_faas.controller.scheduler as scheduler
from sllm_faas.controller.simulator.cluster import Cluster, Instance, Node
from sllm_faas.controller.simulator.config import ModelSpec

RELEASE_BANDWIDTH = 25e9  # ServerlessLLM's released scheduler assumes this for every node and tier


@dataclass(frozen=True)
class Placement:
    node: Node
    migrate: Instance | None = None  # a running instance to move off `node` first
    migrate_to: Node | None = None
    wait_s: float | None = None  # wait for room on `node` (expected in this many seconds) instead of starting now
    wait_for: tuple[str, ...] = ()  # the running instances whose ends that wait counts on


class Policy:
    name = ""
    local_cache = True   # nodes keep checkpoints in DRAM and SSD after a load
    prefetch = False     # the loader starts on the decision, in parallel with the container start

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def place(self, cluster: Cluster, model: ModelSpec, now: float, claims: dict[str, int] | None = None,
              pending: int = 0) -> Placement | None:
        """Where a new instance of `model` starts, or None if no node can take it now. `claims`: running
        instance -> waiting requests that count on it (only the policies that wait look at them); `pending`: other
        requests waiting for GPUs (only the policy that migrates looks at it)."""
        raise NotImplementedError


class RandomPolicy(Policy):
    """Availability only: any node with enough GPUs, uniformly at random."""
    name = "random"

    def place(self, cluster: Cluster, model: ModelSpec, now: float, claims: dict[str, int] | None = None,
              pending: int = 0) -> Placement | None:
        able = [node for node in cluster.nodes if node.reclaimable >= model.gpus]
        return Placement(self.rng.choice(able)) if able else None


class LeastAllocated(Policy):
    """Kubernetes' default scoring (NodeResourcesFit, LeastAllocated): the node with the largest share of its
    GPUs unallocated (an idle instance still holds its GPUs); ties are broken at random, as kube-scheduler does."""
    name = "least-allocated"

    def place(self, cluster: Cluster, model: ModelSpec, now: float, claims: dict[str, int] | None = None,
              pending: int = 0) -> Placement | None:
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
    loading queue, and the running instances a slot can be freed from (by waiting for one, or migrating it);
    the loader starts staging on the decision."""
    name = "ours"
    prefetch = True
    migration = True

    def place(self, cluster: Cluster, model: ModelSpec, now: float, claims: dict[str, int] | None = None,
              pending: int = 0) -> Placement | None:
        snapshot = cluster.snapshot(now, self.migration, claims, pending, placing=model.name)
        return carry_out(cluster, scheduler.plans(snapshot, model.name))


class OursNoMigration(Ours):
    """Ours without live migration: what locality, calibration and waiting for a local slot bring."""
    name = "ours-no-migration"
    migration = False


class ServerlessLLMRelease(Policy):
    """ServerlessLLM's released storage-aware scheduler (sllm 0.8): only nodes holding the checkpoint
    locally are candidates (a request waits for one of them), every tier is assumed to deliver 25 GB/s,
    migration is off (broken in that release); it does ask the loader to prefetch when it decides.
    Runs the scheduler core on a snapshot transformed accordingly."""
    name = "sllm-release"
    prefetch = True

    def place(self, cluster: Cluster, model: ModelSpec, now: float, claims: dict[str, int] | None = None,
              pending: int = 0) -> Placement | None:
        constant = dict.fromkeys(scheduler.TIERS, RELEASE_BANDWIDTH)
        local = tuple(dataclasses.replace(cluster.node_info(node, now), bandwidth=constant)
                      for node in cluster.holders[model.name])
        if not local:
            return None
        return carry_out(cluster, scheduler.plans(scheduler.Snapshot(local, cluster.model_infos), model.name))


def carry_out(cluster: Cluster, plans: scheduler.Plans) -> Placement | None:
    """The first decision of the scheduler core's decision path (the one the controller's placement takes):
    the snapshot is exact, so whatever the core finds feasible the cluster can do."""
    decision = next(iter(plans), None)
    if decision is None or math.isinf(decision.estimate_s):
        return None
    node, action = cluster.node_by_id[decision.node], decision.action
    if action is scheduler.Action.MIGRATE_THEN_LOAD:
        return Placement(node, cluster.instances[decision.migrate], cluster.node_by_id[decision.migrate_to])
    if action is scheduler.Action.WAIT_THEN_LOAD:
        return Placement(node, wait_s=decision.wait_s, wait_for=decision.wait_for)
    return Placement(node)


POLICIES: dict[str, type[Policy]] = {policy.name: policy for policy in (
    RandomPolicy, LeastAllocated, KServeLike, ServerlessLLMRelease, Ours, OursNoMigration)}


def make_policy(name: str, seed: int) -> Policy:
    return POLICIES[name](seed)
