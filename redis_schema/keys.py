"""Key builders. All keys share one prefix (default "sllm:"), so deployments and tests can share a Redis."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sllm_faas.common.names import validate_model_name

SCHEMA_VERSION = 2
TIERS = ("gpu", "dram", "ssd")
EVENTS_MAXLEN = 10_000


def validate_id(value: object, what: str = "node id") -> str:
    """Node, instance, function and migration ids follow Kubernetes object names (DNS subdomains, <= 253 chars)."""
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
        raise ValueError(f"invalid {what} {str(value)[:80]!r}: use lowercase letters, digits, '-' and '.'")
    return value


def validate_node_id(node: object) -> str:
    return validate_id(node, "node id")


@dataclass(frozen=True)
class Keys:
    prefix: str = "sllm:"

    @property
    def schema_version(self) -> str:
        """STRING: the schema version the data was written with."""
        return f"{self.prefix}schema_version"

    @property
    def schema_lock(self) -> str:
        """STRING: held while one process upgrades the data to a newer schema version."""
        return f"{self.prefix}schema_lock"

    @property
    def nodes(self) -> str:
        """SET of node ids that have published a record (stale members are pruned by readers)."""
        return f"{self.prefix}nodes"

    def node(self, node: str) -> str:
        """HASH: one node's capacities, usage, bandwidths and heartbeat; expires when heartbeats stop."""
        return f"{self.prefix}node:{validate_node_id(node)}"

    def node_models(self, node: str, tier: str) -> str:
        """SET of model names held in `tier` on `node`; expires with the node record."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        return f"{self.prefix}node:{validate_node_id(node)}:models:{tier}"

    def node_queue(self, node: str) -> str:
        """ZSET of the node's loading queue: member "MODEL@TIER", score = estimated finish (unix seconds)."""
        return f"{self.prefix}node:{validate_node_id(node)}:queue"

    def model(self, model: str) -> str:
        """HASH: what is known of a model wherever it is: size in bytes, partitions, format version."""
        return f"{self.prefix}model:{validate_model_name(model)}"

    def node_slots(self, node: str) -> str:
        """ZSET, the node's slot ledger: member = instance id (or booking id), score = when the hold expires."""
        return f"{self.prefix}node:{validate_node_id(node)}:slots"

    @property
    def instances(self) -> str:
        """SET of runtime instance ids that have registered (stale members are pruned by readers)."""
        return f"{self.prefix}instances"

    def instance(self, instance: str) -> str:
        """HASH: one runtime instance: node, model, address, state, load; expires when heartbeats stop."""
        return f"{self.prefix}instance:{validate_id(instance, 'instance id')}"

    @property
    def functions(self) -> str:
        """SET of deployed function names (local mode gateway)."""
        return f"{self.prefix}functions"

    def function(self, name: str) -> str:
        """HASH: one deployed function: model, environment and com.openfaas.scale.* settings."""
        return f"{self.prefix}function:{validate_id(name, 'function name')}"

    @property
    def migrations(self) -> str:
        """ZSET of migration ids, score = creation time (unix seconds)."""
        return f"{self.prefix}migrations"

    def migration(self, migration: str) -> str:
        """HASH: one live migration's state machine (state, source, destination, rounds, outcome)."""
        return f"{self.prefix}migration:{validate_id(migration, 'migration id')}"

    @property
    def events(self) -> str:
        """STREAM of stage, evict and lease changes from every node (capped at about 10,000 entries)."""
        return f"{self.prefix}events"
