"""The placement controller's HTTP API (Flask under gunicorn; stateless, so replicas are safe).

    POST /v1/placements          decide for a model (books a slot, starts staging)
    GET  /v1/placements/<model>  the ranked estimate, no side effects
    POST /v1/scale               scale-request entry point: place `replicas` instances of a function/model
    POST /system/alert           AlertManager receiver (OpenFaaS scale-up alerts): prefetch, no booking
    POST /v1/migrations          operator-triggered live migration of one request; GET /v1/migrations/<id>
    POST /filter, /prioritize    kube-scheduler extender
    POST /mutate                 mutating admission webhook (AdmissionReview v1)
    GET  /v1/cluster             the cluster view `sllm-faas status` prints
    GET  /healthz, /metrics

Every endpoint but /healthz and /metrics needs `Authorization: Bearer <token>` when a token is set (a controller
with neither token nor client CA starts only with --insecure-no-auth). The
kube-scheduler cannot send headers, so the same routes also answer under `/k8s/<token>/...` (put the
token in the extender's urlPrefix and the webhook's URL path), or run with mTLS (--client-ca).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import requests
from flask import Flask, jsonify, request

from sllm_faas.common import jsonbody
from sllm_faas.common.errors import ApiError, client_input, install, plain_body
from sllm_faas.common.metrics import Metrics, operator_routes
from sllm_faas.common.names import InvalidName
from sllm_faas.common.redis_client import connect
from sllm_faas.controller import kube
from sllm_faas.controller.booking import Booker, Booking
from sllm_faas.controller.cluster import ClusterCache, read_migrations
from sllm_faas.controller.config import ControllerConfig
from sllm_faas.controller.keepalive import DEFAULT_KEEP_ALIVE_S, CostKeepAlive, KeepAliveTracker
from sllm_faas.controller.migration import Migrator, NoDestination
from sllm_faas.controller.placement import NoCapacity, Placer, UnknownModel
from sllm_faas.controller.scheduler import Action, Decision
from sllm_faas.redis_schema import keepalive as keepalive_records
from sllm_faas.redis_schema.keys import Keys, validate_id, waiting_member
from sllm_faas.redis_schema.upgrade import ensure_schema

log = logging.getLogger("sllm.controller")
DECISION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
OPEN_PATHS = {"/healthz", "/metrics"}


class Controller:
    """The controller's state per worker process: a Redis client and the cluster view cache."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.client = connect(config.redis_url, health_check_interval_s=10)
        self.cache = ClusterCache(self.client, self.keys, config.snapshot_max_age_s)
        self.placer = Placer(self.client, self.keys, self.cache, Booker(self.client, self.keys, config.booking_ttl_s),
                             config.model_store or None, loader_token=config.loader_token)
        self.metrics = Metrics()
        m = self.metrics
        self.decisions = m.counter("sllm_controller_decisions_total", "Placement decisions by source and outcome.",
                                   ("source", "outcome"))
        self.decision_seconds = m.histogram("sllm_controller_decision_seconds",
                                            "Time to decide (rank + book), by source.", DECISION_BUCKETS, ("source",))
        self.cold_start = m.cold_start()
        nodes = m.gauge("sllm_controller_nodes", "Live nodes in the cluster view (of the worker that answered).")
        view_age = m.gauge("sllm_controller_view_age_seconds", "Age of the cluster view decisions use (of the "
                           "worker that answered).")

        def view() -> None:
            latest = self.cache.latest
            nodes.set(len(latest.nodes) if latest else 0)
            view_age.set(time.time() - latest.read_at if latest else 0)

        m.on_scrape(view)
        kick_failures = m.counter("sllm_controller_stage_kick_failures_total",
                                  "Loaders that could not be told to stage a placed model.")
        self.placer.on_kick_failure = kick_failures.inc
        self.migrations = m.counter("sllm_controller_migrations_total",
                                    "Migrations this controller ran, by reason and outcome.", ("reason", "outcome"))
        self.migrator = Migrator(self.client, self.keys)
        self._migrations = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sllm-migrate")
        threading.Thread(target=self._recover_forever, name="sllm-migration-recovery", daemon=True).start()
        self.keepalive = KeepAliveTracker(keepalive_policy(config))
        threading.Thread(target=self._publish_keepalive_forever, name="sllm-keepalive", daemon=True).start()
        self._schema_checked_at = -math.inf

    def ensure_schema(self) -> None:
        """Before writing: the data is at our schema version (upgraded if older). Re-checked at most once a
        second, which also covers a Redis that restarted empty."""
        if time.monotonic() - self._schema_checked_at > 1.0:
            ensure_schema(self.client, self.keys)
            self._schema_checked_at = time.monotonic()

    def _recover_forever(self, every_s: float = 5.0) -> None:
        """Finish or abort migrations whose coordinator died (any controller replica may take them)."""
        while True:
            try:
                for record in self.migrator.recover():
                    self.migrations.labels("recovered", record.get("state", "")).inc()
            except (redis.RedisError, requests.RequestException) as exc:
                log.warning("migration recovery: %s", exc)
            except Exception:  # never let the recovery thread die
                log.exception("migration recovery failed")
            time.sleep(every_s)

    def _publish_keepalive_forever(self) -> None:
        """Each cluster read: learn the models' idle times, publish the keep-alive of each model that went idle
        (sllm:keepalive:<model>), which the node loaders apply. It follows the reads that decisions start (the
        cache reads on from the first decision), adding none of its own."""
        read_at = 0.0
        while True:
            try:
                view = self.cache.latest
                if view is not None and view.read_at > read_at:
                    read_at = view.read_at
                    keepalive_records.publish(self.client, self.keys, self.keepalive.update(
                        view.instances.values(), view.snapshot, view.read_at))
            except redis.RedisError as exc:
                log.warning("keep-alive publication: %s", exc)
            except Exception:  # never let the publication thread die
                log.exception("keep-alive publication failed")
            time.sleep(self.cache.max_age_s)

    def cancel_booking(self, node: str, booking: str) -> bool:
        self.cache.forget_booking(node, booking)
        return bool(self.placer.booker.cancel(Booking(booking, node, 0.0)))

    def migrate_in_background(self, run, reason: str) -> None:
        def job():
            try:
                records = run()
                for record in records if isinstance(records, list) else [records]:
                    self.migrations.labels(reason, record.get("state", "")).inc()
            except (NoDestination, LookupError, ValueError, redis.RedisError, requests.RequestException) as exc:
                log.warning("%s migration not started: %s", reason, exc)
                self.migrations.labels(reason, "not_started").inc()
            except Exception:
                log.exception("%s migration failed", reason)
                self.migrations.labels(reason, "error").inc()

        self._migrations.submit(job)

    def decide(self, source: str, model: str, **options) -> dict:
        started = time.perf_counter()
        outcome = "error"
        try:
            placement = self.placer.place(model, **options)
            plan = placement.decision.plan()
            outcome = str(plan.action)
            if placement.booking:  # a cold start's placement: its decision phase, by the tier it loads from
                self.cold_start.labels("decision", model, plan.tier).observe(time.perf_counter() - started)
            if plan.action is Action.MIGRATE_THEN_LOAD and options.get("book_slot", True):  # not for prefetches
                self.cache.note_migration(plan.instance)
                self.migrate_in_background(lambda: self.migrator.execute_plan(plan), "plan")
            return placement.as_dict() | {"ranked": [d.plan().as_json() for d in placement.ranked[:5]]}
        except NoCapacity:
            outcome = "no_capacity"
            raise
        finally:
            self.decisions.labels(source, outcome).inc()
            self.decision_seconds.labels(source).observe(time.perf_counter() - started)


