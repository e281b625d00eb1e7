"""Pre-warmed runtimes (`sllm-faas up --pool-size`) and what a client sees of a cold start (issue #19): a
pooled instance serves, streams, registers in Redis and migrates; an idle member killed is replaced; held
streams carry SSE progress comments the openai client ignores; --max-held answers 429 with Retry-After."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from test_local_cluster import QUESTION, Up, descendants, store, wait_until, write_stack  # noqa: F401 - fixture


def pools(up: Up) -> dict[str, dict]:
    return {p["node"]: p for p in requests.get(f"{up.gateway}/system/pools", headers=up.admin, timeout=10).json()}


def pools_full(up: Up) -> dict[str, dict]:
    return wait_until(lambda: (p := pools(up)) and all(len(n["idle"]) == n["size"] for n in p.values()) and p,
                      timeout=120)


def to_zero(up: Up, name: str) -> None:
    assert up.scale(name, 0).status_code == 202
    wait_until(lambda: up.function(name)["replicas"] == 0)


@pytest.fixture(scope="module")
def up(store, tmp_path_factory, redis_target):  # noqa: F811 - the imported fixture
    prefix = f"sllm-test-pool:{os.getpid()}:"
    cluster = Up(tmp_path_factory.mktemp("pool"), store, redis_target.url, prefix, nodes=2, slots=2,
                 extra=["--pool-size", "1", "--max-held", "1"])
    stack = write_stack(cluster.workdir.parent / "stack.yml", {"fp": {"model": "smollm2-a"},
                                                                "fm": {"model": "smollm2-a", "max": 2}})
    deployed = cluster.deploy(stack)
    assert deployed.returncode == 0, deployed.stderr
    yield cluster
    assert cluster.stop() == 0


def test_a_pooled_instance_serves_streams_and_registers_in_redis(up, redis_target):
    idle = {m["pid"] for p in pools_full(up).values() for m in p["idle"]}
    raw = up.client("fp").chat.completions.with_raw_response.create(model="smollm2-a", messages=QUESTION,
                                                                    max_tokens=12, temperature=0)
    assert "Paris" in raw.parse().choices[0].message.content
    cold = json.loads(raw.headers["X-Sllm-Cold-Start"])
    assert cold["start"] == "pool" and cold["imports_s"] < cold["process_start_to_ready_s"]
    instance = up.function("fp")["instances"][0]
    assert instance["start"] == "pool" and instance["pid"] in idle   # the idle member became the instance
    ready = requests.get(instance["url"] + "/_/ready", timeout=10).json()
    assert ready["cold_start"]["start"] == "pool"
    client = redis.Redis.from_url(redis_target.url, decode_responses=True)
    key = f"{up.state['key_prefix']}instance:{instance['id']}"
    # the record says "ready" from the registration's next heartbeat (every SLLM_INSTANCE_HEARTBEAT_S)
    record = wait_until(lambda: (r := client.hgetall(key)).get("state") == "ready" and r, timeout=30)
    assert record["node"] == instance["node"] and record["function"] == "fp"
    chunks = up.client("fp").chat.completions.create(model="smollm2-a", messages=QUESTION, max_tokens=12,
                                                     temperature=0, stream=True)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    refilled = pools_full(up)[instance["node"]]
    assert instance["pid"] not in {m["pid"] for m in refilled["idle"]}   # a new member took its place
    to_zero(up, "fp")
    wait_until(lambda: not Path(f"/proc/{instance['pid']}").exists())


def test_held_stream_shows_progress_comments_and_stays_valid_for_the_openai_client(up):
    pools_full(up)
    body = {"model": "smollm2-a", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True}
    comments, data = [], []
    with requests.post(f"{up.gateway}/function/fp/v1/chat/completions", json=body, stream=True,
                       timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                data.append(line[6:])
    assert comments and all(c.startswith(": sllm cold-start phase=") for c in comments), comments
    assert comments[-1].startswith(": sllm cold-start phase=ready start=pool"), comments
    assert json.loads(comments[-1].split("cold_start=", 1)[1])["start"] == "pool"
    assert data[-1] == "[DONE]" and any(json.loads(d)["choices"] for d in data[:-1])
    to_zero(up, "fp")
    pools_full(up)
    chunks = list(up.client("fp").chat.completions.create(**body))   # the same kind of held stream, parsed
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    to_zero(up, "fp")


def test_a_later_start_on_a_node_finds_the_tokenizer_preloaded(up):
    """Each assignment's model is prepared by its node's zygote: a later pooled start there reads no tokenizer."""
    seen: dict[str, list[str]] = {}
    for _ in range(3):   # two nodes: some node starts twice
        pools_full(up)
        raw = up.client("fp").completions.with_raw_response.create(model="smollm2-a", prompt="The capital of France is",
                                                                   max_tokens=3, temperature=0)
        assert "Paris" in raw.parse().choices[0].text
        cold = json.loads(raw.headers["X-Sllm-Cold-Start"])
        assert cold["start"] == "pool"
        seen.setdefault(up.function("fp")["instances"][0]["node"], []).append(cold["tokenizer"])
        to_zero(up, "fp")
        wait_until(lambda: all(p["models"] and not p["unprepared"] for n, p in pools(up).items() if n in seen),
                   timeout=60)
    repeated = [kinds for kinds in seen.values() if len(kinds) > 1]
    assert repeated and all(set(kinds[1:]) == {"preloaded"} for kinds in repeated), seen


def test_requests_beyond_max_held_get_429_with_retry_after(up):
    pools_full(up)

    def ask(_) -> requests.Response:
        return requests.post(f"{up.gateway}/function/fp/v1/completions", timeout=300,
                             json={"model": "smollm2-a", "prompt": "The capital of France is", "max_tokens": 3})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    for refused in (a for a in answers if a.status_code == 429):
        assert int(refused.headers["Retry-After"]) >= 1 and "--max-held" in refused.json()["error"]
    to_zero(up, "fp")


def test_an_idle_member_killed_is_replaced_and_requests_still_succeed(up):
    before = pools_full(up)
    for node in before.values():
        os.kill(node["idle"][0]["pid"], signal.SIGKILL)
    answer = up.client("fp").completions.create(model="smollm2-a", prompt="The capital of France is", max_tokens=3,
                                                temperature=0)
    assert "Paris" in answer.choices[0].text
    after = wait_until(lambda: (p := pools_full(up)) and all(p[n]["replaced"] > before[n]["replaced"] for n in p)
                       and p, timeout=120)
    killed = {n["idle"][0]["pid"] for n in before.values()}
    assert not killed & {m["pid"] for n in after.values() for m in n["idle"]}
    to_zero(up, "fp")


def test_a_pooled_instance_migrates_a_running_stream(up):
    controller = next(pid for pid in descendants(up.process.pid)
                      if b"controller" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{controller}/environ").read_bytes().split(b"\0") if v)
    token = environ[b"SLLM_MIGRATION_TOKEN"].decode()   # `up` gave the same token to the controller and instances
    pools_full(up)
    assert up.scale("fm", 2).status_code == 202
    status = wait_until(lambda: (s := up.function("fm"))["availableReplicas"] == 2 and s, timeout=120)
    assert "pool" in {i["start"] for i in status["instances"]}   # two at once may both land on one node's pool of 1
    chunks: list[str] = []
    done = threading.Event()

    def stream() -> None:
        for chunk in up.client("fm").completions.create(model="smollm2-a", prompt="Once upon a time", max_tokens=64,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
            chunks.append(chunk.choices[0].text if chunk.choices else "")
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    wait_until(lambda: len(chunks) > 5, timeout=120, step=0.02)
    busy = [i for i in up.function("fm")["instances"] if i["in_flight"]]
    assert len(busy) == 1
    other = next(i for i in status["instances"] if i["id"] != busy[0]["id"])
    migrated = subprocess.run([sys.executable, "-m", "sllm_faas", "migrate", busy[0]["url"], "--all", "--keep-model",
                               "--to", other["url"], "--redis-url", up.state["redis"], "--key-prefix",
                               up.state["key_prefix"], "--json"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SLLM_MIGRATION_TOKEN": token})
    thread.join(timeout=300)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert done.is_set() and len("".join(chunks)) > 100
    to_zero(up, "fm")


def test_ctrl_c_stops_the_zygotes_and_members(store, tmp_path):  # noqa: F811 - the imported fixture
    up = Up(tmp_path, store, None, "sllm:", nodes=1, slots=1, extra=["--pool-size", "2"])
    try:
        assert up.deploy(write_stack(tmp_path / "stack.yml", {"fc": {"model": "smollm2-a"}})).returncode == 0
        members = {m["pid"] for m in pools_full(up)["node-0"]["idle"]}
        answer = requests.post(f"{up.gateway}/function/fc", json={"question": "Capital of France?"}, timeout=300)
        assert answer.status_code == 200 and answer.json()["answer"]
        assert up.function("fc")["instances"][0]["pid"] in members
        zygote = pools(up)["node-0"]["zygote_pid"]
        family = descendants(up.process.pid) | members
        assert zygote in family
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0
    survivors = [pid for pid in family if Path(f"/proc/{pid}").exists()]
    assert survivors == [], survivors


@pytest.mark.gpu
def test_with_cuda_a_member_is_a_fresh_process_that_initialised_cuda(tmp_path):
    """On a CUDA machine the zygote execs each member (CUDA does not survive a fork); the member has CUDA's
    driver mapped before any assignment. Runs the pool in this process, which becomes a child subreaper."""
    from sllm_faas.runtime.local.pool import Pools

    spawner = ThreadPoolExecutor(1)
    pool = Pools(["gpu-node"], 1, tmp_path, lambda popen: spawner.submit(popen).result())
    try:
        status = wait_until(lambda: (p := pool.status()[0])["idle"] and p, timeout=300)
        assert status["kind"] == "exec"
        pid = status["idle"][0]["pid"]
        maps = wait_until(lambda: "libcuda" in (m := Path(f"/proc/{pid}/maps").read_text()) and m, timeout=120)
        assert "libcuda" in maps
    finally:
        pool.stop()
