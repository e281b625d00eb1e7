"""The function runtime's HTTP app: OpenAI-compatible API, OpenFaaS invoke, health, readiness, metrics.

    gunicorn -c python:runtime.server.gunicorn_conf 'runtime.server.app:create_app()'

The app answers /_/health at once; the model loads in a background thread (the cold start) and
/_/ready turns 200 only after a warm-up forward pass.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound

from runtime.http_server import Admission
from runtime.jsonbody import JsonError, loads_object, request_object
from runtime.migration.routes import register_migration_routes
from runtime.server import openai_api as api
from runtime.server.metrics import COLD_START_BUCKETS, LATENCY_BUCKETS, Registry
from runtime.server.settings import Settings
from runtime.server.startup import LoadedModel, process_start_time, start_model

log = logging.getLogger("sllm.runtime")
Handler = Callable[[Any, Any], Any]


class FunctionEvent:
    """What an OpenFaaS python3-http handler receives as `event`, as upstream builds it
    (openfaas/python-flask-template, template/python3-http/index.py): `body` is the raw bytes; handlers
    parse JSON with runtime.jsonbody (its JsonError becomes a 400 here)."""

    def __init__(self) -> None:
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class FunctionContext:
    """What the handler receives as `context`: `context.llm` runs completions on this instance's model."""

    def __init__(self, runtime: Runtime) -> None:
        self.hostname = socket.gethostname()
        self.llm = runtime


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loaded: LoadedModel | None = None
        self.failure: str | None = None
        self.metrics = Registry()
        self._declare_metrics()
        self.registration = None  # InstanceRegistration when SLLM_REDIS_URL is set
        self.rates = {"decode_tokens_per_s": 0.0, "prefill_tokens_per_s": 0.0}  # moving averages

    def _declare_metrics(self) -> None:
        m = self.metrics
        m.histogram("sllm_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        m.histogram("sllm_e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS)
        m.histogram("sllm_cold_start_seconds", "Process start to ready, by the tier the weights came from.",
                    COLD_START_BUCKETS)
        m.gauge("sllm_cold_start_phase_seconds", "Seconds spent in each cold-start step of this instance.")
        m.counter("sllm_prompt_tokens_total", "Prompt tokens processed.")
        m.counter("sllm_generation_tokens_total", "Tokens generated.")
        m.counter("sllm_requests_total", "Finished requests by finish reason.")
        m.gauge("sllm_num_requests_running", "Requests generating now.",
                lambda: self.loaded.engine.running if self.loaded else 0)
        m.gauge("sllm_num_requests_waiting", "Requests queued for a generation slot.",
                lambda: self.loaded.engine.waiting if self.loaded else 0)

    def release(self) -> None:
        """At exit: give the node loader our lease and the node our slot back now rather than at expiry."""
        if self.loaded is not None and self.loaded.lease is not None:
            self.loaded.lease.stop()
        if self.registration is not None:
            self.registration.withdraw()

    def describe(self) -> dict[str, str]:
        """This instance's live state for its Redis record (redis_schema/SCHEMA.md, `sllm:instance:<id>`)."""
        loaded = self.loaded
        state = "ready" if loaded else "failed" if self.failure else "starting"
        name = loaded.name if loaded else self.settings.served_name or os.path.basename(self.settings.model)
        engine = loaded.engine if loaded else None
        return {"state": state, "model": name, "slots": str(self.settings.max_batch),
                "active": str(engine.running + engine.waiting if engine else 0),
                "tokens": str(engine.tokens_in_flight if engine else 0),
                **{k: f"{v:.1f}" for k, v in self.rates.items()}}

    def start(self, process_started: float) -> None:
        atexit.register(self.release)
        if self.settings.redis_url:
            from runtime.server.registration import InstanceRegistration

            self.registration = InstanceRegistration(self.settings, self.describe).start()

        def run() -> None:
            try:
                self.loaded = start_model(self.settings, process_started, on_finish=self._record)
            except Exception as exc:  # reported by /_/ready and the log; the process stays up for inspection
                self.failure = f"{type(exc).__name__}: {exc}"
                log.exception("cold start failed")
                return
            report = self.loaded.cold_start
            self.metrics.observe("sllm_cold_start_seconds", report.process_start_to_ready_s, tier=report.tier)
            for phase in ("imports", "staging_wait", "load", "build", "first_forward"):
                self.metrics.set("sllm_cold_start_phase_seconds", getattr(report, f"{phase}_s"), phase=phase)

        threading.Thread(target=run, name="sllm-cold-start", daemon=True).start()

    def _record(self, generation) -> None:
        if generation.first_token_at:
            ttft = generation.first_token_at - generation.submitted_at
            self.metrics.observe("sllm_time_to_first_token_seconds", ttft)
            self._update_rate("prefill_tokens_per_s", len(generation.prompt_ids), ttft)
            self._update_rate("decode_tokens_per_s", len(generation.output_ids) - 1,
                              generation.finished_at - generation.first_token_at)
        self.metrics.observe("sllm_e2e_request_latency_seconds", generation.finished_at - generation.submitted_at)
        self.metrics.inc("sllm_prompt_tokens_total", len(generation.prompt_ids))
        self.metrics.inc("sllm_generation_tokens_total", len(generation.output_ids))
        self.metrics.inc("sllm_requests_total", finish_reason=generation.finish_reason)

    def _update_rate(self, name: str, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            previous = self.rates[name]
            self.rates[name] = tokens / seconds if not previous else 0.8 * previous + 0.2 * tokens / seconds

    # -- generation, shared by the OpenAI routes and handlers (context.llm) ----------------------
    def _require_ready(self) -> LoadedModel:
        if self.loaded is None:
            raise api.ApiError(503, "the model is still loading" if not self.failure else self.failure,
                               kind="server_error", code="not_ready")
        return self.loaded

    def _submit(self, prompt_ids: list[int], body: dict, default_max_tokens: int):
        loaded = self._require_ready()
        if len(prompt_ids) > self.settings.max_prompt_tokens:
            raise api.ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is "
                               f"{self.settings.max_prompt_tokens}", "prompt", "context_length_exceeded")
        room = loaded.engine.max_seq - len(prompt_ids)
        if room < 1:
            raise api.ApiError(400, f"the prompt has {len(prompt_ids)} tokens and leaves no room in the context of "
                               f"{loaded.engine.max_seq}", "prompt", "context_length_exceeded")
        parsed = api.parse_sampling(body, self.settings.max_tokens, min(default_max_tokens, room))
        if len(prompt_ids) + parsed.params.max_tokens > loaded.engine.max_seq:
            raise api.ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({parsed.params.max_tokens}) "
                               f"exceeds the context of {loaded.engine.max_seq}", "max_tokens",
                               "context_length_exceeded")
        return loaded.engine.submit(prompt_ids, parsed.params), parsed

    def check_model(self, body: dict) -> None:
        name = self._require_ready().name
        if body.get("model") not in (None, name):
            raise api.ApiError(404, f"the model {body.get('model')!r} does not exist; this instance serves {name!r}",
                               "model", "model_not_found")

    def chat(self, body: dict) -> dict | Response:
        loaded = self._require_ready()
        messages = api.parse_messages(body)
        from runtime.model.tokenizer import TemplateError

        try:
            prompt_ids = loaded.tokenizer.encode_chat(messages)
        except TemplateError as exc:
            raise api.ApiError(400, f"chat template: {exc}", "messages") from None
        return self._respond(prompt_ids, body, chat=True, default_max_tokens=self.settings.max_tokens)

    def complete(self, body: dict) -> dict | Response:
        loaded = self._require_ready()
        prompt_ids = loaded.tokenizer.encode(api.parse_prompt(body))
        if not prompt_ids:
            raise api.ApiError(400, "'prompt' is empty: there is nothing to complete", "prompt")
        return self._respond(prompt_ids, body, chat=False, default_max_tokens=16)

    def _respond(self, prompt_ids: list[int], body: dict, chat: bool, default_max_tokens: int) -> dict | Response:
        generation, parsed = self._submit(prompt_ids, body, default_max_tokens)
        shape = api.ResponseShape(self.loaded.name, chat)
        generation.request_id = shape.id  # how /_/requests and migrations name it
        if not parsed.stream:
            try:
                text = generation.wait()
            except RuntimeError as exc:
                raise api.ApiError(500, str(exc), kind="server_error") from None
            return shape.complete(text, generation.finish_reason, len(prompt_ids), len(generation.output_ids))
        frames = api.sse_stream(shape, generation.stream(), lambda: generation.finish_reason, parsed.include_usage,
                                lambda: (len(prompt_ids), len(generation.output_ids)))

        def guarded():
            try:
                yield from frames
            finally:  # the client went away: free the slot, or stop relaying a migrated request
                if generation.finish_reason is None:
                    generation.cancelled = True
                    if self.loaded is not None:
                        self.loaded.engine.cancel(generation)

        return Response(guarded(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def default_handler(event: FunctionEvent, context: FunctionContext) -> Any:
    """OpenFaaS invoke without a user hook: chat if the body has messages, else a plain completion."""
    body = loads_object(event.body, "the request body")
    result = context.llm.chat(body) if "messages" in body else context.llm.complete(body)
    return {"statusCode": 200, "body": result}


def _handler_response(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, dict) and "statusCode" in result:
        body = result.get("body", "")
        if isinstance(body, Response):  # a streamed completion (stream: true)
            response = body
        else:
            response = jsonify(body) if isinstance(body, dict | list) else Response(str(body))
        response.status_code = int(result["statusCode"])
        response.headers.update(result.get("headers") or {})
        return response
    return jsonify(result) if isinstance(result, dict | list) else Response(str(result))


INVOKE_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
RESERVED_PREFIXES = ("_/", "v1/")  # the runtime's own routes; the handler never sees these paths
RESERVED_PATHS = ("_", "v1", "metrics")
OVERLOADED = json.dumps(api.ApiError(503, "every generation thread is busy; retry shortly", kind="server_error",
                                     code="overloaded").body()).encode()


def _generation(environ: dict) -> bool:
    """Requests that may hold a thread for a whole generation: all but /_/... and /metrics, whose threads
    (SLLM_HTTP_RESERVED_THREADS) are kept so that health checks and scrapes answer under any load."""
    path = environ.get("PATH_INFO", "")
    return not (path.startswith("/_/") or path == "/metrics")


def create_app(settings: Settings | None = None, handler: Handler | None = None,
               process_started: float | None = None) -> Flask:
    """The WSGI app; starts the cold start in the background.

    The cold start is timed from the creation of the process that was spawned (SLLM_SPAWN_PID, set by
    our gunicorn config in the master), so the forked worker's breakdown includes the master's start.
    """
    settings = settings or Settings.from_env()
    if not log.handlers:  # our lines (the cold-start breakdown) go to stderr beside gunicorn's
        handler_ = logging.StreamHandler()
        handler_.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler_)
        log.setLevel(os.environ.get("SLLM_LOG_LEVEL", "info").upper())
    if process_started is None:
        process_started = process_start_time(int(os.environ.get("SLLM_SPAWN_PID") or os.getpid()))
    runtime = Runtime(settings)
    app = Flask("sllm-faas-runtime")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["sllm_runtime"] = runtime
    user_handler = handler or default_handler

    @app.errorhandler(api.ApiError)
    def api_error(exc: api.ApiError):
        return jsonify(exc.body()), exc.status

    @app.errorhandler(JsonError)
    def json_error(exc: JsonError):
        return jsonify(api.ApiError(exc.status, exc.message).body()), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = "invalid_request_error" if exc.code and exc.code < 500 else "server_error"
        return jsonify(api.ApiError(exc.code or 500, exc.description or exc.name, kind=kind).body()), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("request failed")
        return jsonify(api.ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").body()), 500

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = request_object()
        runtime.check_model(body)
        return runtime.chat(body)

    @app.post("/v1/completions")
    def completions():
        body = request_object()
        runtime.check_model(body)
        return runtime.complete(body)

    @app.get("/v1/models")
    def models():
        loaded = runtime._require_ready()
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "sllm-faas", "max_model_len": loaded.engine.max_seq}]}

    @app.route("/", defaults={"path": ""}, methods=INVOKE_METHODS)
    @app.route("/<path:path>", methods=INVOKE_METHODS)
    def invoke(path: str):
        """Like upstream python3-http, `/` and every other path go to the handler, but ours stay ours."""
        if path.startswith(RESERVED_PREFIXES) or path in RESERVED_PATHS:
            raise NotFound()
        return _handler_response(user_handler(FunctionEvent(), FunctionContext(runtime)))

    @app.get("/_/health")
    def health():
        return {"status": "ok"}

    @app.get("/_/ready")
    def ready():
        if runtime.loaded is None:
            body = {"ready": False, "error": runtime.failure} if runtime.failure else {"ready": False}
            return body, 503
        return {"ready": True, "model": runtime.loaded.name, "cold_start": runtime.loaded.cold_start.as_dict()}

    @app.get("/metrics")
    def metrics():
        return Response(runtime.metrics.render(), mimetype="text/plain; version=0.0.4")

    register_migration_routes(app, runtime)
    app.wsgi_app = Admission(app.wsgi_app, settings.http_threads - settings.http_reserved, _generation,
                             ("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")],
                              OVERLOADED))
    runtime.start(process_started)
    return app
