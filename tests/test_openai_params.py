"""The OpenAI API without silent gaps (issue #17): every parameter is implemented exactly or refused with a 400
naming it. A real `sllm-faas serve --api-key` (gunicorn, the real SmolLM2) driven by the official openai client;
the references are the server's own greedy runs, its raw logprobs, and transformers' generate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests

from sllm_faas.runtime.embedded_redis import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REPEAT = "one two three one two three one two three"


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    port = free_tcp_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "SLLM_SERVED_MODEL_NAME": "smollm2", "SLLM_TORCH_THREADS": "2", "SLLM_MAX_BATCH": "8",
           "SLLM_MAX_TOKENS": "256"}
    env.pop("SLLM_API_KEY", None)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "sllm_faas", "serve", str(smollm2["sllm"]), "--port",
                                    str(port), "--host", "127.0.0.1", "--api-key", KEY], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            if requests.get(url + "/_/ready", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def completion(client, **kwargs):
    return client.completions.create(model="smollm2", **kwargs)


def test_api_key_request_id_and_vllm_endpoints(server, client):
    unauthorised = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        unauthorised.models.list()
    assert refused.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/completions"):
        response = requests.post(server + path, json={}, timeout=10) if "compl" in path else \
            requests.get(server + path, timeout=10)
        assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/_/health", "/_/ready", "/metrics", "/health", "/version"):  # open without the key
        assert requests.get(server + path, timeout=10).status_code == 200, path
    assert requests.get(server + "/version", timeout=10).json()["version"]

    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    raw = client.completions.with_raw_response.create(model="smollm2", prompt="Hi", max_tokens=1,
                                                      extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert len(requests.get(server + "/health", timeout=10).headers["X-Request-Id"]) == 32  # generated

    tokens = requests.post(server + "/tokenize", json={"prompt": "The capital of France", "return_token_strs": True},
                           timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) and "".join(tokens["token_strs"]) == "The capital of France"
    back = requests.post(server + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json()
    assert back == {"prompt": "The capital of France"}
    chat = requests.post(server + "/tokenize", json={"messages": QUESTION}, timeout=10).json()
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens and chat["max_model_len"] == 2048


def test_token_prompts_batches_and_n(server, client):
    ids = requests.post(server + "/tokenize", json={"prompt": "The capital of France is"}, timeout=10).json()
    greedy = dict(max_tokens=6, temperature=0)
    alone = [completion(client, prompt=p, **greedy).choices[0].text for p in ("The capital of France is", "1, 2, 3,")]
    assert completion(client, prompt=ids["tokens"], **greedy).choices[0].text == alone[0]
    batched = completion(client, prompt=["The capital of France is", "1, 2, 3,"], n=2, **greedy)
    assert [c.index for c in batched.choices] == [0, 1, 2, 3]
    assert [c.text for c in batched.choices] == [alone[0], alone[0], alone[1], alone[1]]
    counts = requests.post(server + "/tokenize", json={"prompt": "1, 2, 3,"}, timeout=10).json()["count"]
    assert batched.usage.prompt_tokens == ids["count"] + counts  # each prompt once, whatever n
    assert batched.usage.completion_tokens == 4 * 6
    token_batch = completion(client, prompt=[ids["tokens"], ids["tokens"][:-1]], **greedy)
    assert token_batch.choices[0].text == alone[0] and len(token_batch.choices) == 2

    seeded = dict(prompt="My favourite colour is", max_tokens=12, temperature=1.0, seed=99)
    many = completion(client, n=3, **seeded)
    singles = [completion(client, **{**seeded, "seed": 99 + j}).choices[0].text for j in range(3)]
    assert [c.text for c in many.choices] == singles  # choice j is seeded seed + j
    assert len(set(singles)) > 1
    streamed = {}
    for chunk in completion(client, n=3, stream=True, **seeded):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[j] for j in range(3)] == singles
    chats = client.chat.completions.create(model="smollm2", messages=QUESTION, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in chats.choices] == [0, 1] and chats.choices[0].message == chats.choices[1].message


def test_logprobs_are_the_models_and_echo_scores_the_prompt(client):
    prompt = "The capital of France is"
    generated = completion(client, prompt=prompt, max_tokens=8, temperature=0, logprobs=5)
    logprobs = generated.choices[0].logprobs
    assert "".join(logprobs.tokens) == generated.choices[0].text and len(logprobs.tokens) == 8
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 5 and max(top.values()) == logprob and top[token] == logprob  # greedy: the argmax
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])

    # lm-evaluation-harness loglikelihood: the prompt's own logprobs, scored by the prefill, equal the decode's
    scored = completion(client, prompt=prompt + generated.choices[0].text, max_tokens=0, echo=True, logprobs=1)
    echo = scored.choices[0]
    assert echo.text == prompt + generated.choices[0].text and scored.usage.completion_tokens == 0
    assert echo.logprobs.token_logprobs[0] is None and echo.logprobs.top_logprobs[0] is None
    tail = echo.logprobs.token_logprobs[-8:]
    assert tail == pytest.approx(logprobs.token_logprobs, abs=2e-2)
    assert echo.logprobs.tokens[-8:] == logprobs.tokens
    one = completion(client, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert one.choices[0].text == prompt + logprobs.tokens[0]
    assert one.choices[0].logprobs.token_logprobs[-1] == pytest.approx(logprobs.token_logprobs[0], abs=2e-2)
    streamed = list(completion(client, prompt=prompt, max_tokens=4, echo=True, logprobs=1, temperature=0,
                               stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt + "".join(logprobs.tokens[:4])
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed if c.choices[0].logprobs) == \
        one.usage.prompt_tokens + 4

    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert len(content) == chat.usage.completion_tokens
    assert all(c.top_logprobs[0].logprob == c.logprob and len(c.top_logprobs) == 3 for c in content)
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed_content = [c for chunk in stream for c in (chunk.choices[0].logprobs.content
                                                        if chunk.choices and chunk.choices[0].logprobs else [])]
    assert [(c.token, c.logprob) for c in streamed_content] == [(c.token, c.logprob) for c in content]


def test_penalties_follow_the_raw_logprobs(client):
    """Greedy with frequency and presence penalties: each chosen token is the argmax of the model's raw logprobs
    (reported alongside) minus the penalties its earlier output tokens earn, vLLM's definition."""
    frequency, presence = 1.5, 0.7
    reply = completion(client, prompt=REPEAT, max_tokens=16, temperature=0, logprobs=20,
                       frequency_penalty=frequency, presence_penalty=presence, extra_body={"ignore_eos": True})
    plain = completion(client, prompt=REPEAT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].text != plain.choices[0].text
    logprobs = reply.choices[0].logprobs
    counts: dict[str, int] = {}
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
        penalised = {t: lp - frequency * counts.get(t, 0) - presence * (t in counts) for t, lp in top.items()}
        assert token in top and max(penalised, key=penalised.get) == token
        counts[token] = counts.get(token, 0) + 1


