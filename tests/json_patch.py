"""RFC 6902 `add` and `replace` (the ops the webhook emits) with RFC 6901 pointers, applied to a copy.

Strict like the API server's applier (evanphx/json-patch): `replace` needs an existing target, `add` an existing
parent, and an array index must be in range."""

from __future__ import annotations

import copy


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(document: dict, patch: list[dict]) -> dict:
    document = copy.deepcopy(document)
    for op in patch:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [_unescape(t) for t in op["path"].split("/")[1:]]
        target = document
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if isinstance(target, list):
            if op["op"] == "replace":
                target[int(last)] = op["value"]
            elif last == "-":
                target.append(op["value"])
            else:
                assert 0 <= int(last) <= len(target), op
                target.insert(int(last), op["value"])
        else:
            assert op["op"] == "add" or last in target, f"replace of a missing member: {op}"
            target[last] = op["value"]
    return document
