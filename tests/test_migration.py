"""Live migration between real runtime instances (gunicorn, the real SmolLM2), coordinated through real Redis.

Faults are real: destinations whose serving process dies (os._exit) or stops (SIGSTOP) at a named
protocol step (runtime/migration/faults.py), a coordinator process that dies mid-migration, a source
SIGKILLed after the handover. Every stream is checked token for token against the same request run
without migration.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import openai
import pytest
import redis
import requests
import torch
import torch.nn.functional as F
from prom import value
from schema_doc import assert_keys_documented

from sllm_faas.controller.migration import Migrator
from sllm_faas.redis_schema.keys import Keys
from sllm_faas.runtime.embedded_redis import free_tcp_port
from sllm_faas.runtime.migration.faults import EXIT_CODE
from sllm_faas.runtime.migration.protocol import auth_headers
from sllm_faas.runtime.migration.record import events_of

ROOT = Path(__file__).resolve().parent.parent
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
REQUESTS = {  # name -> (chat?, request parameters)
    "greedy-chat": (True, dict(messages=STORY, max_tokens=48, temperature=0)),
    "seeded-completion": (False, dict(prompt="The old lighthouse keeper opened the door and", max_tokens=48,
                                      temperature=0.9, top_p=0.95, seed=1234)),
    "greedy-completion": (False, dict(prompt="Ten facts about the moon:\n1.", max_tokens=40, temperature=0)),
    "greedy-chat-2": (True, dict(messages=[{"role": "user", "content": "Describe a storm at sea."}], max_tokens=40,
                                 temperature=0)),
    "long-chat": (True, dict(messages=STORY, max_tokens=100, temperature=0)),
    "longer-chat": (True, dict(messages=STORY, max_tokens=200, temperature=0)),  # outlives a coordinator restart
    # every per-request sampling state: penalties count the tokens so far, which the migration must carry
    "penalised-completion": (False, dict(prompt="The old lighthouse keeper opened the door and", max_tokens=64,
                                         temperature=0.9, top_p=0.95, seed=4321, presence_penalty=0.6,
                                         frequency_penalty=0.8, logit_bias={"13": -5}, logprobs=3,
                                         extra_body={"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.3,
                                                     "min_tokens": 8})),
}


class Instance:
    """`sllm-faas serve` (gunicorn master + one worker, in a process group of their own), registered in Redis
    under `name` on `node`."""

    def __init__(self, model: Path, name: str, node: str, redis: tuple[str, str] | None, log_dir: Path, **env: str):
        self.name, self.port = name, free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        environment = {**os.environ, "SLLM_SERVED_MODEL_NAME": "smollm2", "SLLM_TORCH_THREADS": "1",
                       "SLLM_MAX_TOKENS": "256", "SLLM_MAX_BATCH": "4", "SLLM_MAX_BODY_BYTES": "65536",
                       "SLLM_INSTANCE_ID": name, "SLLM_NODE_ID": node, "SLLM_ADVERTISE_URL": self.url,
                       "SLLM_INSTANCE_HEARTBEAT_S": "1", "SLLM_MIGRATION_STAGE_TIMEOUT_S": "5", **env}
        if redis:  # registered in Redis, and writes its migration incidents there
            environment.update(SLLM_REDIS_URL=redis[0], SLLM_KEY_PREFIX=redis[1])
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "sllm_faas", "serve", str(model), "--port",
                                             str(self.port), "--host", "127.0.0.1"], cwd=ROOT, env=environment,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> Instance:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if requests.get(self.url + "/_/ready", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:  # not listening yet, or too busy loading to answer
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} never became ready")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def in_flight(self) -> list[dict]:
        return requests.get(self.url + "/_/requests", headers=auth_headers(), timeout=10).json()["data"]

    def migration(self, migration_id: str) -> dict:
        return requests.get(f"{self.url}/_/migration/{migration_id}", headers=auth_headers(), timeout=10).json()

    def kill(self) -> None:
        """SIGKILL the master and its worker at once (a stopped worker too): the instance dies."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def worker_exits(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if "exited with code" in line]


