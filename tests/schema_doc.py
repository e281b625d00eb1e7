"""Checks Redis contents against redis_schema/SCHEMA.md, so the document cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def documented_schema() -> dict[str, set[str]]:
    """Key patterns and hash fields from redis_schema/SCHEMA.md."""
    text = (ROOT / "redis_schema" / "SCHEMA.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    schema = {}
    for section in sections:
        pattern = re.match(r"`([^`]+)`", section).group(1)
        first_cells = re.findall(r"^\| (`[^|]+`) \|", section, flags=re.M)  # a field table's first column
        schema[pattern] = {field for cell in first_cells for field in re.findall(r"`([a-z_]+)`", cell)}
    return schema


def assert_keys_documented(client, prefix: str, partial_hashes: tuple[str, ...] = ("sllm:model:<model>",)) -> None:
    """Every key under `prefix` matches a documented pattern; hashes hold exactly the documented fields
    (at most, for the patterns in `partial_hashes`)."""
    schema = documented_schema()
    patterns = {re.compile("^" + re.sub(r"<[a-z]+>", "[^:]+", re.escape(p))
                           .replace("sllm:", re.escape(prefix)) + "$"): p for p in schema}
    keys = list(client.scan_iter(match=prefix + "*"))
    assert keys
    for key in keys:
        matches = [p for regex, p in patterns.items() if regex.match(key)]
        assert matches, f"undocumented key {key}"
        if client.type(key) == "hash":
            fields = set(client.hkeys(key))
            assert fields <= schema[matches[0]], f"{key}: undocumented fields {fields - schema[matches[0]]}"
            assert fields == schema[matches[0]] or matches[0] in partial_hashes, \
                f"{key}: documented fields missing: {schema[matches[0]] - fields}"
