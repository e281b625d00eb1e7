"""The migration wire format: JSON bodies checked field by field, and NDJSON for the continuation stream.

Destination endpoints (called by the source):
    POST   /_/migration/<id>/tokens   {"start", "tokens", and on the first round "prompt_tokens", "params",
                                       "model", "numerics"} -> {"position", "prefill_s", ...}
    POST   /_/migration/<id>/commit   {"start", "tokens", "text"} -> NDJSON: resumed, delta..., done | error
Both roles:
    GET    /_/migration/<id>          this instance's status of the migration
    DELETE /_/migration/<id>          abort it (before the handover)
    GET    /_/migration               every migration this instance remembers
Source endpoints (called by the coordinator):
    GET    /_/requests                the in-flight requests, by the id their clients see
    POST   /_/requests/<id>/migrate   {"destination", "migration", "threshold", ...} -> 202, the status

Token ids travel as JSON integers; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllm_faas.common.errors import ApiError

if TYPE_CHECKING:  # importing sampling imports torch: the app registers these routes before torch is loaded
    from sllm_faas.runtime.model.params import SamplingParams

PREFIX = "/_/migration"
MIGRATION_ID = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")  # a DNS label: also a valid Redis-schema id
MAX_TOKEN_ID = 1 << 31


def check_migration_id(value: object) -> str:
    if not isinstance(value, str) or not MIGRATION_ID.fullmatch(value):
        raise ApiError(400, f"migration id {str(value)[:80]!r} must be a DNS label: lowercase letters, digits "
                                 "and '-', at most 63 characters", "migration")
    return value


def require(body: dict, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """body[name] if it has the JSON type `kind` (bools are not numbers), else a 400 naming the field."""
    if name not in body or body[name] is None:
        if default is ...:
            raise ApiError(400, f"'{name}' is required", name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be a {names}", name)
    return value


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = float(require(body, name, (int, float), default))
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}", name)
    return value


def token_list(body: dict, name: str = "tokens", limit: int = 1 << 20) -> list[int]:
    tokens = require(body, name, list)
    if len(tokens) > limit:
        raise ApiError(413, f"'{name}' has {len(tokens)} tokens; the limit is {limit}", name)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < MAX_TOKEN_ID for t in tokens):
        raise ApiError(400, f"'{name}' must be a list of token ids (non-negative integers)", name)
    return tokens


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    """Every field the destination's sampling depends on; the penalties' token counts travel as the tokens."""
    return {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "seed": params.seed, "stop": list(params.stop), "ignore_eos": params.ignore_eos, "top_k": params.top_k,
            "min_p": params.min_p, "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty, "repetition_penalty": params.repetition_penalty,
            "min_tokens": params.min_tokens, "logit_bias": {str(k): v for k, v in params.logit_bias.items()},
            "logprobs": params.logprobs}


def params_from_json(raw: object) -> SamplingParams:
    """The sampling state of the request: with its seed, the destination draws the very same tokens."""
    from sllm_faas.runtime.model.params import SamplingParams

    if not isinstance(raw, dict):
        raise ApiError(400, "'params' must be an object", "params")
    max_tokens = require(raw, "max_tokens", int)
    seed = require(raw, "seed", int)
    stop = require(raw, "stop", list, [])
    if max_tokens < 1 or not 0 <= seed < 2**63:
        raise ApiError(400, "'params.max_tokens' must be >= 1 and 'params.seed' in [0, 2**63)", "params")
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'params.stop' must be a list of non-empty strings", "params.stop")
    bias = require(raw, "logit_bias", dict, {})
    if not all(k.isascii() and k.isdigit() and int(k) < MAX_TOKEN_ID and isinstance(v, int | float)
               and not isinstance(v, bool) and -100 <= v <= 100 for k, v in bias.items()):
        raise ApiError(400, "'params.logit_bias' must map token ids to numbers in [-100, 100]",
                            "params.logit_bias")
    top_k, min_tokens = require(raw, "top_k", int, 0), require(raw, "min_tokens", int, 0)
    logprobs = require(raw, "logprobs", int, None)
    if top_k < 0 or min_tokens < 0 or logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(400, "'params.top_k' and 'params.min_tokens' must be >= 0, 'params.logprobs' in [0, 20]",
                            "params")
    return SamplingParams(max_tokens=max_tokens, temperature=number(raw, "temperature", 1.0, 0.0, 2.0),
                          top_p=number(raw, "top_p", 1.0, 1e-9, 1.0), seed=seed, stop=stop,
                          ignore_eos=require(raw, "ignore_eos", bool, False), top_k=top_k,
                          min_p=number(raw, "min_p", 0.0, 0.0, 1.0),
                          presence_penalty=number(raw, "presence_penalty", 0.0, -2.0, 2.0),
                          frequency_penalty=number(raw, "frequency_penalty", 0.0, -2.0, 2.0),
                          repetition_penalty=number(raw, "repetition_penalty", 1.0, 1e-9, 1e9),
                          min_tokens=min_tokens, logit_bias={int(k): float(v) for k, v in bias.items()},
                          logprobs=logprobs)


@dataclass(frozen=True)
class MigrateOptions:
    """How the source runs one migration; every field has a default (docs/MIGRATION.md)."""

    destination: str
    threshold: int = 20              # pause and hand over once fewer new tokens than this remain to send
    max_rounds: int = 8              # hand over after this many rounds even if the destination lags behind
    timeout_s: float = 30.0          # longest wait for a round's prefill, or between two relayed events
    handover_timeout_s: float = 5.0  # longest pause: commit -> the destination's "resumed"
    release: bool = False            # release the model once no request is left on the source

    @classmethod
    def from_json(cls, body: dict) -> MigrateOptions:
        destination = require(body, "destination", str)
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", destination):
            raise ApiError(400, "'destination' must be an http(s) base URL such as http://10.0.0.7:8080",
                                "destination")
        threshold = require(body, "threshold", int, cls.threshold)
        max_rounds = require(body, "max_rounds", int, cls.max_rounds)
        if threshold < 1 or max_rounds < 1:
            raise ApiError(400, "'threshold' and 'max_rounds' must be >= 1", "threshold")
        return cls(destination.rstrip("/"), threshold, max_rounds,
                   number(body, "timeout_s", cls.timeout_s, 0.1, 3600.0),
                   number(body, "handover_timeout_s", cls.handover_timeout_s, 0.1, 600.0),
                   require(body, "release", bool, False))

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "threshold": self.threshold, "max_rounds": self.max_rounds,
                "timeout_s": self.timeout_s, "handover_timeout_s": self.handover_timeout_s, "release": self.release}


def auth_headers() -> dict[str, str]:
    """The bearer token the migration endpoints require (SLLM_MIGRATION_TOKEN; without it they refuse, routes.py)."""
    token = os.environ.get("SLLM_MIGRATION_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_text(response) -> str:
    """The message of an error reply (`requests` response), whichever shape it has."""
    try:
        error = response.json().get("error")
    except ValueError:
        return response.text[:200]
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)


def ndjson(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


def numerics(engine) -> dict[str, Any]:
    """What a token's logits depend on besides the model: equal fingerprints on both sides give equal tokens
    (runtime/model/llama.py, batch invariance)."""
    import torch

    weight = engine.model.get_input_embeddings().weight
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(weight.dtype).split(".")[-1],
            "device": weight.device.type, "cpu": torch.backends.cpu.get_cpu_capability()}
