"""Scenario files: a TOML description of a cluster, the models deployed on it and the requests it gets.

Every number lives in a file with its source (`scenarios/catalog.toml` for hardware, models and request
lengths; the scenario for the cluster and the workload), so a result can be traced back to its inputs.
Loading validates everything up front and names the file and field at fault.
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
CATALOG = SCENARIO_DIR / "catalog.toml"
POLICY_NAMES = ("random", "least-allocated", "kserve-like", "sllm-release", "ours", "ours-no-migration")
DEFAULT_POLICIES = ["random", "least-allocated", "kserve-like", "sllm-release", "ours"]
ARRIVALS = ("poisson", "gamma")
TRACE_DIR = Path(__file__).resolve().parent / "traces"
TRACES = {"azure-llm-2023/conv": "azure-llm-2023/AzureLLMInferenceTrace_conv.csv",  # name -> file under TRACE_DIR
          "azure-llm-2023/code": "azure-llm-2023/AzureLLMInferenceTrace_code.csv"}
GB = 10**9
BYTES_PER_PARAM = 2  # 16-bit checkpoints


class ScenarioError(ValueError):
    """A scenario that cannot be simulated; the message names the file and the field."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: float
    hbm_bytes_per_s: float
    flops: float


@dataclass(frozen=True)
class TokenLengths:
    input_mean: float
    input_cv: float
    output_mean: float
    output_cv: float
    max_tokens: int


@dataclass(frozen=True)
class NodeGroup:
    count: int
    gpus: int
    dram_cache_bytes: float
    ssd_cache_bytes: float
    bandwidth: dict[str, float]  # tier -> bytes/s from that tier into GPU memory
    bandwidth_jitter: float      # each node's bandwidths are drawn within +-jitter of these


@dataclass(frozen=True)
class ModelSpec:
    """One deployed function: its own checkpoint (a fine-tuned copy of `base`)."""
    name: str
    base: str
    size_bytes: int
    gpus: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    home_replicas: int


@dataclass(frozen=True)
class Workload:
    requests: int
    rate: float          # requests per second, whole cluster
    arrival: str         # "poisson" or "gamma"
    cv: float            # coefficient of variation of one model's inter-arrival times (gamma)
    zipf_s: float        # popularity skew across models
    lengths: TokenLengths
    sweep_rates: tuple[float, ...]
    trace: str = ""      # replay this real trace (TRACES) instead of drawing arrivals and lengths


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: Path
    seed: int
    policies: tuple[str, ...]
    gpu: GpuSpec
    node_groups: tuple[NodeGroup, ...]
    models: tuple[ModelSpec, ...]
    workload: Workload
    container_start_s: float
    keep_alive_s: float
    migration_overhead_s: float


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml") if p != CATALOG)


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name (`default`, `paper-4x4`, ...) or a TOML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = SCENARIO_DIR / f"{name_or_path}.toml"
        if str(name_or_path) not in scenario_names():
            raise ScenarioError(f"{name_or_path}: no such file, and not a built-in scenario "
                                f"(built-in: {', '.join(scenario_names())})")
        path = builtin
    return parse_scenario(_read_toml(path), path)


def parse_scenario(data: dict[str, Any], path: Path) -> Scenario:
    top = _Fields(path, "", data)
    catalog = _Catalog(path, {kind: top.raw_table(kind) for kind in ("gpus", "models", "datasets")})
    runtime, workload = top.table("runtime"), top.table("workload")
    gpu_name = runtime.choice("gpu", catalog.names("gpus"))
    gpu = _gpu(gpu_name, catalog.entry("gpus", gpu_name))
    node_groups = tuple(_node_group(group) for group in top.tables("nodes"))
    scenario = Scenario(
        name=top.string("name", default=path.stem), description=top.string("description", default=""), path=path,
        seed=top.integer("seed", default=0), policies=top.names("policies", "policy", POLICY_NAMES, DEFAULT_POLICIES),
        gpu=gpu, node_groups=node_groups, models=_models(top.tables("deploy"), catalog, gpu, runtime, node_groups),
        workload=_workload(workload, catalog), container_start_s=runtime.number("container_start_s"),
        keep_alive_s=runtime.number("keep_alive_s"), migration_overhead_s=runtime.number("migration_overhead_s"))
    for fields in (top, runtime, workload):
        fields.reject_unknown()
    _check_home_copies(scenario)
    return scenario


