"""Architectures without a native decoder are served by transformers through the same engine."""

from __future__ import annotations

import torch
from tiny_families import family_config, write_word_tokenizer

from sllm_faas.runtime.checkpoint import convert
from sllm_faas.runtime.loader import load
from sllm_faas.runtime.model.engine import Engine
from sllm_faas.runtime.model.fallback import TransformersDecoder, build_model
from sllm_faas.runtime.model.families import decoder_path
from sllm_faas.runtime.model.sampling import SamplingParams
from sllm_faas.runtime.model.tokenizer import Tokenizer

PROMPT = [1, 17, 42, 99, 5, 250, 31]


def gpt2_checkpoint(tmp_path):
    """A seeded random GPT-2 (float32), as an HF folder and converted; returns (reference, checkpoint dir)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    reference = AutoModelForCausalLM.from_config(family_config("gpt2")).eval()
    reference.save_pretrained(tmp_path / "hf")
    write_word_tokenizer(tmp_path / "hf", 320)
    convert(tmp_path / "hf", tmp_path / "ck")
    return reference, tmp_path / "ck"


def generate(engine: Engine, max_tokens: int = 20) -> list[int]:
    generation = engine.submit(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    generation.wait()
    return generation.output_ids


def test_fallback_engine_greedy_equals_transformers_and_migrates_exactly(tmp_path):
    reference, checkpoint = gpt2_checkpoint(tmp_path)
    assert decoder_path(checkpoint).startswith("transformers fallback (model_type 'gpt2'")
    model, path = build_model(checkpoint, load(checkpoint))
    assert isinstance(model, TransformersDecoder) and path == decoder_path(checkpoint)
    expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False)[0, len(PROMPT):]
    tokenizer = Tokenizer(checkpoint)
    source = Engine(model, tokenizer, max_batch=2, max_seq=64).start()
    destination = Engine(build_model(checkpoint, load(checkpoint))[0], tokenizer, max_batch=2, max_seq=64).start()
    try:
        # a batch-mate decoding beside it changes nothing
        other = source.submit([1, 2, 3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        tokens = generate(source)
        other.wait()
        assert tokens == expected.tolist()
        # a migration's destination recomputes prompt + 8 generated tokens, then continues with the same tokens
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        staged = destination.stage(PROMPT, tokens[:6], params)
        destination.extend(staged, tokens[6:8])
        destination.resume(staged, [], tokenizer.decode(tokens[:8]))
        staged.wait()
        assert staged.output_ids == tokens
    finally:
        source.stop()
        destination.stop()
