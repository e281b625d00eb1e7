"""Where the local cluster keeps its files: the cache root (model store, gateway tokens) and each gateway's
admin-token file. Shared by `sllm-faas up`, which writes the token, and the verbs that read it."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit


def cache_root() -> Path:
    """$SLLM_FAAS_CACHE, else ~/.cache/sllm-faas: the model store and the gateways' admin tokens."""
    return Path(os.environ.get("SLLM_FAAS_CACHE") or Path.home() / ".cache" / "sllm-faas")


def token_path(gateway: str) -> Path:
    """Where `sllm-faas up` leaves the admin token of the gateway at `gateway` (mode 0600, removed when it
    stops), so that `sllm-faas deploy` finds it without being told."""
    url = urlsplit(gateway)
    return cache_root() / "gateways" / f"{url.hostname}_{url.port or 80}.token"
