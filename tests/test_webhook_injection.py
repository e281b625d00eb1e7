"""The mutating webhook injects the node plumbing into function pods, against a real controller (gunicorn) and
real Redis, with pods built the way OpenFaaS and Knative build them; the patched pods must pass the Kubernetes
schema, and a reinvocation must add nothing."""

from __future__ import annotations

import base64
import json

import pytest
import requests
from controller_process import GB, ControllerProcess, publish_model, publish_node
from json_patch import apply_patch

UID = "0d6c3e2a-1f7b-4c1e-9a51-3f8e2b7c9d40"
REDIS_SECRET = "sllm-redis/url"


def openfaas_pod(function: str = "chat", model: str = "m1") -> dict:
    """A pod of the Deployment faas-netes makes for a function (openfaas/faas-netes pkg/handlers/deploy.go
    makeDeploymentSpec): label faas_function, annotation prometheus.io.scrape, one container named after the
    function on the watchdog's port 8080, and the probes of pkg/k8s/probes.go MakeProbes with HTTPProbe set
    (GET /_/health on 8080; faas-netes' default timings: initialDelay 2, timeout 1, period 2)."""
    probe = {"httpGet": {"path": "/_/health", "port": 8080, "scheme": "HTTP"}, "initialDelaySeconds": 2,
             "timeoutSeconds": 1, "periodSeconds": 2, "successThreshold": 1, "failureThreshold": 3}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{function}-5d8f9c7b4-", "namespace": "openfaas-fn",
                         "labels": {"faas_function": function, "pod-template-hash": "5d8f9c7b4"},
                         "annotations": {"prometheus.io.scrape": "false", "sllm.io/model": model}},
            "spec": {"containers": [{
                "name": function, "image": f"ghcr.io/x/{function}:0.1.0",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "SLLM_MAX_BATCH", "value": "8"}],
                "resources": {"limits": {"memory": "2Gi"}, "requests": {"memory": "1Gi"}},
                "imagePullPolicy": "Always", "livenessProbe": dict(probe), "readinessProbe": dict(probe),
                "securityContext": {"readOnlyRootFilesystem": False}}],
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}}


def knative_pod(service: str = "chat", model: str = "m1") -> dict:
    """A pod of a Knative revision (knative/serving pkg/reconciler/revision/resources/deploy.go makePodSpec and
    queue.go makeQueueContainer): queue-proxy first, then the user container with its port named user-port, PORT
    and K_* env and the drain preStop; the user's HTTP/TCP readiness probe is removed from it and handed to
    queue-proxy as SERVING_READINESS_PROBE, defaulted to TCP on the user port (applyReadinessProbeDefaults)."""
    revision = f"{service}-00001"
    labels = {"serving.knative.dev/service": service, "serving.knative.dev/configuration": service,
              "serving.knative.dev/revision": revision, "app": revision}
    queue_env = {"SERVING_NAMESPACE": "default", "SERVING_SERVICE": service, "SERVING_CONFIGURATION": service,
                 "SERVING_REVISION": revision, "QUEUE_SERVING_PORT": "8012", "CONTAINER_CONCURRENCY": "8",
                 "REVISION_TIMEOUT_SECONDS": "600", "USER_PORT": "8080", "USER_CONTAINER_NAME": "user-container",
                 "SERVING_READINESS_PROBE": '{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}'}
    queue_proxy = {
        "name": "queue-proxy", "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue@sha256:" + "0" * 64,
        "ports": [{"name": "http-queueadm", "containerPort": 8022}, {"name": "http-autometric", "containerPort": 9090},
                  {"name": "http-usermetric", "containerPort": 9091}, {"name": "queue-port", "containerPort": 8012}],
        "env": [{"name": k, "value": v} for k, v in queue_env.items()]
        + [{"name": "SERVING_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
                           "periodSeconds": 1},
        "securityContext": {"allowPrivilegeEscalation": False}}
    user = {"name": "user-container", "image": "ghcr.io/sllm-faas/runtime@sha256:" + "1" * 64,
            "args": ["serve", model], "ports": [{"name": "user-port", "containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": "PORT", "value": "8080"}, {"name": "K_REVISION", "value": revision},
                    {"name": "K_CONFIGURATION", "value": service}, {"name": "K_SERVICE", "value": service},
                    {"name": "SLLM_MODEL", "value": model}],
            "lifecycle": {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": 8022}}},
            "terminationMessagePolicy": "FallbackToLogsOnError"}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{revision}-deployment-7c9d-", "namespace": "default", "labels": labels},
            "spec": {"containers": [queue_proxy, user], "terminationGracePeriodSeconds": 600,
                     "enableServiceLinks": False}}


def review(pod: dict) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": UID, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
                        "namespace": pod["metadata"]["namespace"], "object": pod, "dryRun": False}}


