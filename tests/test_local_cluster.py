"""`sllm-faas up` end to end: real Redis, controller, node loaders, gateway and runtime processes, driven
through the gateway with the official openai client and the `deploy` / `invoke` verbs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from sllm_faas.runtime.embedded_redis import free_tcp_port
from sllm_faas.runtime.node_loader.client import LoaderClient

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Up:
    """A `sllm-faas up` process and the cluster it reports in its state file."""

    def __init__(self, tmp: Path, store: Path, redis_url: str | None, prefix: str, nodes: int = 2, slots: int = 1,
                 extra: list[str] | tuple[str, ...] = ()):
        self.workdir = tmp / "work"
        self.build_root = self.workdir / "build"
        self.state_file = tmp / "cluster.json"
        args = [sys.executable, "-m", "sllm_faas", "up", "--nodes", str(nodes), "--slots", str(slots),
                "--port", str(free_tcp_port()), "--model-store", str(store), "--workdir", str(self.workdir),
                "--build-root", str(self.build_root),
                "--key-prefix", prefix, "--state-file", str(self.state_file), "--dram-budget", "1GiB", *extra]
        if redis_url:
            args += ["--redis-url", redis_url]
        self.log = open(tmp / "up.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        deadline = time.monotonic() + 120
        while not self.state_file.exists():
            assert self.process.poll() is None, (tmp / "up.log").read_text()
            assert time.monotonic() < deadline, "sllm-faas up did not come up"
            time.sleep(0.1)
        self.state = json.loads(self.state_file.read_text())
        self.gateway = self.state["gateway"]
        self.admin = {"Authorization": "Bearer " + Path(self.state["token_file"]).read_text()}

    def deploy(self, stack: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sllm_faas", "deploy", "-f", str(stack), "-g", self.gateway,
                               "--build-dir", str(self.build_root)], capture_output=True, text=True, timeout=60)

    def function(self, name: str) -> dict:
        return requests.get(f"{self.gateway}/system/function/{name}", headers=self.admin, timeout=10).json()

    def scale(self, name: str, replicas: int) -> requests.Response:
        return requests.post(f"{self.gateway}/system/scale-function/{name}", json={"replicas": replicas},
                             headers=self.admin, timeout=30)

    def client(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway}/function/{name}/v1", api_key="unused", timeout=300)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.log.close()
        return code


def write_stack(path: Path, functions: dict[str, dict]) -> Path:
    import yaml

    body = {"version": 1.0, "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"}, "functions": {}}
    for name, options in functions.items():
        body["functions"][name] = {
            "lang": "sllm-python", "handler": str(ROOT / "examples" / "smollm2" / "function"),
            "image": f"example/{name}:latest", "environment": {"SLLM_MODEL": options["model"], "SLLM_MAX_TOKENS": "64"},
            "labels": {"com.openfaas.scale.zero": "true", "com.openfaas.scale.max": str(options.get("max", 1)),
                       "com.openfaas.scale.zero-duration": options.get("zero_duration", "10m"),
                       "com.openfaas.scale.target": str(options.get("target", 8))}}
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def store(smollm2, tmp_path_factory):
    """The loaders' remote store: the example model under two names (two models, same weights)."""
    root = tmp_path_factory.mktemp("store")
    for name in ("smollm2-a", "smollm2-b"):
        (root / name).symlink_to(smollm2["sllm"])
    return root


@pytest.fixture(scope="module")
def dram_root(request):
    """`up --dram-root`: a tmpfs of 2 MiB pages where this host lets us mount one, else a folder of /dev/shm."""
    try:
        yield request.getfixturevalue("huge_tmpfs")
    except pytest.skip.Exception:
        directory = Path(tempfile.mkdtemp(prefix="sllm-dram-root-", dir="/dev/shm"))
        yield directory
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(store, tmp_path_factory, redis_target, dram_root):
    prefix = f"sllm-test-up:{os.getpid()}:"
    up = Up(tmp_path_factory.mktemp("up"), store, redis_target.url, prefix, nodes=2, slots=1,
            extra=["--dram-root", str(dram_root)])
    stack = write_stack(up.workdir.parent / "stack.yml", {"fa": {"model": "smollm2-a", "zero_duration": "4s"},
                                                           "fb": {"model": "smollm2-b"},
                                                           "fd": {"model": "smollm2-a", "target": 1, "max": 2}})
    deployed = up.deploy(stack)
    assert deployed.returncode == 0, deployed.stderr
    yield up
    assert up.stop() == 0


def wait_until(condition, timeout: float = 60, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)
    return value