class _Catalog:
    """GPUs, models and datasets: the shared catalog's entries, overridden or extended by the scenario's own."""

    def __init__(self, scenario_path: Path, own: dict[str, dict[str, Any]]) -> None:
        shared = _read_toml(CATALOG)
        self.entries = {kind: {name: (CATALOG, value) for name, value in shared.get(kind, {}).items()}
                        for kind in own}
        for kind, table in own.items():
            self.entries[kind].update({name: (scenario_path, value) for name, value in table.items()})

    def names(self, kind: str) -> list[str]:
        return list(self.entries[kind])

    def entry(self, kind: str, name: str) -> _Fields:
        """The entry's fields, reporting errors against the file it came from; every entry cites a source."""
        path, value = self.entries[kind][name]
        fields = _Fields(path, f"{kind}.{name}.", value)
        fields.string("source")
        return fields


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc


_REQUIRED = object()


class _Fields:
    """Typed, checked access to one TOML table; remembers which keys were read to reject typos."""

    def __init__(self, path: Path, where: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ScenarioError(f"{path}: {where}: expected a table")
        self.path, self.where, self.data, self.used = path, where, table, set()

    def error(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.path}: {self.where}{key}: {problem}")

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise self.error(key, "missing")
        return default

    def number(self, key: str, default: Any = None, positive: bool = False) -> float:
        """A finite number >= 0 (> 0 if `positive`); required unless a default is given."""
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(key, f"expected a number, got {value!r}")
        if value < 0 or (positive and value == 0):
            raise self.error(key, f"must be {'> 0' if positive else '>= 0'}, got {value}")
        return float(value)

    def integer(self, key: str, default: Any = None, minimum: int = 0) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def string(self, key: str, default: Any = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return value

    def choice(self, key: str, known: Any, default: Any = None) -> str:
        value = self.string(key, default)
        if value not in known:
            raise self.error(key, f"unknown {key} {value!r} (known: {', '.join(sorted(known))})")
        return value

    def numbers(self, key: str) -> tuple[float, ...]:
        values = self._get(key, [])
        if not isinstance(values, list):
            raise self.error(key, f"expected a list of numbers, got {values!r}")
        items = _Fields(self.path, f"{self.where}{key}", {f"[{i}]": value for i, value in enumerate(values)})
        return tuple(items.number(index, positive=True) for index in items.data)

    def names(self, key: str, what: str, known: tuple[str, ...], default: list[str]) -> tuple[str, ...]:
        values = self._get(key, default)
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise self.error(key, f"expected a non-empty list of names, got {values!r}")
        for value in values:
            if value not in known:
                raise self.error(key, f"unknown {what} {value!r} (known: {', '.join(known)})")
        return tuple(values)

    def table(self, key: str) -> _Fields:
        return _Fields(self.path, f"{self.where}{key}.", self._get(key, _REQUIRED))

    def raw_table(self, key: str) -> dict[str, Any]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "expected a table")
        return value

    def tables(self, key: str) -> list[_Fields]:
        """An array of tables (`[[key]]`), each checked for unknown keys once read."""
        values = self._get(key, _REQUIRED)
        if not isinstance(values, list) or not values:
            raise self.error(key, "expected one or more [[" + key + "]] tables")
        return [_Fields(self.path, f"{self.where}{key}[{i}].", value) for i, value in enumerate(values)]

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], f"unknown field (known here: {', '.join(sorted(self.used))})")



def _gpu(name: str, fields: _Fields) -> GpuSpec:
    spec = GpuSpec(name, fields.number("memory_gb", positive=True) * GB,
                   fields.number("hbm_gb_per_s", positive=True) * GB, fields.number("tflops", positive=True) * 1e12)
    fields.reject_unknown()
    return spec


def _node_group(fields: _Fields) -> NodeGroup:
    group = NodeGroup(
        count=fields.integer("count", minimum=1), gpus=fields.integer("gpus", minimum=1),
        dram_cache_bytes=fields.number("dram_cache_gb") * GB, ssd_cache_bytes=fields.number("ssd_cache_gb") * GB,
        bandwidth={tier: fields.number(f"{tier}_gb_per_s", positive=True) * GB for tier in ("dram", "ssd", "remote")},
        bandwidth_jitter=fields.number("bandwidth_jitter", default=0.0))
    if group.bandwidth_jitter >= 1:
        raise fields.error("bandwidth_jitter", f"must be < 1, got {group.bandwidth_jitter}")
    fields.reject_unknown()
    return group


