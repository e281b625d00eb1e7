"""A tiny Qwen3 with seeded random weights and a character tokenizer, built offline, then converted, once.

    python examples/qwen3/prepare.py            # prints the checkpoint directory

No Qwen3 weights can be downloaded where this project is built and tested, so the model is made from a
`Qwen3Config` (4 layers, hidden size 256, q/k norms, grouped-query attention; 3.2M parameters, float32) with
`torch.manual_seed(0)`. Its weights are random: what it says is gibberish. What it shows is the path a Qwen3
checkpoint takes: `convert`, the native decoder (`inspect` says `native (qwen3)`), the OpenAI API and the
chat template, on `sllm-faas serve` or a local cluster. A real Qwen3 folder goes the same way:
`sllm-faas convert Qwen3-0.6B/ DST`.

The tokenizer is built here too: one token per printable ASCII character and newline (others read as `?`),
plus Qwen's `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` (the end of a turn), and a ChatML chat template.
The result is cached under $SLLM_FAAS_CACHE (default ~/.cache/sllm-faas), keyed by this recipe's version and
the transformers and torch versions (they decide the random initialisation) and the checkpoint format.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script
from examples.cache import cache_root, cached_checkpoint, prepare_cli  # noqa: E402

MODEL = "qwen3-tiny-random"  # the name stack.yml asks for
RECIPE_VERSION = 1  # bump when what prepare() builds changes
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = SPECIALS + ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_char_tokenizer(directory: Path) -> int:
    """tokenizer.json and tokenizer_config.json (with the chat template) in `directory`; returns the vocab size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    tokenizer.decoder = decoders.Fuse()  # joins the characters back without separators
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE}, indent=2))
    return len(VOCAB)


def qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=len(VOCAB), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=VOCAB.index("<|im_end|>"),
                       pad_token_id=VOCAB.index("<|endoftext|>"),
                       initializer_range=0.3)  # at 0.02 the next-token scores are nearly flat: greedy repeats "\n"


def save_random_model(config, directory: Path, dtype: str = "float32", seed: int = 0) -> None:
    """A seeded random model of `config` in `dtype`, saved as an HF folder with the character tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(directory)
    write_char_tokenizer(directory)


def versions_key() -> str:
    """The versions that decide what a seeded random initialisation produces."""
    return "-".join(f"{name}{importlib.metadata.version(name)}" for name in ("transformers", "torch"))


def prepare(root: Path | None = None) -> dict[str, Path]:
    """Paths {"hf": ..., "sllm": ...}, building and converting only what the cache lacks."""
    base = (root or cache_root()) / f"{MODEL}-r{RECIPE_VERSION}-{versions_key()}"
    return cached_checkpoint(base, lambda folder: save_random_model(qwen3_config(), folder))


if __name__ == "__main__":
    sys.exit(prepare_cli(__doc__.splitlines()[0], prepare))