def keepalive_policy(config: ControllerConfig) -> CostKeepAlive:
    """The keep-alive policy as this deployment's settings price it (deploy/README.md, `--keepalive-*`)."""
    return CostKeepAlive(DEFAULT_KEEP_ALIVE_S, config.keepalive_exchange_rate, config.keepalive_tail_restart_s,
                         config.keepalive_tail_coverage)


def _model_field(body: dict, name: str = "model") -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name} must be a non-empty string", name)
    return value


def _size_hint(body: dict) -> int | None:
    size = body.get("size_bytes")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size > 1 << 50:
        raise ApiError(400, "size_bytes must be a positive integer (bytes, at most 1 PiB)", "size_bytes")
    return size


def _optional_id(body: dict, field: str, what: str) -> str:
    """An optional id field of a request body: "" when absent or empty, else a valid id (400 naming `field`)."""
    value = body.get(field)
    return "" if value in (None, "") else _id(value, what, field)


def _id(value: object, what: str, field: str | None = None) -> str:
    """validate_id for a value from the request: its ValueError is the client's fault (400 naming `field`,
    else `what`), not ours."""
    with client_input(field or what):
        return validate_id(value, what)


def _instance(value: str, field: str) -> str:
    """A migration's source or destination: a base URL, else an instance id."""
    return value if value.startswith(("http://", "https://")) else _id(value, "instance id", field)