class Call(threading.Thread):
    """One client request on its own thread, made with the official openai client, streaming or not."""

    def __init__(self, instance: Instance, name: str, stream: bool) -> None:
        super().__init__(daemon=True)
        self.chat, params = REQUESTS[name]
        self.instance, self.params, self.stream = instance, {**params, "model": "smollm2"}, stream
        self.pieces: list[str] = []
        self.logprobs: list = []  # (token, logprob, top_logprobs) per token, where the request asks for them
        self.times: list[float] = []
        self.finish_reason = self.usage = self.error = None
        self.start()

    def run(self) -> None:
        api = self.instance.client().chat.completions if self.chat else self.instance.client().completions
        params = dict(self.params)
        params["extra_body"] = {"ignore_eos": True, **params.get("extra_body", {})}
        try:
            if not self.stream:
                reply = api.create(**params)
                choice = reply.choices[0]
                self.pieces = [choice.message.content if self.chat else choice.text]
                self._logprobs(choice.logprobs)
                self.finish_reason, self.usage = choice.finish_reason, reply.usage.completion_tokens
                return
            for chunk in api.create(stream=True, stream_options={"include_usage": True}, **params):
                if chunk.usage:
                    self.usage = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                self._logprobs(choice.logprobs)
                text = choice.delta.content if self.chat else choice.text
                if text:
                    self.pieces.append(text)
                    self.times.append(time.monotonic())
                self.finish_reason = choice.finish_reason or self.finish_reason
        except Exception as exc:  # the test asserts on it
            self.error = exc

    def _logprobs(self, logprobs) -> None:
        if logprobs is not None and not self.chat:
            self.logprobs += zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True)

    def result(self) -> tuple[str, str | None, int | None, list]:
        self.join(timeout=120)
        assert not self.is_alive(), "the request never finished"
        assert self.error is None, repr(self.error)
        assert len(self.logprobs) == (self.usage if "logprobs" in self.params else 0)
        return "".join(self.pieces), self.finish_reason, self.usage, self.logprobs


@pytest.fixture(scope="module", autouse=True)
def migration_token():
    """Migration needs credentials (the routes refuse without SLLM_MIGRATION_TOKEN): instances, coordinators
    and the controller started here inherit this process's token."""
    previous = os.environ.get("SLLM_MIGRATION_TOKEN")
    os.environ["SLLM_MIGRATION_TOKEN"] = uuid.uuid4().hex
    yield os.environ["SLLM_MIGRATION_TOKEN"]
    if previous is None:
        del os.environ["SLLM_MIGRATION_TOKEN"]
    else:
        os.environ["SLLM_MIGRATION_TOKEN"] = previous


@pytest.fixture(scope="module")
def namespace(redis_target):
    """A Redis key prefix shared by this module's instances and coordinators; its keys go afterwards."""
    from conftest import delete_prefixed

    client = redis.Redis.from_url(redis_target.url, decode_responses=True)
    prefix = f"sllm-test:{uuid.uuid4().hex[:12]}:"
    yield client, prefix, redis_target.url
    delete_prefixed(client, prefix)
    client.close()


FAULTS = [("destination.tokens", "exit", "destination_failed"), ("destination.round", "hang", "destination_timeout"),
          ("destination.commit", "exit", "destination_failed"), ("destination.commit", "hang", "destination_timeout")]
RELAY_FAULTS = ["exit", "hang"]


@pytest.fixture(scope="module")
def instances(smollm2, namespace, tmp_path_factory):
    """Every instance this module uses, started at once (they load in parallel), killed at its end: a healthy
    source and destination, a source to drain, and one destination per injected fault (not registered in
    Redis, so no one picks them)."""
    _, prefix, url = namespace
    log_dir = tmp_path_factory.mktemp("instances")
    specs = [("src-a", "node-a", True, {}), ("dst-b", "node-b", True, {}), ("src-drained", "node-d", True, {}),
             ("source.paused:exit", "node-e", False, {"SLLM_MIGRATION_FAULT": "source.paused:exit"})]
    specs += [(f"{step}:{action}", "node-c", False, {"SLLM_MIGRATION_FAULT": f"{step}:{action}"})
              for step, action, _ in FAULTS]
    specs += [(f"destination.relay:{action}", "node-c", False, {"SLLM_MIGRATION_FAULT": f"destination.relay:{action}"})
              for action in RELAY_FAULTS]
    started = {name: Instance(smollm2["sllm"], name.replace(".", "-").replace(":", "-"), node,
                              (url, prefix) if registered else None, log_dir, **env)
               for name, node, registered, env in specs}
    try:
        yield {name: instance.wait_ready() for name, instance in started.items()}
    finally:
        for instance in started.values():
            instance.kill()


