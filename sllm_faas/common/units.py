"""Sizes ("512MiB", "4GiB", "1.5GB", a byte count) and durations ("30s", "10m", "1h30m"), parsed once for every
command, setting and label that takes one. Each parser raises ValueError naming the text and the accepted forms."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20,
               "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """'512MiB', '1GiB', '1.5GB' or a plain byte count, in bytes (K/M/G/T alone are binary, as in Kubernetes' Ki)."""
    match = _SIZE.fullmatch(text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size like 512MiB, 2GiB or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_duration(text: str) -> float:
    """Go durations as OpenFaaS labels use them ("30s", "10m", "1h30m"), in seconds; a unit is required."""
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m or 1h")
    return sum(float(amount) * _DURATION_UNITS[unit] for amount, unit in parts)


def parse_seconds(text: str) -> float:
    """A settings' duration: a plain number of seconds ("2.5", as every `*_s` setting has always taken) or a Go
    duration ("30s", "10m")."""
    try:
        value = float(text)
    except ValueError:
        try:
            return parse_duration(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a duration like 30s, 10m, 1h or a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number of seconds")
    return value