def _models(deploys: list[_Fields], catalog: _Catalog, gpu: GpuSpec, runtime: _Fields,
            node_groups: tuple[NodeGroup, ...]) -> tuple[ModelSpec, ...]:
    """Each [[deploy]] entry becomes `copies` functions named base#i; GPU count and speeds follow from the GPU."""
    weights_fraction = runtime.number("weights_fraction", positive=True)
    prefill_mfu, decode_mbu = runtime.number("prefill_mfu", positive=True), runtime.number("decode_mbu", positive=True)
    most_gpus = max(group.gpus for group in node_groups)
    models: list[ModelSpec] = []
    copies_of: dict[str, int] = {}  # copies named so far per base: several entries may deploy one base
    for deploy in deploys:
        base = deploy.choice("model", catalog.names("models"))
        spec = catalog.entry("models", base)
        params = spec.number("params_b", positive=True) * 1e9
        spec.reject_unknown()
        size = int(params * BYTES_PER_PARAM)
        gpus = _gpus_needed(size, gpu.memory_bytes * weights_fraction)
        if gpus > most_gpus:
            raise deploy.error("model", f"{base} needs {gpus} x {gpu.name} GPUs for its weights, and no node has "
                                        f"more than {most_gpus}")
        copies, replicas = deploy.integer("copies", default=1, minimum=1), deploy.integer("home_replicas", default=1)
        deploy.reject_unknown()
        for copy in range(copies_of.get(base, 0), copies_of.get(base, 0) + copies):
            models.append(ModelSpec(
                name=f"{base}#{copy}", base=base, size_bytes=size, gpus=gpus,
                # prefill is compute-bound: 2 FLOPs per parameter per token
                prefill_tokens_per_s=prefill_mfu * gpu.flops * gpus / (2 * params),
                # one stream's decode is memory-bound: every token reads all the weights once
                decode_tokens_per_s=decode_mbu * gpu.hbm_bytes_per_s * gpus / size,
                home_replicas=replicas))
        copies_of[base] = copies_of.get(base, 0) + copies
    return tuple(models)


def _gpus_needed(weights: int, per_gpu: float) -> int:
    """Smallest power of two (tensor parallelism splits heads evenly) whose memory holds the weights."""
    gpus = 1
    while gpus * per_gpu < weights:
        gpus *= 2
    return gpus


def _workload(fields: _Fields, catalog: _Catalog) -> Workload:
    spec = catalog.entry("datasets", fields.choice("dataset", catalog.names("datasets")))
    lengths = TokenLengths(spec.number("input_mean", positive=True), spec.number("input_cv"),
                           spec.number("output_mean", positive=True), spec.number("output_cv"),
                           spec.integer("max_tokens", minimum=1))
    spec.reject_unknown()
    arrival = fields.choice("arrival", ARRIVALS, default="gamma")
    trace = fields.choice("trace", ["", *TRACES], default="")
    return Workload(requests=fields.integer("requests", minimum=1), rate=fields.number("rate", positive=True),
                    arrival=arrival, cv=fields.number("cv", default=1.0, positive=True),
                    zipf_s=fields.number("zipf_s", default=1.0), lengths=lengths,
                    sweep_rates=fields.numbers("sweep_rates"), trace=trace)


@dataclass(frozen=True)
class NodeSpec:
    id: str
    gpus: int
    dram_cache_bytes: float
    ssd_cache_bytes: float
    bandwidth: dict[str, float]


def expand_nodes(scenario: Scenario) -> tuple[NodeSpec, ...]:
    """One spec per node, n0, n1, ...; jittered bandwidths are drawn from the scenario's seed, so every
    policy runs on the same machines."""
    rng = random.Random(scenario.seed)
    nodes = []
    for group in scenario.node_groups:
        for _ in range(group.count):
            bandwidth = {tier: rate * rng.uniform(1 - group.bandwidth_jitter, 1 + group.bandwidth_jitter)
                         for tier, rate in group.bandwidth.items()}
            nodes.append(NodeSpec(f"n{len(nodes)}", group.gpus, group.dram_cache_bytes, group.ssd_cache_bytes,
                                  bandwidth))
    return tuple(nodes)


def home_nodes(nodes: tuple[NodeSpec, ...], model: ModelSpec, index: int) -> list[NodeSpec]:
    """Where deployment put the checkpoint of the index-th model: consecutive nodes that can run it,
    starting at index, so home copies spread evenly."""
    able = [node for node in nodes if node.gpus >= model.gpus]
    return [able[(index + k) % len(able)] for k in range(min(model.home_replicas, len(able)))]


def _check_home_copies(scenario: Scenario) -> None:
    """Deployed checkpoints are pinned on their home nodes' SSDs: they must fit there."""
    nodes = expand_nodes(scenario)
    pinned = dict.fromkeys((node.id for node in nodes), 0.0)
    for index, model in enumerate(scenario.models):
        for node in home_nodes(nodes, model, index):
            pinned[node.id] += model.size_bytes
    for node in nodes:
        if pinned[node.id] > node.ssd_cache_bytes:
            raise ScenarioError(f"{scenario.path}: nodes: node {node.id} holds {pinned[node.id] / GB:.0f} GB of home "
                                f"copies but its ssd_cache_gb is {node.ssd_cache_bytes / GB:.0f}")