def test_scale_from_zero_then_to_zero_with_the_openai_client(cluster):
    assert cluster.function("fa")["replicas"] == 0
    raw = cluster.client("fa").chat.completions.with_raw_response.create(model="smollm2-a", messages=QUESTION,
                                                                         max_tokens=12, temperature=0)
    assert "Paris" in raw.parse().choices[0].message.content
    cold = json.loads(raw.headers["X-Sllm-Cold-Start"])
    assert cold["process_start_to_ready_s"] > 0 and cold["tier"] in ("remote", "ssd", "dram")  # as found
    assert json.loads(raw.headers["X-Sllm-Placement"])["tier"] == "remote"  # only the store had it
    status = cluster.function("fa")
    assert status["availableReplicas"] == 1 and status["instances"][0]["node"] == raw.headers["X-Sllm-Node"]
    pid = status["instances"][0]["pid"]
    wait_until(lambda: cluster.function("fa")["replicas"] == 0, timeout=30)   # 4 s idle, then scaled to zero
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)
    warm_again = cluster.client("fa").completions.create(model="smollm2-a", prompt="The capital of France is",
                                                         max_tokens=3, temperature=0)
    assert "Paris" in warm_again.choices[0].text


def test_second_cold_start_lands_on_the_node_holding_the_model_in_dram(cluster, dram_root):
    first = cluster.client("fa").chat.completions.with_raw_response.create(model="smollm2-a", messages=QUESTION,
                                                                           max_tokens=4)
    fa_node = first.headers["X-Sllm-Node"]
    other = cluster.client("fb").chat.completions.with_raw_response.create(model="smollm2-b", messages=QUESTION,
                                                                           max_tokens=4)
    assert other.headers["X-Sllm-Node"] != fa_node   # one slot per node: fb goes to the other node
    assert requests.post(f"{cluster.gateway}/system/scale-function/fa", json={"serviceName": "fa", "replicas": 0},
                         headers=cluster.admin, timeout=30).status_code == 202
    wait_until(lambda: cluster.function("fa")["replicas"] == 0)
    again = cluster.client("fa").chat.completions.with_raw_response.create(model="smollm2-a", messages=QUESTION,
                                                                           max_tokens=4)
    assert again.headers["X-Sllm-Node"] == fa_node
    assert json.loads(again.headers["X-Sllm-Placement"])["tier"] == "dram"
    assert json.loads(again.headers["X-Sllm-Cold-Start"])["tier"] == "dram"
    staged = list(dram_root.glob(f"sllm-up-*/{fa_node}/smollm2-a/part-*.bin"))  # the DRAM tier under --dram-root
    assert staged, sorted(map(str, dram_root.rglob("*")))
    for name in ("fa", "fb"):
        cluster.scale(name, 0)


