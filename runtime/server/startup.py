"""The cold start of a function instance, step by step, with the time each step took.

1. find the model (ask the node loader to stage and lease it, when one is configured);
2. map/read the weights from the fastest tier that holds them;
3. build the decoder skeleton (meta device, no init) and assign the weights; the tokenizer is the one a
   pooled runtime's zygote preloaded when it is the same files (runtime/server/zygote.py);
4. warming: one forward pass;
and only then report ready. `on_phase` hears "loading" and then "warming" (/_/ready says which, and a held
stream's progress comments show it).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from sllm_faas.common.names import validate_model_name
from sllm_faas.runtime.checkpoint.format import MANIFEST_NAME, CheckpointError

log = logging.getLogger("sllm.runtime")


def process_start_time(pid: int | None = None) -> float:
    """Wall-clock time at which `pid` was created, from the kernel's record in /proc.

    Computed as now minus the process's age on the boot-time clock (both in ticks since boot), so
    it is precise to a clock tick; /proc/stat's btime alone is rounded to whole seconds.
    """
    import time

    with open(f"/proc/{pid or os.getpid()}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), after "pid (comm)"
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot)


@dataclass
class ColdStart:
    """Seconds per step; the tier is where the weights came from (gpu, dram, ssd)."""

    process_start_to_ready_s: float = 0.0
    imports_s: float = 0.0
    staging_wait_s: float = 0.0
    load_s: float = 0.0
    build_s: float = 0.0
    warming_s: float = 0.0   # the warm-up forward
    tier: str = "unknown"
    start: str = "spawn"     # or "pool": a pre-warmed runtime assigned to this function (runtime/server/zygote.py)
    decoder: str = "native"  # or "transformers fallback (why)": runtime/model/fallback.py
    tokenizer: str = "read"  # or "preloaded": by the pool's zygote (runtime/server/zygote.py `prepare`)

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def log_line(self) -> str:
        return (f"cold start: start={self.start} tier={self.tier} decoder={self.decoder} tokenizer={self.tokenizer} "
                f"total={self.process_start_to_ready_s:.3f}s imports={self.imports_s:.3f}s "
                f"staging_wait={self.staging_wait_s:.3f}s load={self.load_s:.3f}s build={self.build_s:.3f}s "
                f"warming={self.warming_s:.3f}s")


def resolve_model_dir(model: str, model_store: str) -> Path:
    """A checkpoint directory, or a plain model name looked up under the model store."""
    if not model:
        raise CheckpointError("SLLM_MODEL", "model", "no model given: sllm-faas serve MODEL_DIR_OR_NAME")
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return path
    if os.sep in model or model.startswith("."):
        raise CheckpointError(path, "manifest", "not a checkpoint directory (convert it with `sllm-faas convert`)")
    return Path(model_store) / validate_model_name(model)


@dataclass
class LoadedModel:
    engine: object  # sllm_faas.runtime.model.engine.Engine (imported lazily: torch is part of the timed cold start)
    tokenizer: object
    name: str
    directory: Path
    cold_start: ColdStart
    lease: object = None  # sllm_faas.runtime.node_loader.client.LeaseKeeper while a node loader pins the model


def stage_with_loader(settings) -> tuple[Path, str, object]:
    """Ask the node loader to bring the model to the fast tier and pin it; returns (path, tier it came
    from, lease keeper). The model must then be given by name, not by path."""
    from sllm_faas.runtime.node_loader.client import LeaseKeeper, LoaderClient

    name = validate_model_name(settings.model)
    client = LoaderClient(settings.loader_socket)
    came_from = client.where(name)["tier"]
    client.stage_and_wait(name, settings.loader_tier)
    keeper = LeaseKeeper(client, client.lease(name, f"{socket.gethostname()}/{os.getpid()}"))
    where = client.where(name)
    return Path(where["path"]), came_from, keeper


def start_model(settings, process_started: float, on_finish=None, on_phase=None) -> LoadedModel:
    """Run the cold-start steps and return a warmed-up engine with the breakdown of where time went; a pooled
    runtime's steps count from its assignment (SLLM_POOL_ASSIGNED_AT), not from its process's creation."""
    import time

    import torch

    from sllm_faas.runtime.loader import load, source_tier
    from sllm_faas.runtime.model.engine import Engine
    from sllm_faas.runtime.model.fallback import build_model
    from sllm_faas.runtime.model.tokenizer import Tokenizer

    torch.set_num_threads(settings.torch_threads)
    report = ColdStart()
    if os.environ.get("SLLM_POOL_ASSIGNED_AT"):  # a pooled runtime: timed from its assignment, imports done
        process_started, report.start = float(os.environ["SLLM_POOL_ASSIGNED_AT"]), "pool"
    mark = time.time()
    report.imports_s = mark - process_started
    phase = on_phase or (lambda name: None)
    phase("loading")

    lease = None
    if settings.loader_socket:
        directory, report.tier, lease = stage_with_loader(settings)
    else:
        directory = resolve_model_dir(settings.model, settings.model_store)
        report.tier = source_tier(directory)
    now = time.time()
    report.staging_wait_s, mark = now - mark, now
    state = load(directory)
    now = time.time()
    report.load_s, mark = now - mark, now

    tokenizer = Tokenizer.load(directory, settings.chat_template)
    report.tokenizer = "preloaded" if tokenizer.preloaded else "read"
    model, report.decoder = build_model(directory, state)
    engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_seq=settings.max_seq, on_finish=on_finish)
    engine.start()
    now = time.time()
    report.build_s, mark = now - mark, now

    phase("warming")
    engine.warm_up()
    now = time.time()
    report.warming_s = now - mark
    report.process_start_to_ready_s = now - process_started
    name = settings.served_name or directory.resolve().name
    log.info("%s", report.log_line())
    return LoadedModel(engine, tokenizer, name, directory, report, lease)
