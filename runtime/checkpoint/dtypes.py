"""The torch dtype of each manifest dtype name (runtime/checkpoint/format.py's allow-list), for the code that
builds tensors: the writer and the loader's views. Kept apart so the spec itself needs no torch."""

from __future__ import annotations

import torch

from sllm_faas.runtime.checkpoint.format import DTYPE_SIZES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES if hasattr(torch, name)}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
