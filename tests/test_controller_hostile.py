"""The controller against malformed and hostile input (issue #13): every field it reads, sent with each wrong JSON
type, is a 400 naming the field and the type found; internal faults are 500s with a request id, never 400s; the
extender is linear in the number of nodes; and the controller will not start without credentials."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import requests
from controller_process import GB, ControllerProcess, publish_model, publish_node

from sllm_faas.controller import kube
from sllm_faas.runtime.embedded_redis import free_tcp_port

# One value of each JSON type; a field gets every one its Kubernetes type does not allow.
JSON_VALUES = {"an object": {"k": "v"}, "an array": ["x"], "a string": "x", "a number": 7, "a boolean": True}


def pod() -> dict:
    """A pod with every field the controller reads present, so each can be replaced by a wrong type."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "chat-1", "labels": {"faas_function": "chat"}, "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "chat", "env": [{"name": "SLLM_MODEL", "value": "m1"}],
                                     "volumeMounts": [{"name": "v", "mountPath": "/v"}],
                                     "ports": [{"name": "http", "containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"path": "/", "port": 8080},
                                                        "exec": {"command": ["true"]}}}],
                     "volumes": [{"name": "v"}],
                     "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{}]}}}}


POD_FIELDS = [  # (path below the pod, the JSON types Kubernetes allows there)
    ("metadata", {"an object"}), ("metadata.labels", {"an object"}), ("metadata.annotations", {"an object"}),
    ("metadata.labels.faas_function", {"a string"}), ("spec", {"an object"}), ("spec.containers", {"an array"}),
    ("spec.containers[0]", {"an object"}), ("spec.containers[0].name", {"a string"}),
    ("spec.containers[0].env", {"an array"}), ("spec.containers[0].env[0]", {"an object"}),
    ("spec.containers[0].env[0].name", {"a string"}), ("spec.containers[0].env[0].value", {"a string"}),
    ("spec.containers[0].volumeMounts", {"an array"}), ("spec.containers[0].volumeMounts[0].mountPath", {"a string"}),
    ("spec.containers[0].ports", {"an array"}), ("spec.containers[0].ports[0].containerPort", {"a number"}),
    ("spec.containers[0].readinessProbe", {"an object"}), ("spec.containers[0].readinessProbe.httpGet", {"an object"}),
    ("spec.containers[0].readinessProbe.httpGet.port", {"a number", "a string"}),
    ("spec.containers[0].readinessProbe.exec.command", {"an array"}), ("spec.volumes", {"an array"}),
    ("spec.volumes[0]", {"an object"}), ("spec.affinity", {"an object"}), ("spec.affinity.nodeAffinity", {"an object"}),
    ("spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution", {"an array"}),
]


def review(obj: dict) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": obj,
                        "dryRun": True}}


def set_path(document: dict, path: str, value) -> dict:
    document = copy.deepcopy(document)
    tokens = path.replace("[", ".[").split(".")
    target = document
    for token in tokens[:-1]:
        target = target[int(token[1:-1])] if token.startswith("[") else target[token]
    last = tokens[-1]
    if last.startswith("["):
        target[int(last[1:-1])] = value
    else:
        target[last] = value
    return document


def cases():
    """(route, body, the field path the answer must name, the JSON type found) for every field and wrong type."""
    for field, allowed in [("request", {"an object"}), ("request.uid", {"a string"}), ("request.kind", {"an object"}),
                           ("request.kind.kind", {"a string"}), ("request.object", {"an object"}),
                           ("request.dryRun", {"a boolean"})] + [(f"request.object.{f}", a) for f, a in POD_FIELDS]:
        for found, value in JSON_VALUES.items():
            if found not in allowed:
                named = field.replace("labels.faas_function", "labels['faas_function']")  # map keys may hold dots
                yield "/mutate", set_path(review(pod()), field, value), f"AdmissionReview.{named}", found
    for field, allowed in [("pod", {"an object"}), ("nodes", {"an object"}), ("nodes.items", {"an array"}),
                           ("nodes.items[0]", {"an object"}), ("nodes.items[0].metadata", {"an object"}),
                           ("nodes.items[0].metadata.name", {"a string"}), ("pod.metadata.annotations", {"an object"}),
                           ("pod.spec.containers", {"an array"}), ("pod.spec.containers[0].env[0]", {"an object"})]:
        for found, value in JSON_VALUES.items():
            if found not in allowed:
                args = {"pod": pod(), "nodes": {"items": [{"metadata": {"name": "node-a"}}]}}
                for verb in ("/filter", "/prioritize"):
                    yield verb, set_path(args, field, value), f"ExtenderArgs.{field}", found
    for found, value in JSON_VALUES.items():
        if found != "an array":
            yield "/filter", {"pod": pod(), "nodenames": value}, "ExtenderArgs.nodenames", found
        if found != "a string":
            yield "/prioritize", {"pod": pod(), "nodenames": ["node-a", value]}, "ExtenderArgs.nodenames[1]", found


