"""examples/qwen3 end to end: prepare.py builds the tiny random Qwen3 offline (cached outside the repo), one
`sllm-faas up` serves it from a model store, `sllm-faas deploy -f examples/qwen3/stack.yml` deploys it, and the
official openai client (plain and streamed) and the example's handler get the text transformers' greedy
`generate` makes from the same HF folder and chat template."""

from __future__ import annotations

import json
import os

import requests
from test_local_cluster import ROOT, Up

from examples.qwen3.prepare import MODEL, prepare

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 24


def transformers_greedy(hf_dir) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(out, skip_special_tokens=True)


def test_qwen3_example_deployed_on_a_local_cluster_answers_like_transformers(tmp_path, redis_target):
    paths = prepare()
    expected = transformers_greedy(paths["hf"])
    assert len(set(expected)) > 3  # random weights, but not one character repeated
    store = tmp_path / "store"
    store.mkdir()
    (store / MODEL).symlink_to(paths["sllm"])

    up = Up(tmp_path, store, redis_target.url, f"sllm-test-qwen3:{os.getpid()}:", nodes=1, slots=1)
    try:
        deployed = up.deploy(ROOT / "examples" / "qwen3" / "stack.yml")
        assert deployed.returncode == 0, deployed.stderr
        client = up.client("qwen3")
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=TOKENS,
                                                               temperature=0)
        assert raw.parse().choices[0].message.content == expected
        assert json.loads(raw.headers["X-Sllm-Cold-Start"])["decoder"] == "native (qwen3)"
        stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=TOKENS, temperature=0,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected
        handled = requests.post(f"{up.gateway}/function/qwen3", json={"message": QUESTION[0]["content"],
                                                                      "max_tokens": TOKENS}, timeout=300)
        assert handled.status_code == 200 and handled.json()["reply"] == expected
    finally:
        assert up.stop() == 0
