"""Deployables are valid: Knative YAML (schema + Knative's rules), stack.yml labels, Dockerfiles (hadolint), and the
placement controller's manifests in deploy/ (schema, and the routes, verbs and settings they use exist)."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from knative_rules import as_core_pod, knative_service_errors, readiness_poll_interval_s, with_knative_defaults

ROOT = Path(__file__).resolve().parent.parent
KNATIVE = ROOT / "examples" / "smollm2" / "knative-service.yaml"
DOCKERFILES = [ROOT / "Dockerfile.runtime", ROOT / "templates" / "sllm-python" / "Dockerfile"]


WEBHOOK_INJECTED_ENV = {"SLLM_NODE_ID", "SLLM_REDIS_URL", "SLLM_FUNCTION_NAME", "SLLM_LOADER_SOCKET", "SLLM_KEY_PREFIX"}


def test_knative_service_passes_kubernetes_schema_and_knative_rules():
    import kubernetes_validate

    doc = yaml.safe_load(KNATIVE.read_text())
    assert knative_service_errors(doc) == []  # no feature flag needed: the webhook adds the hostPath volumes
    kubernetes_validate.validate(as_core_pod(doc), "1.30.0", strict=True)
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    readiness = with_knative_defaults(doc)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/_/ready"
    assert readiness_poll_interval_s(readiness) == 0.05  # queue-proxy's aggressive probing while starting
    assert "failureThreshold" not in readiness and container["startupProbe"]["httpGet"]["path"] == "/_/health"
    assert not {e["name"] for e in container["env"]} & WEBHOOK_INJECTED_ENV
    assert not any("hostPath" in v for v in doc["spec"]["template"]["spec"]["volumes"])


def test_knative_rules_catch_mistakes():
    doc = yaml.safe_load(KNATIVE.read_text())
    doc["metadata"]["annotations"] = {"autoscaling.knative.dev/min-scale": "0"}
    spec = doc["spec"]["template"]["spec"]
    spec["timeoutSeconds"] = 3600
    container = spec["containers"][0]
    container["ports"].append({"containerPort": 9090})
    container["readinessProbe"]["failureThreshold"] = 600  # the old way of waiting for the model
    container["env"].append({"name": "PORT", "value": "9000"})
    spec["volumes"].append({"name": "sock", "hostPath": {"path": "/run/sllm", "type": "Directory"}})
    container["volumeMounts"].append({"name": "sock", "mountPath": "/run/sllm"})
    errors = knative_service_errors(doc)
    expected = ["metadata.annotations.autoscaling.knative.dev/min-scale", "timeoutSeconds: 3600",
                "ports: Knative allows one port", "readinessProbe.failureThreshold: 600 is disallowed",
                "env.PORT: reserved", "podspec-volumes-hostpath", "volumeMounts[1].readOnly"]
    for fragment in expected:
        assert any(fragment in e for e in errors), (fragment, errors)
    assert len(errors) == len(expected), errors

    doc = yaml.safe_load(KNATIVE.read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8012}]
    errors = knative_service_errors(doc)
    assert any("'http' must be empty, http1 or h2c" in e for e in errors)
    assert any("8012 is reserved" in e for e in errors)


def test_knative_readme_agrees_with_the_service():
    """Every `key: value` the example README states for the Knative Service is what the YAML sets."""
    doc = yaml.safe_load(KNATIVE.read_text())
    flat = {}

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(value, (dict, list)):
                    flat.setdefault(str(key), set()).add(str(value))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    readme = (ROOT / "examples" / "smollm2" / "README.md").read_text()
    section = readme[readme.index("### Knative"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    claims = re.findall(r"`([\w./-]+): \"?([^`\"]+)\"?`", section)
    assert len(claims) >= 6, claims
    for key, value in claims:
        assert value in flat.get(key, set()), f"examples/smollm2/README.md says {key}: {value}; the YAML has " \
                                               f"{sorted(flat.get(key, []))}"


def test_stack_files_name_the_template_and_handler():
    for name in ("stack.yml", "stack-pro.yml"):
        stack = yaml.safe_load((ROOT / "examples" / "smollm2" / name).read_text())
        function = stack["functions"]["smollm2"]
        assert function["lang"] == "sllm-python" and (ROOT / "templates" / function["lang"] / "template.yml").exists()
        assert (ROOT / "examples" / "smollm2" / function["handler"] / "handler.py").exists()
        assert all(isinstance(v, str) for v in function["labels"].values()), name  # the API takes strings


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(subprocess.sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_loader_daemonset_passes_kubernetes_schema():
    import kubernetes_validate

    doc = yaml.safe_load((ROOT / "examples" / "smollm2" / "loader-daemonset.yaml").read_text())
    kubernetes_validate.validate(doc, "1.30.0", strict=True)
    env = {e["name"] for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"SLLM_LOADER_NODE_ID", "SLLM_LOADER_REMOTE", "SLLM_LOADER_SSD_DIR", "SLLM_LOADER_REDIS_URL"} <= env


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (apimachinery resource.Quantity: binary Ki..Ei, decimal k..E)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match and match[2] in units, f"not a memory quantity: {text!r}"
    return int(float(match[1]) * units[match[2]])


LOADER_OVERHEAD = 2**30  # the loader process itself (Python, torch imported for staging, buffers)


def test_loader_daemonset_memory_covers_the_dram_tier_and_survives_on_gpu_nodes():
    """tmpfs pages are charged to the cgroup that wrote them (cgroup v2): the loader's limit must hold its DRAM
    budget, or the kernel OOM-kills it as the tier fills."""
    from sllm_faas.common.units import parse_size

    path = ROOT / "examples" / "smollm2" / "loader-daemonset.yaml"
    pod = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    budget = parse_size(env["SLLM_LOADER_DRAM_BUDGET"])
    resources = container["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit >= budget + LOADER_OVERHEAD, \
        f"{path}: resources.limits.memory={resources['limits']['memory']} < SLLM_LOADER_DRAM_BUDGET=" \
        f"{env['SLLM_LOADER_DRAM_BUDGET']} + 1Gi"
    assert quantity_bytes(resources["requests"]["memory"]) == limit  # the tier is really used: reserve it
    taints = {(t["key"], t.get("effect")) for t in pod["tolerations"] if t.get("operator") == "Exists"}
    assert {("nvidia.com/gpu", "NoSchedule"), ("nvidia.com/gpu", "NoExecute")} <= taints
    assert pod["priorityClassName"] in ("system-node-critical", "system-cluster-critical")


# -- deploy/: the placement controller's manifests -------------------------------------------------------------

DEPLOY = ROOT / "deploy"
TOKEN = "5f0c2a9e7b41d8e3" * 4  # the shape `openssl rand -hex 32` prints, as deploy/README.md says to make it
CA_BUNDLE = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n").decode()
PLACEHOLDERS = {"<TOKEN>": TOKEN, "<CA_BUNDLE>": CA_BUNDLE}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
SECRET_VALUES = {("sllm-controller", "token"): TOKEN, ("sllm-loader-token", "token"): "f" * 64,
                 ("sllm-redis", "url"): "redis://:pw@redis.sllm-system.svc.cluster.local:6379/0"}
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
# kubescheduler.config.k8s.io/v1 fields (kube-scheduler decodes its --config strictly: unknown fields are errors)
SCHEDULER_FIELDS = {"apiVersion", "kind", "parallelism", "leaderElection", "clientConnection", "enableProfiling",
                    "enableContentionProfiling", "percentageOfNodesToScore", "podInitialBackoffSeconds",
                    "podMaxBackoffSeconds", "profiles", "extenders", "delayCacheUntilActive"}
EXTENDER_FIELDS = {"urlPrefix", "filterVerb", "preemptVerb", "prioritizeVerb", "weight", "bindVerb", "enableHTTPS",
                   "tlsConfig", "httpTimeout", "nodeCacheCapable", "managedResources", "ignorable"}
EXTENDER_TLS_FIELDS = {"insecure", "serverName", "certFile", "keyFile", "caFile", "certData", "keyData", "caData"}
LEADER_ELECTION_FIELDS = {"leaderElect", "leaseDuration", "renewDeadline", "retryPeriod", "resourceLock",
                          "resourceName", "resourceNamespace"}
PROFILE_FIELDS = {"schedulerName", "percentageOfNodesToScore", "plugins", "pluginConfig"}


def deploy_docs(name: str, fill: bool = True) -> list[dict]:
    """The documents of deploy/NAME, with the placeholders deploy/README.md tells users to fill in filled."""
    text = (DEPLOY / name).read_text()
    for placeholder, value in PLACEHOLDERS.items() if fill else ():
        text = text.replace(placeholder, value)
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"].get("name"))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def service_link_variables(service: dict) -> set[str]:
    """The variables the kubelet puts in every pod of the Service's namespace (enableServiceLinks, the default)."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        if port.get("name"):
            names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        base = f"{prefix}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
        names |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
    return names