@pytest.fixture(scope="module")
def pair(instances):
    """A healthy source and destination on two nodes."""
    return instances["src-a"], instances["dst-b"]


@pytest.fixture
def migrator(namespace):
    client, prefix, _ = namespace
    return Migrator(client, Keys(prefix), lease_s=2.0, request_timeout_s=5.0)


REFERENCES: dict[tuple[str, bool], tuple[str, str | None, int | None]] = {}


def reference(instance: Instance, name: str, stream: bool = True) -> tuple[str, str | None, int | None, list]:
    """The request run alone, without migration (computed once per request and mode)."""
    if (name, stream) not in REFERENCES:
        REFERENCES[name, stream] = Call(instance, name, stream).result()
    return REFERENCES[name, stream]


def running_requests(instance: Instance, count: int, min_tokens: int) -> list[str]:
    """The ids of the `count` requests generating on `instance`, once each has `min_tokens` tokens."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = [r for r in instance.in_flight() if r["state"] == "running"]
        if len(rows) >= count and all(r["completion_tokens"] >= min_tokens for r in rows):
            return [r["id"] for r in rows]
        time.sleep(0.01)
    raise AssertionError(f"{count} requests never started generating")


FAST = dict(timeout_s=3.0, handover_timeout_s=2.0)


def eventually(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- numerics: what makes a migrated stream exact -------------------------------------------------

def test_decoder_rows_do_not_depend_on_the_batch_or_on_prefill(smollm2):
    """A token's logits are the same decoded alone, in a batch, or recomputed by a prefill (llama.py doc)."""
    from sllm_faas.runtime.loader import load
    from sllm_faas.runtime.model.llama import DecoderConfig, KVCache, build_decoder, linear
    from sllm_faas.runtime.model.tokenizer import Tokenizer

    torch.manual_seed(0)
    weight = torch.randn(576, 1536).bfloat16()
    plain = weight.clone()
    rows = torch.randn(200, 1536).bfloat16()
    rows[:, ::97] = 4096.0  # large terms make any change of summation order visible in bf16
    weight[:, ::97] = torch.tensor([4096.0, -4096.0]).repeat(8)[: weight[:, ::97].shape[1]].bfloat16()
    assert torch.equal(torch.cat([linear(rows[i:i + 1], weight) for i in range(8)]), F.linear(rows[:8], weight))
    lone = torch.cat([linear(rows[i:i + 1], plain) for i in range(len(rows))])
    for count in (2, 3, 31, 32, 33, 64, 129, 200):  # AMX kernels order sums by the number of rows past 32
        assert torch.equal(linear(rows[:count], plain), lone[:count]), f"{count} rows"

    model = build_decoder(DecoderConfig.from_dir(smollm2["sllm"]), load(smollm2["sllm"]))
    tokenizer = Tokenizer(smollm2["sllm"])
    cache = KVCache(model.config, 4, 256, torch.bfloat16)
    long = "The history of the northern lighthouses, their keepers, their lamps and the ships they saved"
    prompts = [tokenizer.encode(t) for t in (long, "Once upon", "def f(x):")]  # prefills over and under 32 rows

    def forward(tokens, positions, slots):
        return model(torch.tensor(tokens), torch.tensor(positions), cache, torch.tensor(slots))[:, -1]

    generated, alone = [[] for _ in prompts], []
    for slot, prompt in enumerate(prompts):
        generated[slot].append(int(forward([prompt], [list(range(len(prompt)))], [slot])[0].argmax()))
    for _ in range(24):  # all three decode together in slots 0-2
        logits = forward([[g[-1]] for g in generated], [[len(p) + len(g) - 1] for p, g in zip(prompts, generated,
                                                                                            strict=True)], [0, 1, 2])
        for row, tokens in enumerate(generated):
            tokens.append(int(logits[row].argmax()))
        alone.append(logits[0])
    context = prompts[0] + generated[0]
    recomputed = forward([context[:-1]], [list(range(len(context) - 1))], [3])[0]  # one prefill in slot 3
    assert torch.equal(recomputed, alone[-1])
    single = prompts[0] + generated[0][:1]  # prompt 0 decoded alone in slot 3 gives the batched tokens
    for _ in range(24):
        single.append(int(forward([[single[-1]]], [[len(single) - 1]], [3])[0].argmax()))
    assert single[len(prompts[0]):] == generated[0]


# -- the protocol between two real instances ----------------------------------------------------

