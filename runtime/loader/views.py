"""Turn partition buffers into named tensors: views, never copies."""

from __future__ import annotations

import torch

from sllm_faas.runtime.checkpoint.dtypes import DTYPES
from sllm_faas.runtime.checkpoint.format import Manifest


def tensor_views(manifest: Manifest, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor is a view into its partition's buffer; an alias is the very same tensor object."""
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in manifest.tensors.items():
        raw = buffers[entry.partition][entry.offset:entry.offset + entry.nbytes]
        tensors[name] = raw.view(DTYPES[entry.dtype]).reshape(entry.shape)
    for alias, target in manifest.aliases.items():
        tensors[alias] = tensors[target]
    return tensors
