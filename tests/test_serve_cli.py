"""`sllm-faas serve` flags: one per runtime setting, env the fallback, one validator naming flag, source and value;
and a real serve started with flags over conflicting env values."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sllm_faas.common.settings import specs
from sllm_faas.runtime.cli import main
from sllm_faas.runtime.embedded_redis import free_tcp_port
from sllm_faas.runtime.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_has_one_option_and_serve_help_lists_its_flag_and_env():
    options = [spec for _, spec in specs(Settings)]
    assert len(options) == len(dataclasses.fields(Settings))
    assert len({o.flag for o in options}) == len({o.env for o in options}) == len(options)
    help_text = subprocess.run([sys.executable, "-m", "sllm_faas", "serve", "--help"], capture_output=True,
                               text=True, check=True, env={**os.environ, "COLUMNS": "400"}).stdout
    for option in options:
        assert option.flag in help_text and f"env {option.env};" in help_text, option


def test_readme_documents_every_serve_flag_and_env_variable():
    readme = (ROOT / "README.md").read_text()
    options = [spec for _, spec in specs(Settings)]
    missing = [o.flag for o in options if o.flag not in readme] + [o.env for o in options if f"`{o.env}`" not in readme]
    assert not missing, f"README.md does not mention {missing}"


@pytest.mark.parametrize("argv, env, expected", [
    (["--max-num-seqs", "0"], {}, "--max-num-seqs='0' (from flag --max-num-seqs): must be at least 1"),
    ([], {"SLLM_MAX_BATCH": "eight"}, "--max-num-seqs='eight' (from env SLLM_MAX_BATCH): not an integer"),
    (["--max-model-len", "8"], {"SLLM_MAX_SEQ": "4096"}, "--max-model-len='8' (from flag --max-model-len): must be at "
                                                         "least 16"),
    ([], {"PORT": "70000"}, "--port='70000' (from env PORT): must be at most 65535"),
    (["--loader-tier", "nvme"], {}, "--loader-tier='nvme' (from flag --loader-tier): not one of ssd, dram, gpu"),
    ([], {"SLLM_LOG_LEVEL": "loud"}, "--log-level='loud' (from env SLLM_LOG_LEVEL): not one of debug, info"),
    ([], {"SLLM_ACCESS_LOG": "maybe"}, "--access-log='maybe' (from env SLLM_ACCESS_LOG): not a boolean"),
    (["--http-threads", "4"], {"SLLM_HTTP_RESERVED_THREADS": "4"},
     "--http-reserved-threads=4 (from env SLLM_HTTP_RESERVED_THREADS) must be below --http-threads=4 (from flag "
     "--http-threads)"),
    (["--chat-template", "/nonexistent/t.jinja"], {}, "--chat-template='/nonexistent/t.jinja' (from flag "
                                                      "--chat-template): not a usable chat template: [Errno 2]"),
])
def test_a_refused_value_names_the_flag_its_source_and_the_value(argv, env, expected, monkeypatch, capsys):
    for _, option in specs(Settings):
        monkeypatch.delenv(option.env, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "some-model", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_a_chat_template_that_does_not_compile_is_refused_with_its_line(tmp_path, monkeypatch, capsys):
    template = tmp_path / "bad.jinja"
    template.write_text("{{ messages }}\n{% for m in messages %}")
    monkeypatch.setenv("SLLM_CHAT_TEMPLATE", str(template))
    assert main(["serve", "some-model"]) == 2
    err = capsys.readouterr().err
    assert f"--chat-template='{template}' (from env SLLM_CHAT_TEMPLATE): not a usable chat template: line 2" in err


def test_no_model_from_the_argument_or_the_env_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("SLLM_MODEL", raising=False)
    assert main(["serve"]) == 2
    assert "no model: pass MODEL_DIR_OR_NAME or set SLLM_MODEL" in capsys.readouterr().err


def test_flags_override_env_in_the_served_runtime(smollm2, tmp_path):
    """A real serve: the flags win over conflicting env values, the env fills in the rest, and the chat template
    file replaces the checkpoint's."""
    template = tmp_path / "plain.jinja"
    template.write_text("[[{{ messages[0]['content'] }}]]")
    port = free_tcp_port()
    env = {**os.environ, "SLLM_SERVED_MODEL_NAME": "from-env", "SLLM_MAX_SEQ": "4096", "SLLM_MAX_TOKENS": "7",
           "SLLM_TORCH_THREADS": "1", "PORT": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sllm_faas", "serve", str(smollm2["sllm"]),
                                "--served-model-name", "from-flag", "--max-model-len", "96", "--max-num-seqs", "2",
                                "--chat-template", str(template), "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        models = wait_ready(process, url)
        assert models["data"][0]["id"] == "from-flag" and models["data"][0]["max_model_len"] == 96
        chat = requests.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
        plain = requests.post(url + "/tokenize", json={"prompt": "[[Hi]]", "add_special_tokens": False}, timeout=30)
        assert chat.json()["tokens"] == plain.json()["tokens"], (chat.text, plain.text)
        too_long = requests.post(url + "/v1/completions", timeout=30,
                                 json={"model": "from-flag", "prompt": "Hi", "max_tokens": 8})
        assert too_long.status_code == 400 and "max_tokens" in too_long.text   # SLLM_MAX_TOKENS=7 from the env
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert "cold start:" in output


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float = 180) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            response = requests.get(url + "/v1/models", timeout=5)
            if response.status_code == 200:
                return response.json()
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError("serve did not become ready")