def test_burst_of_20_at_zero_all_answered_with_one_staging_per_node(cluster, redis_target):
    import redis

    client = redis.Redis.from_url(redis_target.url, decode_responses=True)
    prefix = cluster.state["key_prefix"]
    wait_until(lambda: cluster.function("fb")["replicas"] == 0)
    for socket_path in cluster.state["nodes"].values():  # back to "only in the store" on every node
        for tier in ("dram", "ssd"):  # 409 while the last instance's lease is still being released
            wait_until(lambda s=socket_path, t=tier: LoaderClient(s).request(
                "POST", "/v1/evict", {"model": "smollm2-b", "tier": t})[0] == 200)
    wait_until(lambda: not any(client.sismember(f"{prefix}node:{n}:models:{t}", "smollm2-b")
                               for n in cluster.state["nodes"] for t in ("dram", "ssd")))
    before = client.xlen(prefix + "events")

    def ask(i: int) -> str:
        answer = cluster.client("fb").chat.completions.create(model="smollm2-b", messages=QUESTION, max_tokens=4,
                                                              temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert len(answers) == 20 and all(answers)
    events = [f for _, f in client.xrange(prefix + "events")][before:]
    staged = {}
    for event in events:
        if event["kind"] == "stage_started" and event["model"] == "smollm2-b":
            staged[(event["node"], event["tier"])] = staged.get((event["node"], event["tier"]), 0) + 1
    assert staged and set(staged.values()) == {1}, staged
    cluster.scale("fb", 0)
    wait_until(lambda: cluster.function("fb")["replicas"] == 0)


def test_scale_up_under_concurrency_up_to_max(cluster):
    wait_until(lambda: all(cluster.function(f)["replicas"] == 0 for f in ("fa", "fb")), timeout=60)

    def ask(_) -> str:
        return cluster.client("fd").completions.create(model="smollm2-a", prompt="Once upon a time", max_tokens=48,
                                                       temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(3) as pool:   # 3 in flight, target 1 per instance, max 2
        answers = list(pool.map(ask, range(3)))
    assert len(set(answers)) == 1
    status = wait_until(lambda: (s := cluster.function("fd"))["availableReplicas"] == 2 and s, timeout=120)
    assert {i["node"] for i in status["instances"]} == set(cluster.state["nodes"])   # one slot per node
    cluster.scale("fd", 0)


def test_gateway_routes_and_bad_requests(cluster, tmp_path, redis_target):
    import redis
    from schema_doc import assert_keys_documented

    assert_keys_documented(redis.Redis.from_url(redis_target.url, decode_responses=True),
                           cluster.state["key_prefix"])
    listed = requests.get(f"{cluster.gateway}/system/functions", headers=cluster.admin, timeout=10).json()
    assert {f["name"] for f in listed} == {"fa", "fb", "fd"} and all(f["namespace"] == "openfaas-fn" for f in listed)
    assert requests.post(f"{cluster.gateway}/function/nope", json={}, timeout=10).status_code == 404
    assert cluster.scale("fa", -1).status_code == 400
    bad = requests.post(f"{cluster.gateway}/system/functions", json={"service": "x", "envVars": {"SLLM_MODEL": "m"},
                                                                      "annotations": {"sllm.io/build": "/etc"}},
                        headers=cluster.admin, timeout=10)
    assert bad.status_code == 400 and "sllm.io/build" in bad.json()["error"]
    assert requests.post(f"{cluster.gateway}/system/functions", json={"service": "../x"}, headers=cluster.admin,
                         timeout=10).status_code == 400
    assert requests.delete(f"{cluster.gateway}/system/functions", json={"functionName": "nope"},
                           headers=cluster.admin, timeout=10).status_code == 404


@pytest.mark.parametrize("stack, message", [
    ("functions: {}\n", "needs a `functions:` mapping"),
    ("functions:\n  f1:\n    lang: sllm-python\n    handler: ./missing\n", "is not a directory"),
    ("functions:\n  f1:\n    lang: sllm-python\n    handler: .\n", "name the model"),
    ("functions:\n  f1:\n    lang: sllm-python\n    handler: .\n    environment: {SLLM_MODEL: m}\n    labels:\n"
     "      com.openfaas.scale.zero-duration: soon\n", "is not a duration"),
    ("functions:\n  f1:\n    lang: nodejs\n    handler: .\n    environment: {SLLM_MODEL: m}\n", "unknown template"),
    ("functions:\n  Bad_Name:\n    lang: sllm-python\n    handler: .\n", "invalid function name"),
    ("functions: [\n", "not valid YAML"),
])
def test_bad_stack_file_gives_a_clear_error(tmp_path, stack, message):
    path = tmp_path / "stack.yml"
    path.write_text(stack)
    result = subprocess.run([sys.executable, "-m", "sllm_faas", "deploy", "-f", str(path), "-g",
                             f"http://127.0.0.1:{free_tcp_port()}", "--build-dir", str(tmp_path / "build")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and str(path) in result.stderr, result.stderr


def test_ctrl_c_leaves_no_processes_and_no_shm_files(store, tmp_path):
    up = Up(tmp_path, store, None, "sllm:", nodes=1, slots=1)   # embedded Redis
    try:
        stack = write_stack(tmp_path / "stack.yml", {"fc": {"model": "smollm2-a"}})
        assert up.deploy(stack).returncode == 0
        answer = requests.post(f"{up.gateway}/function/fc", json={"question": "Capital of France?"}, timeout=300)
        assert answer.status_code == 200 and answer.json()["answer"]
        instance_pid = up.function("fc")["instances"][0]["pid"]
        shm = Path(f"/dev/shm/sllm-up-{up.process.pid}")
        assert any(shm.rglob("manifest.json"))   # the DRAM tier holds the model
        family = descendants(up.process.pid)
        assert instance_pid in family and len(family) >= 6  # redis, controller, loader, gateway (+workers), instance
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0
    assert not shm.exists()
    survivors = [pid for pid in family if Path(f"/proc/{pid}").exists()]
    assert survivors == [], survivors


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_a_request_at_zero_waits_for_a_slot_while_every_slot_is_taken(cluster, redis_target):
    """Two nodes of one slot, held by fb and fd: fa's request is not refused but held while its start asks again
    (counted among the callers waiting for GPUs), and served once fd gives its slot back."""
    import redis

    client = redis.Redis.from_url(redis_target.url, decode_responses=True)
    waiting = cluster.state["key_prefix"] + "waiting"
    wait_until(lambda: cluster.function("fa")["replicas"] == 0)
    for name in ("fb", "fd"):
        assert cluster.scale(name, 1).status_code == 202
    wait_until(lambda: all(cluster.function(n)["availableReplicas"] == 1 for n in ("fb", "fd")))
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(cluster.client("fa").chat.completions.with_raw_response.create, model="smollm2-a",
                           messages=QUESTION, max_tokens=4)
        wait_until(lambda: any(m.startswith("smollm2-a/fa/fa-") for m in client.zrange(waiting, 0, -1)))
        assert not held.done()
        assert cluster.scale("fd", 0).status_code == 202
        answer = held.result(timeout=120)
    assert answer.parse().choices[0].message.content and answer.headers["X-Sllm-Node"]
    assert not any(m.startswith("smollm2-a/fa/") for m in client.zrange(waiting, 0, -1))  # placed: gone
    for name in ("fa", "fb"):
        cluster.scale(name, 0)
