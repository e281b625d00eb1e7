"""The placement controller against real Redis and real controller processes (gunicorn)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from controller_process import GB, ControllerProcess, publish_model, publish_node
from json_patch import apply_patch
from schema_doc import assert_keys_documented

from sllm_faas.redis_schema import Keys
from sllm_faas.redis_schema.upgrade import SchemaError, ensure_schema
from sllm_faas.runtime.embedded_redis import EmbeddedRedis, free_tcp_port

TOKEN = "s3cret-token"


@pytest.fixture
def cluster(redis_ns):
    """Three nodes, one slot each: node-a holds m1 in DRAM, node-b on SSD, node-c has nothing."""
    publish_model(redis_ns.client, redis_ns.prefix, "m1", 4 * GB)
    publish_node(redis_ns.client, redis_ns.prefix, "node-a", dram=["m1"])
    publish_node(redis_ns.client, redis_ns.prefix, "node-b", ssd=["m1"])
    publish_node(redis_ns.client, redis_ns.prefix, "node-c")
    return redis_ns


@pytest.fixture
def controller(cluster, tmp_path):
    process = ControllerProcess(tmp_path, cluster.url, cluster.prefix, token=TOKEN).start()
    yield process
    process.stop()


def pod(model: str | None = "m1", **metadata) -> dict:
    annotations = {"sllm.io/model": model} if model else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "m1-7d9f", "namespace": "openfaas-fn", "labels": {"faas_function": "m1"},
                         "annotations": annotations, **metadata},
            "spec": {"containers": [{"name": "m1", "image": "ghcr.io/x/m1:latest"}]}}


def node_item(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}


def review(obj: dict, dry_run: bool = False) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "kind": {"group": "", "version": "v1",
                                                                               "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
                        "namespace": "openfaas-fn", "object": obj, "dryRun": dry_run}}


def test_placement_books_the_fastest_node_queues_and_records(controller, cluster):
    first = controller.post("/v1/placements", {"model": "m1", "function": "fn"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["node"], body["tier"], body["action"]) == ("node-a", "dram", "load")
    assert body["estimate_s"] == pytest.approx(0.4)       # 4 GB / 10 GB/s
    assert [d["node"] for d in body["ranked"]] == ["node-a", "node-b", "node-c"]
    ledger = cluster.client.zrange(cluster.prefix + "node:node-a:slots", 0, -1)
    assert ledger == [body["booking"]]
    events = [fields for _, fields in cluster.client.xrange(cluster.prefix + "events")]
    assert events[-1]["kind"] == "placed" and events[-1]["booking"] == body["booking"] and events[-1]["owner"] == "fn"

    second = controller.post("/v1/placements", {"model": "m1"}).json()   # node-a's only slot is taken
    assert (second["node"], second["tier"], second["staging"]) == ("node-b", "ssd", "m1@dram")
    queue = cluster.client.zrange(cluster.prefix + "node:node-b:queue", 0, -1, withscores=True)
    assert queue[0][0] == "m1@dram" and queue[0][1] == pytest.approx(time.time() + 2.0, abs=1.5)
    third = controller.post("/v1/placements", {"model": "m1"}).json()
    assert third["node"] == "node-c" and third["tier"] == "remote"
    full = controller.post("/v1/placements", {"model": "m1"})
    assert full.status_code == 409 and "no node has a free slot" in full.json()["error"]
    assert_keys_documented(cluster.client, cluster.prefix)


def test_queue_wait_counts_and_estimates_have_no_side_effects(cluster, controller):
    publish_node(cluster.client, cluster.prefix, "node-a", dram=["m1"], queue={"m9@dram": time.time() + 30})
    estimate = controller.get("/v1/placements/m1").json()
    assert [d["node"] for d in estimate["ranked"]][0] == "node-b"   # node-a's queue drains in ~30 s
    assert not cluster.client.exists(cluster.prefix + "node:node-b:slots")


def test_unknown_model_and_bad_fields(controller):
    unknown = controller.post("/v1/placements", {"model": "never-seen"})
    assert unknown.status_code == 404 and unknown.json()["field"] == "model"
    hinted = controller.post("/v1/placements", {"model": "never-seen", "size_bytes": GB})
    assert hinted.status_code == 200 and hinted.json()["tier"] == "remote"
    for body, field in (({"model": "../etc"}, None), ({"model": 5}, "model"), ({}, "model"),
                        ({"model": "m1", "size_bytes": -1}, "size_bytes"), ({"model": "m1", "size_bytes": True},
                                                                             "size_bytes"),
                        ({"model": "m1", "function": "Bad_Name"}, "function"), ({"model": "m1", "function": 7},
                                                                                "function"),
                        ({"model": "m1", "caller": "../x"}, "caller")):
        response = controller.post("/v1/placements", body)
        assert response.status_code == 400, body
        assert field is None or response.json()["field"] == field
    assert controller.post("/v1/scale", {"function": "Bad_Name"}).status_code == 400
    assert controller.post("/v1/scale", {"model": "m1", "replicas": 0}).json()["field"] == "replicas"
    too_big = requests.post(controller.url + "/v1/placements", data=b"x" * (5 << 20), headers=controller.headers(),
                            timeout=30)
    assert too_big.status_code == 413


def test_auth_failure_is_401_with_no_side_effect(controller, cluster):
    before = cluster.client.xlen(cluster.prefix + "events")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
        response = requests.post(controller.url + "/v1/placements", json={"model": "m1"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert requests.post(f"{controller.url}/k8s/wrong/mutate", json=review(pod()), timeout=10).status_code == 401
    assert cluster.client.xlen(cluster.prefix + "events") == before
    assert not any(cluster.client.exists(f"{cluster.prefix}node:{n}:slots") for n in ("node-a", "node-b", "node-c"))
    assert requests.get(controller.url + "/healthz", timeout=10).status_code == 200


def test_extender_filter_and_prioritize_with_kube_scheduler_payloads(controller, cluster):
    publish_node(cluster.client, cluster.prefix, "node-d", slots=0)  # full, nothing to migrate
    names = ["node-c", "node-a", "node-b", "node-d", "not-ours"]
    args = {"pod": pod(), "nodes": {"apiVersion": "v1", "kind": "NodeList", "items": [node_item(n) for n in names]},
            "nodenames": None}
    del args["nodenames"]
    filtered = requests.post(f"{controller.url}/k8s/{TOKEN}/filter", json=args, timeout=10).json()
    assert [i["metadata"]["name"] for i in filtered["nodes"]["items"]] == ["node-c", "node-a", "node-b", "not-ours"]
    assert list(filtered["failedNodes"]) == ["node-d"] and filtered["error"] == ""
    by_name = controller.post("/filter", {"Pod": pod(), "NodeNames": names}).json()  # nodeCacheCapable callers
    assert by_name["nodenames"] == ["node-c", "node-a", "node-b", "not-ours"]
    scores = requests.post(f"{controller.url}/k8s/{TOKEN}/prioritize", json={"pod": pod(), "nodenames": names},
                           timeout=10).json()
    assert scores == [{"host": "node-c", "score": 0}, {"host": "node-a", "score": 10},
                      {"host": "node-b", "score": 6}, {"host": "node-d", "score": 0}, {"host": "not-ours", "score": 0}]
    not_ours = controller.post("/prioritize", {"pod": pod(model=None), "nodenames": ["node-a"]}).json()
    assert not_ours == [{"host": "node-a", "score": 0}]
    for bad in ({"nodenames": names}, {"pod": pod(), "nodenames": "node-a"}, {"pod": pod(), "nodes": {"items": [{}]}},
                [1, 2], {"pod": pod(), "nodes": {}}):
        assert controller.post("/filter", bad).status_code == 400, bad
        assert controller.post("/prioritize", bad).status_code == 400, bad
    assert not cluster.client.exists(cluster.prefix + "node:node-a:slots")  # the extender never books


def test_admission_webhook_patches_affinity_annotation_and_booking(controller, cluster):
    answer = requests.post(f"{controller.url}/k8s/{TOKEN}/mutate", json=review(pod()), timeout=10).json()
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1" and response["allowed"] is True
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and response["patchType"] == "JSONPatch"
    patched = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    placement = json.loads(patched["metadata"]["annotations"]["sllm.io/placement"])
    assert placement["node"] == "node-a" and placement["estimate_s"] == pytest.approx(0.4)
    terms = patched["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [(t["weight"], t["preference"]["matchExpressions"][0]["values"]) for t in terms] == [
        (100, ["node-a"]), (50, ["node-b"]), (25, ["node-c"])]
    booking = patched["metadata"]["annotations"]["sllm.io/booking"]
    env = {e["name"]: e for e in patched["spec"]["containers"][0]["env"]}
    assert env["SLLM_BOOKING_ID"] == {"name": "SLLM_BOOKING_ID", "value": booking}
    assert cluster.client.zrange(cluster.prefix + "node:node-a:slots", 0, -1) == [booking]

    existing = pod()
    existing["spec"]["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}}
    existing["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    answer = controller.post("/mutate", review(existing, dry_run=True)).json()["response"]
    patched = apply_patch(existing, json.loads(base64.b64decode(answer["patch"])))
    terms = patched["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["weight"] == 1 and terms[1]["preference"]["matchExpressions"][0]["values"] == ["node-b"]
    assert cluster.client.zcard(cluster.prefix + "node:node-b:slots") == 0  # dry run: nothing booked

    untouched = controller.post("/mutate", review(pod(model=None))).json()["response"]
    assert untouched == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}
    unknown = controller.post("/mutate", review(pod(model="nobody-has-it"))).json()["response"]
    assert unknown["allowed"] is True and "size unknown" in unknown["warnings"][0]
    for bad in ({"kind": "AdmissionReview"}, {**review(pod()), "request": {"uid": "x", "kind": {"kind": "Service"},
                                                                           "object": {}}},
                {**review(pod()), "request": {"kind": {"kind": "Pod"}, "object": pod()}}, "text"):
        assert controller.post("/mutate", bad).status_code == 400, bad


def test_alert_receiver_prefetches_without_booking(controller, cluster, tmp_path):
    cluster.client.hset(cluster.prefix + "function:chat", mapping={"model": "m1"})
    alert = {"receiver": "scale-up", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "APIHighInvocationRate", "function_name": "chat.openfaas-fn"}}]}
    # node-a already holds m1 in DRAM; make node-b the best so a staging is needed
    cluster.client.srem(cluster.prefix + "node:node-a:models:dram", "m1")
    publish_node(cluster.client, cluster.prefix, "node-b", ssd=["m1"], bw_ssd=20 * GB)
    answer = controller.post("/system/alert", alert).json()
    assert answer["prefetched"][0]["node"] == "node-b" and answer["prefetched"][0]["booking"] is None
    assert cluster.client.zrange(cluster.prefix + "node:node-b:queue", 0, -1) == ["m1@dram"]
    assert not cluster.client.exists(cluster.prefix + "node:node-b:slots")
    resolved = controller.post("/system/alert", {"status": "resolved", "alerts": [
        {"status": "resolved", "labels": {"function_name": "chat"}}]}).json()
    assert resolved == {"prefetched": []}
    assert controller.post("/system/alert", {"alerts": [{"labels": {}}]}).json()["field"] == \
        "alerts[0].labels.function_name"


def test_scale_places_replicas_on_distinct_slots(controller, cluster):
    cluster.client.hset(cluster.prefix + "function:chat", mapping={"model": "m1"})
    answer = controller.post("/v1/scale", {"function": "chat", "replicas": 3}).json()
    assert sorted(p["node"] for p in answer["placements"]) == ["node-a", "node-b", "node-c"]
    assert controller.post("/v1/scale", {"function": "chat"}).status_code == 409


def test_two_controllers_never_double_book(cluster, tmp_path):
    for i in range(8):
        publish_node(cluster.client, cluster.prefix, f"node-{i}", slots=1, ssd=["m1"] if i % 2 else [])
    controllers = [ControllerProcess(tmp_path, cluster.url, cluster.prefix, token=TOKEN).start() for _ in range(2)]
    try:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda i: controllers[i % 2].post("/v1/placements", {"model": "m1"}), range(40)))
    finally:
        for process in controllers:
            process.stop()
    placed = [r.json() for r in responses if r.status_code == 200]
    assert sorted(r.status_code for r in responses) == [200] * 11 + [409] * 29   # 3 + 8 slots in all
    assert len({p["booking"] for p in placed}) == 11
    for node in ["node-a", "node-b", "node-c"] + [f"node-{i}" for i in range(8)]:
        assert cluster.client.zcard(f"{cluster.prefix}node:{node}:slots") == 1, node


def test_slots_given_back_through_another_worker_are_placed_without_waiting_for_a_read(cluster):
    """A worker's view counts its own bookings until a read confirms them; where another worker gave them back,
    it refuses only after reading again (it answered 409 until its next background read)."""
    from sllm_faas.controller.booking import Booker, Booking
    from sllm_faas.controller.cluster import ClusterCache
    from sllm_faas.controller.placement import NoCapacity, Placer

    client, keys = cluster.client, Keys(cluster.prefix)
    first, second = (Placer(client, keys, ClusterCache(client, keys, max_age_s=3600), Booker(client, keys))
                     for _ in range(2))
    held = [first.place("m1") for _ in range(3)]  # the three nodes' one slot each
    assert sorted(p.decision.node for p in held) == ["node-a", "node-b", "node-c"]
    for placement in held:  # given back through the other worker, as DELETE /v1/bookings/... may be
        assert second.booker.cancel(Booking(placement.booking, placement.decision.node, 0.0)) == 1
        second.cache.forget_booking(placement.decision.node, placement.booking)
    assert first.place("m1").decision.node == "node-a"
    with pytest.raises(NoCapacity):  # the read confirmed that one: no read hides a real refusal
        for _ in range(3):
            first.place("m1")
    assert sum(client.zcard(keys.node_slots(n)) for n in ("node-a", "node-b", "node-c")) == 3
    before = time.monotonic()
    view = first.cache.refresh()
    assert first.cache.refresh(unless_since=before) is view  # refusals queued on that read take it, none rereads
    assert first.cache.refresh(unless_since=time.monotonic()) is not view


def test_expired_node_is_not_placed_and_is_pruned(cluster, tmp_path):
    process = ControllerProcess(tmp_path, cluster.url, cluster.prefix, snapshot_max_age_s="0.1").start()
    try:  # published once the controller is up, so a slow start cannot expire it before the first placement
        publish_node(cluster.client, cluster.prefix, "node-a", dram=["m1"], ttl=2)
        assert process.post("/v1/placements", {"model": "m1"}).json()["node"] == "node-a"
        cluster.client.delete(cluster.prefix + "node:node-a:slots")
        time.sleep(2.5)  # node-a's loader stopped heartbeating: its record expired
        placed = process.post("/v1/placements", {"model": "m1"}).json()
        assert placed["node"] == "node-b"
        assert not cluster.client.sismember(cluster.prefix + "nodes", "node-a")
    finally:
        process.stop()


def test_redis_restart_during_operation(tmp_path):
    port = free_tcp_port()
    server = EmbeddedRedis(port=port)
    server.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    publish_model(client, "sllm:", "m1", GB)
    publish_node(client, "sllm:", "node-a", dram=["m1"], slots=4)
    process = ControllerProcess(tmp_path, server.url, "sllm:", snapshot_max_age_s="0.1").start()
    try:
        assert process.post("/v1/placements", {"model": "m1"}).status_code == 200
        server.stop()
        time.sleep(2.5)  # the cached view is now too old to decide on
        down = process.post("/v1/placements", {"model": "m1"})
        assert down.status_code == 503 and "Redis unavailable" in down.json()["error"]
        server = EmbeddedRedis(port=port)
        server.start()
        publish_model(client, "sllm:", "m1", GB)
        publish_node(client, "sllm:", "node-a", dram=["m1"], slots=4)
        deadline = time.monotonic() + 10
        while (answer := process.post("/v1/placements", {"model": "m1"})).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.json()["node"] == "node-a" and client.get("sllm:schema_version") == "2"
    finally:
        process.stop()
        server.stop()


def test_extender_ranks_from_its_cached_view_while_redis_is_down(tmp_path):
    """Renewing a waiting pod's member is a write to Redis; with Redis gone the filter still answers from the
    cached view (the renewal is logged and skipped), instead of failing the pod's scheduling attempt."""
    server = EmbeddedRedis(port=free_tcp_port())
    server.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    publish_model(client, "sllm:", "m1", GB)
    publish_node(client, "sllm:", "node-a", dram=["m1"])
    process = ControllerProcess(tmp_path, server.url, "sllm:", token=TOKEN, snapshot_max_age_s="600").start()
    try:
        assert process.post("/v1/placements", {"model": "m1"}).status_code == 200     # node-a's one slot
        response = process.post("/mutate", review(pod())).json()["response"]
        patched = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
        assert client.zcard("sllm:waiting") == 1
        server.stop()
        answer = process.post("/filter", {"pod": patched, "nodenames": ["node-a"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["failedNodes"] == {"node-a": "sllm: no free slot and no migratable instance"}
    finally:
        process.stop()
        server.stop()


def test_schema_upgrade_from_version_1_and_refusal_of_newer(redis_ns):
    keys = Keys(redis_ns.prefix)
    client = redis_ns.client
    client.set(keys.schema_version, "1")
    client.sadd(keys.nodes, "gpu-node", "cpu-node")
    client.hset(keys.node("gpu-node"), mapping={"node_id": "gpu-node", "heartbeat_at": "1",
                                                "gpus": json.dumps([{"index": 0}, {"index": 1}])})
    client.hset(keys.node("cpu-node"), mapping={"node_id": "cpu-node", "heartbeat_at": "1", "gpus": "[]"})
    with ThreadPoolExecutor(4) as pool:  # concurrent controllers upgrade once
        assert set(pool.map(lambda _: ensure_schema(client, keys), range(4))) == {2}
    assert client.get(keys.schema_version) == "2"
    assert client.hget(keys.node("gpu-node"), "slots") == "2" and client.hget(keys.node("cpu-node"), "slots") == "1"
    client.set(keys.schema_version, "7")
    with pytest.raises(SchemaError, match="newer sllm-faas"):
        ensure_schema(client, keys)


def test_status_and_place_cli(cluster):
    env_args = ["--redis-url", cluster.url, "--key-prefix", cluster.prefix]
    place = subprocess.run([sys.executable, "-m", "sllm_faas", "place", "m1", *env_args], capture_output=True,
                           text=True, timeout=60)
    assert place.returncode == 0, place.stderr
    lines = place.stdout.splitlines()
    assert lines[0].split()[:3] == ["rank", "node", "estimate_s"] and lines[1].split()[:3] == ["1", "node-a", "0.400"]
    status = subprocess.run([sys.executable, "-m", "sllm_faas", "status", "--json", *env_args], capture_output=True,
                            text=True, timeout=60)
    data = json.loads(status.stdout)
    assert {n["node_id"] for n in data["nodes"]} == {"node-a", "node-b", "node-c"} and data["waiting"] == []
    # one member as the controller writes it, one that no controller wrote (no '/'): shown, not parsed
    cluster.client.zadd(cluster.prefix + "waiting", {"m1/chat/chat-5f3a9c01": time.time() + 60,
                                                     "forged": time.time() + 60})
    shown = subprocess.run([sys.executable, "-m", "sllm_faas", "status", *env_args], capture_output=True,
                           text=True, timeout=60)
    table = shown.stdout
    assert shown.returncode == 0, shown.stderr
    assert "NODES" in table and "node-a" in table and "INSTANCES" in table
    assert "WAITING FOR GPUS (2 callers" in table and "m1/chat/chat-5f3a9c01" in table and "forged" in table
    down = subprocess.run([sys.executable, "-m", "sllm_faas", "status", "--redis-url",
                           f"redis://127.0.0.1:{free_tcp_port()}/0"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "Redis unavailable" in down.stderr


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_decision_starts_staging_on_the_chosen_nodes_real_loader(redis_ns, tmp_path, transport):
    """Over TCP the loader requires its token: the controller's --loader-token must carry the kick."""
    from loader_daemon import LoaderDaemon
    from test_node_loader import make_model

    store = tmp_path / "remote"
    make_model(store, "small", 1)
    (tmp_path / "node").mkdir()
    tcp = {"tcp": f"127.0.0.1:{free_tcp_port()}", "token": "loader-secret"} if transport == "tcp" else {}
    loader = LoaderDaemon(tmp_path / "node", store, redis_ns.url, redis_ns.prefix, node="node-a", **tcp).start()
    process = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix, model_store=str(store),
                                **({"loader_token": "loader-secret"} if tcp else {}))
    try:
        process.start()
        deadline = time.monotonic() + 30
        while not redis_ns.client.exists(redis_ns.prefix + "node:node-a"):
            assert time.monotonic() < deadline, "the loader never published its node"
            time.sleep(0.05)
        placed = process.post("/v1/placements", {"model": "small"}).json()   # size read from the model store
        assert "node" in placed, placed
        assert placed["node"] == "node-a" and placed["tier"] == "remote" and placed["staging"] == "small@dram"
        deadline = time.monotonic() + 30
        while loader.client.where("small")["tier"] != "dram":
            assert time.monotonic() < deadline, "the loader was never told to stage"
            time.sleep(0.05)
        kinds = [f["kind"] for _, f in redis_ns.client.xrange(redis_ns.prefix + "events") if f["model"] == "small"]
        assert kinds[0] == "placed" and "staged" in kinds
    finally:
        process.stop()
        loader.stop()


def test_extender_counts_the_pods_own_webhook_booking_as_free(controller, cluster):
    for node in ("node-b", "node-c"):
        publish_node(cluster.client, cluster.prefix, node, slots=1, ssd=["m1"])
    response = controller.post("/mutate", review(pod())).json()["response"]
    patched = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    assert cluster.client.zcard(cluster.prefix + "node:node-a:slots") == 1    # node-a is now full...
    names = ["node-a", "node-b", "node-c"]
    filtered = controller.post("/filter", {"pod": patched, "nodenames": names}).json()
    assert filtered["nodenames"] == names                                        # ...but not for this pod
    def scores(obj: dict) -> dict[str, int]:
        return {s["host"]: s["score"] for s in controller.post("/prioritize", {"pod": obj, "nodenames": names}).json()}

    mine = scores(patched)
    assert mine["node-a"] == 10 and mine["node-b"] < 10
    other = scores(pod())
    assert other["node-a"] < 10                                                  # another pod sees the slot taken


def test_a_pod_admitted_unplaced_stays_counted_as_waiting_while_the_scheduler_retries_it(controller, cluster):
    """The webhook gives the pod its caller id (`sllm.io/caller`: the first admission request's uid, kept when the
    webhook is invoked again with a new uid). Each time the extender filters for it while no node can take it, its
    member of Keys.waiting lives another 30 s; once a node can, it leaves. A pod the webhook booked a slot for
    waits for nothing; a dry run writes no caller id, and a value that is not an id is none."""
    waiting, uid = cluster.prefix + "waiting", "705ab4f5-6393-11e8-b7cc-42010a800002"
    taken = [controller.post("/v1/placements", {"model": "m1"}).json() for _ in range(3)]  # every node's one slot
    dry = controller.post("/mutate", review(pod(), dry_run=True)).json()["response"]
    assert "sllm.io/caller" not in apply_patch(pod(), json.loads(base64.b64decode(dry["patch"])))["metadata"][
        "annotations"] and cluster.client.zcard(waiting) == 0
    response = controller.post("/mutate", review(pod())).json()["response"]
    assert "no node has a free slot" in response["warnings"][0]
    patched = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    assert patched["metadata"]["annotations"]["sllm.io/caller"] == uid
    member = f"m1/m1/{uid}"                                                      # model / faas_function / caller
    assert cluster.client.zscore(waiting, member) == pytest.approx(time.time() + 30, abs=5)
    # reinvoked: a new request uid. kubernetes/kubernetes
    # staging/src/k8s.io/apiserver/pkg/admission/plugin/webhook/request/admissionreview.go, CreateAdmissionObjects:
    # `uid := types.UID(uuid.NewUUID())` for every webhook call, reinvocations included
    again = review(patched)
    again["request"]["uid"] = "3b7e9d10-6393-11e8-b7cc-42010a800002"
    response = controller.post("/mutate", again).json()["response"]
    patched = apply_patch(patched, json.loads(base64.b64decode(response["patch"])))
    assert patched["metadata"]["annotations"]["sllm.io/caller"] == uid
    assert cluster.client.zrange(waiting, 0, -1) == [member]                     # one caller, not two

    cluster.client.zadd(waiting, {member: time.time() + 2})                      # about to expire
    names = ["node-a", "node-b", "node-c"]
    assert controller.post("/filter", {"pod": patched, "nodenames": names}).json()["nodenames"] == []
    assert cluster.client.zscore(waiting, member) == pytest.approx(time.time() + 30, abs=5)
    for other in (pod(), apply_patch(pod(), [{"op": "add", "path": "/metadata/annotations/sllm.io~1caller",
                                              "value": "../x"}])):
        assert controller.post("/filter", {"pod": other, "nodenames": names}).status_code == 200
    assert cluster.client.zcard(waiting) == 1                                    # no caller id: not counted

    last = taken[-1]                                                             # a slot given back:
    assert requests.delete(f"{controller.url}/v1/bookings/{last['node']}/{last['booking']}",
                           headers=controller.headers(), timeout=10).status_code == 200
    others = [n for n in names if n != last["node"]]
    assert controller.post("/filter", {"pod": patched, "nodenames": others}).json()["nodenames"] == []
    assert cluster.client.zscore(waiting, member) is not None                    # not where it may run
    assert controller.post("/filter", {"pod": patched, "nodenames": names}).json()["nodenames"] == [last["node"]]
    assert cluster.client.zcard(waiting) == 0                                    # a node can take it now

    second = review(pod(name="m1-8e0a"))
    second["request"]["uid"] = "9c1d2e3f-6393-11e8-b7cc-42010a800002"
    booked = controller.post("/mutate", second).json()["response"]                # the webhook books it
    placed = apply_patch(pod(name="m1-8e0a"), json.loads(base64.b64decode(booked["patch"])))
    assert placed["metadata"]["annotations"]["sllm.io/booking"]
    assert controller.post("/filter", {"pod": placed, "nodenames": names}).json()["nodenames"] == [last["node"]]
    assert cluster.client.zcard(waiting) == 0                                    # booked: it waits for nothing


def test_a_controller_killed_and_restarted_loses_nothing(cluster, tmp_path):
    first = ControllerProcess(tmp_path, cluster.url, cluster.prefix).start()
    booked = first.post("/v1/placements", {"model": "m1"}).json()
    import os
    import signal

    os.killpg(first.process.pid, signal.SIGKILL)     # no shutdown code runs
    first.process.wait()
    first.log.close()
    second = ControllerProcess(tmp_path, cluster.url, cluster.prefix).start()
    try:
        nodes = {n["node_id"]: n for n in second.get("/v1/cluster").json()["nodes"]}
        assert nodes[booked["node"]]["free_slots"] == 0              # the booking lives in Redis
        assert second.post("/v1/placements", {"model": "m1"}).json()["node"] != booked["node"]
    finally:
        second.stop()


def test_migration_api_validates_and_reports_unknown_ids(controller):
    for body, field in (({"request": "cmpl-1"}, "source"), ({"source": "http://127.0.0.1:9", "request": ""}, "request"),
                        ({"source": "a", "request": "b", "threshold": 0}, "threshold"),
                        ({"source": "a", "request": "b", "destination": 5}, "destination")):
        response = controller.post("/v1/migrations", body)
        assert response.status_code == 400 and response.json()["field"] == field, body
    assert controller.get("/v1/migrations/m-none").status_code == 404
    assert controller.get("/v1/migrations/..%2Fx").status_code in (400, 404)
    # who takes part is checked before the 202: a migration the caller could never follow is refused now
    for body, status in (({"source": "file:///etc/passwd", "request": "x"}, 400),
                         ({"source": "gopher://127.0.0.1:1/", "request": "x"}, 400),
                         ({"source": "inst-unknown", "request": "x"}, 404),
                         ({"source": "http://127.0.0.1:9", "request": "x"}, 409),
                         ({"source": "http://127.0.0.1:9", "request": "x", "destination": "inst-unknown"}, 404),
                         ({"source": "http://127.0.0.1:9", "request": "x", "destination": "http://127.0.0.1:9/"}, 400)):
        response = controller.post("/v1/migrations", body)
        assert response.status_code == status and response.json()["error"], (body, response.text)


def test_own_bookings_count_once_whether_or_not_a_read_has_seen_them(redis_ns):
    from sllm_faas.controller.booking import Booker
    from sllm_faas.controller.cluster import ClusterCache

    publish_node(redis_ns.client, redis_ns.prefix, "node-a", slots=3)
    keys = Keys(redis_ns.prefix)
    cache, booker = ClusterCache(redis_ns.client, keys, max_age_s=60), Booker(redis_ns.client, keys)

    def free() -> int:
        return cache.view().snapshot.node_by_id["node-a"].free_slots

    assert free() == 3
    assert booker.book("node-a", "b-1") is not None
    cache.note_booking("node-a", "b-1", None)
    assert free() == 2                     # before any read sees it
    cache.refresh()
    assert free() == 2                     # the read sees it: not counted twice
    from sllm_faas.controller.cluster import read_cluster

    started = time.monotonic()
    stale = read_cluster(redis_ns.client, keys)       # a read that began before the next booking
    second = booker.book("node-a", "b-2")
    cache.note_booking("node-a", "b-2", None)
    assert free() == 1
    with cache._lock:                                 # that read lands after the booking: it cannot hold b-2
        cache._read, cache._read_started = stale, started
        cache._rebuild()
    assert free() == 1                     # so b-2 still counts
    cache.refresh()
    assert free() == 1                     # a read begun after the booking holds it: counted once
    booker.cancel(second)                  # given back elsewhere (another worker or replica)
    cache.refresh()
    assert free() == 2                     # a later read without it frees the slot at once, not in 60 s


def test_booking_script_defaults_slots_like_the_reader_and_scale_is_all_or_nothing(controller, cluster):
    from sllm_faas.controller.booking import Booker

    key = cluster.prefix + "node:node-a"
    cluster.client.hdel(key, "slots")
    cluster.client.hset(key, "gpus", json.dumps([{"index": 0}, {"index": 1}]))   # 2 GPUs, no `slots` field
    booker = Booker(cluster.client, Keys(cluster.prefix))
    assert booker.book("node-a", "b-1") is not None and booker.book("node-a", "b-2") is not None
    assert booker.book("node-a", "b-3") is None
    cluster.client.delete(cluster.prefix + "node:node-a:slots")
    before = {n: cluster.client.zcard(f"{cluster.prefix}node:{n}:slots") for n in ("node-a", "node-b", "node-c")}
    too_many = controller.post("/v1/scale", {"model": "m1", "function": "fn-m1", "replicas": 5})  # 4 slots in all
    assert too_many.status_code == 409
    assert set(cluster.client.zrange(cluster.prefix + "waiting", 0, -1)) == {f"m1/fn-m1/{i}" for i in range(5)}
    assert {n: cluster.client.zcard(f"{cluster.prefix}node:{n}:slots") for n in before} == before
    placed = controller.post("/v1/placements", {"model": "m1"}).json()
    assert controller.delete(f"/v1/bookings/{placed['node']}/{placed['booking']}").json() == {"cancelled": True}
    assert controller.delete(f"/v1/bookings/{placed['node']}/{placed['booking']}").status_code == 404


def test_a_cancelled_booking_frees_its_slot_even_in_a_read_that_saw_it(redis_ns):
    from sllm_faas.controller.booking import Booker, Booking
    from sllm_faas.controller.cluster import ClusterCache

    publish_node(redis_ns.client, redis_ns.prefix, "node-a", slots=1)
    keys = Keys(redis_ns.prefix)
    cache, booker = ClusterCache(redis_ns.client, keys, max_age_s=60), Booker(redis_ns.client, keys)
    assert booker.book("node-a", "b-1") is not None
    cache.refresh()                                        # this read holds b-1
    assert cache.view().snapshot.node_by_id["node-a"].free_slots == 0
    booker.cancel(Booking("b-1", "node-a", 0.0))
    cache.forget_booking("node-a", "b-1")
    assert cache.view().snapshot.node_by_id["node-a"].free_slots == 1
    cache.refresh()                                        # a read after the cancellation: not freed twice
    assert cache.view().snapshot.node_by_id["node-a"].free_slots == 1


def test_callers_waiting_for_gpus_price_a_migration_as_the_simulator_does(redis_ns):
    """Keys.waiting is the controller's `pending`: with no one waiting the plan migrates; with three other callers
    waiting for GPUs, the move's GPU time costs more than the remote load elsewhere. A refused caller enters the
    set, with its expiry, and leaves it once placed."""
    from sllm_faas.controller.booking import Booker
    from sllm_faas.controller.cluster import ClusterCache
    from sllm_faas.controller.placement import WAITING_TTL_S, NoCapacity, Placer
    from sllm_faas.redis_schema.records import InstanceRecord

    client, keys = redis_ns.client, Keys(redis_ns.prefix)
    publish_model(client, redis_ns.prefix, "big", 10 * GB)
    publish_model(client, redis_ns.prefix, "small", 1 * GB)
    # node-p: big in DRAM (1 s at 10 GB/s), its one slot held by "busy" (small); node-q: free, small in DRAM,
    # big from the store at 5 GB/s (2 s)
    publish_node(client, redis_ns.prefix, "node-p", dram=["big", "small"])
    publish_node(client, redis_ns.prefix, "node-q", dram=["small"], bw_remote=5 * GB)
    busy = InstanceRecord("busy", "node-p", "small", "fn-small", "http://10.0.0.9:8080", "ready", active=1, tokens=100,
                          decode_tokens_per_s=20.0, prefill_tokens_per_s=1000.0, heartbeat_at=time.time())
    client.hset(keys.instance("busy"), mapping=busy.to_hash())
    client.sadd(keys.instances, "busy")
    client.zadd(keys.node_slots("node-p"), {"busy": time.time() + 60})
    cache = ClusterCache(client, keys, max_age_s=60)
    placer = Placer(client, keys, cache, Booker(client, keys))

    # move = re-prefill 100 / 1000 + 0.05 s + reload small on node-q 0.1 s = 0.25 s; its price with no one else
    # waiting: 0.25 x (2 + 0 - 1) s; ranked 0.25 + 1 s load + 0.25 = 1.5 s, ahead of node-q's 2 s
    first = placer.place("big", owner="fn-big").decision
    assert (first.node, first.migrate, first.migrate_to) == ("node-p", "busy", "node-q")
    assert first.estimate_s == pytest.approx(1.25) and first.price_s == pytest.approx(0.25)
    assert client.zcard(keys.waiting) == 0                   # placed: not waiting
    placer.note_waiting(["big/fn-pod/u-1"])                  # a pod admitted unplaced, asked about by the scheduler:
    cache.refresh()                                          # the others pay 0.25 x (2 + 1 - 1) for its move...
    assert placer.estimate("big")[0].price_s == pytest.approx(0.5)
    assert placer.estimate("big", demand="big/fn-pod/u-1")[0].price_s == pytest.approx(0.25)  # ...it does not
    client.zrem(keys.waiting, "big/fn-pod/u-1")

    placer.note_waiting(["m2/fn-a/0", "m2/fn-a/1", "m3//"])    # three other callers refused meanwhile
    cache.refresh()
    assert cache.view().waiting == {"m2/fn-a/0", "m2/fn-a/1", "m3//"} and cache.view().snapshot.pending == 3
    # the move now costs 0.25 x (2 + 3 - 1) = 1 s: 2.25 s against node-q's remote load, 2 s
    second = placer.place("big", owner="fn-big")
    assert (second.decision.node, second.decision.action.value, second.decision.tier) == ("node-q", "load", "remote")
    assert second.booking is not None

    cache.refresh()                                          # node-q booked: no slot, no destination to move to
    with pytest.raises(NoCapacity):
        placer.place("big", owner="fn-late", caller="start-2")
    expires = client.zscore(keys.waiting, "big/fn-late/start-2")
    assert expires == pytest.approx(time.time() + WAITING_TTL_S, abs=5)
    cache.refresh()
    assert cache.view().snapshot.pending == 4
    client.zrem(keys.node_slots("node-q"), second.booking)   # its slot is given back
    cache.refresh()
    placed = placer.place("big", owner="fn-late", caller="start-2")
    assert placed.decision.node == "node-q" and client.zscore(keys.waiting, "big/fn-late/start-2") is None
    client.zadd(keys.waiting, {"gone/fn/0": time.time() - 1})  # expired: neither read nor counted
    cache.refresh()
    assert cache.view().waiting == {"m2/fn-a/0", "m2/fn-a/1", "m3//"}
    flood = {f"m9/fn-{i}/0": time.time() + 60 for i in range(1500)}  # a burst of refusals: all counted, few read
    client.zadd(keys.waiting, flood)
    cache.refresh()
    assert cache.view().snapshot.pending == 1503 and len(cache.view().waiting) == 1024
