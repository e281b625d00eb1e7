"""The local gateway: OpenFaaS gateway routes, scaling functions from and to zero with real processes.

    /function/<name>[/<path>]          proxy to an instance (streams; holds the request during a cold start)
    /system/functions                  GET list, POST deploy, PUT update, DELETE remove
    /system/function/<name>            GET one function, with its instances and their cold-start breakdowns
    /system/logs?name=<name>           GET its instances' logs as NDJSON (tail, follow), as OpenFaaS's log provider
    /system/scale-function/<name>      POST {"serviceName", "replicas"}
    /healthz

Every /system/ route wants `Authorization: Bearer <admin token>` (`sllm-faas up` generates it); the
build folder of a deployment must lie under the gateway's build root, and environment variables that
steer the interpreter or our own internals (LD_*, PYTHON*, SLLM_BOOKING_ID, ...) are refused. An
instance's own `/_/` routes (readiness, migration) are never proxied. While Redis or the controller is
unreachable the gateway answers 503 with Retry-After.

Scale from zero: the first request asks the controller for a placement (which books a slot and starts
the node's loader staging), starts a runtime process "on" that node, holds the request until the
instance is ready (--cold-start-timeout) and proxies it. More instances start while every ready one has
`com.openfaas.scale.target` requests in flight (up to max); all stop after `zero-duration` idle when
`com.openfaas.scale.zero` is true. Deployments live in Redis (`sllm:function:<name>`), instances in
this process.

With --pool-size, a start takes a pre-warmed runtime from the node's pool (runtime/local/pool.py), else it
spawns one. A streaming request held by a start is answered at once and sees the start's progress as SSE
comments (`: sllm cold-start phase=...`, which SSE clients ignore) before its first token; a non-streaming
one beyond --max-held requests held per function gets 429 with Retry-After from the placement's estimate.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
import requests
from flask import Flask, Response, jsonify, request

from sllm_faas.common.errors import ApiError, client_input, install, openai_body, plain_body, request_id
from sllm_faas.common.jsonbody import request_object
from sllm_faas.common.metrics import Metrics, operator_routes
from sllm_faas.common.processes import children_by_parent
from sllm_faas.common.redis_client import connect
from sllm_faas.redis_schema.keys import Keys, validate_id
from sllm_faas.redis_schema.records import FunctionRecord
from sllm_faas.runtime.local import logs
from sllm_faas.runtime.local.instances import Instance, InstanceLauncher, probe_ready
from sllm_faas.runtime.local.stack import ScaleSettings
from sllm_faas.runtime.node_loader.client import LoaderClient

log = logging.getLogger("sllm.gateway")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host"}
# Variables a deployment may not set: they steer the dynamic loader or the interpreter, or they are ours to
# set per instance (a caller's SLLM_BOOKING_ID would take another function's slot).
DENIED_ENV = re.compile(r"LD_.*|PYTHON.*|GCONV_PATH|GUNICORN_CMD_ARGS|SLLM_(MIGRATION_TOKEN|BOOKING_ID|INSTANCE_ID|"
                        r"NODE_ID|FUNCTION_NAME|ADVERTISE_URL|REDIS_URL|KEY_PREFIX|MODEL_STORE|LOADER_SOCKET|"
                        r"LOADER_TOKEN|CONTROLLER_TOKEN|SPAWN_PID|GATEWAY_TOKEN|POOL_ASSIGNED_AT)", re.IGNORECASE)
RETRY_AFTER_S = "2"
READY_CHECK_S = 0.25
PROGRESS_S = 0.25      # how often a held stream checks the start's phase
PLACE_RETRY_S = 1.0    # how often a start that found every slot taken asks the controller again (its view: ~1 s)


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """What `sllm-faas up` hands its gateway (JSON in SLLM_GATEWAY_CONFIG): values of up's own settings
    (runtime/local/up.py UpSettings, whose defaults are the only ones), the URLs of the parts it started and the
    credentials it generated. Not a user setting: the gateway has no flags or variables of its own."""

    redis_url: str
    controller_url: str
    workdir: str
    model_store: str
    key_prefix: str
    controller_token: str
    admin_token: str                   # Bearer token for /system/ routes; empty refuses them all
    build_root: str                    # deployments' build folders must be under it; empty refuses them all
    migration_token: str               # SLLM_MIGRATION_TOKEN given to every instance
    cold_start_timeout_s: float
    pool_size: int                     # pre-warmed runtimes per node (0: every start spawns)
    pool_nodes: tuple[str, ...]        # the nodes to keep pools for
    max_held: int                      # non-streaming requests held per function during a start (0: no cap)
    idle_check_s: float = 1.0          # how often idle functions are checked for scale to zero
    max_body_bytes: int = 4 << 20      # request body limit of the Flask app (413 above)

    def to_env(self) -> str:
        return json.dumps(asdict(self))


class GatewayError(ApiError):
    """The gateway's answer on purpose (sllm_faas/common/errors.py); a 429 or 503 says when to retry."""

    def __init__(self, status: int, message: str, retry_after: str = RETRY_AFTER_S) -> None:
        super().__init__(status, message, headers={"Retry-After": retry_after} if status in (429, 503) else None)


