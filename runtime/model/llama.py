"""The native decoder: Llama and its relatives (Mistral, Qwen2/3, Phi-3, Gemma 2/3) in plain torch, with a
slot-based KV cache. How each family differs is read from its config by runtime/model/families.py.

Numerics follow transformers' implementation (RMSNorm in float32, RoPE tables in float32 cast to
the activation dtype, eager attention with a float32 softmax), so greedy tokens match it. The KV
cache holds `max_batch` sequences of up to `max_seq` tokens; each running request owns one slot, and
one decode step advances every active slot together.

Batch invariance: a token's logits do not depend on which other requests share its decode step, nor
on whether its context was computed by decode steps or by one prefill. Live migration relies on it
(the destination recomputes the context with a prefill and must continue with the very same tokens),
and so does reproducible serving. Three rules give it on CPU:
- every matmul gets at least two rows (`linear`, `attend`): with one row oneDNN takes a
  matrix-vector path that sums long rows (K >= 1024 or so) in another order (AVX512 without AMX);
  torch's reference bf16 path (below) sums one row as it sums many, so there a weight matmul takes one;
- on CPUs with AMX, a weight matmul takes at most ROW_BLOCK (32) rows at a time (`linear`): there
  oneDNN's bf16 kernel sums every row in one order for 1 to 32 rows, but for more it blocks the sums
  by the number of rows and threads (33, 64 and 300 rows give three orders); without AMX any number
  >= 2 agrees, so rows are not blocked;
- attention is plain matmul + softmax over keys padded to a multiple of KEY_BLOCK, masked by
  position: a query row sees the same keys, in the same order, with the same trailing masked block,
  in a prefill and in a decode step. SDPA's fused kernels split keys and queries into blocks whose
  size depends on the lengths, which changes the sums.
On x86 CPUs without AVX-512 (torch's "AVX2" capability) there are no bf16 instructions, and torch multiplies
bf16 matrices on its reference path (about 3 GFLOPS here: a quarter of a 37-token prefill went to attention),
so attention multiplies in float32 and rounds the result back, as the bf16 kernel rounds its float32 sums.
MKL's float32 matmul gives a row other bits with 2 or 3 rows than with 4 or more (all alike from 4 to 600,
at every key length 128-2048), so there attention takes at least ATTENTION_ROWS rows. The weight matmuls stay
bf16: their float32 copies would double the memory each decode step reads.
tests/test_migration.py checks both on the real model; docs/MIGRATION.md says where it holds.

Logits come out of a bf16 matmul rounded to 8 bits, so each row's top few are recomputed in float32
(`rescore_top`): otherwise near-tied tokens tie exactly and argmax falls to the lower token id.
"""

from __future__ import annotations

import math
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from sllm_faas.runtime.model.families import SUPPORTED_MODEL_TYPES, DecoderConfig, Rope, UnsupportedModel

__all__ = ["SUPPORTED_MODEL_TYPES", "DecoderConfig", "KVCache", "LlamaDecoder", "UnsupportedModel", "build_decoder"]


