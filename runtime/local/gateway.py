"""The local gateway: OpenFaaS gateway routes, scaling functions from and to zero with real processes.

    /function/<name>[/<path>]          proxy to an instance (streams; holds the request during a cold start)
    /system/functions                  GET list, POST deploy, PUT update, DELETE remove
    /system/function/<name>            GET one function, with its instances and their cold-start breakdowns
    /system/scale-function/<name>      POST {"serviceName", "replicas"}
    /healthz

Scale from zero: the first request asks the controller for a placement (which books a slot and starts
the node's loader staging), starts a runtime process "on" that node, holds the request until the
instance is ready (--cold-start-timeout) and proxies it. More instances start while every ready one has
`com.openfaas.scale.target` requests in flight (up to max); all stop after `zero-duration` idle when
`com.openfaas.scale.zero` is true. Deployments live in Redis (`sllm:function:<name>`), instances in
this process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
import requests
from flask import Flask, Response, jsonify, request

from redis_schema.keys import Keys, validate_id
from runtime.local.instances import Instance, InstanceLauncher
from runtime.local.stack import ScaleSettings, StackError

log = logging.getLogger("sllm.gateway")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host"}


@dataclass(frozen=True)
class GatewayConfig:
    redis_url: str
    controller_url: str
    workdir: str
    model_store: str
    key_prefix: str = "sllm:"
    controller_token: str = ""
    cold_start_timeout_s: float = 300.0
    idle_check_s: float = 1.0
    max_body_bytes: int = 4 << 20

    def to_env(self) -> str:
        return json.dumps(asdict(self))


class GatewayError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Function:
    name: str
    model: str
    build: str
    image: str = ""
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    instances: list[Instance] = field(default_factory=list)
    starting: int = 0
    invocations: int = 0
    last_request: float = field(default_factory=time.monotonic)
    last_error: str | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    @functools.cached_property
    def scale(self) -> ScaleSettings:
        """Parsed once: a deployment's labels never change (an update replaces the Function)."""
        return ScaleSettings.from_labels(self.labels, f"function {self.name} labels")

    def record(self) -> dict[str, str]:
        return {"model": self.model, "build": self.build, "image": self.image, "env": json.dumps(self.env),
                "labels": json.dumps(self.labels), "annotations": json.dumps(self.annotations),
                "created_at": f"{self.created_at:.3f}"}

    def status(self) -> dict:
        ready = [i for i in self.instances if i.ready.is_set()]
        return {"name": self.name, "image": self.image, "namespace": "openfaas-fn", "envProcess": "sllm-faas serve",
                "envVars": self.env, "labels": self.labels, "annotations": self.annotations,
                "replicas": len(self.instances), "availableReplicas": len(ready),
                "invocationCount": self.invocations,
                "createdAt": datetime.fromtimestamp(self.created_at, UTC).isoformat().replace("+00:00", "Z")}


