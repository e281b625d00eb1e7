"""A real evaluation client against `sllm-faas serve`: lm-evaluation-harness runs two local tasks (tests/data/lm_eval,
no dataset download) with `local-completions` loglikelihood (token-id prompts, echo, logprobs) and
`local-chat-completions` generate_until; its scores must be what the openai client gets from the same server."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_openai_params import KEY, client, server  # noqa: F401 (fixtures: one served SmolLM2)

DATA = Path(__file__).parent / "data" / "lm_eval"


def test_lm_eval_loglikelihood_and_generate_until(smollm2, server, client, monkeypatch):  # noqa: F811
    lm_eval = pytest.importorskip("lm_eval", reason="the dev extra (lm_eval) is not installed")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.chdir(DATA)  # the tasks' data_files are relative
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tasks = TaskManager(include_path=str(DATA))
    scored = lm_eval.simple_evaluate(
        model="local-completions", tasks=["sllm_capitals_mc"], task_manager=tasks, log_samples=True,
        model_args=f"model=smollm2,base_url={server}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={smollm2['hf']},num_concurrent=1,max_retries=1")
    tokenizer = AutoTokenizer.from_pretrained(smollm2["hf"])
    samples = scored["samples"]["sllm_capitals_mc"]
    assert len(samples) == 3
    for sample in samples:
        doc = sample["doc"]
        for choice, (loglikelihood, _) in zip(doc["choices"], sample["filtered_resps"], strict=True):
            context = tokenizer(doc["question"]).input_ids
            whole = tokenizer(doc["question"] + choice).input_ids
            reply = client.completions.create(model="smollm2", prompt=whole, max_tokens=0, echo=True, logprobs=0)
            expected = sum(reply.choices[0].logprobs.token_logprobs[len(context):])
            assert loglikelihood == pytest.approx(expected, abs=1e-4), (doc, choice)
    assert scored["results"]["sllm_capitals_mc"]["acc,none"] == sum(
        max(range(3), key=lambda i, s=s: s["filtered_resps"][i][0]) == s["doc"]["answer"] for s in samples) / 3

    generated = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["sllm_capitals_gen"], task_manager=tasks, log_samples=True,
        apply_chat_template=True, model_args=f"model=smollm2,base_url={server}/v1/chat/completions,"
                                             "num_concurrent=1,max_retries=1")
    samples = generated["samples"]["sllm_capitals_gen"]
    assert len(samples) == 3
    for sample in samples:
        question = sample["arguments"][0][0]
        answer = client.chat.completions.create(model="smollm2", messages=eval_messages(question), max_tokens=24,
                                                temperature=0, stop=["\n"], seed=1234)
        assert sample["resps"][0][0] == answer.choices[0].message.content


def eval_messages(prompt) -> list[dict]:
    """lm_eval hands chat models the conversation as a JsonChatStr: the messages as a JSON string."""
    import json

    return json.loads(prompt[0])  # a (named) tuple of one string
