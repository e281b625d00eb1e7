"""Tokenizer and chat template from a model directory, through `tokenizers` and jinja2 only."""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
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


def check_template(source: str) -> None:
    """ValueError naming the line where `source` is not a chat template this environment can compile."""
    import jinja2

    try:
        _environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"line {exc.lineno}: {exc.message}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PRELOADED_MAX = 4   # tokenizers a pool's zygote keeps (runtime/server/zygote.py)
_preloaded: OrderedDict[tuple, Tokenizer] = OrderedDict()


def _identity(directory: Path, chat_template: str | Path | None) -> tuple:
    """What a loaded tokenizer depends on: each file's path, inode, size and mtime (None where absent)."""
    def of(path: Path) -> tuple | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
    paths = [directory / name for name in TOKENIZER_FILES] + ([Path(chat_template)] if chat_template else [])
    return tuple(of(path) for path in paths)


class Tokenizer:
    @classmethod
    def load(cls, directory: str | Path, chat_template: str | Path | None = None) -> Tokenizer:
        """The tokenizer of `directory`: the one preloaded in this process (a pooled runtime inherits its zygote's)
        when its files are the very same ones, else read now (0.1 s for SmolLM2's 49k-token BPE)."""
        key = _identity(Path(directory), chat_template)
        found = _preloaded.get(key)
        return found if found is not None else cls(directory, chat_template)

    @classmethod
    def preload(cls, directory: str | Path, chat_template: str | Path | None = None) -> bool:
        """Read and keep the tokenizer (and compile its chat template) for later `load`s in this process and its
        forks, the oldest dropped beyond PRELOADED_MAX; False if it was kept already."""
        key = _identity(Path(directory), chat_template)
        tokenizer = _preloaded.pop(key, None)
        new = tokenizer is None
        if new:
            tokenizer = cls(directory, chat_template)
            tokenizer.preloaded = True
            if tokenizer.has_chat_template:
                tokenizer.compiled_template()
        _preloaded[key] = tokenizer
        while len(_preloaded) > PRELOADED_MAX:
            _preloaded.popitem(last=False)
        return new

    def __init__(self, directory: str | Path, chat_template: str | Path | None = None) -> None:
        """`chat_template`: a Jinja file used instead of the checkpoint's template (serve --chat-template)."""
        directory = Path(directory)
        self.preloaded = False   # True: kept by `preload` (a pooled runtime's zygote) before this process needed it
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
        if chat_template is not None:
            template = Path(chat_template).read_text()
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

    def template_uses(self, name: str) -> bool:
        """Whether the chat template reads the variable `name` (e.g. `tools`): a request's tools are refused
        rather than silently dropped by a template that never renders them."""
        if not self._template_source:
            return False
        from jinja2 import meta

        return name in meta.find_undeclared_variables(_environment().parse(self._template_source))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token: int) -> str:
        """One token's text as logprobs report it (special tokens included)."""
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            **kwargs: Any) -> str:
        """Render as transformers' apply_chat_template does (utils/chat_template_utils.py): its sandboxed
        environment, None-valued message keys dropped, the special tokens and extra kwargs as variables."""
        if not self._template_source:
            raise TemplateError("this model has no chat template; use /v1/completions")
        template = self.compiled_template()
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        variables = {**{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs}
        try:
            return template.render(messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError:
            raise
        except Exception as exc:  # a template failing on what it was given (e.g. a missing key) is a bad request
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None

    def compiled_template(self):
        if self._template is None:
            self._template = _environment().from_string(self._template_source)
        return self._template

    def encode_chat(self, messages: list[dict[str, Any]], **template: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **template), add_special_tokens=False)


@functools.cache
def _environment():
    """transformers' chat-template environment (_compile_jinja_template), rebuilt without importing transformers:
    the immutable sandbox, trim/lstrip blocks, loopcontrols, a no-op {% generation %} block, its tojson,
    raise_exception, strftime_now, dict and a namespace that refuses underscore names."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: here it renders as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=Namespace)
    return env
