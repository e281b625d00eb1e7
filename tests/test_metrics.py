"""Prometheus metrics of every service, read as Prometheus reads them (prometheus_client's parser): counts
summed over gunicorn workers, vLLM's names, labels and buckets on the runtime, cold-start phases, docs."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from controller_process import GB, ControllerProcess, publish_model, publish_node
from prom import families, value

from sllm_faas.common.metrics import (
    COLD_START_BUCKETS,
    INTER_TOKEN_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    RuntimeMetrics,
    token_buckets,
)

ROOT = Path(__file__).resolve().parent.parent
# The names, types and label names vLLM (vllm/v1/metrics/loggers.py) exposes for the metrics we share; the
# parser names counters without `_total`. vLLM adds an `engine` label that a single-engine instance does not need.
VLLM = {
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
}


def bounds(family) -> list[float]:
    """The finite bucket bounds of a histogram family's first series."""
    first = next(s.labels for s in family.samples if s.name.endswith("_bucket"))
    rest = {k: v for k, v in first.items() if k != "le"}
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")
            and {k: v for k, v in s.labels.items() if k != "le"} == rest and s.labels["le"] != "+Inf"]


def test_token_buckets_are_vllms_1_2_5_series():
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert token_buckets(2048)[-1] == 2000


def test_controller_counts_over_two_workers_never_go_down_and_equal_the_decisions(redis_ns, tmp_path):
    publish_model(redis_ns.client, redis_ns.prefix, "m1", 4 * GB)
    for node in ("node-a", "node-b"):
        publish_node(redis_ns.client, redis_ns.prefix, node, slots=1000, dram=["m1"] if node == "node-a" else ())
    controller = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix, workers="2").start()
    try:
        made, seen = 0, []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(12):
                answers = list(pool.map(lambda _: controller.post("/v1/placements", {"model": "m1"}), range(8)))
                assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
                made += len(answers)
                for _ in range(3):  # scrapes land on either worker
                    response = requests.get(controller.url + "/metrics", timeout=10)
                    seen.append(value(response.text, "sllm_controller_decisions_total", source="api"))
                    assert seen[-1] == made, (seen, made)
                    assert value(response.text, "sllm_controller_decision_seconds_count", source="api") == made
                    assert value(response.text, "sllm_cold_start_seconds_count", phase="decision",
                                 model_name="m1") == made
        assert seen == sorted(seen)
        text = requests.get(controller.url + "/metrics", timeout=10).text
        assert families(text)["sllm_controller_stage_kick_failures"].type == "counter"
        assert value(text, "sllm_controller_nodes") == 2
        assert len(set(re.findall(r"Booting worker with pid: (\d+)", controller.log_path.read_text()))) == 2
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def runtime_server(smollm2, tmp_path_factory):
    from test_runtime_server import Server, shrinkwrap

    build = shrinkwrap(tmp_path_factory.mktemp("faas"), "smollm2", ROOT / "examples" / "smollm2" / "function")
    server = Server(build, smollm2["sllm"], SLLM_SERVED_MODEL_NAME="smollm2", SLLM_MAX_BATCH="2",
                    SLLM_MAX_SEQ="512")
    server.wait_ready()
    yield server
    server.stop()


def test_runtime_engine_metrics_have_vllms_names_labels_buckets_and_exact_counts(runtime_server):
    client = openai.OpenAI(base_url=runtime_server.url + "/v1", api_key="unused")

    def ask(i: int):
        return client.completions.create(model="smollm2", prompt=f"Count to {i}:", max_tokens=6 + i, temperature=0)

    with ThreadPoolExecutor(5) as pool:  # 5 requests on 2 slots: some wait in the queue
        usages = [answer.usage for answer in pool.map(ask, range(5))]
    deadline = time.monotonic() + 10
    while True:  # a client has its last token a moment before the engine frees that request's slot
        text = requests.get(runtime_server.url + "/metrics", timeout=10).text
        if value(text, "vllm:num_requests_running") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    found = families(text)
    for name, kind in VLLM.items():
        assert found[name].type == kind, name
        assert all(s.labels.get("model_name") == "smollm2" for s in found[name].samples), name
    assert bounds(found["vllm:time_to_first_token_seconds"]) == list(TTFT_BUCKETS)
    assert bounds(found["vllm:inter_token_latency_seconds"]) == list(INTER_TOKEN_BUCKETS)
    for name in ("e2e_request_latency", "request_queue_time", "request_prefill_time", "request_decode_time"):
        assert bounds(found[f"vllm:{name}_seconds"]) == list(REQUEST_LATENCY_BUCKETS)
    assert bounds(found["vllm:request_prompt_tokens"]) == [float(b) for b in token_buckets(512)]

    prompt, generated = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    assert value(text, "vllm:request_success_total") == 5  # the warm-up forward is not a request
    assert value(text, "vllm:prompt_tokens_total") == prompt == value(text, "vllm:request_prompt_tokens_sum")
    assert value(text, "vllm:generation_tokens_total") == generated == value(text, "vllm:request_generation_tokens_sum")
    assert value(text, "vllm:inter_token_latency_seconds_count") == generated - 5
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time",
                 "request_decode_time"):
        assert value(text, f"vllm:{name}_seconds_count") == 5, name
    assert value(text, "vllm:num_preemptions_total") == 0
    assert value(text, "vllm:num_requests_running") == value(text, "vllm:kv_cache_usage_perc") == 0

    tiers = {s.labels["tier"] for s in found["sllm_cold_start_seconds"].samples}
    assert len(tiers) == 1 and tiers <= {"dram", "ssd", "gpu"}
    for phase in RuntimeMetrics.PHASES:
        assert value(text, "sllm_cold_start_seconds_count", phase=phase, model_name="smollm2") == 1, phase
    assert bounds(found["sllm_cold_start_seconds"]) == list(COLD_START_BUCKETS)


def test_every_metric_is_documented_in_the_readme():
    """Every metric name declared in the code appears in README.md, where a user looks for it."""
    readme = (ROOT / "README.md").read_text()
    declared = set()
    for path in [*ROOT.glob("runtime/**/*.py"), *ROOT.glob("controller/**/*.py"),
                 *ROOT.glob("sllm_faas/common/*.py")]:
        pattern = r"\b(?:counter|gauge|histogram)\(\s*\"((?:vllm:|sllm_)[a-z_:]+)\""
        declared |= set(re.findall(pattern, path.read_text()))
    declared.add("sllm_cold_start_seconds")
    assert len(declared) > 30
    missing = sorted(name for name in declared if name not in readme)
    assert not missing, f"metrics missing from README.md: {missing}"
    for phase in (*RuntimeMetrics.PHASES, "decision", "placement", "staging", "request_to_ready"):
        assert f"`{phase}`" in readme, phase
