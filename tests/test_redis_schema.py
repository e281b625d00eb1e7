"""redis_schema is the one place that names keys and encodes and decodes records: the code elsewhere spells
no key, the records round-trip and hold exactly the fields SCHEMA.md documents, and the Lua scripts build
the same keys as the Python builders (checked in a real Redis)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from schema_doc import documented_schema

from sllm_faas.common import settings
from sllm_faas.common.tiers import FASTEST_FIRST, HELD, SLOWEST_FIRST, Tier
from sllm_faas.redis_schema.keys import ID, LUA_KEY, Keys
from sllm_faas.redis_schema.records import (
    Event,
    FunctionRecord,
    InstanceRecord,
    MigrationEvent,
    MigrationRecord,
    ModelRecord,
    NodeRecord,
    RecordError,
)

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("runtime", "controller", "sllm_faas", "benchmarks", "examples", "templates")

# A key or key segment in a string literal: the prefix, a key name followed by an id, or a sub-key.
_KEY = re.compile(r"\bsllm:(?! )|(?<![\w])(nodes?|instances?|models?|functions?|migrations?|events|schema_version"
                  r"|schema_lock):(?=$|[{\w'\"])|:models:|:(queue|slots)\b")
_KEY_TAIL = re.compile(r"(\*|nodes|instances|functions|migrations|events|schema_version|schema_lock"
                       r"|(node|instance|model|function|migration):.*)")  # what follows the prefix in a key
_DOCUMENTED_PATTERN = re.compile(r"\bsllm:[\w:]*<\w+>[\w:<>]*")  # `sllm:instance:<id>` in a help text names it


def _sources() -> list[Path]:
    """Our Python files outside redis_schema (the sllm_faas/<part> links lead to folders scanned as such)."""
    def linked(path: Path) -> bool:
        parts = path.relative_to(ROOT).parts
        return any((ROOT.joinpath(*parts[:i])).is_symlink() for i in range(1, len(parts)))
    return [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py")) if not linked(path)]


def _hand_built_keys(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if _KEY.search(_DOCUMENTED_PATTERN.sub("", node.value)):
                found.append(f"{where}: {node.value[:60]!r}")
        parts = ([node.left, node.right] if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
                 else [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
                 if isinstance(node, ast.JoinedStr) else [])
        if any(isinstance(part, (ast.Name, ast.Attribute)) and "prefix" in ast.unparse(part) for part in parts) \
                and any(_KEY_TAIL.fullmatch(part.value) for part in _constants(node)):
            found.append(f"{where}: {ast.unparse(node)[:60]} (a key built from the prefix)")
    return found


def _constants(node: ast.AST) -> list[ast.Constant]:
    parts = [node.left, node.right] if isinstance(node, ast.BinOp) else node.values
    return [part for part in parts if isinstance(part, ast.Constant) and isinstance(part.value, str)]


def test_no_module_outside_redis_schema_spells_a_key():
    sources = _sources()
    assert ROOT / "controller" / "cluster.py" in sources and not any("redis_schema" in p.parts for p in sources)
    found = [hit for path in sources for hit in _hand_built_keys(path)]
    # the default prefix is spelled once, in DEFAULT_KEY_PREFIX, where every service's settings and Keys take it
    # from (common lies below redis_schema)
    default = [hit for hit in found if hit.startswith("sllm_faas/common/settings.py:") and hit.endswith(": 'sllm:'")]
    assert len(default) == 1, default
    found.remove(default[0])
    assert found == [], "keys named outside redis_schema (use redis_schema.keys.Keys):\n" + "\n".join(found)


def test_the_scan_finds_hand_built_keys(tmp_path):
    """The scan above is not blind: each way a key used to be spelled by hand is caught, docs are not."""
    sample = tmp_path / "sample.py"
    sample.write_text('PREFIX = "sllm:"\n'
                      'LUA = "redis.call(\'HGETALL\', prefix .. \'node:\' .. node)"\n'
                      'def f(prefix, node):\n'
                      '    """Docs may name `sllm:node:<node>`."""\n'
                      '    return prefix + "events", f"{prefix}instance:{node}", "node:"\n')
    found = _hand_built_keys(sample, tmp_path)
    assert [hit.split(":")[1] for hit in found] == ["1", "2", "5", "5", "5", "5"], found


def test_tier_names_are_those_stored_and_shown():
    assert [str(t) for t in SLOWEST_FIRST] == ["remote", "ssd", "dram", "gpu"]
    assert FASTEST_FIRST == tuple(reversed(SLOWEST_FIRST)) and HELD == (Tier.SSD, Tier.DRAM, Tier.GPU)
    assert Tier.DRAM.faster_or_equal("ssd") and not Tier.SSD.faster_or_equal(Tier.DRAM)
    with pytest.raises(ValueError, match="unknown loader tier 'disk'; tiers: remote, ssd, dram, gpu"):
        Tier.parse("disk", "loader tier")
    with pytest.raises(ValueError, match="unknown tier 'remote'"):
        Keys().node_models("node-a", "remote")  # the model store is not a tier a node publishes
    assert "tier is `ssd`, `dram` or `gpu`" in (ROOT / "redis_schema" / "SCHEMA.md").read_text()


NODE = NodeRecord(node_id="node-a", address="/run/sllm/loader.sock", heartbeat_at=1795519301.523, slots=2,
                  bandwidth={Tier.REMOTE: 1.2e9, Tier.SSD: 2.48e9, Tier.DRAM: None, Tier.GPU: 2.5e10},
                  capacity={Tier.SSD: 20 << 30, Tier.DRAM: 4 << 30, Tier.GPU: 0},
                  used={Tier.SSD: 1 << 30, Tier.DRAM: 0, Tier.GPU: 0},
                  gpus=[{"index": 0, "name": "H200", "memory_total": 1, "memory_free": 1}], queue_length=1,
                  remote="dir:/models")
INSTANCE = InstanceRecord(id="smollm2-7f3a9c", node="node-a", model="smollm2", function="chat",
                          address="http://10.0.0.5:8080", state="ready", active=2, tokens=812,
                          decode_tokens_per_s=41.5, prefill_tokens_per_s=900.2, heartbeat_at=1795519305.11, slots=4,
                          started_at=1795519200.0)
MODEL = ModelRecord(size_bytes=269529088, partitions=2, format_version=1)
MIGRATION = MigrationRecord(id="m-1795527607-2c56a867", state="completed", owner="vm-1", lease_until=1795527617.052,
                            created_at=1795527607.052, updated_at=1795527609.5, request="chatcmpl-1",
                            source="http://a:8080", destination="http://b:8080", source_instance="a",
                            reason="operator", options={"threshold": 20, "release": False}, rounds=2,
                            tokens_recomputed=300, pause_s=0.0671, same_numerics=True, outcome="handed_over",
                            events=(MigrationEvent(1795527607.052, "pending", "vm-1", "created"),
                                    MigrationEvent(1795527609.5, "completed", "vm-1", "handed_over")))
FUNCTION = FunctionRecord(model="smollm2", build="/srv/build/chat", image="chat:1", env={"A": "1"},
                          labels={"com.openfaas.scale.zero": "true"}, annotations={}, created_at=1795519000.25)


@pytest.mark.parametrize(("record", "pattern"), [(NODE, "sllm:node:<node>"), (INSTANCE, "sllm:instance:<id>"),
                                                 (MODEL, "sllm:model:<model>"), (FUNCTION, "sllm:function:<name>"),
                                                 (MIGRATION, "sllm:migration:<id>")])
def test_records_round_trip_with_exactly_the_documented_fields(record, pattern):
    encoded = record.to_hash()
    assert set(encoded) == documented_schema()[pattern]
    assert all(isinstance(value, str) for value in encoded.values())
    assert type(record).from_hash(pattern, encoded) == record


def test_node_record_encodes_as_the_loader_always_published_it():
    encoded = NODE.to_hash()
    assert encoded["bw_dram"] == "" and encoded["bw_ssd"] == "2480000000" and encoded["heartbeat_at"] == \
        "1795519301.523" and encoded["schema_version"] == "2" and encoded["gpus"].startswith('[{"index": 0')
    assert NodeRecord.from_hash("k", {**encoded, "slots": ""}).slots == 1  # one per GPU when absent


def test_migration_record_leaves_unknown_outcomes_empty():
    encoded = MIGRATION.to_hash()
    assert encoded["duration_s"] == encoded["incident_at"] == encoded["error"] == "" and encoded["same_numerics"] == "1"
    assert encoded["events"].startswith('[{"t":1795527607.052,"state":"pending","by":"vm-1","detail":"created"},')
    assert MigrationRecord.from_hash("k", {**encoded, "same_numerics": ""}).same_numerics is None
    with pytest.raises(RecordError, match="k: field 'events' holds an entry without t, state, by and detail"):
        MigrationRecord.from_hash("k", {**encoded, "events": '[{"t": 1}]'})


def test_events_round_trip_with_their_kind_fields():
    event = Event("node-a", "staged", "smollm2", Tier.DRAM, 1795519238.6391, {"job": "7", "bytes": "269529088"})
    fields = event.to_fields()
    assert fields == {"node": "node-a", "kind": "staged", "model": "smollm2", "tier": "dram", "ts": "1795519238.639",
                      "job": "7", "bytes": "269529088"}
    assert Event.from_fields("1-0", fields) == Event("node-a", "staged", "smollm2", "dram", 1795519238.639,
                                                     {"job": "7", "bytes": "269529088"})
    with pytest.raises(RecordError, match="events entry 1-0: field 'tier' is missing"):
        Event.from_fields("1-0", {"node": "n", "kind": "k", "model": "m", "ts": "1"})


@pytest.mark.parametrize(("record", "field", "value", "problem"), [
    (NodeRecord, "gpus", "{}", "is not a JSON list"), (NodeRecord, "heartbeat_at", "soon", "is not a number"),
    (InstanceRecord, "state", "", "is missing"), (ModelRecord, "size_bytes", "", "is missing"),
    (FunctionRecord, "env", "[1]", "is not a JSON dict"), (FunctionRecord, "labels", "{", "is not JSON")])
def test_malformed_fields_name_key_and_field(record, field, value, problem):
    sample = {NodeRecord: NODE, InstanceRecord: INSTANCE, ModelRecord: MODEL, FunctionRecord: FUNCTION}[record]
    with pytest.raises(RecordError, match=f"^sllm:x: field '{field}' {problem}"):
        record.from_hash("sllm:x", {**sample.to_hash(), field: value})


def test_lua_builds_the_keys_python_builds(redis_ns):
    """The templates the scripts get (controller/cluster.py) give, in Redis, the keys the builders give."""
    keys = Keys(redis_ns.prefix)
    script = redis_ns.client.register_script(LUA_KEY + "return key(ARGV[1])(ARGV[2])")
    cases = [(keys.node, "node-a.zone-1"), (lambda n: keys.node_models(n, Tier.GPU), "node-a"),
             (keys.node_queue, "n1"), (keys.node_slots, "n1"), (keys.instance, "smollm2-7f3a9c"),
             (keys.model, "Qwen2.5-0.5B_instruct"), (keys.function, "chat"), (keys.migration, "m-1-2c56")]
    for build, name in cases:
        assert script(args=[build(ID), name]) == build(name)
    assert Keys().prefix == settings.DEFAULT_KEY_PREFIX == "sllm:"
