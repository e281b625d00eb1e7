"""The source's side of a migration: rounds of tokens, the pause, the handover, then the relay.

One thread per migration. Until the handover the request never stops generating here except during
the pause, so any failure of the destination (an error, a death, a timeout) leaves it where it was:
the source unpauses it and tells the destination to drop its copy. After the handover the source
relays the destination's tokens to its client; if the destination fails then, the source takes the
request back and recomputes it from the tokens relayed so far (generation is deterministic, so the
client sees the same continuation), unless it has released its model, in which case the client gets
an error and the incident is recorded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import requests

from sllm_faas.runtime.migration import faults
from sllm_faas.runtime.migration.host import Host
from sllm_faas.runtime.migration.protocol import (
    PREFIX,
    MigrateOptions,
    auth_headers,
    error_text,
    numerics,
    params_to_json,
)
from sllm_faas.runtime.migration.state import Migrations, MigrationStatus
from sllm_faas.runtime.model.engine import EngineStopped, Generation

log = logging.getLogger("sllm.migration")
CONNECT_TIMEOUT_S = 3.0


class KeepIt(Exception):
    """The request stays on the source; `outcome` says why (docs/MIGRATION.md, outcomes)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.message = outcome, message


class SourceMigration(MigrationStatus):
    def __init__(self, migration_id: str, generation: Generation, options: MigrateOptions, host: Host,
                 migrations: Migrations) -> None:
        super().__init__(migration_id, "source", generation.request_id, options.destination, "transferring")
        self.generation, self.options, self.host, self.migrations = generation, options, host, migrations
        self.sent = 0  # context tokens the destination holds
        self.paused_at: float | None = None
        self._abort = threading.Event()

    def start(self) -> SourceMigration:
        threading.Thread(target=self._run, name=f"sllm-migrate-{self.id}", daemon=True).start()
        return self

    def abort(self) -> bool:
        """Stop before the handover (the request stays here); False once the pause has begun."""
        if self.state != "transferring":
            return False
        self._abort.set()
        return True

    def _url(self, action: str = "") -> str:
        return f"{self.options.destination}{PREFIX}/{self.id}{action}"

    def _run(self) -> None:
        with requests.Session() as session:
            session.headers.update(auth_headers())
            try:
                response, lines = self._hand_over(session)
            except KeepIt as kept:
                self._keep(session, kept)
                return
            except Exception as exc:  # a bug must not leave the request paused
                log.exception("migration %s failed before the handover", self.id)
                self._keep(session, KeepIt("internal_error", f"{type(exc).__name__}: {exc}"))
                return
            self._relay(response, lines)

    # -- before the handover ----------------------------------------------------------------
    def _hand_over(self, session: requests.Session) -> tuple[requests.Response, Iterator[str]]:
        """Rounds, pause, commit; returns the destination's continuation stream once it has resumed."""
        engine, name = self.host.engine, self.host.model_name
        generation = self.generation
        context = generation.context()
        reply = self._send(session, {"start": 0, "tokens": context, "prompt_tokens": len(generation.prompt_ids),
                                     "params": params_to_json(generation.params), "model": name,
                                     "numerics": numerics(engine), "request": generation.request_id})
        self.same_numerics = reply.get("same_numerics")
        while True:
            self._check_live()
            context = generation.context()
            if len(context) - self.sent < self.options.threshold or self.rounds >= self.options.max_rounds:
                break
            self._send(session, {"start": self.sent, "tokens": context[self.sent:]})
        if not engine.pause(generation):
            raise KeepIt("finished_first", "the request finished before the handover")
        self.paused_at = time.monotonic()
        final = generation.context()[self.sent:]
        self.move("paused", f"{len(final)} tokens left to send")
        faults.inject("source.paused")
        response, lines = self._commit(session, final)
        self.rounds += 1
        self.tokens_recomputed += len(final)
        self.sent += len(final)
        engine.detach(generation)  # the handover: the slot and its cache are free from here on
        self.duration_s = time.monotonic() - self.started
        self.move("relaying", f"handed over at token {self.sent}")
        if self.options.release:
            self.host.release_model(f"handed its requests over to {self.options.destination}")
        return response, lines

    def _commit(self, session: requests.Session, final: list[int]) -> tuple[requests.Response, Iterator[str]]:
        """Send the last tokens and the text the client has seen; wait for the destination's `resumed`."""
        try:
            response = session.post(self._url("/commit"), json={"start": self.sent, "tokens": final,
                                                                 "text": self.generation.text},
                                    stream=True, timeout=(CONNECT_TIMEOUT_S, self.options.handover_timeout_s))
        except requests.Timeout as exc:
            raise KeepIt("destination_timeout", f"commit: {exc}") from None
        except requests.RequestException as exc:
            raise KeepIt("destination_failed", f"commit: {exc}") from None
        if response.status_code != 200:
            response.close()
            raise KeepIt("destination_refused", f"commit: HTTP {response.status_code}: {error_text(response)}")
        lines = response.iter_lines(chunk_size=None, decode_unicode=True)
        try:
            first = json.loads(next(line for line in lines if line))
        except (requests.RequestException, StopIteration, ValueError) as exc:
            response.close()
            outcome = "destination_timeout" if "timed out" in str(exc).lower() else "destination_failed"
            raise KeepIt(outcome, f"commit: no resume from the destination: {exc or 'the stream ended'}") from None
        if first.get("event") != "resumed":
            response.close()
            raise KeepIt("destination_failed", f"commit: {first.get('message') or first}")
        return response, lines

    def _send(self, session: requests.Session, body: dict) -> dict:
        """One round: the destination prefills `body['tokens']` while this instance keeps generating."""
        try:
            response = session.post(self._url("/tokens"), json=body,
                                    timeout=(CONNECT_TIMEOUT_S, self.options.timeout_s))
        except requests.Timeout as exc:
            raise KeepIt("destination_timeout", f"round {self.rounds + 1}: {exc}") from None
        except requests.RequestException as exc:
            raise KeepIt("destination_failed", f"round {self.rounds + 1}: {exc}") from None
        if response.status_code != 200:
            raise KeepIt("destination_refused",
                         f"round {self.rounds + 1}: HTTP {response.status_code}: {error_text(response)}")
        self.rounds += 1
        self.tokens_recomputed += len(body["tokens"])
        self.sent = body["start"] + len(body["tokens"])
        self.move("transferring", f"round {self.rounds}: {len(body['tokens'])} tokens")
        return response.json()

    def _check_live(self) -> None:
        if self._abort.is_set():
            raise KeepIt("aborted", "aborted on request")
        if self.generation.cancelled:
            raise KeepIt("cancelled", "the client went away")
        if self.generation.finish_reason is not None:
            raise KeepIt("finished_first", "the request finished before the handover")

    def _keep(self, session: requests.Session, kept: KeepIt) -> None:
        """The request stays here: generate on, and have the destination drop what it staged."""
        engine = self.host.engine
        if engine is not None and self.generation.state == "paused":
            engine.unpause(self.generation)
        if self.paused_at is not None:
            self.pause_s = time.monotonic() - self.paused_at
        try:
            session.delete(self._url(), timeout=(1.0, 1.0))
        except requests.RequestException:  # the destination may well be dead: it drops idle staged requests itself
            pass
        self.migrations.end(self, "aborted", kept.outcome, kept.message)

    # -- after the handover ------------------------------------------------------------------
    def _relay(self, response: requests.Response, lines: Iterator[str]) -> None:
        """Feed the destination's tokens and text to the request's own client, as if generated here."""
        generation = self.generation
        try:
            for line in lines:
                if generation.cancelled:  # our client went away: so does the destination's copy
                    self._drop_destination(response)
                    generation.end("cancelled")
                    self.migrations.end(self, "completed", "handed_over", "the client went away")
                    return
                if not line:
                    continue
                event = json.loads(line)
                kind, tokens = event.get("event"), event.get("tokens") or []
                if self.pause_s is None and (tokens or kind == "done"):  # the first token from the destination
                    self.pause_s = time.monotonic() - self.paused_at
                logprobs = event.get("logprobs")
                generation.add_tokens(tokens, logprobs if isinstance(logprobs, list) and
                                      len(logprobs) == len(tokens) else None)
                if kind == "delta" and event.get("text"):
                    generation.text += event["text"]
                    generation.events.put(("delta", event["text"]))
                elif kind == "done":
                    generation.end(event.get("finish_reason") or "stop")
                    self.migrations.end(self, "completed", "handed_over")
                    return
                elif kind == "error":
                    raise RuntimeError(event.get("message") or "the destination failed the request")
            raise RuntimeError("the destination's stream ended without a finish")
        except (requests.RequestException, ValueError, RuntimeError) as exc:
            self._drop_destination(response)
            self._take_back(str(exc))
        finally:
            response.close()

    def _drop_destination(self, response: requests.Response) -> None:
        """Say so before hanging up, so the destination stops its copy without taking us for dead."""
        try:
            requests.delete(self._url(), headers=auth_headers(), timeout=(1.0, 1.0))
        except requests.RequestException:  # a dead destination has nothing to drop
            pass
        response.close()

    def _take_back(self, reason: str) -> None:
        generation, engine = self.generation, self.host.engine
        try:
            if engine is None:
                raise EngineStopped("this instance released its model")
            engine.restore(generation)
        except (EngineStopped, ValueError) as exc:
            detail = f"the destination failed after the handover ({reason}) and the source cannot go on: {exc}"
            generation.end("error", f"migration {self.id}: {detail}")
            self.migrations.incident(self, "destination_lost", detail)
            self.migrations.end(self, "failed", "destination_lost", detail)
            return
        detail = (f"the destination failed after the handover ({reason}); the source took the request back at "
                  f"token {len(generation.output_ids)}")
        self.migrations.incident(self, "destination_lost_recovered", detail)
        self.migrations.end(self, "recovered", "destination_lost", detail)

