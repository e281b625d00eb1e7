"""Chat templates render exactly as transformers' apply_chat_template renders them (issue #17 part 3), without
importing transformers on the serve path: SmolLM2's own template and test templates in the styles of Llama 3.1
(JSON tools), Hermes / Qwen2.5 (ChatML tools) and Mistral ([INST] tools), with tools, documents, tool-call
history, add_generation_prompt, template kwargs, tojson's options, strftime_now, namespace, loop controls,
raise_exception and the {% generation %} block."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sllm_faas.runtime.model.tokenizer import TemplateError, Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, e.g. Zürich",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {
        "type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
CALL = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CONVERSATIONS = {
    "plain": dict(messages=[{"role": "user", "content": "Hello!"}]),
    "system and turns": dict(messages=[{"role": "system", "content": "Be brief. "},
                                       {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": " Hello. "},
                                       {"role": "user", "content": "Weather?"}]),
    "no generation prompt": dict(messages=[{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hey"}], add_generation_prompt=False),
    "tools": dict(messages=[{"role": "user", "content": "Weather in Zürich?"}], tools=[WEATHER]),
    "tool history": dict(messages=[{"role": "user", "content": "Weather in Zürich?"},
                                   {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                   {"role": "tool", "tool_call_id": "call_7", "content": "22 degrees"},
                                   {"role": "user", "content": "Thanks"}], tools=[WEATHER]),
    "template kwargs": dict(messages=[{"role": "user", "content": "Hi"}], enable_thinking=False,
                            date_string="01 Jan 2025"),
    "documents": dict(messages=[{"role": "user", "content": "Where is it?"}],
                      documents=[{"title": "Café", "text": "It is in Zürich."}, {"title": "B", "text": "x"}]),
}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2["hf"])


def model_dir(smollm2, tmp_path: Path, template: str | None) -> Path:
    """SmolLM2's tokenizer files with `template` as chat_template.jinja (None: the model's own)."""
    directory = tmp_path / "tokenizer"
    directory.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2["sllm"] / name, directory / name)
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    return directory


def render_both(hf_tokenizer, ours: Tokenizer, template: str, conversation: dict) -> tuple[str | None, str | None]:
    """(transformers', ours), an exception's message in place of a rendering."""
    options = dict(conversation)
    messages, add = options.pop("messages"), options.pop("add_generation_prompt", True)
    try:
        expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add, **options)
    except Exception as exc:  # the template refused: we must refuse too
        expected = f"refused: {exc}"
    try:
        got = ours.apply_chat_template(messages, add_generation_prompt=add, **options)
    except TemplateError as exc:
        got = f"refused: {exc}"
    return expected, got


@pytest.mark.parametrize("name", ["smollm2", *sorted(p.stem for p in TEMPLATES.glob("*.jinja"))])
def test_rendering_equals_transformers(smollm2, hf_tokenizer, tmp_path, name):
    template = None if name == "smollm2" else (TEMPLATES / f"{name}.jinja").read_text()
    ours = Tokenizer(model_dir(smollm2, tmp_path, template))
    template = template or (smollm2["sllm"] / "chat_template.jinja").read_text()
    rendered = 0
    for conversation in CONVERSATIONS.values():
        expected, got = render_both(hf_tokenizer, ours, template, conversation)
        if expected.startswith("refused: "):
            assert got.startswith("refused: "), (conversation, expected, got)
        else:
            assert got == expected, conversation
            rendered += 1
    assert rendered >= 4


def test_template_features_are_rendered(smollm2, tmp_path):
    """What the comparison relies on really shows up in the text (it is not two equal empty renderings)."""
    llama = Tokenizer(model_dir(smollm2, tmp_path, (TEMPLATES / "llama3_json_tools.jinja").read_text()))
    assert llama.template_uses("tools") and not llama.template_uses("documents")
    text = llama.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[WEATHER])
    assert '    "type": "function"' in text and "Zürich" in text  # indent=4, ensure_ascii=False
    with pytest.raises(TemplateError, match="one tool call per assistant turn"):
        llama.apply_chat_template([{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]}])
    mistral = Tokenizer(model_dir(smollm2, tmp_path, (TEMPLATES / "mistral_tools.jinja").read_text()))
    compact = mistral.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[WEATHER])
    assert '{"function":{"description":' in compact  # separators and sort_keys
    documents = Tokenizer(model_dir(smollm2, tmp_path, (TEMPLATES / "documents_generation.jinja").read_text()))
    text = documents.apply_chat_template(**CONVERSATIONS["documents"])
    assert '"title": "Caf\\u00e9"' in text and documents.template_uses("documents")
    own = Tokenizer(model_dir(smollm2, tmp_path, None))
    assert not own.template_uses("tools")


def test_the_serve_path_renders_without_importing_transformers(smollm2, tmp_path):
    directory = model_dir(smollm2, tmp_path, (TEMPLATES / "chatml_hermes_tools.jinja").read_text())
    code = ("import sys; from sllm_faas.runtime.model.tokenizer import Tokenizer; "
            f"t = Tokenizer({str(directory)!r}); "
            "t.encode_chat([{'role': 'user', 'content': 'Hi'}], tools=[{'type': 'function', 'function': {}}]); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
