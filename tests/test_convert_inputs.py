"""`sllm-faas convert` inputs beyond a plain safetensors folder: sharded HF folders and GGUF files."""

from __future__ import annotations

import json

import pytest
import torch
from test_serve_families import cli

from sllm_faas.runtime.loader import load


def test_sharded_folder_with_index_converts_every_tensor(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cli("convert", tmp_path / "sharded", tmp_path / "ck", "--no-progress")
    state = load(tmp_path / "ck")
    original = load_file(tiny_llama_dir / "model.safetensors")
    assert set(index["weight_map"]) <= state.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())


def test_gguf_converts_to_the_same_model_as_the_example_recipe(tmp_path, smollm2):
    """The example's GGUF through the CLI: same tensors, config (RoPE base from the GGUF metadata included),
    tokenizer and chat template as the cached SmolLM2 checkpoint, and the native decoder takes it."""
    from examples.smollm2.prepare import gguf_path

    gguf, _ = gguf_path()
    cli("convert", gguf, tmp_path / "ck", "--no-progress")
    ours, theirs = load(tmp_path / "ck"), load(smollm2["sllm"])
    assert ours.keys() == theirs.keys()
    assert all(ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], theirs[name]) for name in ours)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "ck" / name).read_text()) == json.loads((smollm2["sllm"] / name).read_text())
    assert "decoder     native (llama)" in cli("inspect", tmp_path / "ck")


def test_unreadable_gguf_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(AssertionError, match="bad.gguf: gguf: transformers cannot read it"):
        cli("convert", bad, tmp_path / "ck", "--no-progress")