def function_from_deployment(body: dict) -> Function:
    """An OpenFaaS FunctionDeployment ({service, image, envVars, labels, annotations}); the build folder
    comes in the `sllm.io/build` annotation (`sllm-faas deploy` makes it)."""
    name = body.get("service")
    validate_id(name, "service (function name)")
    env = body.get("envVars") or {}
    labels = body.get("labels") or {}
    annotations = body.get("annotations") or {}
    for field_name, value in (("envVars", env), ("labels", labels), ("annotations", annotations)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{field_name} must map names to strings")
    model = annotations.get("sllm.io/model") or env.get("SLLM_MODEL")
    if not model:
        raise ValueError("name the model in envVars.SLLM_MODEL or annotations['sllm.io/model']")
    build = annotations.get("sllm.io/build", "")
    if not build or not (Path(build) / "index.py").is_file():
        raise ValueError(f"annotations['sllm.io/build'] must be a function build folder with index.py "
                         f"(`sllm-faas deploy` makes one); got {build!r}")
    ScaleSettings.from_labels(labels, "labels")
    return Function(name, model, build, str(body.get("image") or ""), dict(env), dict(labels), dict(annotations))


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.redis = redis.Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=5)
        logs = Path(config.workdir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.launcher = InstanceLauncher(logs, {
            "SLLM_REDIS_URL": config.redis_url, "SLLM_KEY_PREFIX": config.key_prefix,
            "SLLM_MODEL_STORE": config.model_store})
        self.functions: dict[str, Function] = {}
        self._lock = threading.Lock()
        self._ids = random.Random(os.urandom(8))
        self._stopping = threading.Event()
        self._load_deployments()
        threading.Thread(target=self._scale_down_idle, name="sllm-idle", daemon=True).start()

    # -- deployments -------------------------------------------------------------------------
    def _load_deployments(self) -> None:
        for name in sorted(self.redis.smembers(self.keys.functions)):
            record = self.redis.hgetall(self.keys.function(name))
            if record:
                self.functions[name] = Function(name, record["model"], record["build"], record.get("image", ""),
                                                json.loads(record["env"]), json.loads(record["labels"]),
                                                json.loads(record["annotations"]), float(record["created_at"]))

    def deploy(self, function: Function, update: bool) -> None:
        with self._lock:
            old = self.functions.get(function.name)
            if update and old is None:
                raise GatewayError(404, f"function {function.name} is not deployed")
            if not update and old is not None:
                raise GatewayError(409, f"function {function.name} exists; update it with PUT")
            self.functions[function.name] = function
        if old is not None:
            self._stop_all(old)
        pipe = self.redis.pipeline()
        pipe.hset(self.keys.function(function.name), mapping=function.record())
        pipe.sadd(self.keys.functions, function.name)
        pipe.execute()

    def remove(self, name: str) -> None:
        with self._lock:
            function = self.functions.pop(name, None)
        if function is None:
            raise GatewayError(404, f"function {name} is not deployed")
        self._stop_all(function)
        self.redis.delete(self.keys.function(name))
        self.redis.srem(self.keys.functions, name)

    def get(self, name: str) -> Function:
        function = self.functions.get(name)
        if function is None:
            raise GatewayError(404, f"function {name} is not deployed")
        return function

    # -- scaling ---------------------------------------------------------------------------------
    def acquire(self, name: str) -> tuple[Instance, bool]:
        """A ready instance with the fewest requests in flight (True if this request waited for a start)."""
        function = self.get(name)
        deadline = time.monotonic() + self.config.cold_start_timeout_s
        waited = False
        with function.changed:
            function.invocations += 1
            function.last_request = time.monotonic()
            while True:
                function.instances = [i for i in function.instances if i.process.poll() is None]
                ready = [i for i in function.instances if i.ready.is_set()]
                scale = function.scale
                if ready:
                    best = min(ready, key=lambda i: i.in_flight)
                    if best.in_flight >= scale.target and not function.starting and len(function.instances) < scale.max:
                        self._start_instance(function)  # scale up; this request does not wait for it
                    best.in_flight += 1
                    return best, waited
                if not function.starting:
                    if function.last_error and waited:
                        raise GatewayError(502, f"function {name}: {function.last_error}")
                    self._start_instance(function)
                waited = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(504, f"function {name}: no instance ready after "
                                            f"{self.config.cold_start_timeout_s:.0f} s")
                function.changed.wait(remaining)

    def release(self, name: str, instance: Instance) -> None:
        function = self.functions.get(name)
        if function is None:
            return
        with function.changed:
            instance.in_flight -= 1
            instance.last_used = function.last_request = time.monotonic()

    def _start_instance(self, function: Function) -> None:
        """Called with function.changed held: counts the start, runs it in the background."""
        function.starting += 1
        function.last_error = None
        threading.Thread(target=self._run_start, args=(function,), name=f"sllm-start-{function.name}",
                         daemon=True).start()

    def _run_start(self, function: Function) -> None:
        instance = placement = None
        try:
            placement = self._place(function)
            instance_id = f"{function.name}-{self._ids.getrandbits(32):08x}"
            env = {**function.env, "SLLM_BOOKING_ID": placement.get("booking") or ""}
            if placement.get("loader"):
                env["SLLM_LOADER_SOCKET"] = placement["loader"]
            instance = self.launcher.start(instance_id, function.name, placement["node"], Path(function.build),
                                           function.model, env)
            instance.placement = {k: placement.get(k) for k in ("tier", "estimate_s", "action", "booking", "staging")}
            log.info("starting %s on %s for %s (estimate %.2fs from %s)", instance_id, placement["node"],
                     function.name, placement.get("estimate_s") or -1, placement.get("tier"))
            with function.changed:
                if self.functions.get(function.name) is not function or self._stopping.is_set():
                    raise GatewayError(410, f"function {function.name} was removed or updated while starting")
                function.instances.append(instance)
            self.launcher.wait_ready(instance, self.config.cold_start_timeout_s)
        except Exception as exc:  # any failure must reach the waiting requests, or they would start another
            message = exc.message if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
            log.warning("could not start an instance of %s: %s", function.name, message)
            if instance is not None:
                self.launcher.stop(instance, grace_s=2)
            if placement is not None and placement.get("booking"):
                self._cancel_booking(placement["node"], placement["booking"])
            with function.changed:
                function.last_error = message
                if instance in function.instances:
                    function.instances.remove(instance)
        finally:
            with function.changed:
                function.starting -= 1
                function.changed.notify_all()

    def _controller_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.controller_token}"} if self.config.controller_token else {}

    def _cancel_booking(self, node: str, booking: str) -> None:
        """A start that failed gives its slot back now rather than at the booking's expiry."""
        try:
            requests.delete(f"{self.config.controller_url}/v1/bookings/{node}/{booking}",
                            headers=self._controller_headers(), timeout=10)
        except requests.RequestException as exc:
            log.warning("could not cancel booking %s on %s: %s", booking, node, exc)

    def _place(self, function: Function) -> dict:
        response = requests.post(self.config.controller_url + "/v1/scale", json={"function": function.name,
                                                                               "model": function.model},
                                 headers=self._controller_headers(), timeout=30)
        if response.status_code != 200:
            raise GatewayError(503, f"controller: {response.json().get('error', response.status_code)}")
        return response.json()["placements"][0]

    def scale_to(self, name: str, replicas: int) -> None:
        function = self.get(name)
        with function.changed:
            live = [i for i in function.instances if i.process.poll() is None and i.ready.is_set()]
            missing = replicas - len(live) - function.starting  # `starting` covers those not ready yet
            for _ in range(max(0, missing)):
                self._start_instance(function)
            extra = sorted(live, key=lambda i: (i.in_flight, -i.last_used))[:max(0, len(live) - replicas)]
            for instance in extra:
                function.instances.remove(instance)
        for instance in extra:
            self.launcher.stop(instance)

    def _stop_all(self, function: Function) -> None:
        with function.changed:
            instances, function.instances = function.instances, []
        for instance in instances:
            self.launcher.stop(instance)

    def _scale_down_idle(self) -> None:
        while not self._stopping.wait(self.config.idle_check_s):
            for function in list(self.functions.values()):
                try:
                    self._scale_down_if_idle(function)
                except Exception:  # one bad function (labels edited in Redis, say) must not stop the others
                    log.exception("scaling %s down failed", function.name)

    def _scale_down_if_idle(self, function: Function) -> None:
        scale = function.scale
        with function.changed:
            idle = time.monotonic() - function.last_request
            busy = any(i.in_flight for i in function.instances) or function.starting
            if not scale.zero or busy or idle < scale.zero_duration_s or len(function.instances) <= scale.min:
                return
            stopping = function.instances[scale.min:]
            function.instances = function.instances[:scale.min]
        for instance in stopping:
            log.info("scaling %s down: stopping %s after %.0f s idle", function.name, instance.id, idle)
            self.launcher.stop(instance)

    def shutdown(self) -> None:
        self._stopping.set()
        for function in list(self.functions.values()):
            self._stop_all(function)


