"""The function runtime's HTTP app: OpenAI-compatible API, OpenFaaS invoke, health, readiness, metrics.

    gunicorn -c python:sllm_faas.runtime.server.gunicorn_conf 'sllm_faas.runtime.server.app:create_app()'

The app answers /_/health at once; the model loads in a background thread (the cold start) and
/_/ready turns 200 only after a warm-up forward pass.
"""

from __future__ import annotations

import atexit
import dataclasses
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import NotFound

from sllm_faas.common.errors import ApiError, install, openai_body
from sllm_faas.common.http_server import Admission
from sllm_faas.common.jsonbody import loads_object, request_object
from sllm_faas.common.metrics import CONTENT_TYPE, Metrics, RuntimeMetrics
from sllm_faas.runtime.migration.routes import migration_routes
from sllm_faas.runtime.migration.state import Migrations
from sllm_faas.runtime.server import openai_api as api
from sllm_faas.runtime.server.settings import Settings
from sllm_faas.runtime.server.startup import LoadedModel, process_start_time, start_model

log = logging.getLogger("sllm.runtime")
Handler = Callable[[Any, Any], Any]


class FunctionEvent:
    """What an OpenFaaS python3-http handler receives as `event`, as upstream builds it
    (openfaas/python-flask-template, template/python3-http/index.py): `body` is the raw bytes; handlers
    parse JSON with sllm_faas.common.jsonbody (its JsonError becomes a 400 here)."""

    def __init__(self) -> None:
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class LLM:
    """What a handler may do with this instance's model (`context.llm`): run OpenAI-style requests on it.

    `chat(body)` and `complete(body)` take the body of /v1/chat/completions and /v1/completions and return
    its response (a streaming one, with "stream": true, as a Response to return as the body); a bad parameter
    raises the 400 the endpoint would answer. `model` is the served name (None while loading)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @property
    def model(self) -> str | None:
        return self._runtime.model_name

    def chat(self, body: dict) -> dict | Response:
        return self._runtime.chat(body)

    def complete(self, body: dict) -> dict | Response:
        return self._runtime.complete(body)


class FunctionContext:
    """What the handler receives as `context`: `context.llm` runs completions on this instance's model."""

    def __init__(self, llm: LLM) -> None:
        self.hostname = socket.gethostname()
        self.llm = llm


