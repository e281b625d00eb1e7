"""The one JSON parser for what arrives from outside: request bodies, manifests, remote documents.

Every service parses hostile JSON through `loads` (or `request_object` for a Flask request body), so
every service refuses the same things the same way: bodies over the size limit, nesting deeper than
`MAX_DEPTH`, integers longer than Python will convert, non-finite numbers (`NaN`, `Infinity`, `1e400`)
and strings holding lone UTF-16 surrogates (they cannot be encoded back to UTF-8 later). The error
names the document and the problem; each service maps `JsonError` to its own error shape, status 400
(or 413 for size).

This module depends on nothing else of ours.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64


class JsonError(ValueError):
    """A document that is not acceptable JSON; `status` is 413 for size, 400 otherwise."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError(f"the number {text[:40]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise JsonError(f"{text} is not valid JSON")


def _check(value: Any, what: str, max_depth: int) -> None:
    """Depth and string checks, iteratively (a recursive walk would be the bug it guards against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise JsonError(f"{what} is nested deeper than {max_depth} levels")
            for key, child in item.items():
                _check_string(key, what)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise JsonError(f"{what} is nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_string(item, what)


def _check_string(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonError(f"{what} holds a string with a lone UTF-16 surrogate: {text[:40]!r}") from None


def loads(raw: bytes | str, what: str = "the JSON document", max_bytes: int | None = None,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parse `raw` as strict JSON within the limits; `what` names the document in errors."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise JsonError(f"{what} is {len(raw)} bytes; the limit is {max_bytes}", 413)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_float=_finite, parse_constant=_constant)
    except JsonError as exc:
        raise JsonError(f"{what}: {exc.message}") from None
    except RecursionError:
        raise JsonError(f"{what} is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise JsonError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # JSONDecodeError, and int() past sys.get_int_max_str_digits()
        raise JsonError(f"{what} is not valid JSON: {exc}") from None
    _check(value, what, max_depth)
    return value


def loads_object(raw: bytes | str, what: str = "the JSON document", max_bytes: int | None = None,
                 max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`loads`, and the top level must be an object."""
    value = loads(raw, what, max_bytes, max_depth)
    if not isinstance(value, dict):
        raise JsonError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def request_object(max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The current Flask request's body as a JSON object (the app's MAX_CONTENT_LENGTH bounds its size)."""
    from flask import request

    limit = request.max_content_length
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise JsonError(f"the request body is {request.content_length} bytes; the limit is {limit}", 413)
    return loads_object(request.get_data(cache=True), "the request body", limit, max_depth)
