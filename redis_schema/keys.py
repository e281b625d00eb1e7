"""Key builders. All keys share one prefix (default "sllm:"), so deployments and tests can share a Redis."""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.names import validate_model_name

SCHEMA_VERSION = 1
TIERS = ("gpu", "dram", "ssd")
EVENTS_MAXLEN = 10_000


def validate_node_id(node: object) -> str:
    """Node ids follow Kubernetes node names: DNS labels joined by dots, at most 253 characters."""
    if not isinstance(node, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", node):
        raise ValueError(f"invalid node id {str(node)[:80]!r}: use lowercase letters, digits, '-' and '.'")
    return node


@dataclass(frozen=True)
class Keys:
    prefix: str = "sllm:"

    @property
    def schema_version(self) -> str:
        """STRING: the schema version the data was written with."""
        return f"{self.prefix}schema_version"

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

    @property
    def events(self) -> str:
        """STREAM of stage, evict and lease changes from every node (capped at about 10,000 entries)."""
        return f"{self.prefix}events"
