"""The node's GPUs as NVML reports them: what the loader publishes in its node record and `sllm-faas doctor`
prints. pynvml is optional (the `gpu` extra); without it, or without a driver, a node has no GPUs to report."""

from __future__ import annotations

from typing import Any


class NvmlUnavailable(Exception):
    """NVML cannot be asked: pynvml is not installed or the driver does not answer (the message says which)."""


def nvml_gpus() -> list[dict[str, Any]]:
    """index, name, memory_total and memory_free (bytes) of each GPU NVML sees."""
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable("pynvml not installed (pip install 'sllm-faas[gpu]')") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML unavailable: {exc}") from exc
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": index, "name": pynvml.nvmlDeviceGetName(handle),
                         "memory_total": int(memory.total), "memory_free": int(memory.free)})
    finally:
        pynvml.nvmlShutdown()
    return gpus