@pytest.fixture
def controller(redis_ns, tmp_path):
    publish_model(redis_ns.client, redis_ns.prefix, "m1", 4 * GB)
    publish_node(redis_ns.client, redis_ns.prefix, "node-a", dram=["m1"])
    process = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix).start()
    yield process
    process.stop()


def test_wrong_json_types_in_admission_review_and_extender_args_are_400_naming_the_field(controller):
    all_cases = list(cases())
    assert len(all_cases) > 150
    for route, body, field, found in all_cases:
        answer = controller.post(route, body)
        assert answer.status_code == 400, (route, field, found, answer.status_code, answer.text)
        assert answer.json()["field"] == field, (route, field, answer.json())
        assert answer.json()["error"].endswith(f"not {found}"), (route, field, answer.json())
    missing = controller.post("/mutate", set_path(review(pod()), "request.object", None)).json()
    assert missing == {"error": "AdmissionReview.request.object is missing", "field": "AdmissionReview.request.object"}
    assert controller.post("/mutate", review(pod())).status_code == 200     # the unbroken shape is accepted


def test_deep_nesting_huge_numbers_and_non_json_are_400_through_the_shared_parser(controller):
    deep = '{"pod": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for raw in (deep, '{"model": 1' + "0" * 5000 + "}", '{"model": NaN}', '{"model": 1e400}', "[1, 2]", "not json",
                b'{"model": "\xff"}'):
        answer = requests.post(controller.url + "/v1/placements", data=raw, headers=controller.headers(), timeout=30)
        assert answer.status_code == 400, (str(raw)[:40], answer.text)
        assert answer.json()["error"].startswith("the request body"), answer.json()


def test_internal_faults_are_500_with_a_request_id_not_client_errors(controller, redis_ns):
    redis_ns.client.hset(redis_ns.prefix + "model:corrupt", mapping={"size_bytes": "garbage"})  # not the caller's fault
    answer = controller.post("/v1/placements", {"model": "corrupt"})
    assert answer.status_code == 500, answer.text
    request_id = answer.json()["request_id"]
    assert len(request_id) == 32 and "ValueError" in answer.json()["error"]
    assert f"request {request_id}" in controller.log_path.read_text()          # the traceback can be found by its id
    bad_id = controller.delete("/v1/bookings/node-a/Not_An_Id")
    assert bad_id.status_code == 400 and bad_id.json()["field"] == "booking id"


class CountingName(str):
    """A node name that counts how often it is hashed: the filter's work, counted instead of timed."""

    hashes = 0

    def __hash__(self) -> int:
        CountingName.hashes += 1
        return str.__hash__(self)


def test_extender_filter_is_linear_in_the_number_of_nodes():
    n = 2000
    names = [CountingName(f"node-{i}") for i in range(n)]
    body = {"nodes": {"items": [{"metadata": {"name": name}} for name in names]}}
    CountingName.hashes = 0
    result = kube.filter_result(body, names, False, None)
    assert [i["metadata"]["name"] for i in result["nodes"]["items"]] == names
    assert CountingName.hashes <= 4 * n, f"{CountingName.hashes} hashes for {n} nodes: quadratic"


def test_forty_thousand_nodes_in_one_extender_call(controller):
    names = [f"n{i}" for i in range(40_000)]
    args = {"pod": pod(), "nodes": {"items": [{"metadata": {"name": n}} for n in names]}}
    answer = controller.post("/filter", args)     # bounded by the client's 30 s timeout; it took 52 s when quadratic
    assert answer.status_code == 200 and len(answer.json()["nodes"]["items"]) == 40_000


def run_controller(*flags: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_CONTROLLER_")}
    return subprocess.run([sys.executable, "-m", "sllm_faas", "controller", "--host", "127.0.0.1", "--port",
                           str(free_tcp_port()), *flags], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


def test_controller_without_credentials_refuses_to_start(redis_ns, tmp_path):
    refused = run_controller("--redis-url", redis_ns.url)
    assert refused.returncode == 2 and "--insecure-no-auth" in refused.stderr, refused.stderr
    assert run_controller(SLLM_CONTROLLER_INSECURE_NO_AUTH="false").returncode == 2      # "false" is not true
    wrong = run_controller(SLLM_CONTROLLER_INSECURE_NO_AUTH="maybe")
    assert wrong.returncode == 2 and "--insecure-no-auth='maybe' (from env SLLM_CONTROLLER_INSECURE_NO_AUTH): not a " \
                                     "boolean" in wrong.stderr, wrong.stderr
    from sllm_faas.controller.config import ControllerConfig

    ControllerConfig(tls_cert="/c.pem", tls_key="/k.pem", client_ca="/ca.pem")     # mTLS counts as credentials
    with pytest.raises(ValueError, match="no credentials"):
        ControllerConfig()
    insecure = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix, insecure=True).start()
    try:
        assert requests.get(insecure.url + "/v1/cluster", timeout=10).status_code == 200
    finally:
        insecure.stop()


def test_healthz_and_metrics_stay_open_with_a_token(controller):
    assert requests.get(controller.url + "/v1/cluster", timeout=10).status_code == 401
    assert requests.get(controller.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(controller.url + "/metrics", timeout=10).status_code == 200
