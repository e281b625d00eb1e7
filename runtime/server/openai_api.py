"""OpenAI-compatible request validation and response shapes (completions and chat completions).

Every request field is either implemented, in the documented allow-list of harmless ones (IGNORED), or a
400 naming it: nothing a client asks for is silently dropped.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sllm_faas.common.errors import ApiError, openai_body
from sllm_faas.runtime.model.params import SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI's top_logprobs limit too
MAX_N = 16
# choices (prompts x n) in one request: each takes an engine slot or waits for one, so an unbounded batch
# would queue thousands of generations behind one request body of a few kilobytes
MAX_CHOICES = 64
ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}
# accepted and without effect on a single small engine: who the user is, storage and tier hints, how many
# tool calls may run in parallel (none are parsed)
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
                   "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                   # vLLM's extensions
                   "ignore_eos", "top_k", "min_p", "repetition_penalty", "min_tokens"}
CHAT_FIELDS = SAMPLING_FIELDS | IGNORED | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                           "response_format", "chat_template_kwargs", "add_generation_prompt",
                                           "documents"}
COMPLETION_FIELDS = SAMPLING_FIELDS | IGNORED | {"prompt", "echo", "best_of", "suffix"}
TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt"}
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: vLLM reports a masked token's logprob as this


def check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(map(repr, unknown))}", unknown[0],
                       "unsupported_parameter")


@dataclass
class ParsedRequest:
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number between {low} and {high}, not {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer between {low} and {high}, not {value!r}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, not {value!r}", name)
    return value


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    parsed = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id below {vocab_size}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' value {value!r} for token {key} must be between -100 and 100",
                           "logit_bias")
        parsed[int(key)] = float(value)
    return parsed


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs: k`; completions: `logprobs: k`."""
    if not chat:
        return _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    if not _flag(body, "logprobs"):
        if body.get("top_logprobs") is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)


def parse_sampling(body: dict, max_tokens_limit: int, default_max_tokens: int, vocab_size: int, chat: bool,
                   echo: bool = False) -> ParsedRequest:
    n = _integer(body, "n", 1, 1, MAX_N)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    given = max_tokens is not None
    if not given:
        max_tokens = default_max_tokens
    low = 0 if echo else 1  # echo with max_tokens 0 scores the prompt only (lm-evaluation-harness)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not low <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"'{key}' must be an integer between {low} and {max_tokens_limit}, not {max_tokens!r}",
                       key)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings",
                       "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' must be an object with 'include_usage'", "stream_options")
    top_k = _integer(body, "top_k", 0, -1, 2**31 - 1)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=stop, ignore_eos=_flag(body, "ignore_eos"),
        top_k=max(top_k, 0), min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 1e9),
        min_tokens=_integer(body, "min_tokens", 0, 0, max_tokens), logit_bias=_logit_bias(body, vocab_size),
        logprobs=_logprobs(body, chat), echo_logprobs=echo)
    if params.top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    if params.repetition_penalty == 0:
        raise ApiError(400, "'repetition_penalty' must be greater than 0", "repetition_penalty")
    params.echo_logprobs = echo and params.logprobs is not None
    return ParsedRequest(params, n, _flag(body, "stream"), bool(options.get("include_usage")), given)


def parse_prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    """A string, a list of token ids, or a batch of either: one entry per prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt, vocab_size):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p, vocab_size) for p in prompt):
        return prompt
    raise ApiError(400, f"'prompt' must be a string, a list of token ids below {vocab_size}, or a non-empty list of "
                        "either", "prompt")


def _token_ids(value: Any, vocab_size: int) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in value)


def parse_messages(body: dict) -> list[dict[str, Any]]:
    """The messages as the chat template sees them: text content (parts joined), assistant tool calls, tool
    results with their call id."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a 'role' of {', '.join(ROLES)}", where)
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise ApiError(400, f"{where}: unsupported field(s) {', '.join(map(repr, unknown))}",
                           f"{where}.{unknown[0]}")
        role, content = message["role"], message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
            raise ApiError(400, f"{where}.tool_calls must be a list of {{'function': ...}} objects on an assistant "
                           "message", f"{where}.tool_calls")
        if not isinstance(content, str) and not (content is None and calls):
            raise ApiError(400, f"{where}.content must be a string (null only beside tool_calls)", f"{where}.content")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ApiError(400, f"{where}: a tool message needs a string 'tool_call_id'", f"{where}.tool_call_id")
        for name in ("name", "tool_call_id", "reasoning_content"):
            if message.get(name) is not None and not isinstance(message[name], str):
                raise ApiError(400, f"{where}.{name} must be a string", f"{where}.{name}")
        parsed.append({**message, "content": content})
    return parsed


