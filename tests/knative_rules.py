"""Knative Serving's admission rules that a plain Kubernetes schema does not know.

Summarised from Knative's docs: autoscaling annotations belong on the revision template; a
container exposes at most one port; timeoutSeconds is bounded by max-revision-timeout-seconds
(600 by default); some podspec fields are behind feature flags in config-features.
"""

from __future__ import annotations

AUTOSCALING_PREFIX = "autoscaling.knative.dev/"
MAX_REVISION_TIMEOUT = 600
FLAGGED_VOLUMES = {"hostPath": "kubernetes.podspec-volumes-hostpath",
                   "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim"}


def knative_service_errors(doc: dict, enabled_flags: set[str] = frozenset()) -> list[str]:
    errors = []
    if doc.get("apiVersion") != "serving.knative.dev/v1" or doc.get("kind") != "Service":
        return [f"not a serving.knative.dev/v1 Service: {doc.get('apiVersion')}/{doc.get('kind')}"]
    outer = (doc.get("metadata") or {}).get("annotations") or {}
    errors += [f"metadata.annotations.{k}: autoscaling annotations go on spec.template.metadata"
               for k in outer if k.startswith(AUTOSCALING_PREFIX)]
    template = (doc.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    for key, value in annotations.items():
        if not isinstance(value, str):
            errors.append(f"spec.template.metadata.annotations.{key}: annotation values must be strings")
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    if len([c for c in containers if c.get("ports")]) > 1:
        errors.append("spec.template.spec.containers: only one container may declare ports")
    for index, container in enumerate(containers):
        ports = container.get("ports") or []
        if len(ports) > 1:
            errors.append(f"containers[{index}].ports: Knative allows one port")
        if ports and ports[0].get("name") not in (None, "http1", "h2c"):
            errors.append(f"containers[{index}].ports[0].name: must be http1 or h2c")
    timeout = spec.get("timeoutSeconds")
    if timeout is not None and not 0 < timeout <= MAX_REVISION_TIMEOUT:
        errors.append(f"timeoutSeconds: {timeout} is outside 1..{MAX_REVISION_TIMEOUT}")
    concurrency = spec.get("containerConcurrency")
    if concurrency is not None and concurrency < 0:
        errors.append("containerConcurrency: must be >= 0")
    for volume in spec.get("volumes") or []:
        for kind, flag in FLAGGED_VOLUMES.items():
            if kind in volume and flag not in enabled_flags:
                errors.append(f"volumes.{volume.get('name')}: {kind} needs the feature flag {flag}")
    return errors


def as_core_pod(doc: dict) -> dict:
    """The revision template as a core v1 Pod, with probe ports filled in as Knative does."""
    template = doc["spec"]["template"]
    spec = {k: v for k, v in template["spec"].items() if k not in ("containerConcurrency", "timeoutSeconds")}
    containers = []
    for container in spec["containers"]:
        port = (container.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        container = dict(container)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container and "httpGet" in container[probe]:
                container[probe] = {**container[probe], "httpGet": {"port": port, **container[probe]["httpGet"]}}
        containers.append(container)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]},
            "spec": {**spec, "containers": containers}}
