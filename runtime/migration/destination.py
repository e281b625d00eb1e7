"""The destination's side of a migration: stage the tokens in rounds, resume, stream the continuation.

A staged request holds a cache slot but samples nothing until the commit. The commit answers with an
NDJSON stream on the same connection: `resumed` once the final tokens are prefilled and the first
new token sampled, then `delta` events (text and token ids), then `done` or `error`. While the stream
is quiet a keepalive `delta` goes out every second, so a dead source is noticed (the write fails):
the destination then cancels the request and records the incident. A staged request whose source
goes silent for SLLM_MIGRATION_STAGE_TIMEOUT_S (default 60) is dropped.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

from sllm_faas.common.errors import ApiError
from sllm_faas.runtime.migration import faults
from sllm_faas.runtime.migration.host import Host, loaded_engine
from sllm_faas.runtime.migration.protocol import (
    ndjson,
    numerics,
    params_from_json,
    require,
    token_list,
)
from sllm_faas.runtime.migration.state import Migrations, MigrationStatus
from sllm_faas.runtime.model.engine import Engine, EngineStopped, Generation, NoFreeSlot, RequestTooLong

KEEPALIVE_S = 1.0
TOKEN_POLL_S = 0.02  # how soon tokens that produced no text yet are forwarded


class StagedMigration(MigrationStatus):
    def __init__(self, migration_id: str, request: str | None, source: str) -> None:
        super().__init__(migration_id, "destination", request, source, "staged")
        self.generation: Generation | None = None
        self.position = 0  # context tokens staged
        self.handed = 0  # output tokens the source had at the handover: the stream sends the ones after
        self.last_seen = time.monotonic()


class Destination:
    """The destination role of one instance: its handlers and the sweeper of abandoned staged requests."""

    def __init__(self, host: Host, migrations: Migrations) -> None:
        self.host, self.migrations = host, migrations
        self._sweeper: threading.Thread | None = None

    def _engine(self) -> Engine:
        return loaded_engine(self.host)

    def _staged(self, migration_id: str) -> StagedMigration:
        status = self.migrations.get(migration_id)
        if not isinstance(status, StagedMigration):
            raise ApiError(404, f"no migration {migration_id} is staged here", "migration")
        if status.state != "staged":
            raise ApiError(409, f"migration {migration_id} is {status.state}, not staged", "migration")
        return status

    def tokens(self, migration_id: str, body: dict, source: str) -> dict:
        """One round: stage (start 0) or extend the request by `tokens`, prefilling them; no sampling."""
        start = require(body, "start", int)
        tokens = token_list(body)
        if start == 0:
            return self._first_round(migration_id, body, tokens, source)
        status = self._staged(migration_id)
        with status.lock:
            _check_start(status, start)
            faults.inject("destination.round")
            self._prefill(status, lambda: self._engine().extend(status.generation, tokens), len(tokens))
        return self._round_reply(status)

    def _first_round(self, migration_id: str, body: dict, tokens: list[int], source: str) -> dict:
        faults.inject("destination.tokens")
        engine = self._engine()
        model = require(body, "model", str)
        if model != self.host.model_name:
            raise ApiError(409, f"this instance serves {self.host.model_name!r}, not {model!r}", "model")
        prompt_tokens = require(body, "prompt_tokens", int)
        if not 1 <= prompt_tokens <= len(tokens):
            raise ApiError(400, f"'prompt_tokens' must be between 1 and {len(tokens)}", "prompt_tokens")
        params = params_from_json(body.get("params"))
        status = StagedMigration(migration_id, require(body, "request", str, None), source)
        status.same_numerics = require(body, "numerics", dict, None) == numerics(engine)
        if self.migrations.add(status) is not status:
            raise ApiError(409, f"migration {migration_id} exists already", "migration")
        try:
            self._prefill(status, lambda: engine.stage(tokens[:prompt_tokens], tokens[prompt_tokens:], params),
                          len(tokens))
        except ApiError as exc:
            self.migrations.end(status, "aborted", "refused", exc.message)
            raise
        self._start_sweeper()
        return self._round_reply(status)

    def _prefill(self, status: StagedMigration, call: Callable[[], Generation | None], count: int) -> None:
        started = time.monotonic()
        try:
            generation = call()
        except NoFreeSlot as exc:
            raise ApiError(503, f"no free slot: {exc}", code="no_free_slot") from None
        except RequestTooLong as exc:
            raise ApiError(400, str(exc), "tokens") from None
        except (EngineStopped, ValueError) as exc:
            raise ApiError(409, str(exc)) from None
        status.generation = generation or status.generation
        status.prefill_s += time.monotonic() - started
        status.position += count
        status.rounds += 1
        status.tokens_recomputed += count
        status.last_seen = time.monotonic()
        status.move("staged", f"round {status.rounds}: {count} tokens")

    def _round_reply(self, status: StagedMigration) -> dict:
        return {"migration": status.id, "position": status.position, "prefill_s": round(status.prefill_s, 4),
                "same_numerics": status.same_numerics}

    def commit(self, migration_id: str, body: dict) -> Iterator[str]:
        """The handover: prefill the final tokens, adopt the client's text, sample on; returns the stream."""
        status = self._staged(migration_id)
        start, tokens = require(body, "start", int), token_list(body)
        text = require(body, "text", str)
        with status.lock:
            _check_start(status, start)
            faults.inject("destination.commit")
            generation = status.generation
            status.handed = len(generation.output_ids) + len(tokens)
            self._prefill(status, lambda: self._engine().resume(generation, tokens, text), len(tokens))
            status.move("generating", f"resumed at token {status.handed}")
        return self._stream(status)

    def _stream(self, status: StagedMigration) -> Iterator[str]:
        generation, sent = status.generation, status.handed
        last_write, relayed = time.monotonic(), False
        try:
            yield ndjson({"event": "resumed", "position": status.position})
            while True:
                try:
                    kind, value = generation.events.get(timeout=TOKEN_POLL_S)
                except queue.Empty:
                    kind, value = "tick", ""
                tokens = generation.output_ids[sent:]
                logprobs = None if generation.logprobs is None else generation.logprobs[sent:sent + len(tokens)]
                sent += len(tokens)
                if kind == "done":
                    yield ndjson({"event": "done", "finish_reason": value, "tokens": tokens, "logprobs": logprobs})
                    self.migrations.end(status, "completed", "handed_over")
                    return
                if kind == "error":
                    yield ndjson({"event": "error", "message": value, "tokens": tokens, "logprobs": logprobs})
                    self.migrations.end(status, "failed", "generation_failed", value)
                    return
                if kind == "delta" or tokens or time.monotonic() - last_write >= KEEPALIVE_S:
                    yield ndjson({"event": "delta", "text": value, "tokens": tokens, "logprobs": logprobs})
                    last_write = time.monotonic()
                    if relayed:
                        faults.inject("destination.relay")
                    relayed = relayed or bool(tokens)
        finally:
            if not status.finished:  # the source stopped reading: it died, or dropped us (then it said so first)
                self._engine_cancel(generation)
                detail = "the source's connection broke after the handover; the request was stopped here"
                self.migrations.incident(status, "source_lost", detail)
                self.migrations.end(status, "failed", "source_lost", detail)

    def abort(self, status: StagedMigration, reason: str) -> None:
        """Drop a staged or generating copy (the source kept the request, or took it back)."""
        if status.generation is not None:
            self._engine_cancel(status.generation)
        self.migrations.end(status, "aborted", "dropped", reason)

    def _engine_cancel(self, generation: Generation) -> None:
        engine = self.host.engine
        if engine is not None and generation.finish_reason is None:
            engine.cancel(generation)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep, name="sllm-migration-sweeper", daemon=True)
            self._sweeper.start()

    def _sweep(self) -> None:
        """Drop staged requests whose source went silent (it died, or lost its connection to us)."""
        timeout_s = float(os.environ.get("SLLM_MIGRATION_STAGE_TIMEOUT_S", "60"))  # read when used, not at import
        while True:
            time.sleep(min(1.0, timeout_s / 4))
            now = time.monotonic()
            for status in self.migrations.all():
                if isinstance(status, StagedMigration) and status.state == "staged" and \
                        now - status.last_seen > timeout_s:
                    self.abort(status, f"the source sent nothing for {timeout_s:.0f} s")


def _check_start(status: StagedMigration, start: int) -> None:
    """Rounds and the commit must continue exactly where the staged tokens end."""
    if start != status.position:
        raise ApiError(409, f"'start' is {start} but {status.position} tokens are staged", "start")

