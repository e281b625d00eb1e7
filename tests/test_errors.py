"""One error type per API family (sllm_faas/common/errors.py): answers on purpose in the family's shape, anything
else a logged 500 with a request id, never a client error."""

from __future__ import annotations

import logging

import pytest
import requests
from controller_process import ControllerProcess, publish_model, publish_node
from flask import Flask

from sllm_faas.common.errors import ApiError, client_input, install, openai_body, plain_body
from sllm_faas.common.jsonbody import request_object


class Refused(Exception):
    """A domain refusal the app translates (like the controller's NoCapacity)."""


def app_with(family) -> Flask:
    app = Flask("sllm-faas-test")
    install(app, family, logging.getLogger("sllm.test"), {Refused: lambda exc: ApiError(409, str(exc))})

    @app.post("/echo")
    def echo():
        return request_object()

    @app.get("/refused")
    def refused():
        raise Refused("every node is full")

    @app.get("/busy")
    def busy():
        raise ApiError(503, "loading", code="not_ready", headers={"Retry-After": "2"})

    @app.get("/field")
    def field():
        with client_input("replicas"):
            int("many")

    @app.get("/bug")
    def bug():
        int("a bug of ours, not the client's")   # a ValueError outside client_input

    return app


def test_control_plane_shape_for_answers_on_purpose():
    client = app_with(plain_body).test_client()
    assert client.get("/refused").get_json() == {"error": "every node is full"}
    answer = client.get("/field")
    assert answer.status_code == 400 and answer.get_json()["field"] == "replicas"
    busy = client.get("/busy")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "2" and busy.get_json() == {"error": "loading"}
    for raw, status in (("{nope", 400), ('{"a": NaN}', 400), ("[1]", 400)):
        answer = client.post("/echo", data=raw, content_type="application/json")
        assert answer.status_code == status and answer.get_json()["error"].startswith("the request body")
    assert client.get("/no/such/route").get_json()["error"]
    wrong_method = client.get("/echo")
    assert wrong_method.status_code == 405 and wrong_method.get_json()["error"]
    assert "POST" in wrong_method.headers["Allow"]


def test_openai_shape_for_answers_on_purpose():
    client = app_with(openai_body).test_client()
    error = client.get("/field").get_json()["error"]
    assert error == {"message": "invalid literal for int() with base 10: 'many'", "type": "invalid_request_error",
                     "param": "replicas", "code": None}
    busy = client.get("/busy").get_json()["error"]
    assert busy["type"] == "server_error" and busy["code"] == "not_ready"
    assert set(client.post("/echo", data="{", content_type="application/json").get_json()["error"]) == \
        {"message", "type", "param", "code"}


@pytest.mark.parametrize("family", [plain_body, openai_body])
def test_a_bug_is_a_logged_500_with_the_request_id_not_a_400(family, caplog):
    client = app_with(family).test_client()
    with caplog.at_level(logging.ERROR, "sllm.test"):
        answer = client.get("/bug", headers={"X-Request-Id": "trace-42"})
    assert answer.status_code == 500
    assert answer.get_json()["request_id"] == "trace-42" and answer.headers["X-Request-Id"] == "trace-42"
    assert "ValueError" in str(answer.get_json()["error"])
    [record] = [r for r in caplog.records if "trace-42" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is ValueError   # the traceback is in the log, under the id


@pytest.mark.parametrize("sent", ["", "two words", "x;Injected=1\t", "a" * 129])
def test_a_request_id_unfit_for_logs_is_replaced(sent):
    answer = app_with(plain_body).test_client().get("/bug", headers={"X-Request-Id": sent} if sent else {})
    request_id = answer.get_json()["request_id"]
    assert request_id != sent and len(request_id) == 32 and answer.headers["X-Request-Id"] == request_id


def test_controller_500_carries_the_callers_request_id_in_body_and_log(redis_ns, tmp_path):
    publish_node(redis_ns.client, redis_ns.prefix, "node-a")
    publish_model(redis_ns.client, redis_ns.prefix, "m1", 1 << 30)
    redis_ns.client.hset(redis_ns.prefix + "model:corrupt", mapping={"size_bytes": "garbage"})  # our data, bad
    controller = ControllerProcess(tmp_path, redis_ns.url, redis_ns.prefix).start()
    try:
        answer = requests.post(controller.url + "/v1/placements", json={"model": "corrupt"}, timeout=30,
                               headers={**controller.headers(), "X-Request-Id": "op-7f3a"})
        assert answer.status_code == 500 and answer.json()["request_id"] == "op-7f3a", answer.text
        assert answer.headers["X-Request-Id"] == "op-7f3a"
        assert "request op-7f3a" in controller.log_path.read_text()
        placed = controller.post("/v1/placements", {"model": "m1"})
        assert placed.status_code == 200 and len(placed.headers["X-Request-Id"]) == 32   # every answer has one
    finally:
        controller.stop()
