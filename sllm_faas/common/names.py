"""Model names: what may appear in a URL, a Redis key or a directory name."""

from __future__ import annotations

import re
import socket

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidName(ValueError):
    pass


def validate_model_name(name: object) -> str:
    """Plain names only: 1-128 of [A-Za-z0-9._-], not starting with '.', '-' or '_' (no paths, no NUL)."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or ".." in name:
        shown = repr(name)[:80]
        raise InvalidName(f"invalid model name {shown}: use 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def dns_label(text: str) -> str:
    """`text` as a Kubernetes-style id: lowercase, anything outside [a-z0-9.-] becomes '-'."""
    return re.sub(r"[^a-z0-9.-]", "-", text.lower()).strip("-.") or "localhost"


def default_node_id() -> str:
    """The node id every service assumes when none is set: the host name as an id (`My_Host` -> `my-host`)."""
    return dns_label(socket.gethostname())
