"""Hostile input to the function runtime's model layer: sampling values at the edges of what the API accepts,
and one request's failure inside the engine (issue #13). The HTTP-level cases are in test_runtime_server.py."""

from __future__ import annotations

import math
import random
import time

import pytest
import requests
import torch

from sllm_faas.runtime.model.sampling import SamplingParams, next_token

EXTREME_TEMPERATURES = [0.0, 1e-300, 1e-30, 1e-6, 1e-5, 0.3, 1.0, 2.0]
EXTREME_TOP_P = [1e-300, 1e-9, 0.5, 0.95, 1.0]


def hostile_logits(rng: random.Random, vocab: int) -> torch.Tensor:
    """Random logits with the values a model or a quantised checkpoint can produce: huge, tiny, -inf."""
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(rng.getrandbits(32))) * rng.choice([1, 50, 1e4])
    for _ in range(rng.randint(0, vocab // 2)):
        logits[rng.randrange(vocab)] = rng.choice([-math.inf, -3e38, 3e38, 1e30, -1e30, 0.0])
    if rng.random() < 0.1:
        logits[:] = -math.inf  # every token masked
    return logits.to(rng.choice([torch.float32, torch.bfloat16, torch.float16]))


def test_hostile_sampling_values_never_raise_and_return_a_token_id():
    rng = random.Random(1234)
    for case in range(600):
        vocab = rng.choice([2, 17, 320, 4096])
        logits = hostile_logits(rng, vocab)
        params = SamplingParams(temperature=rng.choice(EXTREME_TEMPERATURES), top_p=rng.choice(EXTREME_TOP_P),
                                seed=rng.choice([0, 1, 2**63 - 1, rng.getrandbits(63)]))
        token = next_token(logits, params, step=rng.randrange(10_000))
        assert isinstance(token, int) and 0 <= token < vocab, (case, params, token)


def test_tiny_temperature_is_greedy_and_sampling_stays_seeded():
    logits = torch.randn(320, generator=torch.Generator().manual_seed(7)) * 5
    greedy = int(torch.argmax(logits))
    for temperature in (1e-300, 1e-30, 1e-6):
        assert next_token(logits, SamplingParams(temperature=temperature), 0) == greedy
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=99)
    draws = [next_token(logits, params, step) for step in range(32)]
    assert draws == [next_token(logits, params, step) for step in range(32)]  # (seed, step) decides the draw
    assert len(set(draws)) > 1  # and it is a real draw, not the argmax


@pytest.fixture(scope="module")
def engine(smollm2):
    from sllm_faas.runtime.loader import load
    from sllm_faas.runtime.model.engine import Engine
    from sllm_faas.runtime.model.llama import DecoderConfig, build_decoder
    from sllm_faas.runtime.model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    model = build_decoder(DecoderConfig.from_dir(smollm2["sllm"]), load(smollm2["sllm"]))
    started = Engine(model, Tokenizer(smollm2["sllm"]), max_batch=4, max_seq=512).start()
    yield started
    started.stop()


def wait_for_tokens(generation, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(generation.output_ids) < count:
        assert generation.finish_reason is None, generation.error
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.005)


def test_one_requests_failure_in_the_engine_does_not_fail_its_batch_mates(engine):
    """Any failure in one request's own work (here its text emission, with a stop sequence of a type the HTTP
    layer refuses but the engine must not trust) ends that request with an error; a request generating
    beside it finishes with exactly the tokens it has alone."""
    prompt = engine.tokenizer.encode("Once upon a time, in a small village,")
    params = dict(max_tokens=40, temperature=0, ignore_eos=True)
    alone = engine.submit(prompt, SamplingParams(**params))
    alone.wait()

    normal = engine.submit(prompt, SamplingParams(**params))
    wait_for_tokens(normal, 2)  # running: the hostile request joins its batch
    hostile = engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0, stop=[b"x"]))
    with pytest.raises(RuntimeError, match="generation failed"):
        hostile.wait()
    assert normal.wait() == alone.text and normal.output_ids == alone.output_ids
    assert normal.finish_reason == "length" and hostile.finish_reason == "error"


MIGRATION_ROUTES = [("GET", "/_/requests"), ("POST", "/_/requests/cmpl-x/migrate"), ("GET", "/_/migration"),
                    ("GET", "/_/migration/m-1"), ("DELETE", "/_/migration/m-1"), ("POST", "/_/migration/m-1/tokens"),
                    ("POST", "/_/migration/m-1/commit")]


def started(tmp_path, **env: str):
    """A real runtime (gunicorn) whose model does not exist: it serves HTTP at once, no weights are loaded."""
    from test_runtime_server import ROOT, Server, shrinkwrap

    build = shrinkwrap(tmp_path, "fn", ROOT / "templates" / "sllm-python" / "function")
    server = Server(build, tmp_path / "no-such-model", SLLM_MODEL_STORE=str(tmp_path), **env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(server.url + "/_/health", timeout=5)
            return server
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a loaded machine
            time.sleep(0.05)
    server.stop()
    raise TimeoutError("the runtime never answered")


def test_migration_routes_refuse_everyone_without_a_migration_token(tmp_path):
    """They expose other callers' prompts and let anyone write into their streams: no token, no migration."""
    server = started(tmp_path, SLLM_MIGRATION_TOKEN="")
    try:
        for method, path in MIGRATION_ROUTES:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
                response = requests.request(method, server.url + path, json={}, headers=headers, timeout=10)
                assert response.status_code == 403, (method, path, response.text)
                assert "SLLM_MIGRATION_TOKEN" in response.json()["error"]["message"]
        assert requests.get(server.url + "/_/health", timeout=10).status_code == 200
        assert requests.get(server.url + "/_/ready", timeout=10).status_code == 503  # open: it says why
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
    finally:
        server.stop()


def test_migration_routes_need_the_exact_bearer_token(tmp_path):
    server = started(tmp_path / "a", SLLM_MIGRATION_TOKEN="s3cret-token")
    try:
        for method, path in MIGRATION_ROUTES:
            for headers in ({}, {"Authorization": "Bearer s3cret"}, {"Authorization": "s3cret-token"},
                            {"Authorization": "Bearer s3cret-token2"}):
                response = requests.request(method, server.url + path, json={}, headers=headers, timeout=10)
                assert response.status_code == 401, (method, path, headers, response.text)
        listed = requests.get(server.url + "/_/migration", headers={"Authorization": "Bearer s3cret-token"},
                              timeout=10)
        assert listed.status_code == 200 and listed.json() == {"object": "list", "data": []}
    finally:
        server.stop()


def test_hostile_json_on_migration_routes_is_400_not_500(tmp_path):
    """The migration routes parse bodies with the one hostile-JSON parser (sllm_faas/common/jsonbody.py) too."""
    server = started(tmp_path / "a", SLLM_MIGRATION_TOKEN="s3cret-token")
    auth = {"Authorization": "Bearer s3cret-token", "Content-Type": "application/json"}
    try:
        for path in ("/_/requests/cmpl-x/migrate", "/_/migration/m-1/tokens", "/_/migration/m-1/commit"):
            for raw in (b"[" * 100_000, b'{"a": NaN}', b'{"a": "\\ud800"}', b'{"a": 1' + b"0" * 5000 + b"}",
                        b"[1, 2]", b"\xff"):
                response = requests.post(server.url + path, data=raw, headers=auth, timeout=10)
                assert response.status_code == 400, (path, raw[:20], response.status_code, response.text)
                assert response.json()["error"]["message"], response.text
    finally:
        server.stop()
