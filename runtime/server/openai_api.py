"""OpenAI-compatible request validation and response shapes (completions and chat completions)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runtime.model.sampling import SamplingParams

MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error returned to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number between {low} and {high}", name)
    return float(value)


def parse_sampling(body: dict, max_tokens_limit: int, default_max_tokens: int) -> ParsedRequest:
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    given = max_tokens is not None
    if not given:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"'{key}' must be an integer between 1 and {max_tokens_limit}", key)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, "'seed' must be a non-negative integer below 2**63", "seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings",
                       "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be a boolean", "ignore_eos")
    params = SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=stop, ignore_eos=ignore_eos)
    if params.top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    return ParsedRequest(params, stream, bool(options.get("include_usage")), given)


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (batched prompts are not supported)", "prompt")
    return prompt


def parse_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a 'role' of {', '.join(ROLES)}", where)
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", f"{where}.content")
        parsed.append({"role": message["role"], "content": content})
    return parsed


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Builds one request's responses; `chat` picks chat.completion vs text_completion objects."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason,
                                                       "logprobs": None}])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta,
                                                             "finish_reason": finish_reason, "logprobs": None}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "finish_reason": finish_reason,
                                                   "logprobs": None}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sse_stream(shape: ResponseShape, deltas: Iterator[str], finish: callable, include_usage: bool,
               counts: callable) -> Iterator[str]:
    """SSE frames: (role chunk), text chunks, the finish chunk, (usage), [DONE]; errors as an error frame."""
    try:
        if shape.chat:
            yield sse(shape.chunk(None, first=True))
        for text in deltas:
            yield sse(shape.chunk(text))
        yield sse(shape.chunk(None, finish()))
        if include_usage:
            yield sse(shape.usage_chunk(*counts()))
    except RuntimeError as exc:
        yield sse(ApiError(500, str(exc), kind="server_error").body())
    yield sse("[DONE]")