@pytest.mark.parametrize(("name", "stream", "by_id"), [("greedy-chat", True, False),
                                                       ("seeded-completion", False, True),
                                                       ("penalised-completion", True, False)],
                         ids=["greedy-chat-streaming-by-url", "seeded-completion-not-streaming-by-instance-id",
                              "penalties-top-k-min-p-logit-bias-logprobs-streaming"])
def test_migrated_request_equals_unmigrated(instances, migrator, namespace, name, stream, by_id):
    source, destination = instances["src-a"], instances["dst-b"]
    expected = reference(source, name, stream)
    call = Call(source, name, stream)
    [request_id] = running_requests(source, 1, min_tokens=8)
    if by_id:  # instance ids resolved from Redis; the destination is picked there (a registered healthy one)
        record = migrator.migrate("src-a", request_id, threshold=20)
        destination = instances[record["destination_instance"]]
        assert record["destination_instance"] in ("dst-b", "src-drained")
    else:
        record = migrator.migrate(source.url, request_id, destination.url, threshold=20)
    assert call.result() == expected
    assert record["state"] == "completed" and record["outcome"] == "handed_over", record
    assert record["destination"] == destination.url and record["same_numerics"] == "1"
    assert int(record["rounds"]) >= 2 and int(record["tokens_recomputed"]) > 8 and float(record["pause_s"]) > 0
    assert [e["state"] for e in events_of(record)][:2] == ["pending", "started"]
    assert source.migration(record["id"])["state"] == "completed"
    assert destination.migration(record["id"])["outcome"] == "handed_over"
    metrics = requests.get(source.url + "/metrics", timeout=10).text
    assert value(metrics, "sllm_migrations_total", outcome="handed_over", role="source") >= 1
    assert value(metrics, "sllm_migration_pause_seconds_count") >= 1
    client, prefix, _ = namespace
    assert_keys_documented(client, prefix)


def test_one_of_several_concurrent_requests_is_migrated(pair, migrator):
    source, destination = pair
    names = ["greedy-chat", "greedy-completion", "greedy-chat-2"]
    expected = [reference(source, n) for n in names]
    calls = [Call(source, n, True) for n in names]
    middle = running_requests(source, 3, min_tokens=4)[1]
    record = migrator.migrate(source.url, middle, destination.url)
    assert record["state"] == "completed", record
    assert [c.result() for c in calls] == expected


@pytest.mark.parametrize(("step", "action", "outcome"), FAULTS, ids=[f"{s}:{a}" for s, a, _ in FAULTS])
def test_destination_failure_before_handover_leaves_the_request_on_the_source(pair, instances, migrator, step,
                                                                              action, outcome):
    source, _ = pair
    name = "greedy-chat"
    expected = reference(source, name)
    broken = instances[f"{step}:{action}"]
    call = Call(source, name, True)
    [request_id] = running_requests(source, 1, min_tokens=4)
    threshold = 1 if step == "destination.round" else 20  # a threshold of 1 forces a second round
    record = migrator.migrate(source.url, request_id, broken.url, threshold=threshold, **FAST)
    assert call.result() == expected
    assert record["state"] == "aborted" and record["outcome"] == outcome, record
    if action == "exit":  # its worker died (gunicorn starts another, which knows nothing of the migration)
        assert any(f"exited with code {EXIT_CODE}" in line for line in broken.worker_exits())
    else:  # stopped, not dead: the source timed out on it
        assert not broken.worker_exits() and broken.process.poll() is None
    broken.kill()
    status = source.migration(record["id"])
    assert status["state"] == "aborted" and (step != "destination.commit" or status["pause_s"] > 0)


@pytest.mark.parametrize("action", RELAY_FAULTS)
def test_destination_failure_after_handover_source_takes_the_request_back(pair, instances, migrator, action):
    source, _ = pair
    name = "seeded-completion"
    expected = reference(source, name)
    broken = instances[f"destination.relay:{action}"]
    call = Call(source, name, True)
    [request_id] = running_requests(source, 1, min_tokens=4)
    record = migrator.migrate(source.url, request_id, broken.url, **FAST)
    assert record["state"] == "completed", record  # the handover happened; the failure came after it
    assert call.result() == expected
    broken.kill()
    status = source.migration(record["id"])
    assert status["state"] == "recovered" and status["incident"] == "destination_lost_recovered", status
    stored = migrator.get(record["id"])
    assert stored["incident"] == "destination_lost_recovered"
    assert any(e["by"] == "source:src-a" and e["state"] == "destination_lost_recovered" for e in events_of(stored))


