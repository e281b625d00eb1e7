"""Knative Serving's admission rules that a plain Kubernetes schema does not know, reproduced from its source.

Every rule cites the upstream file (github.com/knative/serving, main branch as of 2026-08) it comes from:

- pkg/apis/serving/v1/revision_defaults.go (applyUserContainerDefaultReadinessProbe, applyReadinessProbeDefaults):
  the defaults the webhook applies before validating: a user container without a readiness probe gets a TCP one;
  successThreshold 0 becomes 1; only when periodSeconds is set do failureThreshold (3) and timeoutSeconds (1)
  get Kubernetes' defaults.
- pkg/apis/serving/k8s_validation.go: validateContainersPorts (one port across all containers),
  validateContainerPorts (name "", "http1" or "h2c"; TCP only), reservedPorts (networking.BackendHTTPPort 8012,
  BackendHTTP2Port 8013, QueueAdminPort 8022, AutoscalingQueueMetricsPort 9090, UserQueueMetricsPort 9091 from
  pkg/networking/constants.go, and ProfilingDefaultPort 8008), reservedEnvVars, reservedContainerNames,
  reservedPaths, validateVolumeMounts (mounts of volumes other than emptyDir, PVC and ephemeral must be
  readOnly), validateVolume (hostPath behind kubernetes.podspec-volumes-hostpath), validateReadinessProbe
  (periodSeconds 0 is "Knative's special probe with aggressive retries": failureThreshold and timeoutSeconds
  are then disallowed), validateProbe (an HTTP probe's port, if named, must be the container port's name).
- pkg/queue/readiness/probe.go: with periodSeconds 0 queue-proxy retries the probe every 50 ms
  (retryInterval) for up to 10 s per kubelet probe (PollTimeout); any other period is probed only at that period.
- pkg/apis/config/defaults.go: DefaultMaxRevisionTimeoutSeconds = 10 * 60 bounds spec.template.spec.timeoutSeconds.
- Autoscaling annotations act only on the revision template (spec.template.metadata.annotations).
"""

from __future__ import annotations

import copy

AUTOSCALING_PREFIX = "autoscaling.knative.dev/"
MAX_REVISION_TIMEOUT = 10 * 60
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_CONTAINER_NAMES = {"queue-proxy"}
RESERVED_PATHS = {"/", "/dev", "/dev/log"}
VALID_PORT_NAMES = {None, "", "http1", "h2c"}
WRITABLE_VOLUME_KINDS = ("emptyDir", "persistentVolumeClaim", "ephemeral")
FLAGGED_VOLUMES = {"hostPath": "kubernetes.podspec-volumes-hostpath",
                   "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim"}
AGGRESSIVE_RETRY_S = 0.05   # pkg/queue/readiness/probe.go retryInterval
AGGRESSIVE_POLL_S = 10.0    # pkg/queue/readiness/probe.go PollTimeout
PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


def with_knative_defaults(doc: dict) -> dict:
    """The Service as Knative's defaulting webhook leaves it (revision_defaults.go), before validation."""
    doc = copy.deepcopy(doc)
    containers = doc["spec"]["template"]["spec"].get("containers") or []
    serving = [c for c in containers if c.get("ports")] or containers[:1]
    for container in serving:
        probe = container.setdefault("readinessProbe", {})
        if not any(k in probe for k in ("tcpSocket", "httpGet", "exec", "grpc")):
            probe["tcpSocket"] = {}
    for container in containers:
        probe = container.get("readinessProbe")
        if probe is None:
            continue
        if not probe.get("successThreshold"):
            probe["successThreshold"] = 1
        if probe.get("periodSeconds", 0):
            probe["failureThreshold"] = probe.get("failureThreshold") or 3
            probe["timeoutSeconds"] = probe.get("timeoutSeconds") or 1
    return doc


def readiness_poll_interval_s(probe: dict) -> float:
    """How often queue-proxy looks at the user container's readiness while starting (pkg/queue/readiness/probe.go)."""
    period = probe.get("periodSeconds", 0)
    return AGGRESSIVE_RETRY_S if period == 0 else float(period)


def _probe_errors(where: str, probe: dict, port: dict, readiness: bool) -> list[str]:
    errors = []
    handlers = [k for k in ("httpGet", "tcpSocket", "exec", "grpc") if k in probe]
    if len(handlers) != 1:
        errors.append(f"{where}: exactly one of httpGet, tcpSocket, exec, grpc (found {handlers or 'none'})")
    for kind in ("httpGet", "tcpSocket"):
        probe_port = (probe.get(kind) or {}).get("port")
        if isinstance(probe_port, str) and probe_port != (port.get("name") or "http"):
            errors.append(f"{where}.{kind}.port: {probe_port!r} must match the container port's name")
    if not readiness:
        return errors
    if probe.get("periodSeconds", 0) < 0:
        errors.append(f"{where}.periodSeconds: {probe['periodSeconds']} must be >= 0")
    if probe.get("successThreshold", 0) < 1:
        errors.append(f"{where}.successThreshold: {probe.get('successThreshold', 0)} must be >= 1")
    if probe.get("periodSeconds", 0) == 0:
        for field in ("failureThreshold", "timeoutSeconds"):
            if probe.get(field, 0):
                errors.append(f"{where}.{field}: {probe[field]} is disallowed when periodSeconds is zero "
                              f"(Knative's aggressive probe)")
    else:
        for field in ("failureThreshold", "timeoutSeconds"):
            if probe.get(field, 0) < 1:
                errors.append(f"{where}.{field}: {probe.get(field, 0)} must be >= 1")
    return errors