@dataclass
class Function(FunctionRecord):
    """A deployed function: its record in Redis and its live state here."""

    name: str = field(kw_only=True)
    instances: list[Instance] = field(default_factory=list)
    starting: int = 0
    invocations: int = 0
    last_request: float = field(default_factory=time.monotonic)
    last_error: GatewayError | None = None  # why the last start failed; waiting requests get it
    changed: threading.Condition = field(default_factory=threading.Condition)
    held: int = 0                      # requests waiting for a start now
    phase: str = ""                    # the latest start's step: placing, staging, loading
    placement: dict = field(default_factory=dict)   # the latest start's placement, while it runs
    ready_by: float | None = None      # monotonic time the controller expects the latest start to be ready
    start_kind: str = ""               # pool or spawn, for the latest start

    @functools.cached_property
    def scale(self) -> ScaleSettings:
        """Parsed once: a deployment's labels never change (an update replaces the Function)."""
        return ScaleSettings.from_labels(self.labels, f"function {self.name} labels")

    def status(self) -> dict:
        ready = [i for i in self.instances if i.ready.is_set()]
        return {"name": self.name, "image": self.image, "namespace": "openfaas-fn", "envProcess": "sllm-faas serve",
                "envVars": self.env, "labels": self.labels, "annotations": self.annotations,
                "replicas": len(self.instances), "availableReplicas": len(ready),
                "invocationCount": self.invocations,
                "createdAt": datetime.fromtimestamp(self.created_at, UTC).isoformat().replace("+00:00", "Z")}


