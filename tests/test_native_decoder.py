"""The native decoder and tokenizer match transformers, on a tiny random Llama and on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config

from sllm_faas.runtime.loader import load
from sllm_faas.runtime.model.engine import Engine
from sllm_faas.runtime.model.llama import DecoderConfig, KVCache, UnsupportedModel, build_decoder
from sllm_faas.runtime.model.sampling import SamplingParams
from sllm_faas.runtime.model.tokenizer import Tokenizer


def greedy(model, cache, prompt: list[int], steps: int, slot: int = 0) -> list[int]:
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, torch.tensor([slot]))
    tokens = [int(logits[0, -1].argmax())]
    for position in range(len(prompt), len(prompt) + steps - 1):
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([[position]]), cache, torch.tensor([slot]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def tiny_models(tmp_path_factory, dtype: torch.dtype):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    reference = LlamaForCausalLM(tiny_llama_config(initializer_range=0.3)).to(dtype).eval()
    path = tmp_path_factory.mktemp("tiny") / "hf"
    reference.save_pretrained(path)
    return reference, build_decoder(DecoderConfig.from_dir(path), load_file(path / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return tiny_models(tmp_path_factory, torch.bfloat16)


def prefill_logits(model, prompt: list[int], dtype: torch.dtype) -> torch.Tensor:
    cache = KVCache(model.config, 1, 128, dtype)
    return model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, torch.tensor([0]), last_only=False)


def test_float32_logits_and_greedy_match_transformers(tmp_path_factory):
    """In float32 the two implementations agree to rounding: this checks the maths and the KV cache."""
    reference, ours = tiny_models(tmp_path_factory, torch.float32)
    prompt = [1, 17, 42, 99, 5, 250, 31]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits
    assert torch.allclose(prefill_logits(ours, prompt, torch.float32), expected, atol=1e-4, rtol=1e-4)
    expected_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, 7:].tolist()
    assert greedy(ours, KVCache(ours.config, 2, 128, torch.float32), prompt, 24) == expected_tokens
    assert len(set(expected_tokens)) > 3  # the reference does not just repeat one token


def test_bf16_logits_within_tolerance(tiny_pair):
    reference, ours = tiny_pair
    prompt = [1, 17, 42, 99, 5, 250, 31]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits.float()
    got = prefill_logits(ours, prompt, torch.bfloat16)
    # bf16 keeps 8 mantissa bits; rounding differences compound over layers: allow 3% of the logit range
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()


def test_batched_decode_equals_one_at_a_time(tiny_pair):
    _, ours = tiny_pair
    prompts = [[1, 5, 9], [1, 200, 7, 8, 9, 10], [1, 2]]
    alone = [greedy(ours, KVCache(ours.config, 4, 64, torch.bfloat16), p, 12, slot=3) for p in prompts]
    cache = KVCache(ours.config, 4, 64, torch.bfloat16)
    slots = [2, 0, 3]
    tokens = []
    for prompt, slot in zip(prompts, slots, strict=True):
        logits = ours(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, torch.tensor([slot]))
        tokens.append([int(logits[0, -1].argmax())])
    for step in range(11):
        positions = torch.tensor([[len(p) + step] for p in prompts])
        logits = ours(torch.tensor([[t[-1]] for t in tokens]), positions, cache, torch.tensor(slots))
        for row, generated in enumerate(tokens):
            generated.append(int(logits[row, -1].argmax()))
    assert tokens == alone


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedModel, match="gpt2"):
        DecoderConfig.from_hf({"model_type": "gpt2"})


def test_smollm2_greedy_tokens_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = Tokenizer(smollm2["sllm"])
    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2["hf"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    assert prompt == hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    reference = AutoModelForCausalLM.from_pretrained(smollm2["hf"]).eval()
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    engine = Engine(build_decoder(DecoderConfig.from_dir(smollm2["sllm"]), load(smollm2["sllm"])), tokenizer).start()
    try:
        generation = engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0))
        answer = generation.wait()
    finally:
        engine.stop()
    expected = expected.tolist()
    if expected[-1] in tokenizer.eos_token_ids:
        expected = expected[:expected.index(expected[-1])]
    assert generation.output_ids == expected
    assert "Paris" in answer


def test_writer_lays_out_projections_for_fused_matmuls(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    from sllm_faas.runtime.checkpoint import convert

    convert(tiny_llama_dir, tmp_path / "ck")
    fused = build_decoder(DecoderConfig.from_dir(tmp_path / "ck"), load(tmp_path / "ck"))
    plain = build_decoder(DecoderConfig.from_dir(tiny_llama_dir), load_file(tiny_llama_dir / "model.safetensors"))
    assert all(layer.self_attn.qkv_weight is not None and layer.mlp.gate_up_weight is not None
               for layer in fused.model.layers)
    assert all(layer.self_attn.qkv_weight is None for layer in plain.model.layers)
    prompt = [1, 17, 42, 99, 5]
    assert torch.equal(prefill_logits(fused, prompt, torch.bfloat16), prefill_logits(plain, prompt, torch.bfloat16))


def test_near_tied_logits_are_rescored_in_float32():
    """A bf16 matmul rounds each logit to 8 bits, so two tokens 0.04 apart near 25.3 both come out 25.25 and
    argmax would take the lower id; rescore_top recomputes the top logits in float32 from the hidden state."""
    import torch.nn.functional as F

    from sllm_faas.runtime.model.llama import rescore_top

    hidden = torch.ones(1, 1, 4, dtype=torch.bfloat16)
    weight = torch.tensor([[16, 9.25, 2 ** -7, 0], [16, 9.25, 0.046875, 0], [1, 0, 0, 0]], dtype=torch.bfloat16)
    rounded = F.linear(hidden, weight).float()
    assert rounded[0, 0, 0] == rounded[0, 0, 1] == 25.25 and int(rounded.argmax()) == 0
    rescored = rescore_top(rounded, hidden, weight)
    assert rescored[0, 0].tolist() == [25.2578125, 25.296875, 1.0] and int(rescored.argmax()) == 1
    assert rescore_top(rounded, hidden.float(), weight.float()) is rounded  # float32 weights: nothing to rescore
