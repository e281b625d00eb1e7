"""Build a transformers causal LM from a converted checkpoint, with no random initialisation.

Parameters are created on the meta device (so no init kernel runs and no memory is touched),
buffers such as rotary frequencies are computed normally, then the loaded tensors are assigned.
This is the general path for any architecture transformers knows; the fast runtime path for
the Llama family does not import transformers' modeling code at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sllm_faas.runtime.checkpoint.format import CheckpointError
from sllm_faas.runtime.loader import load


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """New nn.Parameters land on the meta device; buffers are left alone."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_causal_lm(directory: str | os.PathLike, device: torch.device | str = "cpu", *,
                   strategy: str = "auto", state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A ready-to-generate `AutoModelForCausalLM` whose weights are the checkpoint's mapped tensors (`state`, when
    the caller has already loaded them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(directory / "config.json", "config", "missing: the HF config is needed to build a model")
    config = AutoConfig.from_pretrained(directory)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    if state is None:
        state = load(directory, device, strategy=strategy)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(directory, "tensors", f"not used by {type(model).__name__}: "
                              f"{', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(directory, "tensors", f"missing from the checkpoint: {', '.join(still_meta[:5])}")
    model.to(device)  # moves buffers; assigned parameters are already there
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()