def function_from_deployment(body: dict, build_root: str) -> Function:
    """An OpenFaaS FunctionDeployment ({service, image, envVars, labels, annotations}); the build folder
    comes in the `sllm.io/build` annotation (`sllm-faas deploy` makes it) and must lie under `build_root`,
    symlinks resolved: the gateway runs that folder's index.py."""
    name = body.get("service")
    with client_input("service"):
        validate_id(name, "service (function name)")
    env = body.get("envVars") or {}
    labels = body.get("labels") or {}
    annotations = body.get("annotations") or {}
    for field_name, value in (("envVars", env), ("labels", labels), ("annotations", annotations)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ApiError(400, f"{field_name} must map names to strings", field_name)
    for variable in env:
        if DENIED_ENV.fullmatch(variable):
            raise ApiError(400, f"envVars.{variable} is not allowed: it steers the interpreter, the dynamic loader "
                                "or sllm-faas internals", f"envVars.{variable}")
    model = annotations.get("sllm.io/model") or env.get("SLLM_MODEL")
    if not model:
        raise ApiError(400, "name the model in envVars.SLLM_MODEL or annotations['sllm.io/model']", "envVars")
    build = annotations.get("sllm.io/build", "")
    if not build or not (Path(build) / "index.py").is_file():
        raise ApiError(400, f"annotations['sllm.io/build'] must be a function build folder with index.py "
                            f"(`sllm-faas deploy` makes one); got {build!r}", "annotations")
    root = Path(build_root).resolve() if build_root else None
    if root is None or not Path(build).resolve().is_relative_to(root):
        raise ApiError(400, f"annotations['sllm.io/build'] {build!r} is not under the gateway's build root "
                            f"{build_root or '(none configured)'} (`sllm-faas up --build-root`)", "annotations")
    with client_input("labels"):
        ScaleSettings.from_labels(labels, "labels")
    return Function(model, build, str(body.get("image") or ""), dict(env), dict(labels), dict(annotations), name=name)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.redis = connect(config.redis_url, timeout_s=5)
        logs = Path(config.workdir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        base_env = {"SLLM_REDIS_URL": config.redis_url, "SLLM_KEY_PREFIX": config.key_prefix,
                    "SLLM_MODEL_STORE": config.model_store}
        if config.migration_token:
            base_env["SLLM_MIGRATION_TOKEN"] = config.migration_token
        self.launcher = InstanceLauncher(logs, base_env, self.redis, self.keys)
        if config.pool_size:
            self.launcher.start_pools(list(config.pool_nodes), config.pool_size)
        self.functions: dict[str, Function] = {}
        self.metrics = Metrics()
        self.cold_start = self.metrics.cold_start()  # phases `placement` and `request_to_ready`
        self._lock = threading.Lock()          # guards self.functions
        self._deploying = threading.Lock()     # one deploy or remove at a time, Redis write included
        self._ids = random.Random(os.urandom(8))
        self._stopping = threading.Event()
        self._load_deployments()
        threading.Thread(target=self._scale_down_idle, name="sllm-idle", daemon=True).start()
        threading.Thread(target=self._watch_readiness, name="sllm-readiness", daemon=True).start()

    # -- deployments -------------------------------------------------------------------------
    def _load_deployments(self) -> None:
        for name in sorted(self.redis.smembers(self.keys.functions)):
            key = self.keys.function(name)
            record = self.redis.hgetall(key)
            if record:
                self.functions[name] = Function(**vars(FunctionRecord.from_hash(key, record)), name=name)

    def deploy(self, function: Function, update: bool) -> None:
        """Record the deployment in Redis first: if that fails (503) nothing has changed, no instance stopped."""
        with self._deploying:
            old = self.functions.get(function.name)
            if update and old is None:
                raise GatewayError(404, f"function {function.name} is not deployed")
            if not update and old is not None:
                raise GatewayError(409, f"function {function.name} exists; update it with PUT")
            pipe = self.redis.pipeline()
            pipe.hset(self.keys.function(function.name), mapping=function.to_hash())
            pipe.sadd(self.keys.functions, function.name)
            pipe.execute()
            with self._lock:
                self.functions[function.name] = function
        if old is not None:
            self._stop_all(old)

    def remove(self, name: str) -> None:
        with self._deploying:
            if name not in self.functions:
                raise GatewayError(404, f"function {name} is not deployed")
            pipe = self.redis.pipeline()
            pipe.delete(self.keys.function(name))
            pipe.srem(self.keys.functions, name)
            pipe.execute()
            with self._lock:
                function = self.functions.pop(name)
        self._stop_all(function)

    def get(self, name: str) -> Function:
        function = self.functions.get(name)
        if function is None:
            raise GatewayError(404, f"function {name} is not deployed")
        return function

    # -- scaling ---------------------------------------------------------------------------------
    def acquire(self, name: str, capped: bool = False) -> tuple[Instance, bool]:
        """A ready instance with the fewest requests in flight (True if this request waited for a start);
        `capped`: 429 rather than wait where --max-held requests already wait (refuse_beyond_held)."""
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
                    function.held -= waited
                    return best, waited
                # an instance whose worker is restarting comes back by itself: wait for it, start nothing
                recovering = any(i.cold_start is not None for i in function.instances)
                if not function.starting and not recovering:
                    if function.last_error and waited:
                        function.held -= 1
                        raise GatewayError(function.last_error.status,
                                           f"function {name}: {function.last_error.message}")
                    self._start_instance(function)
                if not waited:   # counted once, while it waits
                    if capped:
                        self.refuse_beyond_held(function)
                    function.held += 1
                waited = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    function.held -= 1
                    raise GatewayError(504, f"function {name}: no instance ready after "
                                            f"{self.config.cold_start_timeout_s:.0f} s")
                function.changed.wait(min(remaining, 1.0))  # re-check: a recovering instance may have died

    def refuse_beyond_held(self, function: Function) -> None:
        """With function.changed held: 429 for a request that would wait while --max-held others already wait
        for the function's start, with Retry-After from the controller's estimate of that start."""
        if not self.config.max_held or function.held < self.config.max_held:
            return
        left = function.ready_by - time.monotonic() if function.ready_by is not None else None
        retry = str(max(1, math.ceil(left))) if left is not None else RETRY_AFTER_S
        raise GatewayError(429, f"function {function.name} is starting and {function.held} requests already wait "
                                f"for it (--max-held {self.config.max_held}); retry in {retry} s", retry_after=retry)

    def has_ready(self, name: str) -> bool:
        return any(i.ready.is_set() for i in self.get(name).instances)

    def progress(self, function: Function) -> str:
        """The running start's step for a held stream: placing, staging N% (the node loader's job), loading,
        warming (the runtime's warm-up forward, as its /_/ready says)."""
        phase, placement = function.phase, function.placement
        if phase != "staging":
            return phase
        model, _, tier = (placement.get("staging") or "").partition("@")
        try:
            job = LoaderClient(placement["loader"], timeout=1.0).stage(model, tier)
        except (OSError, KeyError, RuntimeError, ValueError):
            return phase
        if job.get("state") in ("queued", "running"):
            return f"staging {math.floor(100 * float(job.get('progress') or 0))}%"
        function.phase = "loading start=" + function.start_kind
        return function.phase

    def release(self, name: str, instance: Instance) -> None:
        function = self.functions.get(name)
        if function is None:
            return
        with function.changed:
            instance.in_flight -= 1
            instance.last_used = function.last_request = time.monotonic()

    def recheck(self, name: str, instance: Instance) -> bool:
        """After a failed exchange with `instance`: True (and out of rotation) if it cannot serve now, so the
        request can go elsewhere or wait; False if it looks fine (the failure was the request's own)."""
        function = self.functions.get(name)
        if instance.process.poll() is None and probe_ready(instance, timeout_s=1.0)[0] == 200:
            return False
        if function is not None:
            self.mark(function, instance, ready=False)
        return True

    def _start_instance(self, function: Function) -> None:
        """Called with function.changed held: counts the start, runs it in the background."""
        function.starting += 1
        function.last_error = None
        threading.Thread(target=self._run_start, args=(function,), name=f"sllm-start-{function.name}",
                         daemon=True).start()

    def _run_start(self, function: Function) -> None:
        instance = placement = None
        function.phase, function.placement, function.ready_by, function.start_kind = "placing", {}, None, ""
        try:
            asked = time.monotonic()
            instance_id = f"{function.name}-{self._ids.getrandbits(32):08x}"
            placement = self._place(function, instance_id)
            self.cold_start.labels("placement", function.model, placement.get("tier") or "unknown").observe(
                time.monotonic() - asked)
            env = {**function.env, "SLLM_BOOKING_ID": placement.get("booking") or ""}
            if placement.get("loader"):
                env["SLLM_LOADER_SOCKET"] = placement["loader"]
            function.placement = placement
            function.ready_by = time.monotonic() + float(placement.get("estimate_s") or 0)
            instance = self.launcher.start(instance_id, function.name, placement["node"], Path(function.build),
                                           function.model, env)
            function.start_kind = instance.start
            function.phase = "staging" if placement.get("staging") and placement.get("loader") else \
                "loading start=" + instance.start
            instance.placement = {k: placement.get(k) for k in ("tier", "estimate_s", "action", "booking", "staging")}
            log.info("starting %s on %s for %s (estimate %.2fs from %s)", instance_id, placement["node"],
                     function.name, placement.get("estimate_s") or -1, placement.get("tier"))
            with function.changed:
                if self.functions.get(function.name) is not function or self._stopping.is_set():
                    raise GatewayError(410, f"function {function.name} was removed or updated while starting")
                function.instances.append(instance)
            started = instance

            def runtime_phase(phase: str) -> None:   # the runtime's own steps: only warming is news here
                if phase == "warming":
                    function.phase = "warming start=" + started.start

            self.launcher.wait_ready(instance, self.config.cold_start_timeout_s, on_phase=runtime_phase)
        except Exception as exc:  # any failure must reach the waiting requests, or they would start another
            # a start that failed (a loader restarting, an instance that died loading) is worth retrying: 503
            error = exc if isinstance(exc, GatewayError) else GatewayError(503, f"{type(exc).__name__}: {exc}")
            log.warning("could not start an instance of %s: %s", function.name, error.message)
            if instance is not None:
                self.launcher.stop(instance, grace_s=2)
            if placement is not None and placement.get("booking"):
                self._cancel_booking(placement["node"], placement["booking"])
            with function.changed:
                function.last_error = error
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

    def _place(self, function: Function, start: str) -> dict:
        """Ask the controller for a node for one start (`start` tells it apart from the function's other starts
        while they wait for GPUs). Every slot taken (409): ask again every PLACE_RETRY_S until the cold-start
        timeout, as Knative's activator holds requests until there is capacity, rather than failing the requests
        that wait; meanwhile the controller counts the start among those waiting for GPUs (`sllm:waiting`)."""
        deadline = time.monotonic() + self.config.cold_start_timeout_s
        while True:
            try:
                response = requests.post(self.config.controller_url + "/v1/scale",
                                         json={"function": function.name, "model": function.model, "caller": start},
                                         headers=self._controller_headers(), timeout=30)
                body = response.json()
            except (requests.RequestException, ValueError) as exc:  # restarting: `up` brings it back
                raise GatewayError(503, f"the placement controller is unreachable: {exc}") from None
            if response.status_code == 200:
                return body["placements"][0]
            error = body.get("error", response.status_code) if isinstance(body, dict) else response.status_code
            if (response.status_code != 409 or time.monotonic() + PLACE_RETRY_S > deadline
                    or self.functions.get(function.name) is not function or self._stopping.wait(PLACE_RETRY_S)):
                raise GatewayError(503, f"controller: {error}")

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

    def _watch_readiness(self) -> None:
        """Take an instance out of rotation while it cannot serve (its worker died and gunicorn is starting
        another, which loads the model again) and back in once /_/ready says 200."""
        workers: dict[str, set[int]] = {}
        while not self._stopping.wait(READY_CHECK_S):
            try:
                parents = children_by_parent()
                for function in list(self.functions.values()):
                    for instance in list(function.instances):
                        if instance.cold_start is None or instance.process.poll() is not None:
                            continue   # still starting (wait_ready owns it) or gone
                        now = parents.get(instance.process.pid, set())
                        restarted = instance.id in workers and workers[instance.id] != now
                        workers[instance.id] = now
                        status, _ = probe_ready(instance, timeout_s=1.0)
                        if status == 200 and not restarted:
                            self.mark(function, instance, ready=True)
                        elif restarted or status != 0:  # a timeout alone may just be a busy instance
                            self.mark(function, instance, ready=False)
            except Exception:  # the watcher must outlive any one bad probe
                log.exception("readiness check failed")

    def mark(self, function: Function, instance: Instance, ready: bool) -> None:
        """Put an instance into or out of rotation; waiting requests are woken when it comes back."""
        if ready == instance.ready.is_set():
            return
        log.info("instance %s of %s is %s", instance.id, function.name, "ready again" if ready else "not ready")
        with function.changed:
            if ready:
                instance.ready.set()
                function.changed.notify_all()
            else:
                instance.ready.clear()

    def shutdown(self) -> None:
        self._stopping.set()
        for function in list(self.functions.values()):
            self._stop_all(function)
        if self.launcher.pools is not None:
            self.launcher.pools.stop()


def forwarded_path(name: str, path: str) -> str:
    """The path under /function/<name>/ to send to the instance, dot segments removed; an instance's own
    /_/ routes (readiness, migration) are for the platform, never for callers."""
    segments = [segment for segment in path.split("/") if segment not in ("", ".")]
    if ".." in segments:
        raise GatewayError(400, f"path {path!r} under /function/{name}/ must not contain '..'")
    if segments and segments[0] == "_":
        raise GatewayError(404, f"/function/{name}/{path}: an instance's /_/ routes are not exposed")
    return "/".join(segments) + ("/" if segments and path.endswith("/") else "")


def wants_stream(body: bytes) -> bool:
    """Whether the request body asks for an SSE stream (OpenAI's `"stream": true`)."""
    try:
        parsed = json.loads(body) if body[:1] == b"{" else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


def stream_error_frame(message: str, code: str = "upstream_disconnected") -> bytes:
    """The SSE frame that ends a stream the instance cut (or a held stream whose start failed): the client
    sees an error, not a silent end."""
    return f"data: {json.dumps(openai_body(ApiError(502, message, code=code)))}\n\n".encode()


def create_app(config: GatewayConfig | None = None) -> Flask:
    # popped: it holds the tokens, and instances (user code) inherit this process's environment
    config = config or GatewayConfig(**json.loads(os.environ.pop("SLLM_GATEWAY_CONFIG")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = Gateway(config)
    import atexit

    atexit.register(gateway.shutdown)
    app = Flask("sllm-faas-gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["sllm_gateway"] = gateway

    def redis_down(exc: redis.RedisError) -> ApiError:  # `up` restarts an embedded Redis; nothing was changed
        log.warning("Redis is unreachable: %s", exc)
        return GatewayError(503, f"Redis is unreachable ({type(exc).__name__}); retry shortly")

    install(app, plain_body, log, {redis.RedisError: redis_down})  # an instance's own answers pass through as sent

    @app.before_request
    def admin_only() -> None:
        """/system/ routes deploy code and change scale: they want the admin token."""
        if not request.path.startswith("/system/"):
            return
        supplied = request.headers.get("Authorization", "").encode()
        if config.admin_token and hmac.compare_digest(supplied, f"Bearer {config.admin_token}".encode()):
            return
        raise ApiError(401, "/system/ routes want Authorization: Bearer <admin token> (`sllm-faas up` wrote it; "
                            "`sllm-faas deploy` reads it, or pass --token / $SLLM_GATEWAY_TOKEN)",
                       headers={"WWW-Authenticate": 'Bearer realm="sllm-faas"'})

    app.register_blueprint(operator_routes(gateway.metrics))

    @app.get("/system/functions")
    def list_functions():
        return jsonify([f.status() for f in sorted(gateway.functions.values(), key=lambda f: f.name)])

    @app.post("/system/functions")
    def deploy():
        gateway.deploy(function_from_deployment(request_object(), config.build_root), update=False)
        return "", 202

    @app.put("/system/functions")
    def update():
        gateway.deploy(function_from_deployment(request_object(), config.build_root), update=True)
        return "", 202

    @app.delete("/system/functions")
    def delete():
        name = request_object().get("functionName")
        with client_input("functionName"):
            validate_id(name, "functionName")
        gateway.remove(name)
        return "", 202

    @app.get("/system/function/<name>")
    def function_status(name: str):
        function = gateway.get(name)
        return {**function.status(), "instances": [i.as_dict() for i in function.instances],
                "heldRequests": function.held,
                "lastError": function.last_error.message if function.last_error else None}

    @app.get("/system/logs")
    def function_logs():
        """OpenFaaS's log provider API: ?name=NAME[&tail=N][&follow=true][&instance=ID], newline-delimited JSON
        messages from the function's instance logs (runtime/local/logs.py)."""
        name = request.args.get("name", "")
        gateway.get(name)
        with client_input():   # tail, follow
            messages = logs.request_stream(gateway.launcher.log_dir, name, request.args)
        if messages is None:
            raise GatewayError(429, f"{logs.MAX_FOLLOWERS} log streams are followed already; retry later")
        return Response(messages, mimetype="application/x-ndjson",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/system/pools")
    def pools():
        """Each node's pool of pre-warmed runtimes: size, kind (fork or exec), idle members, replacements."""
        return jsonify(gateway.launcher.pools.status() if gateway.launcher.pools else [])

    @app.post("/system/scale-function/<name>")
    def scale_function(name: str):
        body = request_object()
        replicas = body.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 64:
            raise GatewayError(400, f"replicas must be an integer from 0 to 64; got {replicas!r}")
        if body.get("serviceName", name) != name:
            raise GatewayError(400, f"serviceName {body.get('serviceName')!r} does not match the path ({name})")
        gateway.scale_to(name, replicas)
        return "", 202

    def forward(name: str, path: str, body: bytes, headers: dict[str, str], capped: bool = False
                ) -> tuple[requests.Response, Instance, bool]:
        """Send the request to a ready instance; one that turns out not to be ready (its worker died, or it
        refused with 503 while reloading) is taken out of rotation and the request waits for another."""
        arrived = time.monotonic()
        deadline = arrived + config.cold_start_timeout_s
        waited_any = False
        while True:
            instance, waited = gateway.acquire(name, capped)
            if waited and not waited_any:  # this request arrived with no instance ready: it waited for one
                tier = instance.placement.get("tier") or "unknown"
                gateway.cold_start.labels("request_to_ready", gateway.get(name).model, tier).observe(
                    time.monotonic() - arrived)
            waited_any = waited_any or waited
            try:
                upstream = requests.request(request.method, f"{instance.url}/{path}", params=request.args, data=body,
                                            headers=headers, stream=True, timeout=(10, 600))
            except requests.RequestException as exc:
                gateway.release(name, instance)
                if not gateway.recheck(name, instance) or time.monotonic() > deadline:
                    raise GatewayError(502, f"function {name}: instance {instance.id} did not answer: {exc}") from None
                continue
            if upstream.status_code == 503 and time.monotonic() < deadline and gateway.recheck(name, instance):
                upstream.close()   # refused unprocessed while the instance reloads: safe to send again
                gateway.release(name, instance)
                continue
            return upstream, instance, waited_any

    def relay(name: str, upstream: requests.Response, instance: Instance):
        try:
            yield from upstream.iter_content(chunk_size=None)
        except requests.RequestException as exc:
            log.warning("function %s: instance %s cut the response: %s", name, instance.id, exc)
            gateway.recheck(name, instance)
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                yield stream_error_frame(f"function {name}: instance {instance.id} stopped mid-response: {exc}")

    def held_stream(name: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """A streaming request that must wait for a start: answered at once, with the start's progress as SSE
        comments until the instance's own stream (or an SSE error frame) follows."""
        function = gateway.get(name)
        result: Future = Future()
        environ = dict(request.environ)   # forward() reads the method and query from a request context

        def run() -> None:
            with app.request_context(environ):
                try:
                    result.set_result(forward(name, path, body, headers))
                except BaseException as exc:  # noqa: BLE001 - handed to the stream
                    result.set_exception(exc)

        threading.Thread(target=run, name=f"sllm-held-{name}", daemon=True).start()

        def let_go(done: Future) -> None:
            if done.exception() is None:
                upstream, instance, _ = done.result()
                upstream.close()
                gateway.release(name, instance)

        def frames():
            said = ""
            try:
                while True:
                    try:
                        upstream, instance, waited = result.result(timeout=PROGRESS_S)
                        break
                    except TimeoutError:
                        phase = gateway.progress(function)
                        if phase and phase != said:
                            said = phase
                            yield f": sllm cold-start phase={phase}\n\n".encode()
            except GatewayError as exc:
                yield stream_error_frame(exc.message, code=f"gateway_{exc.status}")
                return
            except GeneratorExit:   # the client left while held: what the start brings back is let go
                result.add_done_callback(let_go)
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down, say: the stream ends with the reason
                yield stream_error_frame(f"function {name}: {type(exc).__name__}: {exc}", code="gateway_error")
                return
            try:
                if waited and instance.cold_start:
                    yield (f": sllm cold-start phase=ready start={instance.start} node={instance.node} "
                           f"cold_start={json.dumps(instance.cold_start, separators=(',', ':'))}\n\n").encode()
                if upstream.status_code >= 400 or not upstream.headers.get("Content-Type", "").startswith(
                        "text/event-stream"):
                    yield stream_error_frame(f"function {name}: {upstream.status_code} {upstream.text[:2000]}",
                                             code=f"upstream_{upstream.status_code}")
                else:
                    yield from relay(name, upstream, instance)
            finally:
                upstream.close()
                gateway.release(name, instance)

        return Response(frames(), status=200, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @app.route("/function/<name>", defaults={"path": ""}, methods=methods)
    @app.route("/function/<name>/<path:path>", methods=methods)
    def invoke(name: str, path: str):
        path = forwarded_path(name, path)
        body = request.get_data()  # before acquiring: an oversized body (413) must not hold an instance
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Request-Id"] = request_id()   # the instance logs and answers under the same id
        streaming = wants_stream(body)
        if streaming and not gateway.has_ready(name):
            return held_stream(name, path, body, headers)
        upstream, instance, waited = forward(name, path, body, headers, capped=not streaming)
        reply = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        reply.update({"X-Sllm-Instance": instance.id, "X-Sllm-Node": instance.node})
        if waited and instance.cold_start:  # this request paid the cold start: say where the time went
            reply["X-Sllm-Cold-Start"] = json.dumps(instance.cold_start)
            reply["X-Sllm-Placement"] = json.dumps(instance.placement)
        response = Response(relay(name, upstream, instance), status=upstream.status_code, headers=reply)

        @response.call_on_close
        def done() -> None:  # runs for every response, streamed or not, HEAD and 204 included
            upstream.close()
            gateway.release(name, instance)

        return response

    return app
