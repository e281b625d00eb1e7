"""Choosing the next token: greedy, or temperature + top-p with a per-position seeded generator.

The random draw for the i-th generated token depends only on (seed, i), never on what ran before
in the process, so a request resumed elsewhere (live migration) draws exactly the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) pairs over 64 bits


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.seed is None:  # fix a seed now so the request is reproducible and migratable
            self.seed = random.getrandbits(63)


# Below this temperature sampling is greedy: dividing logits by a tinier one overflows float32 to inf
# (1e-300 is a valid OpenAI temperature), and the distribution is one-hot to float32 precision anyway.
MIN_TEMPERATURE = 1e-5


def next_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """`logits`: (vocab,) of the last position; `step`: index of the token being generated.

    Total for every value the API accepts and any logits (huge, -inf, +inf, NaN): it returns a valid
    token id rather than raise, because a raise here would be one request's failure on the engine thread.
    """
    logits = logits.float()
    top = logits.max()
    if not params.temperature >= MIN_TEMPERATURE or not torch.isfinite(top):
        return int(torch.argmax(logits))  # greedy; also where +inf or NaN leaves no distribution to draw from
    probs = torch.softmax((logits - top) / params.temperature, dim=-1)  # the top token has weight 1: sum >= 1
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    generator = torch.Generator().manual_seed((params.seed * _MIX + step) % (1 << 63))
    return int(torch.multinomial(probs, 1, generator=generator))
