"""`sllm-faas convert`, `inspect` and `serve` on a native family and on the transformers fallback, end to end:
greedy tokens through the official openai client equal transformers' generate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import torch
from tiny_families import FAMILIES, family_config, write_word_tokenizer

from sllm_faas.runtime.embedded_redis import free_tcp_port

PROMPT = [1, 17, 42, 99, 5, 250, 31]


def cli(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "sllm_faas", *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


NATIVE = {name: f"native ({family_config(name).model_type})" for name in FAMILIES}


@pytest.mark.parametrize(("name", "path"), [*NATIVE.items(), ("gpt2", "transformers fallback")])
def test_convert_inspect_serve_greedy_equals_transformers(name, path, tmp_path):
    import openai
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    reference = AutoModelForCausalLM.from_config(family_config(name)).eval()
    reference.save_pretrained(tmp_path / "hf")
    write_word_tokenizer(tmp_path / "hf", 320)
    expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT):]
    cli("convert", tmp_path / "hf", tmp_path / "ck", "--no-progress")
    assert f"decoder     {path}" in cli("inspect", tmp_path / "ck")

    port = free_tcp_port()
    server = subprocess.Popen([sys.executable, "-m", "sllm_faas", "serve", tmp_path / "ck", "--port", str(port),
                               "--host", "127.0.0.1"], env={**os.environ, "SLLM_TORCH_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ready = time.monotonic() + 120, None
        while ready is None or ready.status_code != 200:
            assert server.poll() is None and time.monotonic() < deadline, "the runtime never became ready"
            try:
                ready = requests.get(f"http://127.0.0.1:{port}/_/ready", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.1)
        assert ready.json()["cold_start"]["decoder"].startswith(path)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        prompt = " ".join(f"w{token}" for token in PROMPT)
        answer = client.completions.create(model="ck", prompt=prompt, max_tokens=16, temperature=0)
        assert answer.choices[0].text.split() == [f"w{token}" for token in expected.tolist()]
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