@pytest.mark.parametrize("dies_after", ["pending", "started"])
def test_controller_dies_mid_migration_and_another_finishes_it(pair, migrator, namespace, dies_after):
    source, destination = pair
    _, prefix, url = namespace
    name = "longer-chat"
    expected = reference(source, name)
    call = Call(source, name, True)
    [request_id] = running_requests(source, 1, min_tokens=4)
    environment = {**os.environ, "SLLM_MIGRATION_FAULT": f"controller.{dies_after}:exit"}
    coordinator = subprocess.run([sys.executable, "-m", "sllm_faas", "migrate", source.url, request_id, "--to",
                                  destination.url, "--lease-s", "1.5", "--redis-url", url, "--key-prefix", prefix],
                                 cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)
    assert coordinator.returncode == EXIT_CODE, coordinator.stderr
    [migration_id] = [m for m in migrator.records.live_ids() if migrator.get(m)["request"] == request_id]
    left = migrator.get(migration_id)
    assert left["state"] == dies_after
    assert migrator.recover() == []  # the dead coordinator's lease has not lapsed yet
    time.sleep(max(0.0, float(left["lease_until"]) - time.time()) + 0.05)
    [record] = migrator.recover()
    assert record["state"] == "completed" and record["owner"] == migrator.owner, record
    assert any("taken over" in e["detail"] for e in events_of(record))
    assert call.result() == expected


def test_source_death_before_handover_fails_the_record_and_frees_the_destination(instances, pair, migrator):
    _, destination = pair
    source = instances["source.paused:exit"]
    call = Call(source, "greedy-chat", True)
    [request_id] = running_requests(source, 1, min_tokens=4)
    record = migrator.migrate(source.url, request_id, destination.url, **FAST)
    assert record["state"] == "failed" and record["outcome"] == "source_lost", record
    call.join(timeout=60)
    assert call.error is not None  # its worker died with the request: the client's stream broke
    assert any(f"exited with code {EXIT_CODE}" in line for line in source.worker_exits())
    eventually(lambda: destination.migration(record["id"])["state"] == "aborted")  # the coordinator dropped it
    source.kill()


def test_release_and_source_death_after_handover(instances, pair, migrator):
    """A drain hands both requests over and releases the source's model; the source then dies while it
    still relays one: its client gets an error and the destination stops the request and records it."""
    _, destination = pair
    source = instances["src-drained"]
    short_expected = reference(source, "greedy-chat")
    short = Call(source, "greedy-chat", True)
    [short_id] = running_requests(source, 1, min_tokens=1)
    long = Call(source, "long-chat", True)
    [long_id] = set(running_requests(source, 2, min_tokens=2)) - {short_id}
    records = migrator.drain(source.url, destination.url, threshold=20)
    assert [r["state"] for r in records] == ["completed", "completed"], records
    ready = requests.get(source.url + "/_/ready", timeout=10)
    assert ready.status_code == 503 and "released its model" in ready.json()["error"]
    assert short.result() == short_expected
    assert not migrator.client.exists(migrator.keys.instance("src-drained"))  # its slot is free for the plan
    source.kill()
    long.join(timeout=60)
    assert long.error is not None  # the stream ended with an error, not with a finish
    migration_id = next(r["id"] for r in records if r["request"] == long_id)
    eventually(lambda: destination.migration(migration_id)["state"] == "failed")
    assert destination.migration(migration_id)["incident"] == "source_lost"
    assert migrator.get(migration_id)["incident"] == "source_lost"

    def metrics() -> str:
        return requests.get(destination.url + "/metrics", timeout=10).text

    eventually(lambda: value(metrics(), "vllm:num_requests_running") == 0)  # it stopped generating, freed the slot
    assert value(metrics(), "sllm_migration_incidents_total", kind="source_lost") == 1