def test_repetition_penalty_equals_transformers(smollm2, client):
    """vLLM's repetition_penalty and transformers' are the same processor (over prompt and output tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2["hf"])
    model = AutoModelForCausalLM.from_pretrained(smollm2["hf"], torch_dtype=torch.float32)
    ids = tokenizer(REPEAT, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.5, min_new_tokens=12)
    reply = completion(client, prompt=ids[0].tolist(), max_tokens=12, temperature=0,
                       extra_body={"repetition_penalty": 1.5, "ignore_eos": True})
    assert reply.choices[0].text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_top_k_min_p_logit_bias_min_tokens(client):
    prompt = dict(prompt="My favourite colour is", max_tokens=10)
    greedy = completion(client, temperature=0, logprobs=2, **prompt).choices[0]
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # keep only the most likely token: greedy, whatever the seed
        assert completion(client, temperature=1.5, seed=5, extra_body=extra, **prompt).choices[0].text == greedy.text
    first, second = sorted(greedy.logprobs.top_logprobs[0].items(), key=lambda kv: -kv[1])
    ids = requests.post(str(client.base_url).replace("/v1/", "") + "/tokenize",
                        json={"prompt": first[0], "add_special_tokens": False}, timeout=10).json()["tokens"]
    assert len(ids) == 1
    banned = completion(client, temperature=0, max_tokens=1, logit_bias={str(ids[0]): -100}, logprobs=1,
                        prompt=prompt["prompt"]).choices[0]
    assert banned.logprobs.tokens == [second[0]]
    forced = completion(client, temperature=0, max_tokens=3, logit_bias={str(ids[0]): 100},
                        prompt="Numbers: 1, 2, 3").choices[0]
    assert forced.text == first[0] * 3

    short = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    longer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=64, temperature=0,
                                            extra_body={"min_tokens": short.usage.completion_tokens + 5})
    assert longer.usage.completion_tokens >= short.usage.completion_tokens + 5
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)


def test_tool_history_is_accepted(client):
    """Assistant messages with content null and tool_calls, and tool results, reach the template."""
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as refused:  # SmolLM2's template concatenates content: None fails
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    assert "chat template" in refused.value.body["message"]
    messages[1]["content"] = ""
    assert client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2).choices


REFUSED = {  # name -> (endpoint, body, the parameter the 400 names)
    "unknown field": ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    "unknown chat field": ("/v1/chat/completions", {"messages": QUESTION, "audio": {}}, "audio"),
    "tools without template support": ("/v1/chat/completions", {"messages": QUESTION, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    "tool_choice required": ("/v1/chat/completions", {"messages": QUESTION, "tool_choice": "required"},
                             "tool_choice"),
    "json response_format": ("/v1/chat/completions", {"messages": QUESTION,
                                                      "response_format": {"type": "json_object"}}, "response_format"),
    "best_of": ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    "suffix": ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    "logprobs over 20": ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    "top_logprobs alone": ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
    "logit_bias range": ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    "logit_bias key": ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    "presence_penalty": ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    "repetition_penalty": ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    "min_p": ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    "top_k": ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    "n": ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    "max_tokens 0 without echo": ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    "token out of vocabulary": ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    # a few-kilobyte body must not queue thousands of generations (prompts x n is bounded)
    "batch of 5000 prompts": ("/v1/completions", {"prompt": ["a"] * 5000, "max_tokens": 1}, "prompt"),
    "prompts x n over the limit": ("/v1/completions", {"prompt": ["a"] * 8, "n": 9}, "prompt"),
    "message field": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "x": 1}]},
                      "messages[0].x"),
    "template kwargs": ("/v1/chat/completions", {"messages": QUESTION, "chat_template_kwargs": {"messages": []}},
                        "chat_template_kwargs"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_unsupported_parameters_are_400s_naming_them(server, case):
    path, body, param = REFUSED[case]
    response = requests.post(server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


def test_harmless_fields_are_accepted(client):
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2, user="u-1",
                                           metadata={"k": "v"}, store=False, parallel_tool_calls=False,
                                           response_format={"type": "text"}, tool_choice="none")
    assert reply.choices[0].message.content
