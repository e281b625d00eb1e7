"""Choosing the next token: logits processors (logit bias, min_tokens, penalties), then greedy, or
temperature + top-k + top-p + min-p with a per-position seeded generator.

The order is vLLM's (v1 sampler): bias and min_tokens, then repetition/frequency/presence penalties, then
greedy, or temperature, min-p, top-k, top-p and the draw. Everything a step depends on is (logits, params,
the request's prompt and output tokens, step): the random draw for the i-th generated token depends only on
(seed, i), and the penalty counts only on the tokens, so a request resumed elsewhere (live migration, which
carries the tokens and these params) draws exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sllm_faas.runtime.model.params import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) pairs over 64 bits


# Below this temperature sampling is greedy: dividing logits by a tinier one overflows float32 to inf
# (1e-300 is a valid OpenAI temperature), and the distribution is one-hot to float32 precision anyway.
MIN_TEMPERATURE = 1e-5


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                   output_ids: Sequence[int], eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """The logits after logit_bias, min_tokens (EOS masked until then) and the penalties, as vLLM applies them:
    repetition over prompt and output tokens, frequency and presence over output tokens."""
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    for token, bias in params.logit_bias.items():
        if 0 <= token < vocab:
            logits[token] += bias
    if len(output_ids) < params.min_tokens and eos_ids:
        logits[[t for t in eos_ids if 0 <= t < vocab]] = -torch.inf
    if params.penalised:
        output = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
        output = output[(output >= 0) & (output < vocab)]
        counts = torch.bincount(output, minlength=vocab)[:vocab].float()
        if params.repetition_penalty != 1:
            seen = counts > 0
            prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=logits.device)
            seen[prompt[(prompt >= 0) & (prompt < vocab)]] = True
            penalty = params.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """`logits`: (vocab,) of the last position, after process_logits; `step`: index of the token being generated.

    Total for every value the API accepts and any logits (huge, -inf, +inf, NaN): it returns a valid
    token id rather than raise, because a raise here would be one request's failure on the engine thread.
    """
    logits = logits.float()
    top = logits.max()
    if not params.temperature >= MIN_TEMPERATURE or not torch.isfinite(top):
        return int(torch.argmax(logits))  # greedy; also where +inf or NaN leaves no distribution to draw from
    probs = torch.softmax((logits - top) / params.temperature, dim=-1)
    if params.min_p > 0 or 0 < params.top_k < probs.shape[-1]:
        floor = probs.max() * params.min_p
        if 0 < params.top_k < probs.shape[-1]:
            floor = torch.maximum(floor, torch.topk(probs, params.top_k).values[-1])
        probs = torch.where(probs >= floor, probs, 0.0)
        probs = probs / probs.sum()  # the top token is always kept: the sum is > 0
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    generator = torch.Generator().manual_seed((params.seed * _MIX + step) % (1 << 63))
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of `logits` (rows, vocab): the log-probability of `tokens[row]` and the k most likely tokens.

    These are the model's raw log-probabilities (before penalties and temperature), as vLLM reports by
    default: what an evaluation harness scores."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens.to(logprobs.device)[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)
        tops = [list(zip(row_ids, row_values, strict=True)) for row_ids, row_values in
                zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return list(zip(chosen, tops, strict=True))
