"""Kubernetes wire formats, as pure functions: the scheduler extender (k8s.io/kube-scheduler/extender/v1)
and the mutating admission webhook (admission.k8s.io/v1 AdmissionReview with a JSONPatch).

Which model a pod serves: the `sllm.io/model` annotation, else the `SLLM_MODEL` env of its first
container that sets one. Pods naming no model are not ours: they pass the filter, score 0 and are
admitted unchanged.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

from sllm_faas.common import jsonbody
from sllm_faas.common.settings import DEFAULT_KEY_PREFIX
from sllm_faas.controller.scheduler import Decision
from sllm_faas.redis_schema.keys import validate_id

MODEL_ANNOTATION = "sllm.io/model"
PLACEMENT_ANNOTATION = "sllm.io/placement"
BOOKING_ANNOTATION = "sllm.io/booking"
CALLER_ANNOTATION = "sllm.io/caller"  # the admission request that decided the pod: its caller id in `Keys.waiting`
KNATIVE_SERVICE_LABEL = "serving.knative.dev/service"
MAX_PRIORITY = 10  # extenderv1.MaxExtenderPriority
AFFINITY_WEIGHTS = (100, 50, 25)  # preferred-affinity weight of the best, second and third node


class BadRequest(ValueError):
    """A malformed payload; `field` is the path of the field at fault (e.g. `request.object.spec.containers[0]`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# -- typed parse: every field we read, with the type Kubernetes gives it -------------------------------------------
# A schema is a dict (a JSON object and the fields we read from it), a one-item list (an array of that), a type or a
# tuple of types (a scalar), or STRING_MAP (map[string]string). JSON null is accepted everywhere, as Go decodes it to
# the zero value; what must be present is checked by the parsers below.
STRING_MAP = "map[string]string"
PROBE = {"httpGet": {"path": str, "port": (int, str)}, "exec": {"command": [str]}}
CONTAINER = {"name": str, "env": [{"name": str, "value": str}], "volumeMounts": [{"name": str, "mountPath": str}],
             "ports": [{"name": str, "containerPort": int}], "readinessProbe": PROBE}
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
POD = {"metadata": {"annotations": STRING_MAP, "labels": STRING_MAP},
       "spec": {"containers": [CONTAINER], "volumes": [{"name": str}], "affinity": {"nodeAffinity": {PREFERRED: [{}]}}}}
NODE_ITEM = {"metadata": {"name": str}}
JSON_TYPE = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}


def _found(value: Any) -> str:
    return JSON_TYPE.get(type(value), type(value).__name__)