def rope_inverse_frequencies(rope: Rope, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    scaling = rope.scaling
    if scaling and scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling:  # llama3: stretch low frequencies, keep high ones, blend in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    """Llama's RMSNorm, or Gemma's (`unit_offset`: scales by 1 + weight, in float32), rounded as transformers does."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta"))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class Linear(nn.Module):
    """nn.Linear without its initialiser: weights are always assigned from a checkpoint, and running
    an init on the meta device would import torch's reference ops (torch._dynamo: 1.5 s of start-up)."""

    def __init__(self, inputs: int, outputs: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(outputs, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


ROW_BLOCK = 32  # on CPUs with AMX, matmuls take at most this many rows at a time (batch invariance, module doc)


@cache
def amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's bf16 kernels then order sums by the number of rows)."""
    return torch.cpu._is_amx_tile_supported()


@cache
def reference_bf16_matmul() -> bool:
    """Whether torch multiplies bf16 matrices on its slow reference path on this CPU (module doc)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose every row sums in one order: a lone row is computed as one of two (except on torch's
    reference bf16 path, where one row sums as in many and costs half of two), and on CPUs with AMX more than
    ROW_BLOCK rows go in blocks of ROW_BLOCK (module doc)."""
    rows = x.numel() // x.shape[-1]
    if rows == 1 and not (weight.dtype == torch.bfloat16 and x.device.type == "cpu" and reference_bf16_matmul()):
        return F.linear(torch.cat([x, x]), weight, bias)[:1]
    if rows <= ROW_BLOCK or x.device.type != "cpu" or not amx():
        return F.linear(x, weight, bias)
    blocks = x.reshape(rows, x.shape[-1]).split(ROW_BLOCK)
    return torch.cat([linear(block, weight, bias) for block in blocks]).view(*x.shape[:-1], -1)


RESCORED = 8  # the largest logits of each row recomputed in float32 (rescore_top)


def rescore_top(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`logits` with each row's RESCORED largest recomputed in float32 from the same hidden state. A bf16
    matmul rounds its output to 8 bits (0.125 at a logit of 25), so near-tied tokens can come out equal and
    argmax then takes the lower token id: SmolLM2's first token for "What is the capital of France?" ("The"
    25.36, "L" 25.26 in float32) tied at 25.625 on a Sapphire Rapids CPU, and the answer never said Paris.
    Each row sums alone, so the rescored values keep batch invariance."""
    if weight.dtype == torch.float32:
        return logits
    top = logits.topk(min(RESCORED, logits.shape[-1]), dim=-1).indices
    exact = (hidden.float().unsqueeze(-2) * weight[top].float()).sum(-1)
    return logits.scatter(-1, top, exact)


class Embedding(nn.Module):
    """nn.Embedding without its initialiser (see Linear)."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, device="meta"), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)




def adjacent_view(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One tensor over `tensors` stacked on dim 0, if they already lie back to back in one buffer.

    The checkpoint writer places q/k/v and gate/up projections next to each other, so a fused
    matmul costs no copy; anything else (padding between them, another layout) returns None.
    """
    if any(t is None for t in tensors):
        return None
    first = tensors[0]
    expected = first.data_ptr()
    for tensor in tensors:
        if tensor.data_ptr() != expected or not tensor.is_contiguous() or tensor.dtype != first.dtype or \
                tensor.shape[1:] != first.shape[1:] or tensor.untyped_storage().data_ptr() != \
                first.untyped_storage().data_ptr():
            return None
        expected += tensor.numel() * tensor.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros that cost nothing until written: on CPU, fresh anonymous pages are zero-filled by the
    kernel on first touch, so a large cache does not pay a memset at start-up. Small pages: a huge page
    would zero 2 MiB for the first key of each layer's slot (120 MiB in SmolLM2's first forward, 0.05-2 s
    where the VM hands free memory back to the host), where 4 KiB pages zero what is written."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    from sllm_faas.runtime.loader.direct import allocate_buffer

    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(allocate_buffer(nbytes, hugepages=False), dtype=torch.uint8).view(dtype).view(shape)


KEY_BLOCK = 128  # attention reads keys in whole blocks of this many positions (batch invariance, module doc)


def padded_length(length: int) -> int:
    return -(-length // KEY_BLOCK) * KEY_BLOCK


class KVCache:
    """Keys and values of every layer for `max_batch` slots of `max_seq` positions (room rounded up to a
    whole KEY_BLOCK, so attention can always read whole blocks)."""

    def __init__(self, config: DecoderConfig, max_batch: int, max_seq: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (config.num_layers, max_batch, config.num_kv_heads, padded_length(max_seq), config.head_dim)
        self.keys, self.values = _zeros(shape, dtype, device), _zeros(shape, dtype, device)
        self.max_batch, self.max_seq = max_batch, max_seq


ATTENTION_ROWS = 4  # on CPUs where attention multiplies in float32, its matmuls take at least this many rows


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """Attention of `q` (batch, heads, steps, dim) over `keys`/`values` (batch, kv_heads, padded, dim).

    `allowed` (batch, 1, 1, steps, padded) masks keys after each query's position (and outside its sliding
    window). Query heads that share a key head are stacked as rows of one matmul, which also gives
    grouped-query attention without copies. `softcap` bounds the scores (Gemma 2) before masking. Too few
    rows are repeated up to the least number whose sums every larger count shares (module doc).
    """
    batch, heads, steps, dim = q.shape
    kv_heads, padded = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    count = group * steps
    in_float32 = q.device.type == "cpu" and q.dtype != torch.float32 and reference_bf16_matmul()
    repeats = -(-(ATTENTION_ROWS if in_float32 else 2) // count)
    rows = (q * scale).reshape(batch, kv_heads, count, dim)

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # rounded back as the bf16 kernel rounds
        return torch.matmul(a.float(), b.float()).to(q.dtype) if in_float32 else torch.matmul(a, b)

    if repeats > 1:
        rows = rows.repeat(1, 1, repeats, 1)
    scores = product(rows, keys.transpose(-1, -2))[:, :, :count]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, group, steps, padded).masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, count, padded)  # computed in float32
    if repeats > 1:
        probs = probs.repeat(1, 1, repeats, 1)
    out = product(probs, values)[:, :, :count]
    return out.view(batch, kv_heads, group, steps, dim).reshape(batch, heads, steps, dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the leading cos.shape[-1] dims of each head; the rest pass through (partial rotary)."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned = x[..., :dim]
    return torch.cat([turned * cos + rotate_half(turned) * sin, x[..., dim:]], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale, self.softcap = config.query_scale, config.attn_softcap
        bias, width = config.attention_bias, (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_weight: torch.Tensor | None = None  # set by fuse(): one view over q, k and v
        self.qkv_bias: torch.Tensor | None = None
        if config.family.fused:  # stored fused (Phi-3): nothing to fuse
            self.qkv_proj = Linear(config.hidden_size, width, bias)
        else:
            self.q_proj = Linear(config.hidden_size, self.heads * self.head_dim, bias)
            self.k_proj = Linear(config.hidden_size, self.kv_heads * self.head_dim, bias)
            self.v_proj = Linear(config.hidden_size, self.kv_heads * self.head_dim, bias)
        self.o_proj = Linear(self.heads * self.head_dim, config.hidden_size)
        if config.family.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.family.gemma)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.family.gemma)
        else:
            self.q_norm = self.k_norm = None

    def fuse(self) -> bool:
        if hasattr(self, "qkv_proj"):
            self.qkv_weight, self.qkv_bias = self.qkv_proj.weight.detach(), self.qkv_proj.bias
            return True
        projections = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = adjacent_view([p.weight.detach() for p in projections])
        if projections[0].bias is not None:
            self.qkv_bias = adjacent_view([p.bias.detach() for p in projections])
            if self.qkv_bias is None:
                self.qkv_weight = None
        return self.qkv_weight is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, positions: torch.Tensor, padded: int, allowed: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        if self.qkv_weight is not None:
            q, k, v = linear(x, self.qkv_weight, self.qkv_bias).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.unflatten(-1, (self.heads, self.head_dim))
        k = k.unflatten(-1, (self.kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        v = v.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        if batch == 1:  # one sequence: its positions are contiguous, so plain slices (views, no gather)
            slot, start = int(slots[0]), int(positions[0, 0])
            keys[slot, :, start:start + steps] = k[0]
            values[slot, :, start:start + steps] = v[0]
            past_k, past_v = keys[slot, None, :, :padded], values[slot, None, :, :padded]
        else:
            slot_index = slots[:, None].expand(batch, steps)
            keys[slot_index, :, positions] = k.transpose(1, 2)
            values[slot_index, :, positions] = v.transpose(1, 2)
            past_k, past_v = keys[slots, :, :padded], values[slots, :, :padded]
        if steps <= KEY_BLOCK:
            out = attend(q, past_k, past_v, allowed, self.scale, self.softcap)
        else:  # a long prefill: each block of queries reads only the keys up to its last position
            ends = range(KEY_BLOCK, steps + KEY_BLOCK, KEY_BLOCK)
            out = torch.cat([attend(q[:, :, end - KEY_BLOCK:end], past_k[:, :, :seen], past_v[:, :, :seen],
                                    allowed[..., end - KEY_BLOCK:end, :seen], self.scale, self.softcap)
                             for end in ends for seen in [padded_length(int(positions[0, min(end, steps) - 1]) + 1)]],
                            dim=2)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.family.fused:  # stored fused (Phi-3): gate rows, then up rows
            self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        else:
            self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
            self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse(): one view over gate and up
        self.activation = F.silu if config.activation == "silu" else partial(F.gelu, approximate="tanh")

    def fuse(self) -> bool:
        if hasattr(self, "gate_up_proj"):
            self.gate_up_weight = self.gate_up_proj.weight.detach()
            return True
        self.gate_up_weight = adjacent_view([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        return self.gate_up_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.activation(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Gemma adds a norm after attention and after the MLP (its
    post_attention_layernorm then normalises the attention output, and pre_feedforward_layernorm the MLP input)."""

    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        size, eps, gemma = config.hidden_size, config.rms_norm_eps, config.family.gemma
        self.input_layernorm = RMSNorm(size, eps, gemma)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(size, eps, gemma)
        self.mlp = MLP(config)
        self.sandwich = gemma
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(size, eps, gemma)

    def forward(self, x, cos, sin, cache, slots, positions, padded, allowed):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, positions, padded, allowed)
        if not self.sandwich:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class _Body(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.family.gemma)


class LlamaDecoder(nn.Module):
    """Parameter names match transformers' *ForCausalLM of each family, so a converted checkpoint assigns directly."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        for index, rope in enumerate(config.ropes):
            self.register_buffer(f"inv_freq{index}", rope_inverse_frequencies(rope, config.rotary_dim),
                                 persistent=False)

    def get_input_embeddings(self) -> Embedding:
        return self.model.embed_tokens

    def new_cache(self, max_batch: int, max_seq: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, max_batch, max_seq, weight.dtype, weight.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                last_only: bool = True) -> torch.Tensor:
        """Logits (float32) for `tokens` (batch, steps) at `positions` (batch, steps) in cache `slots`.

        Prefill passes one sequence (batch 1, its new tokens); decode passes one token per sequence.
        """
        config = self.config
        x = self.model.embed_tokens(tokens)
        if config.embed_scale is not None:
            x = x * torch.tensor(config.embed_scale, dtype=x.dtype)
        tables = []
        for index in range(len(config.ropes)):
            angles = positions[..., None].float() * getattr(self, f"inv_freq{index}")
            emb = torch.cat((angles, angles), dim=-1)
            tables.append((emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]))
        padded = padded_length(int(positions.max()) + 1)
        keys = torch.arange(padded, device=tokens.device)[None, None, :]
        masks = {window: ((keys <= positions[:, :, None]) &
                          (keys > positions[:, :, None] - window if window else True))[:, None, None]
                 for window in set(config.layer_windows)}
        for layer, rope, window in zip(self.model.layers, config.layer_ropes, config.layer_windows, strict=True):
            x = layer(x, *tables[rope], cache, slots, positions, padded, masks[window])
        if last_only:
            x = x[:, -1:]
        hidden = self.model.norm(x)
        logits = rescore_top(self.lm_head(hidden).float(), hidden, self.lm_head.weight)
        if config.final_softcap is not None:
            logits = torch.tanh(logits / config.final_softcap) * config.final_softcap
        return logits


def build_decoder(config: DecoderConfig, state: dict[str, torch.Tensor]) -> LlamaDecoder:
    """Assign loaded tensors to a meta-device skeleton: no init, no copy."""
    model = LlamaDecoder(config)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing:
        raise UnsupportedModel(f"checkpoint lacks {', '.join(sorted(missing)[:5])}")
    if unexpected - {"lm_head.weight"}:
        raise UnsupportedModel(f"checkpoint has tensors the decoder does not use: {', '.join(sorted(unexpected)[:5])}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    for layer in model.model.layers:
        layer.self_attn.fuse()
        layer.mlp.fuse()
    return model.eval()
