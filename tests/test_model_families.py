"""Each family the native decoder implements matches transformers on a tiny seeded random model.

The configs are small but switch on what makes each family differ from Llama: short sliding windows that
the prompt plus generation outgrow, Llama 3 rope scaling whose original context is shorter than the test,
partial rotary, soft-capping low enough to bend the scores, Gemma 3's two RoPE bases.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from test_native_decoder import greedy, prefill_logits
from tiny_families import FAMILIES, family_config, reference_and_native

from sllm_faas.runtime.model.llama import DecoderConfig, KVCache, UnsupportedModel


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_transformers(name, tmp_path):
    reference, native = reference_and_native(name, tmp_path)
    prompt = [1, 17, 42, 99, 5, 250, 31, 8, 77, 140]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits
    got = prefill_logits(native, prompt, torch.float32)
    assert (got - expected).abs().max() <= 1e-4
    expected_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                         min_new_tokens=24)[0, len(prompt):].tolist()
    assert greedy(native, KVCache(native.config, 2, 128, torch.float32), prompt, 24) == expected_tokens
    assert len(set(expected_tokens)) > 3  # the reference does not just repeat one token


@pytest.mark.parametrize("name", ["gemma2", "phi3"])
def test_batched_decode_equals_one_at_a_time(name, tmp_path):
    """Batch invariance (llama.py's module doc) holds with sliding windows, soft-capping and fused projections."""
    _, native = reference_and_native(name, tmp_path, torch.bfloat16)
    prompts = [[1, 5, 9], [1, 200, 7, 8, 9, 10, 11, 12], [1, 2]]
    alone = [greedy(native, KVCache(native.config, 4, 64, torch.bfloat16), p, 12, slot=3) for p in prompts]
    cache, slots, tokens = KVCache(native.config, 4, 64, torch.bfloat16), [2, 0, 3], []
    for prompt, slot in zip(prompts, slots, strict=True):
        logits = native(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, torch.tensor([slot]))
        tokens.append([int(logits[0, -1].argmax())])
    for step in range(11):
        positions = torch.tensor([[len(p) + step] for p in prompts])
        logits = native(torch.tensor([[t[-1]] for t in tokens]), positions, cache, torch.tensor(slots))
        for row, generated in enumerate(tokens):
            generated.append(int(logits[row, -1].argmax()))
    assert tokens == alone


@pytest.mark.parametrize(("override", "named"), [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"use_sliding_window": True, "layer_types": None}, "use_sliding_window"),
])
def test_unimplemented_settings_are_named(override, named):
    config = {**tiny_llama_config().to_dict(), "model_type": "qwen2", "rope_parameters": None, **override}
    with pytest.raises(UnsupportedModel, match=named):
        DecoderConfig.from_hf(config)


def test_hub_style_configs_read_like_saved_ones():
    """config.json files on the Hub predate transformers 5: rope_theta + rope_scaling at the top level, and Gemma 3
    with rope_local_base_freq and sliding_window_pattern instead of per-layer-type rope_parameters."""
    gemma3 = family_config("gemma3").to_dict()
    hub_gemma3 = {**gemma3, "rope_parameters": None, "layer_types": None, "sliding_window_pattern": 2,
                  "rope_theta": 10000.0, "rope_local_base_freq": 10.0,
                  "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    assert DecoderConfig.from_hf(hub_gemma3) == DecoderConfig.from_hf(gemma3)
    llama3 = family_config("llama3-rope").to_dict()
    hub_llama3 = {**llama3, "rope_parameters": None, "rope_theta": llama3["rope_parameters"]["rope_theta"],
                  "rope_scaling": {k: v for k, v in llama3["rope_parameters"].items() if k != "rope_theta"}}
    assert DecoderConfig.from_hf(hub_llama3) == DecoderConfig.from_hf(llama3)
    assert DecoderConfig.from_hf(llama3).ropes[0].scaling["factor"] == 8.0
