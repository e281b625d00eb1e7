"""Serving a causal LM the native decoder does not implement, with transformers, behind the same interface.

The model is runtime/loader/hf_model.load_causal_lm's (meta-device skeleton, the checkpoint's tensors
assigned as its weights), so the engine, the API, the metrics and migration work unchanged. Each cache slot
holds its own transformers cache, and every forward runs one position of one sequence: a token's logits
then come from the very same computations whether its context was generated here or recomputed by a
migration's destination, so a migration between two fallback instances continues with the same tokens.
The price is a prefill that runs position by position; the native families do not pay it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sllm_faas.runtime.model.families import DecoderConfig, UnsupportedModel


class SlotCaches:
    """One transformers cache per engine slot (None while the slot is empty)."""

    def __init__(self, max_batch: int, max_seq: int) -> None:
        self.slots: list = [None] * max_batch
        self.max_batch, self.max_seq = max_batch, max_seq


class TransformersDecoder(nn.Module):
    """A transformers causal LM with the native decoder's forward(tokens, positions, cache, slots, last_only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.config = model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def new_cache(self, max_batch: int, max_seq: int) -> SlotCaches:
        return SlotCaches(max_batch, max_seq)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCaches, slots: torch.Tensor,
                last_only: bool = True) -> torch.Tensor:
        """Float32 logits (batch, steps or 1, vocab), one position at a time (module doc)."""
        rows = []
        for row in range(tokens.shape[0]):
            slot, logits = int(slots[row]), []
            for step in range(tokens.shape[1]):
                position = int(positions[row, step])
                past = None if position == 0 else cache.slots[slot]
                cached = 0 if past is None else past.get_seq_length()
                if cached != position:
                    raise RuntimeError(f"slot {slot} holds {cached} positions, asked for position {position}")
                out = self.hf(input_ids=tokens[row:row + 1, step:step + 1],
                              position_ids=positions[row:row + 1, step:step + 1], cache=past, use_cache=True)
                cache.slots[slot] = out.cache
                logits.append(out.logits[:, -1:].float())
            rows.append(torch.cat(logits[-1:] if last_only else logits, dim=1))
        return torch.cat(rows)


def build_model(directory: str | Path, state: dict[str, torch.Tensor]) -> tuple[nn.Module, str]:
    """The native decoder when the checkpoint's family has one, else transformers; with a line saying which."""
    try:
        config = DecoderConfig.from_dir(directory)
    except UnsupportedModel as exc:
        from sllm_faas.runtime.loader.hf_model import load_causal_lm

        return TransformersDecoder(load_causal_lm(directory, state=state)), f"transformers fallback ({exc})"
    from sllm_faas.runtime.model.llama import build_decoder

    return build_decoder(config, state), f"native ({config.model_type})"
