"""Key builders. All keys share one prefix (default "sllm:"), so deployments and tests can share a Redis."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sllm_faas.common.names import validate_model_name
from sllm_faas.common.settings import DEFAULT_KEY_PREFIX  # every setting's default prefix, spelled there once
from sllm_faas.common.tiers import HELD, Tier

SCHEMA_VERSION = 2
EVENTS_MAXLEN = 10_000


class _Placeholder(str):
    """The id slot of a key template: only this module makes one, and the key builders pass it unchecked."""


ID = _Placeholder("{id}")

# Prepended to Lua scripts that build keys of ids they read from a set: `key(template)` is a function of an
# id giving the template (`Keys.node(ID)`, `Keys.node_models(ID, "gpu")`, ..., passed in ARGV) with `{id}`
# replaced by the id (the template is split once, so each key costs one concatenation).
LUA_KEY = """
local function key(template)
  local at = string.find(template, '{id}', 1, true)
  local head, tail = string.sub(template, 1, at - 1), string.sub(template, at + 4)
  return function(id) return head .. id .. tail end
end
"""


def validate_id(value: object, what: str = "node id") -> str:
    """Node, instance, function and migration ids follow Kubernetes object names (DNS subdomains, <= 253 chars)."""
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
        raise ValueError(f"invalid {what} {str(value)[:80]!r}: use lowercase letters, digits, '-' and '.'")
    return value


def waiting_member(model: str, function: str = "", caller: str = "") -> str:
    """A member of `Keys.waiting`: one caller (a start, a pod's admission) of a function, or of `model` alone,
    that no node could place, or that waits for another model's instance to free GPUs. Never parsed back."""
    return f"{validate_model_name(model)}/{function[:253]}/{caller[:253]}"


def validate_node_id(node: object) -> str:
    return node if isinstance(node, _Placeholder) else validate_id(node, "node id")


def _checked(value: object, what: str) -> str:
    """`value` validated as an id (`what` names it), or the template placeholder `ID` as it is."""
    return value if isinstance(value, _Placeholder) else validate_id(value, what)


@dataclass(frozen=True)
class Keys:
    """Every key name. A builder called with `ID` instead of an id gives the key's template for Lua (LUA_KEY)."""

    prefix: str = DEFAULT_KEY_PREFIX

    @property
    def every(self) -> str:
        """SCAN pattern of every key under this prefix (to clear a test's or a benchmark's namespace)."""
        return f"{self.prefix}*"

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

    def node_models(self, node: str, tier: Tier | str) -> str:
        """SET of model names held in `tier` on `node`; expires with the node record."""
        if tier not in HELD:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(HELD)}")
        return f"{self.prefix}node:{validate_node_id(node)}:models:{tier}"

    def node_queue(self, node: str) -> str:
        """ZSET of the node's loading queue: member "MODEL@TIER", score = estimated finish (unix seconds)."""
        return f"{self.prefix}node:{validate_node_id(node)}:queue"

    def model(self, model: str) -> str:
        """HASH: what is known of a model wherever it is: size in bytes, partitions, format version."""
        name = model if isinstance(model, _Placeholder) else validate_model_name(model)
        return f"{self.prefix}model:{name}"

    def keepalive(self, model: str) -> str:
        """HASH: the controller's keep-alive decision for a model (keep time, warm tier, pre-stage time, node)."""
        return f"{self.prefix}keepalive:{validate_model_name(model)}"

    def node_slots(self, node: str) -> str:
        """ZSET, the node's slot ledger: member = instance id (or booking id), score = when the hold expires."""
        return f"{self.prefix}node:{validate_node_id(node)}:slots"

    @property
    def waiting(self) -> str:
        """ZSET of placement requests that wait for GPUs: member = `waiting_member(...)`, score = when it expires
        (unix seconds). Its live size is what a migration's GPU time costs (controller/placement.py)."""
        return f"{self.prefix}waiting"

    @property
    def instances(self) -> str:
        """SET of runtime instance ids that have registered (stale members are pruned by readers)."""
        return f"{self.prefix}instances"

    def instance(self, instance: str) -> str:
        """HASH: one runtime instance: node, model, address, state, load; expires when heartbeats stop."""
        return f"{self.prefix}instance:{_checked(instance, 'instance id')}"

    @property
    def functions(self) -> str:
        """SET of deployed function names (local mode gateway)."""
        return f"{self.prefix}functions"

    def function(self, name: str) -> str:
        """HASH: one deployed function: model, environment and com.openfaas.scale.* settings."""
        return f"{self.prefix}function:{_checked(name, 'function name')}"

    @property
    def migrations(self) -> str:
        """ZSET of migration ids, score = creation time (unix seconds)."""
        return f"{self.prefix}migrations"

    def migration(self, migration: str) -> str:
        """HASH: one live migration's state machine (state, source, destination, rounds, outcome)."""
        return f"{self.prefix}migration:{_checked(migration, 'migration id')}"

    @property
    def events(self) -> str:
        """STREAM of stage, evict and lease changes from every node (capped at about 10,000 entries)."""
        return f"{self.prefix}events"
