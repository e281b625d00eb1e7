"""Tokenizer and chat template from a model directory, through `tokenizers` and jinja2 only."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _FastTokenizer


class TemplateError(ValueError):
    """The chat template rejected the messages (it called raise_exception)."""


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self._tokenizer = _FastTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.special_tokens = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token",
                                                                            "unk_token")}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        self._template_source = template
        self._template = None
        self.eos_token_ids = self._eos_ids(directory)

    def _eos_ids(self, directory: Path) -> set[int]:
        ids = set()
        eos = self.special_tokens.get("eos_token")
        if eos is not None and self._tokenizer.token_to_id(eos) is not None:
            ids.add(self._tokenizer.token_to_id(eos))
        generation = directory / "generation_config.json"
        if generation.exists():
            value = json.loads(generation.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return ids

    @property
    def has_chat_template(self) -> bool:
        return bool(self._template_source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render like transformers does: sandboxed jinja2, trim_blocks and lstrip_blocks."""
        if not self._template_source:
            raise TemplateError("this model has no chat template; use /v1/completions")
        if self._template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
            env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._template = env.from_string(self._template_source)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special_tokens.items() if v is not None})

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