def create_app(config: ControllerConfig | None = None) -> Flask:
    config = config or ControllerConfig.from_json(os.environ.get("SLLM_CONTROLLER_CONFIG", "{}"))
    controller = Controller(config)
    app = Flask("sllm-faas-controller")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["sllm_controller"] = controller
    plumbing = kube.Plumbing(config.inject_socket_dir, config.inject_dram_dir, config.redis_url,
                             config.inject_redis_secret, config.key_prefix)

    def redis_down(exc: redis.RedisError) -> ApiError:
        log.warning("Redis unavailable: %s", exc)
        return ApiError(503, f"Redis unavailable at {config.redis_url.split('@')[-1]}: {exc}")

    install(app, plain_body, log, {  # the domain's refusals; anything else is a logged 500
        kube.BadRequest: lambda exc: ApiError(400, str(exc), exc.field),
        InvalidName: lambda exc: ApiError(400, str(exc), "model"),
        UnknownModel: lambda exc: ApiError(404, str(exc), "model"),
        NoCapacity: lambda exc: ApiError(409, str(exc)),
        redis.RedisError: redis_down})

    @app.before_request
    def authenticate() -> None:
        if (request.content_length or 0) > config.max_body_bytes:
            raise ApiError(413, f"request body over the {config.max_body_bytes} byte limit")
        if not config.token or request.path in OPEN_PATHS:
            return
        header = request.headers.get("Authorization", "")
        sent = header[7:] if header.startswith("Bearer ") else (request.view_args or {}).get("token", "")
        if not hmac.compare_digest(sent.encode(), config.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def json_body() -> dict:
        return jsonbody.request_object()

    def hook(rule: str, **options):
        """A route under both its plain path and /k8s/<token>/... (callers that cannot send headers)."""
        def register(view):
            app.add_url_rule(rule, view_func=view, **options)
            app.add_url_rule(f"/k8s/<token>{rule}", endpoint=f"{view.__name__}_k8s",
                             view_func=lambda token, **kw: view(**kw), **options)
            return view
        return register

    @hook("/v1/placements", methods=["POST"])
    def place():
        controller.ensure_schema()
        body = json_body()
        return controller.decide("api", _model_field(body), size_hint=_size_hint(body),
                                 owner=_optional_id(body, "function", "function name"),
                                 caller=_optional_id(body, "caller", "caller id"))

    @hook("/v1/placements/<model>", methods=["GET"])
    def estimate(model: str):
        ranked = controller.placer.estimate(model, _size_hint({"size_bytes": request.args.get("size_bytes", type=int)}))
        return {"model": model, "ranked": [d.plan().as_json() for d in ranked]}

    @hook("/v1/scale", methods=["POST"])
    def scale():
        controller.ensure_schema()
        body = json_body()
        function = body.get("function")
        model = body.get("model")
        if function is not None:
            _id(function, "function name")
            model = model or controller.client.hget(controller.keys.function(function), "model")
        model = _model_field({"model": model})
        replicas = body.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 64:
            raise ApiError(400, "replicas must be an integer from 1 to 64", "replicas")
        caller = _optional_id(body, "caller", "caller id")
        callers = [f"{caller}.{i}" if caller else str(i) for i in range(replicas)] if replicas > 1 else [caller]
        placements = []
        try:
            for one in callers:
                placements.append(controller.decide("scale", model, size_hint=_size_hint(body), owner=function or "",
                                                    caller=one))
        except NoCapacity:  # all or nothing: give back the replicas already booked; every one waits for GPUs
            for placed in placements:
                if placed.get("booking"):
                    controller.cancel_booking(placed["node"], placed["booking"])
            controller.placer.note_waiting([waiting_member(model, function or "", one) for one in callers])
            raise
        return {"function": function, "model": model, "placements": placements}

    @hook("/v1/bookings/<node>/<booking>", methods=["DELETE"])
    def cancel_booking(node: str, booking: str):
        """A caller whose instance could not start gives its slot back before the booking expires."""
        removed = controller.cancel_booking(_id(node, "node id"), _id(booking, "booking id"))
        return {"cancelled": removed}, 200 if removed else 404

    @hook("/system/alert", methods=["POST"])
    def alert():
        """AlertManager webhook: each firing alert's function is prefetched on its best node."""
        body = json_body()
        alerts = body.get("alerts")
        if not isinstance(alerts, list):
            raise ApiError(400, "alerts must be a list", "alerts")
        prefetched = []
        for index, entry in enumerate(alerts):
            labels = entry.get("labels") if isinstance(entry, dict) else None
            name = labels.get("function_name") if isinstance(labels, dict) else None
            if not isinstance(name, str) or not name:
                raise ApiError(400, f"alerts[{index}].labels.function_name must be a non-empty string",
                               f"alerts[{index}].labels.function_name")
            if (entry.get("status") or body.get("status")) != "firing":
                continue
            function = name.split(".", 1)[0]  # OpenFaaS names functions "name.namespace"
            model = controller.client.hget(controller.keys.function(_id(function, "function name")),
                                           "model") or function
            try:
                decision = controller.decide("alert", model, book_slot=False, owner=function)
            except (UnknownModel, NoCapacity) as exc:
                decision = {"model": model, "error": str(exc)}
            prefetched.append({"function": function, **decision})
        return {"prefetched": prefetched}

    def extender_ranking(pod: dict, names: list[str], track: bool = False) -> list[Decision] | None:
        """The nodes ranked for the pod the scheduler asks about (None: not ours). A pod our webhook admitted
        that holds no slot yet (no booking, no migration freeing one) is a caller, its caller id in
        `sllm.io/caller`: its own member of Keys.waiting does not price its migrations, and with `track` (the
        filter: once per scheduling attempt) it is counted as waiting while no node among `names` can take it
        without waiting for GPUs, and no longer once one can."""
        model = kube.model_of(pod)
        if not model:
            return None
        booked, caller = kube.booked_node(pod), kube.caller_of(pod)
        slot_coming = booked or kube.placement_of(pod).get("action") == Action.MIGRATE_THEN_LOAD
        demand = waiting_member(model, kube.function_of(pod), caller) if caller and not slot_coming else None
        ranked = controller.placer.estimate(model, booked_node=booked, demand=demand)
        if demand is not None and track:
            eligible = set(names)
            try:  # best effort: the ranking itself comes from the cached view
                controller.placer.track_waiting(model, next((d for d in ranked if d.node in eligible), None), demand)
            except redis.RedisError as exc:
                log.warning("extender: could not update the waiting caller %s: %s", demand, exc)
        return ranked

    @hook("/filter", methods=["POST"])
    def extender_filter():
        body = json_body()
        pod, names, names_only = kube.parse_extender_args(body)
        return kube.filter_result(body, names, names_only, extender_ranking(pod, names, track=True))

    @hook("/prioritize", methods=["POST"])
    def extender_prioritize():
        pod, names, _ = kube.parse_extender_args(json_body())
        return jsonify(kube.priorities(names, extender_ranking(pod, names)))

    @hook("/mutate", methods=["POST"])
    def mutate():
        uid, pod, dry_run = kube.parse_admission_review(json_body())
        model = kube.model_of(pod)
        if not model:
            return kube.admission_response(uid)
        if kube.placed(pod):  # a reinvocation: placed and booked already, only what is still missing is added
            return kube.admission_response(uid, kube.pod_patch(pod, plumbing))
        # the pod's caller id (how the extender tells its own wait from the others'): every webhook call has a new
        # uid, so a reinvocation of a pod admitted unplaced keeps the first call's
        caller = None if dry_run else kube.caller_of(pod) or uid
        try:
            if dry_run:  # no side effects: rank only
                ranked = controller.placer.estimate(model)
                placement = ranked[0].plan().as_json() if ranked and ranked[0].feasible else None
            else:
                controller.ensure_schema()
                placement = controller.decide("webhook", model, owner=kube.function_of(pod), caller=caller)
        except (UnknownModel, NoCapacity) as exc:  # never block a pod: admit it unplaced, say why
            return kube.admission_response(uid, kube.pod_patch(pod, plumbing, caller=caller),
                                           warning=f"sllm-faas: {exc}")
        if placement is None:  # a dry run's
            return kube.admission_response(uid, kube.pod_patch(pod, plumbing),
                                           warning="sllm-faas: no node can start this model")
        ranked = [d["node"] for d in placement.get("ranked", []) if d["node"] != placement["node"]]
        best = [placement["node"], *ranked][:len(kube.AFFINITY_WEIGHTS)]  # the booked node first
        summary = {k: placement.get(k) for k in ("node", "tier", "estimate_s", "action", "booking", "instance", "to")}
        return kube.admission_response(uid, kube.pod_patch(pod, plumbing, best, summary, caller))

    @hook("/v1/migrations", methods=["POST"])
    def start_migration():
        """Operator-triggered migration of one request; runs in the background, follow it by id."""
        body = json_body()
        for field in ("source", "request"):
            if not isinstance(body.get(field), str) or not body[field]:
                raise ApiError(400, f"{field} must be a non-empty string", field)
        destination = body.get("destination")
        if destination is not None and not isinstance(destination, str):
            raise ApiError(400, "destination must be a string (a base URL or an instance id)", "destination")
        threshold = body.get("threshold", 20)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= 4096:
            raise ApiError(400, "threshold must be an integer from 1 to 4096", "threshold")
        # Who takes part is decided now, so a caller learns of an unknown instance, a bad address or no
        # destination from this answer; only the transfer itself runs in the background.
        migrator = controller.migrator
        field = "source"
        try:
            source_url, source_instance = migrator.resolve(_instance(body["source"], "source"))
            field = "destination"
            if destination is None:
                destination = migrator.pick_destination(source_instance or source_url)
            destination_url = migrator.resolve(_instance(destination, "destination"))[0]
        except NoDestination as exc:
            raise ApiError(409, str(exc), "destination") from None
        except LookupError as exc:
            raise ApiError(404, str(exc), field) from None
        if destination_url == source_url:
            raise ApiError(400, f"source and destination are the same instance ({source_url})", "destination")
        migration_id = f"m-{int(time.time())}-{os.urandom(4).hex()}"
        controller.migrate_in_background(lambda: migrator.migrate(
            source_url, body["request"], destination_url, threshold=threshold, reason="operator",
            migration_id=migration_id), "operator")
        return {"id": migration_id, "record": controller.keys.migration(migration_id)}, 202

    @hook("/v1/migrations/<migration_id>", methods=["GET"])
    def migration_record(migration_id: str):
        record = controller.migrator.get(_id(migration_id, "migration id"))
        if not record:
            raise ApiError(404, f"no migration {migration_id}", "migration_id")
        return record

    @hook("/v1/cluster", methods=["GET"])
    def cluster():
        return {**controller.cache.refresh().as_dict(),
                "migrations": read_migrations(controller.client, controller.keys)}

    app.register_blueprint(operator_routes(controller.metrics))

    return app
