"""The converted model generates exactly what the original safetensors folder generates."""

from __future__ import annotations

import pytest
import torch

from sllm_faas.runtime.checkpoint import convert
from sllm_faas.runtime.loader.hf_model import load_causal_lm, parameters_on_meta


@pytest.mark.parametrize("strategy", ["mmap", "direct"])
def test_greedy_tokens_and_logits_match_from_pretrained(tmp_path, tiny_llama_dir, strategy):
    from transformers import AutoModelForCausalLM

    convert(tiny_llama_dir, tmp_path / "ck")
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ours = load_causal_lm(tmp_path / "ck", strategy=strategy)
    prompt = torch.tensor([[1, 17, 42, 99, 5, 250]])
    with torch.no_grad():
        assert torch.equal(reference(prompt).logits, ours(prompt).logits)
    expected = reference.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=24, do_sample=False), expected)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_no_random_init_and_no_meta_left(tmp_path, tiny_llama_dir):
    convert(tiny_llama_dir, tmp_path / "ck")
    model = load_causal_lm(tmp_path / "ck")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    with parameters_on_meta():
        layer = torch.nn.Linear(4096, 4096)
    assert layer.weight.device.type == "meta"  # reset_parameters ran on meta: no init work


def test_missing_weights_are_named(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    from sllm_faas.runtime.checkpoint import CheckpointError, save_state_dict

    state = load_file(tiny_llama_dir / "model.safetensors")
    state.pop("model.norm.weight")
    save_state_dict(state, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_causal_lm(tmp_path / "ck")