def admit(controller: ControllerProcess, pod: dict) -> tuple[dict, list[dict]]:
    """POST as the API server does (token in the path), return (the patched pod, the patch)."""
    answer = requests.post(f"{controller.url}/k8s/{controller.token}/mutate", json=review(pod), timeout=30)
    assert answer.status_code == 200, answer.text
    response = answer.json()["response"]
    assert response["uid"] == UID and response["allowed"] is True
    patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
    assert ("patch" in response) == bool(patch) and response.get("patchType", "JSONPatch") == "JSONPatch"
    return apply_patch(pod, patch), patch


def valid(pod: dict) -> dict:
    import kubernetes_validate

    kubernetes_validate.validate(pod, "1.30.0", strict=True)
    return pod


def env_of(container: dict) -> dict[str, dict]:
    env = container.get("env") or []
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env: {names}"
    return {e["name"]: e for e in env}


@pytest.fixture
def cluster(redis_ns):
    publish_model(redis_ns.client, redis_ns.prefix, "m1", 4 * GB)
    publish_node(redis_ns.client, redis_ns.prefix, "node-a", dram=["m1"], slots=2)
    publish_node(redis_ns.client, redis_ns.prefix, "node-b", slots=2)
    return redis_ns


@pytest.fixture
def controller(cluster, tmp_path):
    process = ControllerProcess(tmp_path, cluster.url, cluster.prefix, inject_redis_secret=REDIS_SECRET).start()
    yield process
    process.stop()