def _wrong(path: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(f"{path} must be {expected}, not {_found(value)}", path)


def check(value: Any, schema: Any, path: str) -> None:
    """Raise BadRequest naming the first field whose JSON type is not the one the schema gives it."""
    if value is None:
        return
    if schema == STRING_MAP:
        if not isinstance(value, dict):
            raise _wrong(path, "an object of strings", value)
        for key, item in value.items():
            if not isinstance(item, str):
                raise _wrong(f"{path}[{key!r}]", "a string", item)
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise _wrong(path, "an object", value)
        for name, sub in schema.items():
            check(value.get(name), sub, f"{path}.{name}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise _wrong(path, "an array", value)
        for index, item in enumerate(value):
            check(item, schema[0], f"{path}[{index}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            raise _wrong(path, " or ".join("an integer" if t is int else JSON_TYPE[t] for t in types), value)


def _required(value: Any, schema: Any, path: str) -> Any:
    if value is None:
        raise BadRequest(f"{path} is missing", path)
    check(value, schema, path)
    return value


def _get(data: dict, name: str) -> Any:
    """Go's encoding/json matches field names case-insensitively; so do we."""
    for key, value in data.items():
        if key.lower() == name.lower():
            return value
    return None


def model_of(pod: dict) -> str | None:
    """The model a pod (checked against POD) serves, or None: not ours."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if annotations.get(MODEL_ANNOTATION):
        return annotations[MODEL_ANNOTATION]
    for container in (pod.get("spec") or {}).get("containers") or []:
        for env in (container or {}).get("env") or []:
            if env and env.get("name") == "SLLM_MODEL" and env.get("value"):
                return env["value"]
    return None


def placement_of(pod: dict) -> dict:
    """Our webhook's decision for this pod (its placement annotation: node, tier, action, booking...), {} if none."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return jsonbody.loads_object(annotations.get(PLACEMENT_ANNOTATION) or "{}")
    except jsonbody.JsonError:
        field = f"pod.metadata.annotations[{PLACEMENT_ANNOTATION!r}]"
        raise BadRequest(f"{field} is not a JSON object", field) from None


def booked_node(pod: dict) -> str | None:
    """The node our webhook booked a slot on for this pod (from its placement annotation), if any."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if not annotations.get(BOOKING_ANNOTATION):
        return None
    node = placement_of(pod).get("node")
    return node if isinstance(node, str) else None


def caller_of(pod: dict) -> str | None:
    """The caller id our webhook gave this pod (its first admission request's uid), if the pod carries one that is
    an id: how it counts among the callers waiting for GPUs. Anything else (a value a user set) is no caller id."""
    caller = ((pod.get("metadata") or {}).get("annotations") or {}).get(CALLER_ANNOTATION)
    try:
        return validate_id(caller, "caller id") if caller else None
    except ValueError:
        return None


def function_of(pod: dict) -> str:
    """The FaaS function a pod serves: OpenFaaS's `faas_function` label, else Knative's service label."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get("faas_function") or labels.get(KNATIVE_SERVICE_LABEL) or ""


def parse_extender_args(body: dict) -> tuple[dict, list[str], bool]:
    """(pod, candidate node names, whether the caller sent names only) from ExtenderArgs."""
    pod = _required(_get(body, "pod"), POD, "ExtenderArgs.pod")
    names = _get(body, "nodenames")
    if names is not None:
        check(names, [str], "ExtenderArgs.nodenames")
        return pod, names, True
    nodes = _required(_get(body, "nodes"), {"items": [NODE_ITEM]}, "ExtenderArgs.nodes")
    items = _required(nodes.get("items"), [NODE_ITEM], "ExtenderArgs.nodes.items")
    for index, item in enumerate(items):
        _required(item, NODE_ITEM, f"ExtenderArgs.nodes.items[{index}]")
        _required(item.get("metadata"), NODE_ITEM["metadata"], f"ExtenderArgs.nodes.items[{index}].metadata")
        _required(item["metadata"].get("name"), str, f"ExtenderArgs.nodes.items[{index}].metadata.name")
    return pod, [item["metadata"]["name"] for item in items], False


def filter_result(body: dict, names: list[str], names_only: bool, ranked: list[Decision] | None) -> dict:
    """ExtenderFilterResult: nodes we know to be full with nothing to migrate fail; the rest pass."""
    known = {d.node: d for d in ranked or []}
    failed = {n: "sllm: no free slot and no migratable instance" for n in names
              if n in known and not known[n].feasible}
    passed = [n for n in names if n not in failed]
    if names_only:
        return {"nodenames": passed, "failedNodes": failed, "error": ""}
    keep = set(passed)  # once: a set per item made this quadratic (40k nodes took 52 s)
    items = [item for item in _get(body, "nodes")["items"] if item["metadata"]["name"] in keep]
    return {"nodes": {"apiVersion": "v1", "kind": "NodeList", "items": items}, "failedNodes": failed, "error": ""}


def priorities(names: list[str], ranked: list[Decision] | None) -> list[dict]:
    """HostPriorityList: 10 for the fastest estimated start, 0 for the slowest (or unknown) node,
    linear in between."""
    known = {d.node: d.estimate_s for d in ranked or [] if not math.isinf(d.estimate_s)}
    times = [known[n] for n in names if n in known]
    best, worst = (min(times), max(times)) if times else (0.0, 0.0)
    scores = []
    for name in names:
        if name not in known:
            score = 0
        elif worst == best:
            score = MAX_PRIORITY
        else:
            score = round(MAX_PRIORITY * (worst - known[name]) / (worst - best))
        scores.append({"host": name, "score": score})
    return scores


def parse_admission_review(body: dict) -> tuple[str, dict, bool]:
    """(request uid, pod, dry run) from an AdmissionReview v1 for a pod."""
    if body.get("apiVersion") != "admission.k8s.io/v1" or body.get("kind") != "AdmissionReview":
        raise BadRequest(f"apiVersion/kind must be admission.k8s.io/v1 AdmissionReview, not "
                         f"{str(body.get('apiVersion'))[:60]}/{str(body.get('kind'))[:60]}", "apiVersion")
    request = _required(body.get("request"), {"uid": str, "kind": {"kind": str}, "object": POD, "dryRun": bool},
                        "AdmissionReview.request")
    uid = _required(request.get("uid"), str, "AdmissionReview.request.uid")
    if not uid:
        raise BadRequest("AdmissionReview.request.uid is empty", "AdmissionReview.request.uid")
    kind = _required(request.get("kind"), {"kind": str}, "AdmissionReview.request.kind")
    if kind.get("kind") != "Pod":
        raise BadRequest(f"AdmissionReview.request.kind.kind must be Pod, not {str(kind.get('kind'))[:60]}",
                         "AdmissionReview.request.kind.kind")
    pod = _required(request.get("object"), POD, "AdmissionReview.request.object")
    return uid, pod, bool(request.get("dryRun"))


def admission_response(uid: str, patch: list[dict] | None = None, warning: str | None = None) -> dict:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warning:
        response["warnings"] = [warning]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")  # RFC 6901


@dataclass(frozen=True)
class Plumbing:
    """What every function pod gets from the node (the webhook injects it, as a mesh injects its sidecar)."""

    socket_dir: str                 # host dir of the node loader's socket, mounted read-write (connect() needs it)
    dram_dir: str                   # host dir of the DRAM tier, mounted read-only (weights are mapped MAP_PRIVATE)
    redis_url: str                  # SLLM_REDIS_URL as a plain value, when no Secret is named
    redis_secret: str = ""          # "SECRET/KEY" in the pod's namespace: SLLM_REDIS_URL from there instead
    key_prefix: str = DEFAULT_KEY_PREFIX

    def volumes(self) -> list[tuple[str, str, bool]]:
        """(volume name, host path = mount path, read-only)."""
        return [(SOCKET_VOLUME, self.socket_dir, False), (DRAM_VOLUME, self.dram_dir, True)]

    def env(self, pod: dict) -> list[dict]:
        if self.redis_secret:
            secret, key = self.redis_secret.split("/", 1)
            redis_url = {"name": "SLLM_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        else:
            redis_url = {"name": "SLLM_REDIS_URL", "value": self.redis_url}
        env = [{"name": "SLLM_NODE_ID", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}},
               {"name": "SLLM_LOADER_SOCKET", "value": f"{self.socket_dir.rstrip('/')}/{LOADER_SOCKET}"},
               redis_url, {"name": "SLLM_KEY_PREFIX", "value": self.key_prefix}]
        function = function_of(pod)
        return env + ([{"name": "SLLM_FUNCTION_NAME", "value": function}] if function else [])


SOCKET_VOLUME, DRAM_VOLUME, LOADER_SOCKET = "sllm-loader-socket", "sllm-dram-tier", "loader.sock"
QUEUE_PROXY = "queue-proxy"                 # Knative's sidecar (pkg/reconciler/revision/resources/queue.go)
KNATIVE_USER_PORT_NAME = "user-port"        # the serving container's port (resources/deploy.go buildContainerPorts)
WATCHDOG_PORT = 8080                        # of-watchdog's port, faas-netes' RuntimeHTTPPort, Knative's default
READY_PATH = "/_/ready"                     # the runtime's readiness (model loaded and warmed up)


def function_container(pod: dict) -> int | None:
    """Index of the container serving the function: OpenFaaS names it after the function (faas-netes
    makeDeploymentSpec); Knative gives it the port named user-port (its default name is user-container);
    otherwise the first container that is not a known sidecar."""
    containers = (pod.get("spec") or {}).get("containers") or []
    named = (function_of(pod), "user-container")
    for rule in (lambda c: c.get("name") == named[0] and named[0],
                 lambda c: any((p or {}).get("name") == KNATIVE_USER_PORT_NAME for p in c.get("ports") or []),
                 lambda c: c.get("name") == named[1],
                 lambda c: c.get("name") != QUEUE_PROXY):
        for index, container in enumerate(containers):
            if container and rule(container):
                return index
    return None


def _extend(patch: list[dict], path: str, current: list | None, items: list) -> None:
    """Append `items` to the array at `path`, creating it when absent (JSONPatch cannot append to nothing)."""
    if not items:
        return
    if current is None:
        patch.append({"op": "add", "path": path, "value": items})
    else:
        patch += [{"op": "add", "path": f"{path}/-", "value": item} for item in items]


def _is_platform_default(probe: dict | None) -> bool:
    """faas-netes' own readiness probe (pkg/k8s/probes.go MakeProbes: GET /_/health, or `cat /tmp/.lock`): it
    turns ready before the model has loaded, so it is replaced; a probe of any other shape is the user's."""
    if not probe:
        return True
    http, command = probe.get("httpGet") or {}, (probe.get("exec") or {}).get("command")
    return http.get("path") == "/_/health" or command == ["cat", "/tmp/.lock"]


def _readiness_patch(pod: dict, index: int) -> list[dict]:
    """Readiness on the runtime's /_/ready, which turns 200 only once the model is loaded and warmed up.

    Knative: the kubelet never runs the user-container's HTTP readiness probe; Knative moves it into queue-proxy's
    SERVING_READINESS_PROBE env, defaulting to TCP on the user port (resources/deploy.go createServingContainer,
    resources/queue.go applyReadinessProbeDefaults). A TCP probe there (the port opens long before the model is
    loaded) becomes an HTTP GET of /_/ready; an HTTP probe the user set is kept.
    OpenFaaS: of-watchdog answers /_/ready on its port by calling the upstream's `ready_path` (of-watchdog
    pkg/readiness.go); the sllm-python template sets ready_path=/_/ready."""
    containers = pod["spec"]["containers"]
    for q, container in enumerate(containers):
        if (container or {}).get("name") != QUEUE_PROXY:
            continue
        env = container.get("env") or []
        port = next((e.get("value") for e in env if e and e.get("name") == "USER_PORT"), None) or ""
        for e, entry in enumerate(env):
            if entry and entry.get("name") == "SERVING_READINESS_PROBE" and entry.get("value"):
                value = _knative_probe(entry["value"], int(port) if port.isdigit() else WATCHDOG_PORT)
                return [] if value == entry["value"] else [
                    {"op": "replace", "path": f"/spec/containers/{q}/env/{e}/value", "value": value}]
        return []
    current = containers[index].get("readinessProbe")
    if not _is_platform_default(current):
        return []
    port = ((current or {}).get("httpGet") or {}).get("port") or WATCHDOG_PORT
    timing = {k: v for k, v in (current or {}).items() if k not in ("httpGet", "exec", "tcpSocket", "grpc")}
    probe = {"httpGet": {"path": READY_PATH, "port": port}, "periodSeconds": 2, "failureThreshold": 3, **timing}
    return [{"op": "add", "path": f"/spec/containers/{index}/readinessProbe", "value": probe}]


def _knative_probe(encoded: str, user_port: int) -> str:
    """queue-proxy's probe JSON (one probe, or a list with multi-container probing: pkg/queue/readiness
    EncodeSingleProbe / EncodeMultipleProbes) with the TCP probe of the user port turned into GET /_/ready."""
    try:
        probes = jsonbody.loads(encoded, "queue-proxy env SERVING_READINESS_PROBE")
    except jsonbody.JsonError as exc:
        raise BadRequest(str(exc), "SERVING_READINESS_PROBE") from None
    changed = False
    for probe in probes if isinstance(probes, list) else [probes]:
        tcp = probe.get("tcpSocket") if isinstance(probe, dict) else None
        if isinstance(tcp, dict) and tcp.get("port") == user_port:
            del probe["tcpSocket"]
            probe["httpGet"] = {"path": READY_PATH, "port": user_port, "host": "127.0.0.1", "scheme": "HTTP",
                                "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]}
            changed = True
    return json.dumps(probes, separators=(",", ":")) if changed else encoded


def pod_patch(pod: dict, plumbing: Plumbing, best_nodes: list[str] = (), placement: dict | None = None,
              caller: str | None = None) -> list[dict]:
    """JSONPatch computed against the pod as it is now, so a reinvocation adds nothing twice: the node plumbing
    (volumes, mounts, env, readiness) into the function container; the `caller` that decided it as an annotation;
    and, when placed, preferred node affinity for the best nodes, the decision as annotations and the booking id
    in the env. A volume, mount or env variable the pod already has (by name, by mount path) is left as the user
    set it."""
    annotations = {CALLER_ANNOTATION: caller} if caller else {}
    if placement:
        annotations[PLACEMENT_ANNOTATION] = json.dumps(placement, sort_keys=True)
        if placement.get("booking"):
            annotations[BOOKING_ANNOTATION] = placement["booking"]
    patch = _annotations_patch(pod, annotations) + (_affinity_patch(pod, best_nodes) if placement else [])
    index = function_container(pod)
    if index is None:
        return patch
    spec = pod["spec"]
    container = spec["containers"][index]
    mounted = {(m or {}).get("mountPath") for m in container.get("volumeMounts") or []}
    volume_names = {(v or {}).get("name") for v in spec.get("volumes") or []}
    volumes, mounts = [], []
    for name, path, read_only in plumbing.volumes():
        if path in mounted:
            continue
        mounts.append({"name": name, "mountPath": path, **({"readOnly": True} if read_only else {})})
        if name not in volume_names:
            volumes.append({"name": name, "hostPath": {"path": path, "type": "Directory"}})
    _extend(patch, "/spec/volumes", spec.get("volumes"), volumes)
    _extend(patch, f"/spec/containers/{index}/volumeMounts", container.get("volumeMounts"), mounts)
    env = plumbing.env(pod)
    if placement and placement.get("booking"):
        env.append({"name": "SLLM_BOOKING_ID", "value": placement["booking"]})
    present = {(e or {}).get("name") for e in container.get("env") or []}
    _extend(patch, f"/spec/containers/{index}/env", container.get("env"), [e for e in env if e["name"] not in present])
    return patch + _readiness_patch(pod, index)


def placed(pod: dict) -> bool:
    """Whether our webhook already placed this pod (a reinvocation must not book a second slot)."""
    return PLACEMENT_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {})


def _annotations_patch(pod: dict, annotations: dict[str, str]) -> list[dict]:
    """Set these annotations (JSONPatch `add` replaces a value the pod already has)."""
    if not annotations:
        return []
    if pod.get("metadata") is None:
        return [{"op": "add", "path": "/metadata", "value": {"annotations": annotations}}]
    if pod["metadata"].get("annotations") is None:
        return [{"op": "add", "path": "/metadata/annotations", "value": annotations}]
    return [{"op": "add", "path": f"/metadata/annotations/{_pointer(k)}", "value": v} for k, v in annotations.items()]


def _affinity_patch(pod: dict, best_nodes: list[str]) -> list[dict]:
    """Preferred node affinity for the best nodes, added after any preference the pod already has."""
    patch: list[dict] = []
    terms = [{"weight": weight, "preference": {"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}}
        for weight, node in zip(AFFINITY_WEIGHTS, best_nodes, strict=False)]
    spec = pod.get("spec") or {}
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    if terms and not spec.get("affinity"):
        patch.append({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": {PREFERRED: terms}}})
    elif terms and not node_affinity:
        patch.append({"op": "add", "path": "/spec/affinity/nodeAffinity", "value": {PREFERRED: terms}})
    elif terms and not node_affinity.get(PREFERRED):
        patch.append({"op": "add", "path": f"/spec/affinity/nodeAffinity/{PREFERRED}", "value": terms})
    elif terms:
        patch += [{"op": "add", "path": f"/spec/affinity/nodeAffinity/{PREFERRED}/-", "value": t} for t in terms]
    return patch