def target_port(service: dict, container: dict, port: int) -> int:
    entry = next(p for p in service["spec"]["ports"] if p["port"] == port)
    target = entry.get("targetPort", port)
    if isinstance(target, str):
        target = next(p["containerPort"] for p in container["ports"] if p.get("name") == target)
    return target


@pytest.fixture(scope="module")
def controller_app():
    """The real app with the token the manifests carry. Port 1 has no Redis: building the app must not connect
    (the client connects on first use), and nothing the tests below send needs Redis."""
    from sllm_faas.controller.config import ControllerConfig
    from sllm_faas.controller.service import create_app

    return create_app(ControllerConfig(redis_url="redis://127.0.0.1:1/0", token=TOKEN))


def endpoint(app, path: str, method: str) -> str:
    return app.url_map.bind("sllm-controller.sllm-system.svc").match(path, method=method)[0]


def kube_pod() -> dict:
    """A pod that names no model: the controller answers it without touching Redis."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "fn-", "namespace": "openfaas-fn"},
            "spec": {"containers": [{"name": "fn", "image": "ghcr.io/x/fn:1"}]}}


def controller_objects():
    docs = deploy_docs("controller.yaml")
    deployment = one(docs, "Deployment", "sllm-controller")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "controller"]
    return docs, deployment, container, one(docs, "Service", "sllm-controller")


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_deploy_manifests_pass_kubernetes_schema(name):
    import kubernetes_validate

    docs = deploy_docs(name)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("kubescheduler.config.k8s.io/"):
            continue  # kube-scheduler's --config file, not an API object: checked field by field below
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        if doc["kind"] not in CLUSTER_SCOPED:  # never depend on the namespace of kubectl's context
            assert doc["metadata"].get("namespace"), f"{name}: {doc['kind']} {doc['metadata']['name']} has no namespace"


def test_controller_app_starts_without_redis_and_fails_softly_when_used(controller_app):
    client = controller_app.test_client()
    assert client.get("/healthz").status_code == 200
    answer = client.get("/v1/cluster", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 503 and "Redis unavailable at redis://127.0.0.1:1/0" in answer.get_json()["error"]


def test_controller_deployment_runs_a_known_verb_with_known_settings(monkeypatch):
    from sllm_faas.controller.config import ENV, resolve
    from sllm_faas.controller.service import OPEN_PATHS, create_app
    from sllm_faas.runtime.cli import VERBS

    docs, deployment, container, service = controller_objects()
    pod_spec = deployment["spec"]["template"]["spec"]
    verb, *args = container["args"]
    assert verb in VERBS and VERBS[verb][0] == "controller.cli"
    assert deployment["spec"]["replicas"] == 2

    env = {}
    for entry in container["env"]:
        assert entry["name"] in ENV.values(), f"{entry['name']} is not a setting of controller/config.py"
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        env[entry["name"]] = SECRET_VALUES[ref["name"], ref["key"]] if ref else entry["value"]
    # Service links would add SLLM_CONTROLLER_PORT=tcp://...: a controller setting. They must be off.
    collisions = service_link_variables(service) & set(ENV.values())
    assert not collisions or pod_spec.get("enableServiceLinks") is False, collisions

    module = importlib.import_module("sllm_faas." + VERBS[verb][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser, verb)
    for name in [*ENV.values(), "REDIS_URL"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = resolve(parser.parse_args(args))  # what `sllm-faas controller` would run with

    assert config.token == TOKEN and config.redis_url == SECRET_VALUES["sllm-redis", "url"]
    assert config.key_prefix == "sllm:" and not config.client_ca  # token mode: webhook.yaml uses /k8s/<TOKEN>/
    https = next(p["containerPort"] for p in container["ports"] if p["name"] == "https")
    assert config.port == https == target_port(service, container, 443)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    tls = next(name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == "sllm-controller-tls")
    assert "items" not in volumes[tls]["secret"]  # a kubernetes.io/tls Secret's keys are tls.crt and tls.key
    assert config.tls_cert == f"{mounts[tls]['mountPath']}/tls.crt" and mounts[tls]["readOnly"] is True
    assert config.tls_key == f"{mounts[tls]['mountPath']}/tls.key"

    app = create_app(dataclasses.replace(config, redis_url="redis://127.0.0.1:1/0"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in OPEN_PATHS and endpoint(app, get["path"], "GET") == "operator.healthz"
        assert get["scheme"] == "HTTPS" and get["port"] in ("https", https)
        assert app.test_client().get(get["path"]).status_code == 200

    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile.runtime").read_text(), re.M).group(1)
    security = pod_spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == int(user)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")  # gunicorn's worker temp files
    assert "emptyDir" in volumes[tmp["name"]]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    account = one(docs, "ServiceAccount", pod_spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False and pod_spec["automountServiceAccountToken"] is False


def test_webhook_calls_a_route_the_controller_serves(controller_app):
    _, _, _, service = controller_objects()
    config = one(deploy_docs("webhook.yaml"), "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    target = hook["clientConfig"]["service"]
    assert (target["name"], target["namespace"]) == (service["metadata"]["name"], service["metadata"]["namespace"])
    assert target["port"] in [p["port"] for p in service["spec"]["ports"]]
    # The API server accepts a webhook path only if every segment is a DNS-1123 subdomain.
    segments = target["path"].strip("/").split("/")
    assert all(DNS1123_SUBDOMAIN.fullmatch(s) and len(s) <= 253 for s in segments), target["path"]
    assert endpoint(controller_app, target["path"], "POST") == "mutate_k8s"
    base64.b64decode(hook["clientConfig"]["caBundle"], validate=True)

    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "0d6c3e2a-1f7b-4c1e-9a51-3f8e2b7c9d40", "kind": {"group": "", "version": "v1",
                                                                               "kind": "Pod"},
                          "operation": "CREATE", "namespace": "openfaas-fn", "object": kube_pod(), "dryRun": False}}
    client = controller_app.test_client()
    answer = client.post(target["path"], json=review)
    assert answer.status_code == 200
    assert answer.get_json()["response"] == {"uid": review["request"]["uid"], "allowed": True}
    assert client.post(target["path"].replace(TOKEN, "0" * 64), json=review).status_code == 401

    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["admissionReviewVersions"] == ["v1"] and hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "NoneOnDryRun" and hook["timeoutSeconds"] == 5
    assert hook["reinvocationPolicy"] == "IfNeeded"  # safe: the patch is computed against the current pod
    selector = hook["namespaceSelector"]
    assert selector["matchLabels"] == {"sllm.io/placement": "enabled"}
    excluded = next(e for e in selector["matchExpressions"] if e["key"] == "kubernetes.io/metadata.name")
    assert excluded["operator"] == "NotIn" and service["metadata"]["namespace"] in excluded["values"]


def test_placeholders_fail_loudly_when_left_in():
    for name in ("webhook.yaml", "scheduler-config.yaml"):
        assert set(re.findall(r"<[A-Z_]+>", (DEPLOY / name).read_text())) == set(PLACEHOLDERS), name
    (hook,) = one(deploy_docs("webhook.yaml", fill=False), "MutatingWebhookConfiguration")["webhooks"]
    assert not all(DNS1123_SUBDOMAIN.fullmatch(s) for s in hook["clientConfig"]["service"]["path"].split("/")[1:])
    with pytest.raises(ValueError):
        base64.b64decode(hook["clientConfig"]["caBundle"], validate=True)


def test_scheduler_config_extender_calls_routes_the_controller_serves(controller_app):
    _, _, _, service = controller_objects()
    (config,) = deploy_docs("scheduler-config.yaml")
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1" and config["kind"] == "KubeSchedulerConfiguration"
    assert set(config) <= SCHEDULER_FIELDS
    assert set(config["leaderElection"]) <= LEADER_ELECTION_FIELDS
    assert config["leaderElection"]["resourceName"] != "kube-scheduler"  # not the default scheduler's lease
    assert all(set(p) <= PROFILE_FIELDS for p in config["profiles"])
    (extender,) = config["extenders"]
    assert set(extender) <= EXTENDER_FIELDS and set(extender["tlsConfig"]) <= EXTENDER_TLS_FIELDS

    url = urllib.parse.urlsplit(extender["urlPrefix"])
    assert url.scheme == "https" and extender["enableHTTPS"] is True
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    # enableHTTPS without a CA makes kube-scheduler skip verification altogether
    assert not extender["tlsConfig"].get("insecure")
    base64.b64decode(extender["tlsConfig"]["caData"], validate=True)

    args = {"pod": kube_pod(), "nodenames": ["node-a", "node-b"]}  # nodeCacheCapable: names only
    assert extender["nodeCacheCapable"] is True
    client = controller_app.test_client()
    expected = {"filterVerb": ("extender_filter_k8s", {"nodenames": ["node-a", "node-b"], "failedNodes": {},
                                                       "error": ""}),
                "prioritizeVerb": ("extender_prioritize_k8s", [{"host": "node-a", "score": 0},
                                                                {"host": "node-b", "score": 0}])}
    for verb, (view, answer) in expected.items():
        path = url.path.rstrip("/") + "/" + extender[verb]  # how kube-scheduler builds the URL
        assert endpoint(controller_app, path, "POST") == view
        response = client.post(path, json=args)
        assert response.status_code == 200 and response.get_json() == answer
    assert not extender.get("bindVerb") and not extender.get("preemptVerb")  # the controller serves neither

    weight = extender["weight"]
    assert isinstance(weight, int) and not isinstance(weight, bool) and weight > 0
    assert extender["ignorable"] is True and not extender.get("managedResources")
    assert GO_DURATION.fullmatch(extender["httpTimeout"])
    unfilled = deploy_docs("scheduler-config.yaml", fill=False)[0]["extenders"][0]["urlPrefix"]
    assert unfilled.endswith("/k8s/<TOKEN>")


def test_rbac_binds_only_the_dedicated_scheduler():
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for p in DEPLOY.glob("*.yaml")
                for d in deploy_docs(p.name) if d["kind"] == "ServiceAccount"}
    rbac = deploy_docs("rbac.yaml")
    subjects = {(s["namespace"], s["name"]) for d in rbac if d["kind"].endswith("Binding") for s in d["subjects"]}
    assert subjects <= accounts and ("sllm-system", "sllm-controller") not in subjects  # the controller needs none

    (config,) = deploy_docs("scheduler-config.yaml")
    election = config["leaderElection"]
    lease = one(rbac, "Role", "sllm-scheduler-lease")
    assert lease["metadata"]["namespace"] == election["resourceNamespace"]
    assert election["resourceName"] in lease["rules"][0]["resourceNames"]

    scheduler = one(deploy_docs("scheduler.yaml"), "Deployment", "sllm-scheduler")
    pod_spec = scheduler["spec"]["template"]["spec"]
    assert ("sllm-system", pod_spec["serviceAccountName"]) in subjects
    (container,) = pod_spec["containers"]
    config_path = next(a.split("=", 1)[1] for a in container["command"] if a.startswith("--config="))
    (mount,) = container["volumeMounts"]
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume and config_path == f"{mount['mountPath']}/config.yaml"  # the token is in there


def test_deploy_readme_lists_every_controller_setting():
    from sllm_faas.controller.config import ENV, ControllerConfig

    rows = {}
    for line in (DEPLOY / "README.md").read_text().splitlines():
        match = re.fullmatch(r"\| `--([a-z-]+)` \| `(\w+)` \| (.+?) \| .+ \|", line)
        if match:
            rows[match[1]] = (match[2], match[3])
    assert rows == {f.name.replace("_", "-"): (ENV[f.name], f"`{f.default}`" if f.default != "" else "(empty)")
                    for f in dataclasses.fields(ControllerConfig)}
