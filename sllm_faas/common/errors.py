"""One error type for every HTTP API of ours, and the one way an app turns exceptions into answers.

`ApiError(status, message, field, code)` is an answer given on purpose: the client's own mistake (4xx, naming
the body field at fault) or a state it must wait out (503, with Retry-After). Each API family renders it in
its one shape:

- `openai_body`, the function runtime (its OpenAI API, its handler's `/` and its migration routes):
  `{"error": {"message", "type", "param", "code"}}`, `param` naming the field;
- `plain_body`, the control plane (placement controller, node loader, local gateway):
  `{"error": message}`, with `"field"` when one field is at fault.

`install(app, family, log)` registers the handlers: `ApiError`, the shared JSON parser's `JsonError` (400/413)
and routing's own errors (404, 405, 413) are answered in the family's shape, and so is any exception type the
app names in `translate`. Everything else is our bug, never the client's: it is logged with its traceback
and a request id and answered 500, the body carrying the same id (`request_id`). The request id is the
client's `X-Request-Id` when it sent a sane one, else a new one; every answer carries it in `X-Request-Id`.

This module depends on nothing else of ours.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sllm_faas.common.jsonbody import JsonError

if TYPE_CHECKING:
    from flask import Flask

REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # a client's id goes into our logs: no spaces, no newlines


class ApiError(Exception):
    """An answer on purpose: `status` (4xx the client's fault, 503 wait and retry), what is wrong, the request
    field at fault, a machine-readable `code`, and extra response headers (Retry-After)."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.code = status, message, field, code
        self.headers = dict(headers or {})


def openai_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's (and vLLM's) error object; `type` follows the status as theirs does."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.code}}


def plain_body(error: ApiError) -> dict[str, Any]:
    return {"error": error.message, **({"field": error.field} if error.field else {})}


@contextmanager
def client_input(field: str | None = None) -> Iterator[None]:
    """Around the check of one value the client sent: the ValueError of its validator is a 400 naming `field`.
    Only there: a ValueError anywhere else is a bug (500)."""
    try:
        yield
    except ValueError as exc:
        raise ApiError(400, str(exc), field) from None


def request_id() -> str:
    """The current request's id (see the module docstring); "-" outside a request."""
    from flask import g, has_request_context

    return g.get("request_id", "-") if has_request_context() else "-"


def install(app: Flask, family: Callable[[ApiError], dict[str, Any]], log: logging.Logger,
            translate: Mapping[type[Exception], Callable[[Any], ApiError]] | None = None) -> None:
    """Register the request id and the error handlers on `app` (call it before the app's own before_request
    hooks, so that they run with the id set). `translate` maps the app's domain exceptions that are answers
    on purpose (a name the client got wrong, a capacity refusal, Redis down) to their ApiError."""
    from flask import g, jsonify, request
    from werkzeug.exceptions import HTTPException

    def answer(error: ApiError, **extra: Any):
        return jsonify({**family(error), **extra}), error.status, error.headers

    @app.before_request
    def name_the_request() -> None:
        sent = request.headers.get("X-Request-Id", "")
        g.request_id = sent if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex

    @app.after_request
    def tell_the_request_id(response):
        response.headers.setdefault("X-Request-Id", request_id())
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return answer(exc)

    @app.errorhandler(JsonError)
    def json_error(exc: JsonError):
        return answer(ApiError(exc.status, exc.message))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        """Routing's own answers (404, 405, 413) in the family's shape; redirects stay redirects."""
        if exc.code is None or exc.code < 400:
            return exc
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}   # a 405's Allow
        return answer(ApiError(exc.code, exc.description or exc.name, headers=headers))

    for kind, convert in (translate or {}).items():
        app.register_error_handler(kind, lambda exc, convert=convert: answer(convert(exc)))

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        """Not an answer on purpose: our bug. Logged with the id the client gets, to find the traceback by."""
        rid = request_id()
        log.exception("internal error, request %s %s %s", rid, request.method, request.path)
        return answer(ApiError(500, f"internal error ({type(exc).__name__}); see the {app.name} log, request {rid}"),
                      request_id=rid)
