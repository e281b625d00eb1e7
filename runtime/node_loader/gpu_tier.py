"""GPU tier (GPU nodes only): models resident in GPU memory, owned by the loader and mapped by
instances through CUDA IPC, so an instance's load is an IPC import instead of a copy."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sllm_faas.runtime.checkpoint.format import read_manifest
from sllm_faas.runtime.node_loader.tiers import BudgetError


class GpuTier:
    def __init__(self, budget: int, device: str = "cuda:0") -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("gpu_budget is set but CUDA is not usable on this node")
        self.budget, self.device = budget, device
        self._lock = threading.Lock()
        self._models: dict[str, tuple[list[Any], int]] = {}  # model -> (buffers, bytes)

    def has(self, model: str) -> bool:
        with self._lock:
            return model in self._models

    @property
    def used(self) -> int:
        with self._lock:
            return sum(size for _, size in self._models.values())

    def upload(self, model: str, directory: Path, pinned: Callable[[str], bool],
               evict: Callable[[str, str], None]) -> None:
        from sllm_faas.runtime.loader.gpu import load_to_gpu

        manifest = read_manifest(directory)
        size = manifest.total_bytes
        with self._lock:
            victims = [m for m in self._models if not pinned(m)]
        while self.used + size > self.budget and victims:
            evict(victims.pop(0), "gpu")
        if self.used + size > self.budget:
            raise BudgetError(f"{model} needs {size} bytes of GPU memory; {self.budget - self.used} free")
        buffers = load_to_gpu(directory, manifest, self.device)
        with self._lock:
            self._models[model] = (buffers, size)

    def describe(self, model: str) -> dict[str, Any]:
        from sllm_faas.runtime.loader.gpu import export_ipc

        with self._lock:
            buffers, _ = self._models[model]
        return export_ipc(buffers)

    def remove(self, model: str) -> int:
        with self._lock:
            _, size = self._models.pop(model, (None, 0))
        return size

    def status(self) -> dict[str, Any]:
        with self._lock:
            models = {m: size for m, (_, size) in self._models.items()}
        return {"device": self.device, "capacity": self.budget, "used": sum(models.values()), "models": models}