def create_app(config: GatewayConfig | None = None) -> Flask:
    config = config or GatewayConfig(**json.loads(os.environ["SLLM_GATEWAY_CONFIG"]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = Gateway(config)
    import atexit

    atexit.register(gateway.shutdown)
    app = Flask("sllm-faas-gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["sllm_gateway"] = gateway

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError):
        return jsonify({"error": exc.message}), exc.status

    @app.errorhandler(ValueError)
    @app.errorhandler(StackError)
    def bad_request(exc: Exception):
        return jsonify({"error": str(exc)}), 400

    def json_body() -> dict:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        return body

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/system/functions")
    def list_functions():
        return jsonify([f.status() for f in sorted(gateway.functions.values(), key=lambda f: f.name)])

    @app.post("/system/functions")
    def deploy():
        gateway.deploy(function_from_deployment(json_body()), update=False)
        return "", 202

    @app.put("/system/functions")
    def update():
        gateway.deploy(function_from_deployment(json_body()), update=True)
        return "", 202

    @app.delete("/system/functions")
    def delete():
        name = json_body().get("functionName")
        validate_id(name, "functionName")
        gateway.remove(name)
        return "", 202

    @app.get("/system/function/<name>")
    def function_status(name: str):
        function = gateway.get(name)
        return {**function.status(), "instances": [i.as_dict() for i in function.instances],
                "lastError": function.last_error}

    @app.post("/system/scale-function/<name>")
    def scale_function(name: str):
        body = json_body()
        replicas = body.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 64:
            raise GatewayError(400, "replicas must be an integer from 0 to 64")
        if body.get("serviceName", name) != name:
            raise GatewayError(400, f"serviceName {body.get('serviceName')!r} does not match the path ({name})")
        gateway.scale_to(name, replicas)
        return "", 202

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @app.route("/function/<name>", defaults={"path": ""}, methods=methods)
    @app.route("/function/<name>/<path:path>", methods=methods)
    def invoke(name: str, path: str):
        body = request.get_data()  # before acquiring: an oversized body (413) must not hold an instance
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        instance, waited = gateway.acquire(name)
        try:
            upstream = requests.request(request.method, f"{instance.url}/{path}", params=request.args, data=body,
                                        headers=headers, stream=True, timeout=(10, 600))
        except requests.RequestException as exc:
            gateway.release(name, instance)
            raise GatewayError(502, f"function {name}: instance {instance.id} did not answer: {exc}") from None
        reply = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        reply.update({"X-Sllm-Instance": instance.id, "X-Sllm-Node": instance.node})
        if waited and instance.cold_start:  # this request paid the cold start: say where the time went
            reply["X-Sllm-Cold-Start"] = json.dumps(instance.cold_start)
            reply["X-Sllm-Placement"] = json.dumps(instance.placement)
        response = Response(upstream.iter_content(chunk_size=None), status=upstream.status_code, headers=reply)

        @response.call_on_close
        def done() -> None:  # runs for every response, streamed or not, HEAD and 204 included
            upstream.close()
            gateway.release(name, instance)

        return response

    return app
