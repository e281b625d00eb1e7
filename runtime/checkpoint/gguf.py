"""GGUF files as a conversion input: dequantised by transformers into an HF folder, then converted from it.

transformers reads GGUF's tensors, config and tokenizer (its chat template included) and maps names to
its own; going through it keeps one GGUF reader in the project. The intermediate folder is hidden beside
the destination and removed afterwards; the conversion from it streams tensor by tensor as usual.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from sllm_faas.runtime.checkpoint.format import CheckpointError


def rope_base(gguf: Path) -> float | None:
    """`{arch}.rope.freq_base` from the GGUF metadata: transformers 5 does not carry it into the config."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    arch = fields["general.architecture"]
    field = fields.get(f"{bytes(arch.parts[arch.data[0]]).decode()}.rope.freq_base")
    return float(field.parts[field.data[0]][0]) if field is not None else None


def gguf_to_hf_folder(gguf: str | os.PathLike, destination: str | os.PathLike,
                      dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantise `gguf` to `dtype` and save a safetensors folder with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(gguf, "gguf", f"transformers cannot read it ({exc})") from None
    # The loaded weights are already dequantised; drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    theta = rope_base(gguf)
    rope = getattr(model.config, "rope_parameters", None)
    if theta is not None and isinstance(rope, dict):
        rope["rope_theta"] = theta
    elif theta is not None:
        model.config.rope_theta = theta
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype | None = None, **options):
    """`sllm-faas convert FILE.gguf DST`: options as for write_checkpoint; dtype defaults to bfloat16."""
    from sllm_faas.runtime.checkpoint.writer import convert

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.gguf-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        gguf_to_hf_folder(src, staging, dtype or torch.bfloat16)
        return convert(staging, dst, **options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