class Runtime:
    """One function instance: its model (loaded in the background), generation, metrics and Redis record.
    It is the migration's `Host` (runtime/migration/host.py): engine, model_name, metrics, release_model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loaded: LoadedModel | None = None
        self.failure: str | None = None
        self.phase = "starting"  # then loading, warming (runtime/server/startup.py); /_/ready says it
        self.metrics = Metrics()
        self.engine_metrics = RuntimeMetrics(self.metrics, settings.max_seq, lambda: self.loaded)
        self.registration = None  # InstanceRegistration when SLLM_REDIS_URL is set
        self.rates = {"decode_tokens_per_s": 0.0, "prefill_tokens_per_s": 0.0}  # moving averages

    def release(self) -> None:
        """At exit: give the node loader our lease and the node our slot back now rather than at expiry."""
        if self.loaded is not None and self.loaded.lease is not None:
            self.loaded.lease.stop()
        if self.registration is not None:
            self.registration.withdraw()

    def describe(self) -> dict[str, Any]:
        """This instance's live state: the InstanceRecord fields (redis_schema/records.py) that change."""
        loaded = self.loaded
        state = "ready" if loaded else "failed" if self.failure else "starting"
        name = loaded.name if loaded else self.settings.served_name or os.path.basename(self.settings.model)
        engine = loaded.engine if loaded else None
        return {"state": state, "model": name, "slots": self.settings.max_batch,
                "active": engine.running + engine.waiting if engine else 0,
                "tokens": engine.tokens_in_flight if engine else 0, **self.rates}

    def start(self, process_started: float) -> None:
        atexit.register(self.release)
        if self.settings.redis_url:
            from sllm_faas.runtime.server.registration import InstanceRegistration

            self.registration = InstanceRegistration(self.settings, self.describe).start()

        def run() -> None:
            try:
                self.loaded = start_model(self.settings, process_started, on_finish=self._record,
                                          on_phase=lambda phase: setattr(self, "phase", phase))
            except Exception as exc:  # reported by /_/ready and the log; the process stays up for inspection
                self.failure = f"{type(exc).__name__}: {exc}"
                log.exception("cold start failed")
                return
            self.engine_metrics.cold_start(self.loaded.name, self.loaded.cold_start)

        threading.Thread(target=run, name="sllm-cold-start", daemon=True).start()

    @property
    def engine(self):
        """The loaded model's engine (runtime/model/engine.py), or None."""
        loaded = self.loaded
        return loaded.engine if loaded is not None else None

    @property
    def model_name(self) -> str | None:
        loaded = self.loaded
        return loaded.name if loaded is not None else None

    def release_model(self, reason: str) -> bool:
        """Give the model back (engine, weights, node-loader lease and slot) once no request is left here.

        New requests are refused first (503, not ready), then the engine is checked again, so a request that
        slipped in keeps the model."""
        loaded = self.loaded
        if loaded is None or loaded.engine.generations():
            return False
        self.loaded, self.failure = None, f"released its model: {reason}"
        if loaded.engine.generations():
            self.loaded, self.failure = loaded, None
            return False
        loaded.engine.stop()
        self.release()
        log.info("released the model: %s", reason)
        return True

    def _record(self, generation) -> None:
        if generation.first_token_at:
            ttft = generation.first_token_at - generation.submitted_at
            self._update_rate("prefill_tokens_per_s", len(generation.prompt_ids), ttft)
            self._update_rate("decode_tokens_per_s", len(generation.output_ids) - 1,
                              generation.finished_at - generation.first_token_at)
        if self.loaded is not None:  # not the warm-up forward of the cold start
            self.engine_metrics.finished(self.loaded.name, generation)

    def _update_rate(self, name: str, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            previous = self.rates[name]
            self.rates[name] = tokens / seconds if not previous else 0.8 * previous + 0.2 * tokens / seconds

    # -- generation, shared by the OpenAI routes and handlers (context.llm) ----------------------
    def _require_ready(self) -> LoadedModel:
        if self.loaded is None:
            raise ApiError(503, "the model is still loading" if not self.failure else self.failure, code="not_ready")
        return self.loaded

    def check_model(self, body: dict) -> None:
        name = self._require_ready().name
        if body.get("model") not in (None, name):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this instance serves {name!r}",
                               "model", "model_not_found")

    def prompt_limit(self) -> int:
        """SLLM_MAX_PROMPT_TOKENS, but never more than the model's context can hold."""
        return min(self.settings.max_prompt_tokens, self._require_ready().engine.max_seq)

    def _check_prompt(self, prompt_ids: list[int], param: str = "prompt") -> int:
        """The room left for output after this prompt."""
        if not prompt_ids:
            raise ApiError(400, f"'{param}' is empty: there is nothing to complete", param)
        limit = self.prompt_limit()
        if len(prompt_ids) > limit:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {limit}", param,
                               "context_length_exceeded")
        room = self.loaded.engine.max_seq - len(prompt_ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and leaves no room in the context of "
                               f"{self.loaded.engine.max_seq}", param, "context_length_exceeded")
        return room

    def chat(self, body: dict) -> dict | Response:
        loaded = self._require_ready()
        api.check_fields(body, api.CHAT_FIELDS)
        messages = api.parse_messages(body)
        template = api.parse_template_options(body, loaded.tokenizer.template_uses)
        from sllm_faas.runtime.model.tokenizer import TemplateError

        try:
            prompt_ids = loaded.tokenizer.encode_chat(messages, **template)
        except TemplateError as exc:
            raise ApiError(400, f"chat template: {exc}", "messages") from None
        return self._respond([prompt_ids], [None], body, chat=True, default_max_tokens=self.settings.max_tokens)

    def complete(self, body: dict) -> dict | Response:
        loaded = self._require_ready()
        api.check_fields(body, api.COMPLETION_FIELDS)
        echo = api.check_completion_options(body)
        tokenizer = loaded.tokenizer
        prompts = api.parse_prompts(body, loaded.engine.vocab_size)
        ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        echoes = [(p if isinstance(p, str) else tokenizer.decode(p)) if echo else None for p in prompts]
        return self._respond(ids, echoes, body, chat=False, default_max_tokens=16)

    def _respond(self, prompts: list[list[int]], echoes: list[str | None], body: dict, chat: bool,
                 default_max_tokens: int) -> dict | Response:
        """Run n choices per prompt (index = prompt * n + j, seeds seed + j) and answer them as one response;
        `echoes` is each prompt's text to put before its completion (completions' echo), or None."""
        loaded = self._require_ready()
        room = min(self._check_prompt(p, "messages" if chat else "prompt") for p in prompts)
        parsed = api.parse_sampling(body, self.settings.max_tokens, min(default_max_tokens, room),
                                    loaded.engine.vocab_size, chat, echo=echoes[0] is not None)
        if len(prompts) * parsed.n > api.MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={parsed.n} asks for {len(prompts) * parsed.n} "
                               f"choices; the limit is {api.MAX_CHOICES}", "prompt" if len(prompts) > 1 else "n")
        longest = max(len(p) for p in prompts)
        if longest + parsed.params.max_tokens > loaded.engine.max_seq:
            key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            raise ApiError(400, f"prompt ({longest} tokens) + {key} ({parsed.params.max_tokens}) exceeds the "
                               f"context of {loaded.engine.max_seq}", key, "context_length_exceeded")
        shape = api.ResponseShape(loaded.name, chat)
        events: queue.Queue = queue.Queue()
        generations = []
        try:
            for prompt in prompts:
                for j in range(parsed.n):
                    params = dataclasses.replace(parsed.params, seed=(parsed.params.seed + j) % 2**63)
                    generation = loaded.engine.submit(prompt, params, api.ChoiceEvents(events, len(generations)))
                    many = len(prompts) * parsed.n > 1
                    generation.request_id = f"{shape.id}-{len(generations)}" if many else shape.id
                    generations.append(generation)
        except Exception:
            self._cancel(generations)
            raise
        choices = Choices(shape, generations, [echoes[i // parsed.n] for i in range(len(generations))],
                          api.Logprobs(loaded.tokenizer.token_text, chat))
        if not parsed.stream:
            try:
                for _ in api.follow(events, len(generations)):
                    pass
            except RuntimeError as exc:
                self._cancel(generations)
                raise ApiError(500, str(exc)) from None
            return shape.complete([choices.whole(i) for i in range(len(generations))],
                                  sum(len(p) for p in prompts), choices.completion_tokens())

        def frames():
            try:
                yield from choices.stream(events, parsed.include_usage, sum(len(p) for p in prompts))
            finally:  # the client went away: free the slots, or stop relaying migrated requests
                self._cancel(generations)

        return Response(frames(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _cancel(self, generations: list) -> None:
        for generation in generations:
            if generation.finish_reason is None:
                generation.cancelled = True
                if self.loaded is not None:
                    self.loaded.engine.cancel(generation)


class Choices:
    """One response's choices: their text (after the echoed prompt), finish reasons and logprobs, whole or as SSE
    frames; logprobs ride with the text chunk that carries their tokens' text, the rest with the finish chunk."""

    def __init__(self, shape: api.ResponseShape, generations: list, echoes: list[str | None],
                 logprobs: api.Logprobs) -> None:
        self.shape, self.generations, self.echoes, self.logprobs = shape, generations, echoes, logprobs
        self.sent = [0] * len(generations)  # output tokens whose logprobs were streamed
        self.offsets = [0] * len(generations)  # completions' text_offset of the next token

    def completion_tokens(self) -> int:
        return sum(len(g.output_ids) for g in self.generations)

    def _prompt_logprobs(self, index: int) -> dict | None:
        generation = self.generations[index]
        if self.echoes[index] is None or generation.prompt_logprobs is None:
            return None
        formatted = self.logprobs.format(generation.prompt_ids, generation.prompt_logprobs)
        self.offsets[index] = len(self.echoes[index])
        return formatted

    def _new_logprobs(self, index: int) -> dict | None:
        generation = self.generations[index]
        if generation.logprobs is None:
            return None
        start, end = self.sent[index], len(generation.output_ids)
        self.sent[index] = end
        formatted = self.logprobs.format(generation.output_ids[start:end], generation.logprobs[start:end],
                                         self.offsets[index])
        if not self.shape.chat:
            self.offsets[index] += sum(len(t) for t in formatted["tokens"])
        return formatted

    def whole(self, index: int) -> tuple[str, str, dict | None]:
        generation = self.generations[index]
        prompt = self._prompt_logprobs(index)
        logprobs = self._new_logprobs(index)
        if prompt is not None:
            logprobs = {key: prompt[key] + logprobs[key] for key in prompt}
        return (self.echoes[index] or "") + generation.text, generation.finish_reason, logprobs

    def stream(self, events: queue.Queue, include_usage: bool, prompt_tokens: int) -> Iterator[str]:
        """SSE frames: per choice (the role chunk, or the echoed prompt), text chunks, its finish chunk; then
        (usage) and [DONE]; a failed generation ends the stream with an error frame."""
        shape, started = self.shape, [False] * len(self.generations)
        try:
            if shape.chat:
                for index in range(len(self.generations)):
                    yield api.sse(shape.chunk(index, None, first=True))
            for index, kind, value in api.follow(events, len(self.generations)):
                if self.echoes[index] is not None and not started[index]:  # after its prefill: its logprobs are in
                    started[index] = True
                    yield api.sse(shape.chunk(index, self.echoes[index], logprobs=self._prompt_logprobs(index)))
                if kind == "delta":
                    yield api.sse(shape.chunk(index, value, logprobs=self._new_logprobs(index)))
                else:
                    yield api.sse(shape.chunk(index, None, value, logprobs=self._new_logprobs(index)))
            if include_usage:
                yield api.sse(shape.usage_chunk(prompt_tokens, self.completion_tokens()))
        except RuntimeError as exc:
            yield api.sse_error(exc)
        yield api.sse("[DONE]")


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
RESERVED_PATHS = ("_", "v1", "metrics", "health", "version", "tokenize", "detokenize")  # vLLM's paths too
OVERLOADED = json.dumps(openai_body(ApiError(503, "every generation thread is busy; retry shortly",
                                             code="overloaded"))).encode()


def _generation(environ: dict) -> bool:
    """Requests that may hold a thread for a whole generation: all but /_/... and /metrics, whose threads
    (SLLM_HTTP_RESERVED_THREADS) are kept so that health checks and scrapes answer under any load."""
    path = environ.get("PATH_INFO", "")
    return not (path.startswith("/_/") or path in ("/metrics", "/health", "/version"))


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
        log.setLevel(settings.log_level.upper())
    if process_started is None:
        process_started = process_start_time(int(os.environ.get("SLLM_SPAWN_PID") or os.getpid()))
    runtime = Runtime(settings)
    app = Flask("sllm-faas-runtime")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["sllm_runtime"] = runtime
    install(app, openai_body, log)
    app.register_blueprint(runtime_routes(runtime, settings.api_key, handler or default_handler))
    migrations = Migrations(runtime.metrics, settings.redis_url, settings.key_prefix, settings.instance_id)
    app.register_blueprint(migration_routes(runtime, migrations, os.environ.get("SLLM_MIGRATION_TOKEN", "")))
    app.wsgi_app = Admission(app.wsgi_app, settings.http_threads - settings.http_reserved, _generation,
                             ("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")],
                              OVERLOADED))
    runtime.start(process_started)
    return app


def runtime_routes(runtime: Runtime, api_key: str | None, user_handler: Handler) -> Blueprint:
    """The runtime's own API: OpenAI and vLLM endpoints, health, readiness, metrics, and the handler on `/`."""
    routes = Blueprint("runtime", __name__)

    @routes.before_request
    def authorize() -> None:
        """With an API key set, /v1/* needs it as a bearer token (as vLLM's --api-key); the rest stays open."""
        if api_key is None or not request.path.startswith("/v1/"):
            return
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @routes.post("/v1/chat/completions")
    def chat_completions():
        body = request_object()
        runtime.check_model(body)
        return runtime.chat(body)

    @routes.post("/v1/completions")
    def completions():
        body = request_object()
        runtime.check_model(body)
        return runtime.complete(body)

    def model_card() -> dict[str, Any]:
        loaded = runtime._require_ready()
        return {"id": loaded.name, "object": "model", "created": int(time.time()), "owned_by": "sllm-faas",
                "max_model_len": loaded.engine.max_seq}

    @routes.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @routes.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        runtime.check_model({"model": model_id})
        return model_card()

    @routes.get("/health")
    def vllm_health():
        """vLLM's liveness: 200 with an empty body once the engine serves, 503 before."""
        runtime._require_ready()
        return Response(status=200)

    @routes.get("/version")
    def version():
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            return {"version": package_version("sllm-faas")}
        except PackageNotFoundError:  # run from a source tree without installing
            return {"version": "unknown"}

    @routes.post("/tokenize")
    def tokenize():
        """vLLM's /tokenize: a `prompt` (with `add_special_tokens`), or chat `messages` through the template."""
        body = request_object()
        runtime.check_model(body)
        loaded = runtime.loaded
        if "messages" in body:
            api.check_fields(body, {"model", "messages", "add_special_tokens", "tools", "tool_choice", "documents",
                                    "add_generation_prompt", "chat_template_kwargs", "return_token_strs"})
            from sllm_faas.runtime.model.tokenizer import TemplateError

            try:
                tokens = loaded.tokenizer.encode_chat(api.parse_messages(body), **api.parse_template_options(
                    body, loaded.tokenizer.template_uses))
            except TemplateError as exc:
                raise ApiError(400, f"chat template: {exc}", "messages") from None
        else:
            api.check_fields(body, {"model", "prompt", "add_special_tokens", "return_token_strs"})
            if not isinstance(body.get("prompt"), str):
                raise ApiError(400, "'prompt' must be a string", "prompt")
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise ApiError(400, "'add_special_tokens' must be a boolean", "add_special_tokens")
            tokens = loaded.tokenizer.encode(body["prompt"], add_special_tokens=add_special)
        strings = [loaded.tokenizer.token_text(t) for t in tokens] if body.get("return_token_strs") else None
        return {"count": len(tokens), "max_model_len": loaded.engine.max_seq, "tokens": tokens, "token_strs": strings}

    @routes.post("/detokenize")
    def detokenize():
        body = request_object()
        runtime.check_model(body)
        api.check_fields(body, {"model", "tokens"})
        vocab = runtime.loaded.engine.vocab_size
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids below {vocab}", "tokens")
        return {"prompt": runtime.loaded.tokenizer.decode(tokens)}

    @routes.route("/", defaults={"path": ""}, methods=INVOKE_METHODS)
    @routes.route("/<path:path>", methods=INVOKE_METHODS)
    def invoke(path: str):
        """Like upstream python3-http, `/` and every other path go to the handler, but ours stay ours."""
        if path.startswith(RESERVED_PREFIXES) or path in RESERVED_PATHS:
            raise NotFound()
        return _handler_response(user_handler(FunctionEvent(), FunctionContext(LLM(runtime))))

    @routes.get("/_/health")
    def health():
        return {"status": "ok"}

    @routes.get("/_/ready")
    def ready():
        if runtime.loaded is None:
            body = {"ready": False, "error": runtime.failure} if runtime.failure else {"ready": False,
                                                                                         "phase": runtime.phase}
            return body, 503
        return {"ready": True, "model": runtime.loaded.name, "cold_start": runtime.loaded.cold_start.as_dict()}

    @routes.get("/metrics")
    def metrics():
        return Response(runtime.metrics.render(), content_type=CONTENT_TYPE)

    return routes
