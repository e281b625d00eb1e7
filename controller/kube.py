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
from typing import Any

from controller.scheduler import Decision

MODEL_ANNOTATION = "sllm.io/model"
PLACEMENT_ANNOTATION = "sllm.io/placement"
BOOKING_ANNOTATION = "sllm.io/booking"
MAX_PRIORITY = 10  # extenderv1.MaxExtenderPriority
AFFINITY_WEIGHTS = (100, 50, 25)  # preferred-affinity weight of the best, second and third node


class BadRequest(ValueError):
    """A malformed payload; the message names the field at fault."""


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object")
    return value


def _get(data: dict, name: str) -> Any:
    """Go's encoding/json matches field names case-insensitively; so do we."""
    for key, value in data.items():
        if key.lower() == name.lower():
            return value
    return None


def model_of(pod: dict) -> str | None:
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BadRequest("pod.metadata.annotations must be an object")
    if annotations.get(MODEL_ANNOTATION):
        return str(annotations[MODEL_ANNOTATION])
    containers = (pod.get("spec") or {}).get("containers") or []
    if not isinstance(containers, list):
        raise BadRequest("pod.spec.containers must be a list")
    for container in containers:
        for env in (container or {}).get("env") or []:
            if isinstance(env, dict) and env.get("name") == "SLLM_MODEL" and env.get("value"):
                return str(env["value"])
    return None


def booked_node(pod: dict) -> str | None:
    """The node our webhook booked a slot on for this pod (from its placement annotation), if any."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if not annotations.get(BOOKING_ANNOTATION):
        return None
    try:
        node = json.loads(annotations.get(PLACEMENT_ANNOTATION) or "{}").get("node")
    except (json.JSONDecodeError, AttributeError):
        raise BadRequest(f"pod annotation {PLACEMENT_ANNOTATION} is not a JSON object") from None
    return node if isinstance(node, str) else None


def function_of(pod: dict) -> str:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return str(labels.get("faas_function") or labels.get("serving.knative.dev/service") or "")


def parse_extender_args(body: Any) -> tuple[dict, list[str], bool]:
    """(pod, candidate node names, whether the caller sent names only) from ExtenderArgs."""
    args = _object(body, "ExtenderArgs")
    pod = _object(_get(args, "pod"), "ExtenderArgs.pod")
    names = _get(args, "nodenames")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequest("ExtenderArgs.nodenames must be a list of strings")
        return pod, names, True
    nodes = _object(_get(args, "nodes"), "ExtenderArgs.nodes")
    items = nodes.get("items")
    if not isinstance(items, list):
        raise BadRequest("ExtenderArgs.nodes.items must be a list")
    try:
        return pod, [str(item["metadata"]["name"]) for item in items], False
    except (TypeError, KeyError):
        raise BadRequest("ExtenderArgs.nodes.items[].metadata.name is missing") from None


def filter_result(body: dict, names: list[str], names_only: bool, ranked: list[Decision] | None) -> dict:
    """ExtenderFilterResult: nodes we know to be full with nothing to migrate fail; the rest pass."""
    known = {d.node: d for d in ranked or []}
    failed = {n: "sllm: no free slot and no migratable instance" for n in names
              if n in known and not known[n].feasible}
    passed = [n for n in names if n not in failed]
    if names_only:
        return {"nodenames": passed, "failedNodes": failed, "error": ""}
    items = [item for item in _get(body, "nodes")["items"] if item["metadata"]["name"] in set(passed)]
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


def parse_admission_review(body: Any) -> tuple[str, dict, bool]:
    """(request uid, pod, dry run) from an AdmissionReview v1 for a pod."""
    review = _object(body, "AdmissionReview")
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        raise BadRequest("apiVersion/kind must be admission.k8s.io/v1 AdmissionReview")
    request = _object(review.get("request"), "AdmissionReview.request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadRequest("AdmissionReview.request.uid is missing")
    kind = request.get("kind") or {}
    if not isinstance(kind, dict) or kind.get("kind") != "Pod":
        raise BadRequest("AdmissionReview.request.kind.kind must be Pod")
    pod = _object(request.get("object"), "AdmissionReview.request.object")
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


def placement_patch(pod: dict, best_nodes: list[str], placement: dict) -> list[dict]:
    """JSONPatch: preferred node affinity for the best nodes, the decision as an annotation, and the
    booking id in the first container's env (the instance takes the booked slot over)."""
    patch: list[dict] = []
    metadata = pod.get("metadata") or {}
    annotations = {PLACEMENT_ANNOTATION: json.dumps(placement, sort_keys=True)}
    if placement.get("booking"):
        annotations[BOOKING_ANNOTATION] = placement["booking"]
    if "annotations" not in metadata or metadata["annotations"] is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
    else:
        patch += [{"op": "add", "path": f"/metadata/annotations/{_pointer(k)}", "value": v}
                  for k, v in annotations.items()]
    terms = [{"weight": weight, "preference": {"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}}
        for weight, node in zip(AFFINITY_WEIGHTS, best_nodes, strict=False)]
    spec = pod.get("spec") or {}
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    preferred = "preferredDuringSchedulingIgnoredDuringExecution"
    if terms and not spec.get("affinity"):
        patch.append({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": {preferred: terms}}})
    elif terms and not node_affinity:
        patch.append({"op": "add", "path": "/spec/affinity/nodeAffinity", "value": {preferred: terms}})
    elif terms and not node_affinity.get(preferred):
        patch.append({"op": "add", "path": f"/spec/affinity/nodeAffinity/{preferred}", "value": terms})
    elif terms:
        patch += [{"op": "add", "path": f"/spec/affinity/nodeAffinity/{preferred}/-", "value": t} for t in terms]
    if placement.get("booking") and spec.get("containers"):
        env = {"name": "SLLM_BOOKING_ID", "value": placement["booking"]}
        if spec["containers"][0].get("env"):
            patch.append({"op": "add", "path": "/spec/containers/0/env/-", "value": env})
        else:
            patch.append({"op": "add", "path": "/spec/containers/0/env", "value": [env]})
    return patch