def knative_service_errors(doc: dict, enabled_flags: set[str] = frozenset()) -> list[str]:
    """Knative's objections to a serving.knative.dev/v1 Service, each naming the field and value."""
    if doc.get("apiVersion") != "serving.knative.dev/v1" or doc.get("kind") != "Service":
        return [f"not a serving.knative.dev/v1 Service: {doc.get('apiVersion')}/{doc.get('kind')}"]
    errors = []
    outer = (doc.get("metadata") or {}).get("annotations") or {}
    errors += [f"metadata.annotations.{k}: autoscaling annotations go on spec.template.metadata"
               for k in outer if k.startswith(AUTOSCALING_PREFIX)]
    doc = with_knative_defaults(doc)
    template = doc["spec"]["template"]
    for key, value in ((template.get("metadata") or {}).get("annotations") or {}).items():
        if not isinstance(value, str):
            errors.append(f"spec.template.metadata.annotations.{key}: {value!r}: annotation values must be strings")
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    if len([c for c in containers if c.get("ports")]) > 1:
        errors.append("spec.template.spec.containers: only one container may declare ports (one port per Service)")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    for name, volume in volumes.items():
        for kind, flag in FLAGGED_VOLUMES.items():
            if kind in volume and flag not in enabled_flags:
                errors.append(f"spec.template.spec.volumes.{name}: {kind} needs the feature flag {flag}")
    for index, container in enumerate(containers):
        where = f"spec.template.spec.containers[{index}]"
        if container.get("name") in RESERVED_CONTAINER_NAMES:
            errors.append(f"{where}.name: {container['name']!r} is reserved")
        ports = container.get("ports") or []
        if len(ports) > 1:
            errors.append(f"{where}.ports: Knative allows one port, found {len(ports)}")
        port = ports[0] if ports else {"containerPort": 8080}
        if port.get("name") not in VALID_PORT_NAMES:
            errors.append(f"{where}.ports[0].name: {port.get('name')!r} must be empty, http1 or h2c")
        if port.get("containerPort") in RESERVED_PORTS:
            errors.append(f"{where}.ports[0].containerPort: {port['containerPort']} is reserved by Knative")
        if port.get("protocol") not in (None, "TCP"):
            errors.append(f"{where}.ports[0].protocol: {port['protocol']!r} must be TCP")
        for env in container.get("env") or []:
            if env.get("name") in RESERVED_ENV:
                errors.append(f"{where}.env.{env['name']}: reserved by Knative")
        for probe_field in PROBES:
            if container.get(probe_field) is not None:
                errors += _probe_errors(f"{where}.{probe_field}", container[probe_field], port,
                                        probe_field == "readinessProbe")
        for m, mount in enumerate(container.get("volumeMounts") or []):
            mwhere = f"{where}.volumeMounts[{m}]"
            volume = volumes.get(mount.get("name"))
            if volume is None:
                errors.append(f"{mwhere}.name: {mount.get('name')!r} has no matching volume")
                continue
            if mount.get("mountPath", "").rstrip("/") in {p.rstrip("/") for p in RESERVED_PATHS} | {""}:
                errors.append(f"{mwhere}.mountPath: {mount.get('mountPath')!r} is reserved")
            if not any(k in volume for k in WRITABLE_VOLUME_KINDS) and not mount.get("readOnly"):
                errors.append(f"{mwhere}.readOnly: volume {mount['name']!r} must be mounted readOnly")
    timeout = spec.get("timeoutSeconds")
    if timeout is not None and not 0 < timeout <= MAX_REVISION_TIMEOUT:
        errors.append(f"spec.template.spec.timeoutSeconds: {timeout} is outside 1..{MAX_REVISION_TIMEOUT} "
                      "(max-revision-timeout-seconds)")
    concurrency = spec.get("containerConcurrency")
    if concurrency is not None and concurrency < 0:
        errors.append(f"spec.template.spec.containerConcurrency: {concurrency} must be >= 0")
    return errors


def as_core_pod(doc: dict) -> dict:
    """The revision template as a core v1 Pod, with probe ports filled in as Knative does."""
    template = doc["spec"]["template"]
    spec = {k: v for k, v in template["spec"].items() if k not in ("containerConcurrency", "timeoutSeconds")}
    containers = []
    for container in spec["containers"]:
        port = (container.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        container = dict(container)
        for probe in PROBES:
            if probe in container and "httpGet" in container[probe]:
                container[probe] = {**container[probe], "httpGet": {**container[probe]["httpGet"], "port": port}}
        containers.append(container)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]},
            "spec": {**spec, "containers": containers}}
