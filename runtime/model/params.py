"""A request's sampling parameters: plain data, with no torch, so the HTTP layer (runtime/server/openai_api.py)
and the migration protocol can build and carry them before (or without) a model and torch being loaded.
How they are applied is runtime/model/sampling.py."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    top_k: int = 0  # 0: off (vLLM also takes -1)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    echo_logprobs: bool = False  # also the prompt's tokens' logprobs (completions' echo)

    def __post_init__(self) -> None:
        if self.seed is None:  # fix a seed now so the request is reproducible and migratable
            self.seed = random.getrandbits(63)

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
