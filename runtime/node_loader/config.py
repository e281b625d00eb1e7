"""Loader settings: flags over environment (SLLM_LOADER_*) over a TOML file (--config) over the defaults, all from
the one declaration below (sllm_faas/common/settings.py); README.md lists them."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sllm_faas.common import settings as common
from sllm_faas.common.names import default_node_id
from sllm_faas.common.settings import Conflict, SettingsError
from sllm_faas.redis_schema.keys import validate_node_id


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


_loader = common.prefixed("SLLM_LOADER_")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    node_id: str = _loader("node_id", "the node's name (in Kubernetes the node name)", default_node_id,
                           check=validate_node_id, shown_default="the host name as an id (My_Host: my-host)")
    remote: str = _loader("remote", "model store: a directory, or an http(s) base URL serving model folders")
    ssd_dir: str = _loader("ssd_dir", "local disk cache (the SSD tier)", check=_absolute)
    dram_dir: str = _loader("dram_dir", "host-shared DRAM tier (a tmpfs)", "/dev/shm/sllm", check=_absolute)
    ssd_budget: int = _loader("ssd_budget", "bytes the SSD tier may hold", 100 << 30, kind="size", minimum=0,
                              shown_default="100GiB")
    dram_budget: int = _loader("dram_budget", "bytes the DRAM tier may hold (at most the cgroup memory limit when the "
                               "DRAM dir is a tmpfs)", 8 << 30, kind="size", minimum=0, shown_default="8GiB")
    gpu_budget: int = _loader("gpu_budget", "bytes of GPU memory for resident models; 0: no GPU tier", 0, kind="size",
                              minimum=0)
    redis_url: str = _loader("redis_url", "the Redis it publishes the node to", common.DEFAULT_REDIS_URL)
    key_prefix: str = _loader("key_prefix", "Redis key prefix (the controller's too)", common.DEFAULT_KEY_PREFIX)
    socket_path: str = _loader("socket_path", "its Unix socket (function pods mount its directory)",
                               "/run/sllm/loader.sock")
    tcp: str | None = _loader("tcp", "also listen on HOST:PORT (needs --token, or --insecure-no-auth)", None,
                              optional=True)
    heartbeat_s: float = _loader("heartbeat_s", "seconds between node record publications", 2.0, kind="duration",
                                 above=0)
    heartbeat_ttl_s: float = _loader("heartbeat_ttl_s", "the node record expires this long after the last heartbeat",
                                     10.0, kind="duration", above=0)
    lease_ttl_s: float = _loader("lease_ttl_s", "a lease expires unless renewed within this", 30.0, kind="duration",
                                 above=0)
    probe_bytes: int = _loader("probe_bytes", "size of the start-up bandwidth probes", 64 << 20, kind="size",
                               minimum=0, shown_default="64MiB")
    slots: int = _loader("slots", "function instances this node hosts; 0: one per GPU, or 1 without GPUs", 0,
                         kind="int", minimum=0)
    stage_workers: int = _loader("stage_workers", "staging jobs run at once (different models), so one slow store "
                                 "blocks one", 2, kind="int", minimum=1)
    transfer_timeout_s: float = _loader("transfer_timeout_s", "overall deadline of one manifest read or one file "
                                        "download from the store", 3600.0, kind="duration", above=0)
    token: str | None = _loader("token", "bearer token the TCP listener requires (the Unix socket needs none)", None,
                                optional=True, secret=True)
    insecure_no_auth: bool = _loader("insecure_no_auth", "allow --tcp without a token", False, kind="bool")
    cgroup_root: str = _loader("cgroup_root", "where this process's cgroup memory limit is read", "/sys/fs/cgroup")

    def __post_init__(self) -> None:
        common.validate(self)
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise Conflict("{heartbeat_ttl_s} must be longer than {heartbeat_s}", self)
        if self.tcp and not self.token and not self.insecure_no_auth:
            raise Conflict("{tcp} needs --token (or SLLM_LOADER_TOKEN): the TCP API would be open to anyone who can "
                           "reach the port; pass --insecure-no-auth to run it without one", self)

    def to_env(self) -> str:
        return common.to_json(self)

    @classmethod
    def from_json(cls, text: str) -> LoaderConfig:
        return common.from_json(cls, text, "$SLLM_LOADER_CONFIG")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the settings below (keys as "
                        "the flag names with underscores); flags and SLLM_LOADER_* variables win over it")
    common.add_arguments(parser, LoaderConfig)


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
    from_file = {}
    if getattr(args, "config", None):
        try:
            with open(args.config, "rb") as handle:
                from_file = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"--config={args.config!r}: {exc}") from None
    return common.resolve(LoaderConfig, common.given(args, LoaderConfig), file=from_file, file_name=args.config or "")
