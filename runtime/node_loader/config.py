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

from sllm_faas.redis_schema.keys import validate_node_id


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
    stage_workers: int = 2             # staging jobs run at once (different models), so one slow store blocks one
    transfer_timeout_s: float = 3600.0  # overall deadline of one manifest read or one file download from remote
    token: str | None = None           # bearer token the TCP listener requires (the Unix socket needs none)
    insecure_no_auth: bool = False     # allow --tcp without a token
    cgroup_root: str = "/sys/fs/cgroup"  # where this process's cgroup memory limit is read

    def __post_init__(self) -> None:
        validate_node_id(self.node_id)
        for name in ("ssd_budget", "dram_budget", "gpu_budget", "probe_bytes", "slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError("heartbeat_ttl_s must be longer than heartbeat_s")
        if self.stage_workers < 1:
            raise ValueError(f"stage_workers must be >= 1, got {self.stage_workers}")
        if not self.transfer_timeout_s > 0:
            raise ValueError(f"transfer_timeout_s must be > 0, got {self.transfer_timeout_s}")
        if self.tcp and not self.token and not self.insecure_no_auth:
            raise ValueError(f"--tcp {self.tcp} needs --token (or SLLM_LOADER_TOKEN): the TCP API would be open to "
                             "anyone who can reach the port; pass --insecure-no-auth to run it without one")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoaderConfig:
        return cls(**json.loads(text))


_ENV = {f.name: f"SLLM_LOADER_{f.name.upper()}" for f in fields(LoaderConfig)}
_SIZES = {"ssd_budget", "dram_budget", "gpu_budget", "probe_bytes"}
_FLOATS = {"heartbeat_s", "heartbeat_ttl_s", "lease_ttl_s", "transfer_timeout_s"}
_INTS = {"slots", "stage_workers"}
_BOOLS = {"insecure_no_auth"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with any of the settings below (keys as the flag names "
                                          "with underscores)")
    from dataclasses import MISSING

    for f in fields(LoaderConfig):
        default = "" if f.default is MISSING else f"; default {f.default}"
        if f.name in _BOOLS:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true", default=None,
                                help=f"env {_ENV[f.name]}=1{default}")
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"env {_ENV[f.name]}{default}")


def _convert(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _SIZES:
        from sllm_faas.runtime.checkpoint.cli import parse_size

        return value if isinstance(value, int) else parse_size(str(value))
    if name in _FLOATS:
        return float(value)
    if name in _INTS:
        return int(value)
    if name in _BOOLS:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in ("1", "true", "yes", "0", "false", "no", ""):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return str(value).lower() in ("1", "true", "yes")
    return str(value)


def cgroup_memory_limit(cgroup_root: str | os.PathLike, proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors (v2 memory.max, v1
    memory.limit_in_bytes), in bytes; None when there is none ("max") or no cgroup file is readable."""
    root = Path(cgroup_root)
    hierarchies: list[tuple[Path, Path, str]] = []  # (hierarchy root, this process's directory, limit file)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            hierarchies.append((root, root / path.lstrip("/"), "memory.max"))
        elif "memory" in controllers.split(","):
            hierarchies.append((root / "memory", root / "memory" / path.lstrip("/"), "memory.limit_in_bytes"))
    limits = []
    for top, directory, name in hierarchies:
        while True:  # every ancestor's limit applies too, up to the root of the hierarchy
            try:
                text = (directory / name).read_text().strip()
            except OSError:
                text = ""  # "max" (no limit) and missing files alike
            if text.isdigit():
                limits.append(int(text))
            if directory == top or top not in directory.parents:
                break
            directory = directory.parent
    return min(limits) if limits else None


def check_dram_budget(config: LoaderConfig) -> None:
    """tmpfs pages are charged to the writer's cgroup: a DRAM tier on tmpfs bigger than this process's memory
    limit gets the loader OOM-killed while staging; refuse to start instead (ValueError naming both numbers)."""
    from sllm_faas.runtime.loader.tiers import on_memory_filesystem

    Path(config.dram_dir).mkdir(parents=True, exist_ok=True)
    if not on_memory_filesystem(config.dram_dir):
        return
    limit = cgroup_memory_limit(config.cgroup_root)
    if limit is not None and config.dram_budget > limit:
        raise ValueError(f"dram_budget {config.dram_budget} bytes exceeds this process's cgroup memory limit "
                         f"{limit} bytes (under {config.cgroup_root}); {config.dram_dir} is a tmpfs, whose pages "
                         "count against that limit: lower --dram-budget or raise the container's memory limit")


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
