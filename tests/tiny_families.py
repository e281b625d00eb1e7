"""Tiny seeded random models of each family, built offline from a transformers config, with a word tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_llama_config

from sllm_faas.runtime.model.llama import DecoderConfig, build_decoder

SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=None,
             pad_token_id=None, initializer_range=0.3)


def family_config(name: str):
    """A transformers config for one family, built offline."""
    import transformers as tf

    if name == "llama3-rope":
        return tiny_llama_config(**{**SIZES, "tie_word_embeddings": False},
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if name == "mistral-window":
        return tf.MistralConfig(**SIZES, head_dim=16, sliding_window=5)
    if name == "qwen2":
        return tf.Qwen2Config(**SIZES, tie_word_embeddings=True)
    if name == "qwen3":
        return tf.Qwen3Config(**SIZES, head_dim=16)
    if name == "phi3":
        return tf.Phi3Config(**SIZES)
    if name == "phi3-partial-rotary":  # Phi-4-mini rotates 3/4 of each head
        return tf.Phi3Config(**SIZES, partial_rotary_factor=0.75, tie_word_embeddings=True)
    if name == "gemma2":
        return tf.Gemma2Config(**{**SIZES, "initializer_range": 0.02}, head_dim=16, query_pre_attn_scalar=24,
                               sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**{**SIZES, "initializer_range": 0.02}, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"] * 2,
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 10000.0}})
    if name == "gpt2":  # no native decoder: the transformers fallback serves it
        return tf.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                             eos_token_id=None, pad_token_id=None, initializer_range=0.3)
    raise AssertionError(name)


FAMILIES = ["llama3-rope", "mistral-window", "qwen2", "qwen3", "phi3", "phi3-partial-rotary", "gemma2", "gemma3"]


def reference_and_native(name: str, directory, dtype=torch.float32):
    """A seeded random transformers model saved as an HF folder, and the native decoder built from that folder."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = family_config(name)
    config._attn_implementation = "eager"
    reference = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    reference.save_pretrained(directory)
    native = build_decoder(DecoderConfig.from_dir(directory), load_file(directory / "model.safetensors"))
    return reference, native


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """tokenizer.json mapping token i to the word `wI`, split on spaces: decoded text names every token, so
    comparing texts compares tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