def test_bad_requests_get_clear_errors(pair):
    source, destination = pair
    post = functools.partial(requests.post, headers=auth_headers())
    unknown = post(f"{source.url}/_/requests/cmpl-nope/migrate", json={"destination": destination.url}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request"
    malformed = post(f"{source.url}/_/requests/cmpl-nope/migrate", data="{nope",
                     headers={**auth_headers(), "Content-Type": "application/json"}, timeout=10)
    assert malformed.status_code == 400
    no_destination = post(f"{source.url}/_/requests/cmpl-nope/migrate", json={"threshold": 3}, timeout=10)
    assert no_destination.status_code == 400 and no_destination.json()["error"]["param"] == "destination"
    bad_id = post(f"{destination.url}/_/migration/Not_An_Id/tokens", json={"start": 0, "tokens": [1]}, timeout=10)
    assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "migration"
    bad_tokens = post(f"{destination.url}/_/migration/m-x/tokens", json={"start": 0, "tokens": ["a"]}, timeout=10)
    assert bad_tokens.status_code == 400 and bad_tokens.json()["error"]["param"] == "tokens"
    no_params = post(f"{destination.url}/_/migration/m-y/tokens", json={"start": 0, "tokens": [1, 2],
                                                                        "model": "smollm2", "prompt_tokens": 1},
                     timeout=10)
    assert no_params.status_code == 400 and no_params.json()["error"]["param"] == "params"
    wrong_model = post(f"{destination.url}/_/migration/m-z/tokens", json={"start": 0, "tokens": [1], "model": "x",
                                                                         "prompt_tokens": 1}, timeout=10)
    assert wrong_model.status_code == 409 and wrong_model.json()["error"]["param"] == "model"
    oversized = post(f"{destination.url}/_/migration/m-w/tokens", json={"start": 0, "tokens": [1] * 40_000},
                     timeout=10)
    assert oversized.status_code == 413
    assert requests.get(f"{source.url}/_/migration/m-unknown", headers=auth_headers(), timeout=10).status_code == 404
    commit = post(f"{destination.url}/_/migration/m-unknown/commit", json={"start": 0, "tokens": [], "text": ""},
                  timeout=10)
    assert commit.status_code == 404
    listed = requests.get(f"{source.url}/_/requests", headers=auth_headers(), timeout=10)
    assert json.loads(listed.text)["object"] == "list"


def test_controller_runs_the_schedulers_migration_plan(smollm2, namespace, tmp_path):
    """A model whose only fast node is full: the controller's decision is "migrate the instance there to the
    other node, then load", and it carries the migration out; the client's stream goes on, equal."""
    from controller_process import GB, ControllerProcess, publish_model, publish_node

    client, prefix, url = namespace
    source = Instance(smollm2["sllm"], "plan-src", "node-p", (url, prefix), tmp_path)
    destination = Instance(smollm2["sllm"], "plan-dst", "node-q", (url, prefix), tmp_path)
    source.wait_ready()
    destination.wait_ready()
    try:
        keys = Keys(prefix)
        publish_model(client, prefix, "big-model", 10 * GB)
        publish_model(client, prefix, "smollm2", 270 * 10**6)
        publish_node(client, prefix, "node-p", slots=1, dram=["big-model", "smollm2"])   # full: plan-src
        publish_node(client, prefix, "node-q", slots=2, dram=["smollm2"], bw_remote=10**6)  # big-model: remote only
        expected = Call(source, "long-chat", True).result()   # alone, unmigrated (also measures prefill speed)
        eventually(lambda: float(client.hget(keys.instance("plan-src"), "prefill_tokens_per_s") or 0) > 0)
        call = Call(source, "long-chat", True)
        running_requests(source, 1, min_tokens=5)
        controller = ControllerProcess(tmp_path, url, prefix, snapshot_max_age_s="0.1").start()
        try:
            placed = controller.post("/v1/placements", {"model": "big-model"}).json()
            assert (placed["action"], placed["node"], placed["instance"], placed["to"]) == \
                ("migrate_then_load", "node-p", "plan-src", "node-q"), placed
            assert placed["booking"] is None and placed["staging"] is None   # already in node-p's DRAM
            assert call.result() == expected
            eventually(lambda: not client.exists(keys.instance("plan-src")), timeout=30)  # released: slot free
            records = [client.hgetall(keys.migration(m)) for m in client.zrange(keys.migrations, 0, -1)]
            mine = [r for r in records if r.get("reason") == "plan" and r.get("source_instance") == "plan-src"]
            assert [r["state"] for r in mine] == ["completed"] and mine[0]["destination_instance"] == "plan-dst"
            assert value(requests.get(controller.url + "/metrics", timeout=10).text,
                         "sllm_controller_migrations_total", outcome="completed", reason="plan") == 1
        finally:
            controller.stop()
    finally:
        source.kill()
        destination.kill()