def check_plumbing(pod: dict, index: int, function: str, redis_url: dict) -> dict:
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["sllm-loader-socket"]["hostPath"] == {"path": "/run/sllm", "type": "Directory"}
    assert volumes["sllm-dram-tier"]["hostPath"] == {"path": "/dev/shm/sllm", "type": "Directory"}
    mounts = {m["mountPath"]: m for m in spec["containers"][index]["volumeMounts"]}
    assert mounts["/run/sllm"] == {"name": "sllm-loader-socket", "mountPath": "/run/sllm"}
    assert mounts["/dev/shm/sllm"] == {"name": "sllm-dram-tier", "mountPath": "/dev/shm/sllm", "readOnly": True}
    env = env_of(spec["containers"][index])
    assert env["SLLM_NODE_ID"]["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
    assert env["SLLM_LOADER_SOCKET"]["value"] == "/run/sllm/loader.sock"
    assert {k: v for k, v in env["SLLM_REDIS_URL"].items() if k != "name"} == redis_url
    assert env["SLLM_FUNCTION_NAME"]["value"] == function
    booking = pod["metadata"]["annotations"]["sllm.io/booking"]
    assert env["SLLM_BOOKING_ID"]["value"] == booking
    terms = spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["preference"]["matchExpressions"][0]["values"] == ["node-a"]
    return env


def test_openfaas_pod_gets_volumes_env_readiness_once(controller, cluster):
    pod = valid(openfaas_pod())
    patched, _ = admit(controller, pod)
    valid(patched)
    env = check_plumbing(patched, 0, "chat", {"valueFrom": {"secretKeyRef": {"name": "sllm-redis", "key": "url"}}})
    assert env["SLLM_MAX_BATCH"] == {"name": "SLLM_MAX_BATCH", "value": "8"}       # the function's own env is kept
    container = patched["spec"]["containers"][0]
    # faas-netes' /_/health readiness is ready before the model loads: replaced by the watchdog's /_/ready (of-watchdog
    # pkg/readiness.go calls the upstream's ready_path), its timings kept; liveness stays on /_/health.
    assert container["readinessProbe"] == {**pod["spec"]["containers"][0]["readinessProbe"],
                                           "httpGet": {"path": "/_/ready", "port": 8080}}
    assert container["livenessProbe"] == pod["spec"]["containers"][0]["livenessProbe"]

    again, patch = admit(controller, patched)          # reinvocationPolicy: IfNeeded
    assert patch == [] and again == patched
    assert cluster.client.zcard(cluster.prefix + "node:node-a:slots") == 1      # booked once, not per call


def test_knative_pod_plumbing_goes_to_the_user_container_and_readiness_to_queue_proxy(cluster, tmp_path):
    process = ControllerProcess(tmp_path, cluster.url, cluster.prefix).start()   # no Secret: the plain URL
    try:
        pod = valid(knative_pod())
        patched, _ = admit(process, pod)
        valid(patched)
        check_plumbing(patched, 1, "chat", {"value": cluster.url})
        assert env_of(patched["spec"]["containers"][1])["SLLM_KEY_PREFIX"]["value"] == cluster.prefix
        queue_proxy, user = patched["spec"]["containers"]
        assert "readinessProbe" not in user                 # the kubelet never runs it in Knative
        before = env_of(pod["spec"]["containers"][0])
        after = env_of(queue_proxy)
        assert set(after) == set(before) and "volumeMounts" not in queue_proxy
        probe = json.loads(after["SERVING_READINESS_PROBE"]["value"])
        assert probe == {"httpGet": {"path": "/_/ready", "port": 8080, "host": "127.0.0.1", "scheme": "HTTP",
                                     "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
                         "successThreshold": 1}
        assert {k: after[k] for k in after if k != "SERVING_READINESS_PROBE"} == \
            {k: before[k] for k in before if k != "SERVING_READINESS_PROBE"}

        again, patch = admit(process, patched)
        assert patch == [] and again == patched
    finally:
        process.stop()


def test_what_the_user_set_is_kept_and_not_duplicated(controller):
    pod = openfaas_pod()
    container = pod["spec"]["containers"][0]
    container["readinessProbe"] = {"httpGet": {"path": "/custom-ready", "port": 8080}, "periodSeconds": 5}
    container["env"].append({"name": "SLLM_LOADER_SOCKET", "value": "/var/run/loader/custom.sock"})
    container["volumeMounts"] = [{"name": "my-socket", "mountPath": "/run/sllm"}]
    pod["spec"]["volumes"] = [{"name": "my-socket", "hostPath": {"path": "/var/run/loader", "type": "Directory"}}]
    patched, _ = admit(controller, valid(pod))
    valid(patched)
    result = patched["spec"]["containers"][0]
    assert result["readinessProbe"] == container["readinessProbe"]
    assert env_of(result)["SLLM_LOADER_SOCKET"]["value"] == "/var/run/loader/custom.sock"
    assert [m["mountPath"] for m in result["volumeMounts"]] == ["/run/sllm", "/dev/shm/sllm"]
    assert [v["name"] for v in patched["spec"]["volumes"]] == ["my-socket", "sllm-dram-tier"]


def test_unplaced_pod_still_gets_the_plumbing(controller):
    pod = openfaas_pod(model="nobody-has-it")
    answer = requests.post(f"{controller.url}/k8s/{controller.token}/mutate", json=review(pod), timeout=30).json()
    response = answer["response"]
    assert "size unknown" in response["warnings"][0]
    patched = valid(apply_patch(pod, json.loads(base64.b64decode(response["patch"]))))
    assert "sllm.io/placement" not in patched["metadata"]["annotations"]
    env = env_of(patched["spec"]["containers"][0])
    assert "SLLM_BOOKING_ID" not in env and env["SLLM_LOADER_SOCKET"]["value"] == "/run/sllm/loader.sock"
