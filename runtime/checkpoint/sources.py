"""Where a conversion reads from: an in-memory state dict, a .safetensors file, or an HF folder.

Each source lists its tensors (name, dtype, shape) without materialising them, and hands out one
tensor at a time, so a conversion never holds the model twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sllm_faas.runtime.checkpoint.format import CheckpointError

# Files a runtime needs besides the weights; copied verbatim when present.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)
INDEX_NAME = "model.safetensors.index.json"
# safetensors header dtype -> torch dtype
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPES[_code] = getattr(torch, _name)


@dataclass
class SourceTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


@dataclass
class Source:
    tensors: list[SourceTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    aux_files: list[Path] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Source:
    """Tensors sharing storage, offset, shape and strides (tied weights) are stored once, as aliases."""
    tensors: list[SourceTensor] = []
    aliases: dict[str, str] = {}
    first_owner: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError("<state_dict>", name, f"expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type == "meta":
            raise CheckpointError("<state_dict>", name, "tensor is on the meta device and has no data")
        identity = None
        if tensor.numel():
            identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                        tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if identity in first_owner:
            aliases[name] = first_owner[identity]
            continue
        if identity is not None:
            first_owner[identity] = name
        tensors.append(SourceTensor(name, tensor.dtype, tuple(tensor.shape), lambda t=tensor: t))
    return Source(tensors, aliases, description={"kind": "state_dict"})


def _safetensors_tensors(path: Path) -> list[SourceTensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(path, "header", f"not a readable safetensors file ({exc})") from None
    entries = []
    for name in handle.keys():
        view = handle.get_slice(name)
        code = view.get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(path, name, f"unsupported safetensors dtype {code}")
        entries.append(SourceTensor(name, _SAFETENSORS_DTYPES[code], tuple(view.get_shape()),
                                    lambda n=name, h=handle: h.get_tensor(n)))
    return entries


def from_safetensors_file(path: str | os.PathLike) -> Source:
    path = Path(path)
    return Source(_safetensors_tensors(path), description={"kind": "safetensors", "path": str(path.resolve())})


def from_hf_folder(folder: str | os.PathLike) -> Source:
    """An HF model folder: sharded (with its index) or single safetensors; pickled .bin files are refused."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(index, "weight_map", f"unreadable index ({exc})") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(index, "weight_map", f"shard {shard!r} is not a plain file name")
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; re-save them as safetensors)" \
            if pickled else ""
        raise CheckpointError(folder, "weights", f"no .safetensors files{hint}")
    tensors: list[SourceTensor] = []
    seen: dict[str, str] = {}
    for shard in shards:
        for entry in _safetensors_tensors(folder / shard):
            if entry.name in seen:
                raise CheckpointError(folder / shard, entry.name, f"tensor also in {seen[entry.name]}")
            seen[entry.name] = shard
            tensors.append(entry)
    aux = [folder / name for name in AUX_FILES if (folder / name).is_file()]
    return Source(tensors, aux_files=aux,
                  description={"kind": "hf-folder", "path": str(folder.resolve()), "files": shards})


def open_source(src: str | os.PathLike) -> Source:
    path = Path(src)
    if path.is_dir():
        return from_hf_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        return from_safetensors_file(path)
    if path.exists():
        raise CheckpointError(path, "source", "expected a .safetensors file or an HF model folder")
    raise CheckpointError(path, "source", "does not exist")
