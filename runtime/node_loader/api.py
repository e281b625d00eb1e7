"""The loader's HTTP/JSON API, served on a Unix socket (shared with function pods through a volume).

    POST   /v1/stage              {"model", "tier": "ssd"|"dram"|"gpu"}  -> 202 job (200 if already there)
    GET    /v1/jobs/<id>                                                 -> job: state, progress, eta_s
    GET    /v1/models/<model>                                            -> where: tier, tiers, path(s), ipc
    POST   /v1/leases             {"model", "holder", "ttl_s"?}         -> 201 lease
    POST   /v1/leases/<id>/renew                                         -> lease
    DELETE /v1/leases/<id>                                               -> released lease
    POST   /v1/evict              {"model", "tier"}                      -> {"freed_bytes"}
    GET    /v1/status                                                    -> tiers, bandwidths, queue, leases
    GET    /metrics, /healthz                                            -> /healthz: 503 naming a dead loop

On TCP (`--tcp`) every route but /healthz needs `Authorization: Bearer <token>` (`--token`); the Unix
socket's file permissions are its credential, so requests on it need none.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import socket

from flask import Flask, jsonify, request

from sllm_faas.common import jsonbody
from sllm_faas.common.errors import ApiError, install, plain_body
from sllm_faas.common.metrics import Metrics, operator_routes
from sllm_faas.common.names import InvalidName
from sllm_faas.redis_schema import Keys
from sllm_faas.runtime.node_loader.config import LoaderConfig
from sllm_faas.runtime.node_loader.service import LoaderError, NodeLoader

MAX_BODY_BYTES = 64 << 10
log = logging.getLogger("sllm.loader")


def _metrics(loader: NodeLoader) -> Metrics:
    """The loader's gauges, read from its status at each scrape, and its staging steps as cold-start phases."""
    m = Metrics()
    capacity = m.gauge("sllm_loader_tier_capacity_bytes", "Byte budget of each tier.", ("tier",))
    used = m.gauge("sllm_loader_tier_used_bytes", "Bytes held (or reserved) in each tier.", ("tier",))
    models = m.gauge("sllm_loader_tier_models", "Models held in each tier.", ("tier",))
    bandwidth = m.gauge("sllm_loader_bandwidth_bytes_per_second", "Measured bandwidth out of each tier.", ("tier",))
    queue = m.gauge("sllm_loader_queue_length", "Staging jobs queued or running.")
    leases = m.gauge("sllm_loader_leases", "Active leases.")
    redis_up = m.gauge("sllm_loader_redis_up", "1 while the last publication to Redis succeeded.")

    def update() -> None:
        status = loader.status()
        for tier, info in status["tiers"].items():
            capacity.labels(tier).set(info["capacity"])
            used.labels(tier).set(info["used"])
            models.labels(tier).set(len(info["models"]))
        for tier, rate in status["bandwidths"].items():
            bandwidth.labels(tier).set(rate)
        queue.set(len(status["queue"]))
        leases.set(len(status["leases"]))
        redis_up.set(1 if status["redis"] else 0)

    m.on_scrape(update)
    cold_start = m.cold_start()
    loader.on_step_staged = lambda model, tier, seconds: cold_start.labels("staging", model, tier).observe(seconds)
    return m


def _on_unix_socket(environ: dict) -> bool:
    """Whether the request came over the Unix socket (gunicorn hands the connection's socket to the app)."""
    sock = environ.get("gunicorn.socket")
    return sock is not None and sock.family == socket.AF_UNIX


def create_app(loader: NodeLoader | None = None) -> Flask:
    """The app; without a loader, builds and starts one from $SLLM_LOADER_CONFIG (set by `sllm-faas loader`)."""
    if loader is None:
        from sllm_faas.runtime.node_loader.publisher import RedisPublisher

        config = LoaderConfig.from_json(os.environ["SLLM_LOADER_CONFIG"])
        publisher = RedisPublisher(config.redis_url, config.node_id, config.tcp or config.socket_path,
                                   keys=Keys(config.key_prefix))
        loader = NodeLoader(config, publisher).start()

        def shutdown() -> None:
            loader.stop()
            publisher.withdraw()

        atexit.register(shutdown)
    app = Flask("sllm-faas-loader")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["sllm_loader"] = loader
    metrics_ = _metrics(loader)

    install(app, plain_body, log, {LoaderError: lambda exc: ApiError(exc.status, str(exc)),
                                   InvalidName: lambda exc: ApiError(400, str(exc))})

    @app.before_request
    def authenticate() -> None:
        token = loader.config.token
        if not token or request.path == "/healthz" or _on_unix_socket(request.environ):
            return
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "the loader's TCP API needs 'Authorization: Bearer <token>' "
                                "(the loader's --token / SLLM_LOADER_TOKEN)")

    @app.post("/v1/stage")
    def stage():
        data = jsonbody.request_object()
        job = loader.stage(data.get("model"), data.get("tier", "dram"))
        return jsonify(job.as_dict()), 200 if job.state == "done" else 202

    @app.get("/v1/jobs/<job_id>")
    def job(job_id: str):
        found = loader.jobs.get(job_id)
        if found is None:
            raise ApiError(404, f"no job {job_id!r}")
        return found.as_dict()

    @app.get("/v1/models/<model>")
    def where(model: str):
        return loader.where(model)

    @app.post("/v1/leases")
    def lease():
        data = jsonbody.request_object()
        ttl = data.get("ttl_s")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
            raise ApiError(400, "ttl_s must be a number", "ttl_s")
        return jsonify(loader.lease(data.get("model"), str(data.get("holder", "")), ttl).as_dict()), 201

    @app.post("/v1/leases/<lease_id>/renew")
    def renew(lease_id: str):
        return loader.renew(lease_id).as_dict()

    @app.delete("/v1/leases/<lease_id>")
    def release(lease_id: str):
        return loader.release(lease_id).as_dict()

    @app.post("/v1/evict")
    def evict():
        data = jsonbody.request_object()
        return {"freed_bytes": loader.evict(data.get("model"), data.get("tier", "dram"))}

    @app.get("/v1/status")
    def status():
        return loader.status()

    app.register_blueprint(operator_routes(metrics_, loader.dead_loops))

    return app
