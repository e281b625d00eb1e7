"""The function runtime as OpenFaaS builds it: template + handler shrinkwrapped into build/<fn>/, served by
gunicorn, called with the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from prom import value
from schema_doc import assert_keys_documented

from sllm_faas.runtime.embedded_redis import free_tcp_port
from sllm_faas.runtime.local.build import shrinkwrap as build_function

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def shrinkwrap(build_root: Path, function: str, handler_dir: Path) -> Path:
    """What `faas-cli build --shrinkwrap` does: the template, with the handler copied into function/."""
    (build_root / "build").mkdir(parents=True, exist_ok=True)
    return build_function("sllm-python", handler_dir, build_root / "build" / function)


class Server:
    def __init__(self, cwd: Path, model: Path, **env: str) -> None:
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "SLLM_MODEL": str(model), "SLLM_TORCH_THREADS": "2", **env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sllm_faas", "serve", "--port", str(self.port), "--host", "127.0.0.1",
             "--app", "index:app"], cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.first_ready_status = None

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                response = requests.get(self.url + "/_/ready", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.02)
                continue
            self.first_ready_status = self.first_ready_status or response.status_code
            if response.status_code == 200:
                return response.json()
            time.sleep(0.05)
        raise TimeoutError("the runtime never became ready")

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        try:
            output, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return output


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    build = shrinkwrap(tmp_path_factory.mktemp("faas"), "smollm2", ROOT / "examples" / "smollm2" / "function")
    instance = Server(build, smollm2["sllm"], SLLM_SERVED_MODEL_NAME="smollm2", SLLM_MAX_TOKENS="256",
                      SLLM_MAX_BODY_BYTES="65536", SLLM_MAX_PROMPT_TOKENS="512")
    instance.ready_body = instance.wait_ready()
    yield instance
    instance.log = instance.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_readiness_waits_for_the_model(server):
    assert server.first_ready_status == 503  # health answered before the model was loaded
    assert requests.get(server.url + "/_/health").json() == {"status": "ok"}
    body = server.ready_body
    assert body["ready"] is True and body["model"] == "smollm2"
    breakdown = body["cold_start"]
    for step in ("imports_s", "staging_wait_s", "load_s", "build_s", "warming_s", "process_start_to_ready_s"):
        assert breakdown[step] >= 0
    assert breakdown["tier"] in ("dram", "ssd")
    assert breakdown["process_start_to_ready_s"] >= breakdown["imports_s"] + breakdown["load_s"]


def test_chat_and_completion_with_openai_client(client):
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens > 10 and chat.usage.completion_tokens > 0

    text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    completion = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert streamed == completion.choices[0].text


def test_stop_sequences_and_seeded_sampling(client):
    first = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                      stop=[" 7"])
    assert first.choices[0].finish_reason == "stop" and " 7" not in first.choices[0].text
    runs = [client.completions.create(model="smollm2", prompt="My favourite colour is", max_tokens=16,
                                      temperature=0.9, top_p=0.95, seed=1234).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_eight_concurrent_streams(client):
    prompts = [f"Count from {start}: {start}, {start + 1}," for start in range(1, 9)]
    expected = [client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0).choices[0].text
                for p in prompts]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(stream, prompts))
    assert got == expected


def test_openfaas_invoke_calls_the_handler(server):
    response = requests.post(server.url + "/", json={"question": "What is the capital of France?"}, timeout=120)
    assert response.status_code == 200
    assert "Paris" in response.json()["answer"]
    bad = requests.post(server.url + "/", json={"nothing": 1}, timeout=30)
    assert bad.status_code == 400 and "question" in bad.json()["error"]


@pytest.mark.parametrize("max_tokens", ['"abc"', "1e400", "-1", "[1]", "true"])
def test_example_handler_bad_max_tokens_is_a_400_naming_it_not_a_500(server, max_tokens):
    body = '{"question": "What is the capital of France?", "max_tokens": ' + max_tokens + "}"
    response = requests.post(server.url + "/", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    error = openai_error(response, 400)
    assert error["param"] == "max_tokens" or "1e400" in error["message"], error


def test_example_handler_null_max_tokens_means_the_default(server):
    response = requests.post(server.url + "/", json={"question": "What is the capital of France?",
                                                     "max_tokens": None}, timeout=120)
    assert response.status_code == 200 and "Paris" in response.json()["answer"]


@pytest.mark.parametrize("body", ["{nope", "[" * 20_000, '{"question": "\\ud800"}', ""])
def test_handler_body_that_is_not_acceptable_json_is_a_400(server, body):
    response = requests.post(server.url + "/", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert "request body" in openai_error(response, 400)["message"]


def openai_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


BAD_REQUESTS = {
    "not json": ("/v1/chat/completions", "{nope", 400),
    "no messages": ("/v1/chat/completions", {"model": "smollm2"}, 400),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    "max_tokens too big": ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400),
    "max_tokens not int": ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    "temperature": ("/v1/completions", {"prompt": "x", "temperature": 7}, 400),
    "n": ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    "stop list": ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    "prompt type": ("/v1/completions", {"prompt": {"a": 1}}, 400),
    "long prompt": ("/v1/completions", {"prompt": "word " * 2000}, 400),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
    "oversized body": ("/v1/completions", {"prompt": "x" * 100_000}, 413),
    "deep json": ("/v1/completions", "[" * 20_000 + "]" * 20_000, 400),
    "deep json object": ("/v1/chat/completions", '{"messages": ' + "[" * 5000 + "]" * 5000 + "}", 400),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400),
    "lone surrogate": ("/v1/completions", '{"prompt": "\\ud800 alone"}', 400),
    "lone surrogate in chat": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    "non-finite number": ("/v1/completions", '{"prompt": "x", "temperature": 1e400}', 400),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client, case):
    path, body, status = BAD_REQUESTS[case]
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    openai_error(response, status)
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=1).choices[0].finish_reason


def test_hostile_sampling_tiny_temperature_does_not_fail_batch_mates(server, client):
    """temperature=1e-300 is accepted (0 <= t <= 2) and used to overflow to inf, failing every request generating
    beside it; now it is greedy, and a stream running beside it gets the tokens it gets alone."""
    prompt = dict(model="smollm2", prompt="Once upon a time, in a small village,", max_tokens=40, temperature=0,
                  extra_body={"ignore_eos": True})
    alone = client.completions.create(**prompt).choices[0].text
    stream = client.completions.create(stream=True, **prompt)
    pieces = [next(iter(stream)).choices[0].text]  # generating now: the hostile request joins its batch
    hostile = requests.post(server.url + "/v1/completions", json={"prompt": "Tell me a story", "max_tokens": 8,
                                                                  "temperature": 1e-300}, timeout=120)
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == alone
    assert hostile.status_code == 200, hostile.text
    greedy = client.completions.create(model="smollm2", prompt="Tell me a story", max_tokens=8, temperature=0)
    assert hostile.json()["choices"][0]["text"] == greedy.choices[0].text


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=0)


def test_metrics(server, client):
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    text = requests.get(server.url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count",
                 "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert name in text, name
    assert value(text, "sllm_cold_start_seconds_count", phase="load", model_name="smollm2") == 1


def test_template_default_handler_log_line_and_clean_shutdown(smollm2, tmp_path):
    build = shrinkwrap(tmp_path, "fn", ROOT / "templates" / "sllm-python" / "function")
    instance = Server(build, smollm2["sllm"])
    try:
        instance.wait_ready()
        ok = requests.post(instance.url + "/", json={"prompt": "The capital of France is", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["completion"]
        bad = requests.post(instance.url + "/", json={"prompt": "x", "max_tokens": -1}, timeout=60)
        assert openai_error(bad, 400)["param"] == "max_tokens"
        # upstream python3-http routes every path to the handler (openfaas/python-flask-template,
        # template/python3-http/index.py: `/` and `/<path:path>`), with event.body the raw bytes
        nested = requests.post(instance.url + "/some/path", data=b'{"prompt": "Hi", "max_tokens": 1}', timeout=60)
        assert nested.status_code == 200 and "completion" in nested.json()
        for ours in ("/v1/nothing", "/_/nothing", "/v1", "/_"):
            assert openai_error(requests.post(instance.url + ours, data=b"{}", timeout=10), 404)
        assert requests.post(instance.url + "/", json={"prompt": ""}, timeout=10).status_code == 400
    finally:
        output = instance.stop()
    assert "cold start: start=spawn tier=" in output and "warming=" in output
    assert instance.process.returncode == 0


def test_missing_model_reports_not_ready(tmp_path):
    build = shrinkwrap(tmp_path, "fn", ROOT / "templates" / "sllm-python" / "function")
    instance = Server(build, tmp_path / "no-such-model", SLLM_MODEL_STORE=str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                response = requests.get(instance.url + "/_/ready", timeout=2)
                if response.json().get("error"):
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        assert response.status_code == 503 and "not a checkpoint" in response.json()["error"]
        completion = requests.post(instance.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert openai_error(completion, 503)["code"] == "not_ready"
    finally:
        instance.stop()



def test_instance_registers_takes_over_its_booking_and_withdraws(smollm2, tmp_path, redis_ns):
    build = shrinkwrap(tmp_path, "fn", ROOT / "templates" / "sllm-python" / "function")
    ledger = redis_ns.prefix + "node:node-a:slots"
    redis_ns.client.zadd(ledger, {"booking-1": time.time() + 60})
    instance = Server(build, smollm2["sllm"], SLLM_REDIS_URL=redis_ns.url, SLLM_KEY_PREFIX=redis_ns.prefix,
                      SLLM_INSTANCE_ID="fn-1", SLLM_NODE_ID="node-a", SLLM_BOOKING_ID="booking-1",
                      SLLM_FUNCTION_NAME="fn", SLLM_INSTANCE_HEARTBEAT_S="1", SLLM_SERVED_MODEL_NAME="smollm2")
    try:
        instance.wait_ready()
        record_key = redis_ns.prefix + "instance:fn-1"
        deadline = time.monotonic() + 10
        while redis_ns.client.hget(record_key, "state") != "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        record = redis_ns.client.hgetall(record_key)
        assert record["state"] == "ready" and record["model"] == "smollm2" and record["node"] == "node-a"
        assert record["function"] == "fn" and record["address"] == ""
        assert 0 < redis_ns.client.ttl(record_key) <= 3
        assert redis_ns.client.zrange(ledger, 0, -1) == ["fn-1"]
        assert redis_ns.client.smembers(redis_ns.prefix + "instances") == {"fn-1"}
        assert_keys_documented(redis_ns.client, redis_ns.prefix)
    finally:
        instance.stop()
    assert not redis_ns.client.exists(record_key) and redis_ns.client.zcard(ledger) == 0


def test_instance_serves_while_redis_is_down(smollm2, tmp_path):
    build = shrinkwrap(tmp_path, "fn", ROOT / "templates" / "sllm-python" / "function")
    instance = Server(build, smollm2["sllm"], SLLM_REDIS_URL=f"redis://127.0.0.1:{free_tcp_port()}/0")
    try:
        instance.wait_ready()
        ok = requests.post(instance.url + "/", json={"prompt": "The capital of France is", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
    finally:
        instance.stop()
    assert instance.process.returncode == 0
