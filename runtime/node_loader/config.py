"""Loader configuration: flags over environment (SLLM_LOADER_*) over a TOML file over defaults."""

from __future__ import annotations

import argparse
import json
import os
import socket
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from redis_schema.keys import validate_node_id


@dataclass(frozen=True)
class LoaderConfig:
    node_id: str                       # the node's name (Kubernetes node name); default: host name
    remote: str                        # model store: a directory, or an http(s) base URL serving model dirs
    ssd_dir: str                       # local disk cache
    dram_dir: str = "/dev/shm/sllm"    # host-shared DRAM tier (tmpfs)
    ssd_budget: int = 100 << 30        # bytes
    dram_budget: int = 8 << 30         # bytes
    gpu_budget: int = 0                # bytes of GPU memory for resident models; 0 = no GPU tier
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "sllm:"
    socket_path: str = "/run/sllm/loader.sock"
    tcp: str | None = None             # optional "host:port" listener (local mode)
    heartbeat_s: float = 2.0
    heartbeat_ttl_s: float = 10.0      # the node record expires this long after the last heartbeat
    lease_ttl_s: float = 30.0          # a lease expires unless renewed within this
    probe_bytes: int = 64 << 20        # size of the start-up bandwidth probes
    slots: int = 0                     # function instances this node hosts; 0 = one per GPU, or 1 without GPUs

    def __post_init__(self) -> None:
        validate_node_id(self.node_id)
        for name in ("ssd_budget", "dram_budget", "gpu_budget", "probe_bytes", "slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError("heartbeat_ttl_s must be longer than heartbeat_s")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoaderConfig:
        return cls(**json.loads(text))


_ENV = {f.name: f"SLLM_LOADER_{f.name.upper()}" for f in fields(LoaderConfig)}
_SIZES = {"ssd_budget", "dram_budget", "gpu_budget", "probe_bytes"}
_FLOATS = {"heartbeat_s", "heartbeat_ttl_s", "lease_ttl_s"}
_INTS = {"slots"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with any of the settings below (keys as the flag names "
                                          "with underscores)")
    from dataclasses import MISSING

    for f in fields(LoaderConfig):
        default = "" if f.default is MISSING else f"; default {f.default}"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"env {_ENV[f.name]}{default}")


def _convert(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _SIZES:
        from runtime.checkpoint.cli import parse_size

        return value if isinstance(value, int) else parse_size(str(value))
    if name in _FLOATS:
        return float(value)
    if name in _INTS:
        return int(value)
    return str(value)


def resolve(args: argparse.Namespace) -> LoaderConfig:
    """Flags, then SLLM_LOADER_* variables, then the --config file, then defaults."""
    from_file: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config, "rb") as handle:
            from_file = tomllib.load(handle)
        unknown = set(from_file) - set(_ENV)
        if unknown:
            raise SystemExit(f"{args.config}: unknown settings {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, env in _ENV.items():
        for candidate in (getattr(args, name, None), os.environ.get(env), from_file.get(name)):
            if candidate is not None:
                values[name] = _convert(name, candidate)
                break
    values.setdefault("node_id", socket.gethostname().lower())
    missing = [name for name in ("remote", "ssd_dir") if name not in values]
    if missing:
        raise SystemExit("sllm-faas loader: missing " + ", ".join(f"--{m.replace('_', '-')} (or {_ENV[m]})"
                                                                   for m in missing))
    values["ssd_dir"] = str(Path(values["ssd_dir"]).resolve())
    values["dram_dir"] = str(Path(values.get("dram_dir", LoaderConfig.dram_dir)).resolve())
    return LoaderConfig(**values)