def parse_template_options(body: dict, uses: Callable[[str], bool]) -> dict[str, Any]:
    """The chat template's inputs besides the messages; `uses(name)` says whether the template reads a variable.

    Tools are rendered when the template knows them; the reply is the raw text (tool calls are not parsed), so
    a request that needs a parsed call (tool_choice 'required' or a named function) is refused."""
    options: dict[str, Any] = {"add_generation_prompt": True}
    if body.get("add_generation_prompt") is not None:
        options["add_generation_prompt"] = _flag(body, "add_generation_prompt")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" and
                                                  isinstance(t.get("function"), dict) for t in tools):
            raise ApiError(400, "'tools' must be a list of {'type': 'function', 'function': {...}}", "tools")
        if not uses("tools"):
            raise ApiError(400, "this model's chat template does not support 'tools'", "tools")
        options["tools"] = tools or None
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise ApiError(400, f"'tool_choice' {json.dumps(choice)[:80]} is not supported: tool calls are not parsed "
                            "(only 'auto' and 'none')", "tool_choice")
    documents = body.get("documents")
    if documents is not None:
        if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
            raise ApiError(400, "'documents' must be a list of objects", "documents")
        if not uses("documents"):
            raise ApiError(400, "this model's chat template does not support 'documents'", "documents")
        options["documents"] = documents
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "only 'response_format' {'type': 'text'} is supported", "response_format")
    extra = body.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict) or TEMPLATE_RESERVED & set(extra):
        raise ApiError(400, f"'chat_template_kwargs' must be an object without {sorted(TEMPLATE_RESERVED)}",
                       "chat_template_kwargs")
    return {**extra, **options}


def check_completion_options(body: dict) -> bool:
    """The completion-only fields; returns echo."""
    n = _integer(body, "n", 1, 1, MAX_N)
    if body.get("suffix"):
        raise ApiError(400, "'suffix' is not supported (no fill-in-the-middle)", "suffix")
    if body.get("best_of") not in (None, n):
        raise ApiError(400, f"'best_of' must equal n ({n}): ranking candidates is not supported", "best_of")
    return _flag(body, "echo")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Logprobs:
    """Formats (logprob, [(token, logprob)...]) entries in the shape of the endpoint: chat's `content` list, or
    completions' parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists."""

    def __init__(self, token_text: Callable[[int], str], chat: bool) -> None:
        self.token_text, self.chat = token_text, chat

    def format(self, tokens: list[int], entries: list, offset: int = 0) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(token, *entry) for token, entry in zip(tokens, entries, strict=True)]}
        texts = [self.token_text(t) for t in tokens]
        offsets = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [None if e is None else _floor(e[0]) for e in entries],
                "top_logprobs": [None if e is None else {self.token_text(t): _floor(lp) for t, lp in e[1]}
                                 for e in entries], "text_offset": offsets}

    def _chat_entry(self, token: int, logprob: float, top: list) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode()),
                "top_logprobs": [{"token": self.token_text(t), "logprob": _floor(lp),
                                  "bytes": list(self.token_text(t).encode())} for t, lp in top]}


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class ResponseShape:
    """Builds one request's responses; `chat` picks chat.completion vs text_completion objects."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, choices: list[tuple[str, str, dict | None]], prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
        """`choices`: (text, finish_reason, logprobs) in index order."""
        if self.chat:
            body = self._envelope("chat.completion", [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                 "logprobs": logprobs} for i, (text, reason, logprobs) in enumerate(choices)])
        else:
            body = self._envelope("text_completion", [
                {"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}
                for i, (text, reason, logprobs) in enumerate(choices)])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, first: bool = False,
              logprobs: dict | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return self._envelope("chat.completion.chunk", [{"index": index, "delta": delta,
                                                             "finish_reason": finish_reason, "logprobs": logprobs}])
        return self._envelope("text_completion", [{"index": index, "text": text or "", "finish_reason": finish_reason,
                                                   "logprobs": logprobs}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body


class ChoiceEvents:
    """A generation's event queue that tags its events with the choice index on one queue shared by all the
    request's choices (n > 1, batched prompts), so one reader follows them in the order they happen."""

    def __init__(self, shared: queue.Queue, index: int) -> None:
        self.shared, self.index = shared, index

    def put(self, item: tuple[str, Any]) -> None:
        self.shared.put((self.index, item))


def follow(shared: queue.Queue, count: int) -> Iterator[tuple[int, str, Any]]:
    """(index, kind, value) events until all `count` choices are done; a failed one raises RuntimeError."""
    remaining = count
    while remaining:
        index, (kind, value) = shared.get()
        if kind == "error":
            raise RuntimeError(value)
        yield index, kind, value
        remaining -= kind == "done"


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sse_error(exc: RuntimeError) -> str:
    return sse(openai_body(ApiError(500, str(exc))))
