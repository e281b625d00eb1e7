"""Deployables are valid: Knative YAML (schema + Knative's rules), stack.yml labels, Dockerfiles (hadolint)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from knative_rules import as_core_pod, knative_service_errors

ROOT = Path(__file__).resolve().parent.parent
KNATIVE = ROOT / "examples" / "smollm2" / "knative-service.yaml"
DOCKERFILES = [ROOT / "Dockerfile.runtime", ROOT / "templates" / "sllm-python" / "Dockerfile"]


def test_knative_service_passes_kubernetes_schema_and_knative_rules():
    import kubernetes_validate

    doc = yaml.safe_load(KNATIVE.read_text())
    assert knative_service_errors(doc, {"kubernetes.podspec-volumes-hostpath"}) == []
    kubernetes_validate.validate(as_core_pod(doc), "1.30.0", strict=True)


def test_knative_rules_catch_mistakes():
    doc = yaml.safe_load(KNATIVE.read_text())
    doc["metadata"]["annotations"] = {"autoscaling.knative.dev/min-scale": "0"}
    doc["spec"]["template"]["spec"]["timeoutSeconds"] = 3600
    doc["spec"]["template"]["spec"]["containers"][0]["ports"].append({"containerPort": 9090})
    errors = knative_service_errors(doc)
    assert any("spec.template.metadata" in e for e in errors)
    assert any("timeoutSeconds" in e for e in errors)
    assert any("one port" in e for e in errors)
    assert any("podspec-volumes-hostpath" in e for e in errors)


def test_broken_pod_fails_the_schema():
    import kubernetes_validate

    doc = yaml.safe_load(KNATIVE.read_text())
    pod = as_core_pod(doc)
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.30.0", strict=True)


def test_stack_file_scale_labels():
    stack = yaml.safe_load((ROOT / "examples" / "smollm2" / "stack.yml").read_text())
    function = stack["functions"]["smollm2"]
    assert function["lang"] == "sllm-python"
    assert (ROOT / "examples" / "smollm2" / function["handler"] / "handler.py").exists()
    labels = function["labels"]
    assert all(isinstance(v, str) for v in labels.values())
    assert int(labels["com.openfaas.scale.min"]) <= int(labels["com.openfaas.scale.max"])
    assert labels["com.openfaas.scale.zero"] == "true"


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
