"""Which checkpoints the native decoder runs, and how each family differs from Llama.

Most decoders people deploy are Llama with a few switches (q/k norms, Gemma's norms and soft-capping,
Phi-3's fused projections, sliding-window layers). `DecoderConfig.from_hf` reads an HF config.json into
those switches, or raises UnsupportedModel naming the field that the native decoder does not implement;
the runtime then serves the checkpoint with transformers instead (runtime/model/fallback.py).
This module imports neither torch nor transformers, so `sllm-faas inspect` can call it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class UnsupportedModel(ValueError):
    """The checkpoint is not a model the native decoder implements."""


@dataclass(frozen=True)
class Family:
    """How a model_type differs from Llama."""

    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3)
    gemma: bool = False  # norms scale by 1 + weight; extra norms after attention and MLP; scaled embeddings
    fused: bool = False  # the checkpoint stores qkv_proj and gate_up_proj (Phi-3)
    attention_bias: bool = False  # default of `attention_bias` when the config omits it (Qwen2)
    window_everywhere: bool = False  # `sliding_window`, when set, applies to every layer (Mistral, Phi-3)


FAMILIES = {
    "llama": Family(),
    "mistral": Family(window_everywhere=True),
    "qwen2": Family(attention_bias=True),
    "qwen3": Family(qk_norm=True),
    "phi3": Family(fused=True, window_everywhere=True),
    "gemma2": Family(gemma=True),
    "gemma3_text": Family(gemma=True, qk_norm=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ROPE_TYPES = ("default", "llama3", "linear")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class Rope:
    theta: float
    scaling: dict | None  # the llama3 or linear parameters; None for plain RoPE


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    model_type: str
    ropes: tuple[Rope, ...]  # the distinct RoPE tables
    layer_ropes: tuple[int, ...]  # per layer: index into ropes
    layer_windows: tuple[int | None, ...]  # per layer: sliding window (keys within the last N positions), or None
    rotary_dim: int  # leading dims of each head that RoPE rotates (partial_rotary_factor)
    family: Family = Family()
    activation: str = "silu"
    query_scale: float = 1.0  # multiplies queries before q.k (head_dim ** -0.5, Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # scores -> tanh(scores / cap) * cap (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    embed_scale: float | None = None  # embeddings multiplied by it (Gemma: sqrt(hidden_size))

    @classmethod
    def from_hf(cls, config: dict) -> DecoderConfig:
        model_type = config.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedModel(f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        layer_types = _layer_types(config, family, layers)
        ropes, layer_ropes = [], []
        for kind in layer_types:
            rope = _rope(config, kind)
            if rope not in ropes:
                ropes.append(rope)
            layer_ropes.append(ropes.index(rope))
        activation = config.get("hidden_activation") or config.get("hidden_act") or "silu"
        if activation not in ACTIVATIONS:
            raise UnsupportedModel(f"hidden_act {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        rope_params = config.get("rope_parameters") or {}
        partial = rope_params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        window = config.get("sliding_window")
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=layers,
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", family.gemma),
            attention_bias=config.get("attention_bias", family.attention_bias), model_type=model_type,
            ropes=tuple(ropes), layer_ropes=tuple(layer_ropes),
            layer_windows=tuple(window if kind == "sliding_attention" else None for kind in layer_types),
            rotary_dim=int(head_dim * partial), family=family, activation=activation,
            query_scale=(config["query_pre_attn_scalar"] if family.gemma else head_dim) ** -0.5,
            attn_softcap=config.get("attn_logit_softcapping") if family.gemma else None,
            final_softcap=config.get("final_logit_softcapping") if family.gemma else None,
            embed_scale=config["hidden_size"] ** 0.5 if family.gemma else None,
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> DecoderConfig:
        return cls.from_hf(json.loads((Path(directory) / "config.json").read_text()))


def _layer_types(config: dict, family: Family, layers: int) -> list[str]:
    """'full_attention' or 'sliding_attention' per layer, from `layer_types` or the family's older rule."""
    types = config.get("layer_types")
    window = config.get("sliding_window")
    if types is None:
        if config.get("model_type") == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        elif config.get("model_type") == "gemma3_text":
            pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        elif config.get("use_sliding_window"):
            raise UnsupportedModel("use_sliding_window without layer_types is not implemented natively")
        else:
            types = ["sliding_attention" if family.window_everywhere and window else "full_attention"] * layers
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        raise UnsupportedModel(f"layer_types {types!r} is not one full_attention/sliding_attention per layer")
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        raise UnsupportedModel(f"sliding_window {window!r} is not a positive int")
    return types


def _rope(config: dict, layer_type: str) -> Rope:
    """The RoPE of one layer type: transformers 5 `rope_parameters` (flat or per layer type), or the older
    `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq` for its sliding layers)."""
    params = config.get("rope_parameters")
    if params and layer_type in params:
        params = params[layer_type]
    if not params:
        if config.get("model_type") == "gemma3_text" and layer_type == "sliding_attention":
            params = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
        else:
            params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(f"rope_type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return Rope(float(params.get("rope_theta", config.get("rope_theta", 10000.0))),
                None if kind == "default" else {**scaling, "rope_type": kind})


def decoder_path(directory: str | Path) -> str:
    """What `sllm-faas serve` will run for a checkpoint: 'native (FAMILY)' or 'transformers (WHY)'."""
    try:
        return f"native ({DecoderConfig.from_dir(directory).model_type})"
    except UnsupportedModel as exc:
        return f"transformers fallback ({exc})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"none: config.json unusable ({type(exc).__name__}: {exc})"
