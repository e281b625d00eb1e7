"""The generation scheduler: one model, many requests, progressing together.

One engine thread owns the model and the KV cache. Waiting requests are admitted into free cache
slots (prefill, one request at a time); every loop iteration then advances all running requests
by one token in a single batched forward. HTTP threads only enqueue requests and read events.

Live migration (runtime/migration/) moves a generation between engines by its tokens. The source
pauses it between two steps, hands it over and detaches it (its slot is freed at once); the
destination stages the tokens into a slot in rounds (prefill without sampling) and resumes by
sampling from the last staged position. These control calls run on the engine thread between steps,
so they never race a forward pass. Sampling depends only on (logits, seed, position), and the decoder
is batch-invariant (runtime/model/llama.py), so a resumed generation continues with the same tokens.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from sllm_faas.runtime.model.llama import LlamaDecoder
from sllm_faas.runtime.model.sampling import SamplingParams, next_token, process_logits, top_logprobs
from sllm_faas.runtime.model.tokenizer import Tokenizer

_ids = itertools.count(1)


class RequestTooLong(ValueError):
    """Prompt plus max_tokens cannot fit in the engine's context."""


class NoFreeSlot(RuntimeError):
    """Every cache slot is taken, so a migrated generation cannot be staged here now."""


class EngineStopped(RuntimeError):
    """The engine thread has stopped (the process is exiting, or the instance released its model)."""


@dataclass
class Generation:
    prompt_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text emitted so far
    finish_reason: str | None = None
    error: str | None = None
    events: queue.Queue = field(default_factory=queue.Queue)  # ("delta", str) | ("done", reason) | ("error", msg)
    submitted_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # admitted into a cache slot (queue time = scheduled_at - submitted_at)
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token sampled here was accepted
    finished_at: float | None = None
    slot: int | None = None
    cancelled: bool = False
    request_id: str | None = None  # the id its client sees (the OpenAI response id), set by the server
    # waiting | running | paused (handing over) | staged (a migration's destination, not sampling yet)
    # | detached (handed over: its tokens now come from another instance) | finished
    state: str = "waiting"
    cached: int = 0  # context positions already in its KV cache slot
    held_logits: torch.Tensor | None = None  # staged: the logits after its last token, sampled on resume
    counted: bool = True  # reported to on_finish; a staged generation is another instance's request
    # with params.logprobs: one (logprob, [(token, logprob)...]) per output token; None for a token staged
    # here by a migration (its logprobs are on the source); with echo_logprobs the prompt's, None first
    logprobs: list | None = None
    prompt_logprobs: list | None = None

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = [None] * len(self.output_ids)

    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def add_tokens(self, tokens: list[int], logprobs: list | None = None) -> None:
        """Append tokens generated elsewhere (a migration's other side), keeping `logprobs` aligned."""
        if self.logprobs is not None:
            self.logprobs.extend(logprobs if logprobs is not None else [None] * len(tokens))
        self.output_ids.extend(tokens)

    def end(self, reason: str, error: str | None = None) -> None:
        """Mark it finished and tell its reader; `reason` is the OpenAI finish_reason."""
        self.finish_reason, self.error, self.state = reason, error, "finished"
        self.finished_at = time.monotonic()
        self.events.put(("error", error) if error else ("done", reason))

    def stream(self):
        """Yield text deltas until the generation ends; raises RuntimeError if the engine failed it."""
        while True:
            kind, value = self.events.get()
            if kind == "delta":
                yield value
            elif kind == "error":
                raise RuntimeError(value)
            else:
                return

    def wait(self) -> str:
        for _ in self.stream():
            pass
        return self.text


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class Engine:
    def __init__(self, model: LlamaDecoder, tokenizer: Tokenizer, *, max_batch: int = 8, max_seq: int = 2048,
                 on_finish: Callable[[Generation], None] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_seq = max_batch, min(max_seq, model.config.max_position_embeddings)
        self.cache = model.new_cache(max_batch, self.max_seq)  # a KVCache, or the fallback's per-slot caches
        self.on_finish = on_finish
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: dict[int, Generation] = {}  # slot -> generation
        self._commands: list[tuple[Callable[[], Any], Future]] = []  # control calls for the engine thread
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sllm-engine", daemon=True)

    # -- called from HTTP threads -------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        atexit.register(self.stop)  # join the engine thread before the interpreter tears torch down
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _check_fits(self, prompt_tokens: int, params: SamplingParams) -> None:
        if prompt_tokens + params.max_tokens > self.max_seq:
            raise RequestTooLong(f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"context of {self.max_seq} tokens")

    def submit(self, prompt_ids: list[int], params: SamplingParams, events: Any = None) -> Generation:
        """Queue a generation; `events` (anything with put/get) lets one reader follow several (n > 1)."""
        if not prompt_ids:
            raise RequestTooLong("the prompt is empty")
        self._check_fits(len(prompt_ids), params)
        generation = Generation(list(prompt_ids), params, **({"events": events} if events is not None else {}))
        with self._wake:
            if self._stopping:
                raise EngineStopped("the engine has stopped")
            self._waiting.append(generation)
            self._wake.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        generation.cancelled = True  # the engine thread frees its slot at the next step
        with self._wake:
            self._wake.notify()  # a paused or staged generation is in no step: wake the loop to free it

    def generations(self) -> list[Generation]:
        """The waiting and slotted generations, oldest first."""
        with self._wake:
            return list(self._waiting) + sorted(self._running.values(), key=lambda g: g.id)

    # -- migration control: each runs on the engine thread between two steps ----------------------
    def _call(self, command: Callable[[], Any], timeout: float | None = 60.0) -> Any:
        """Run `command` on the engine thread and return its result. On timeout a command that has not
        started is withdrawn (TimeoutError); one that has started is waited for, never abandoned half done."""
        future: Future = Future()
        with self._wake:
            if self._stopping or not self._thread.is_alive():
                raise EngineStopped("the engine has stopped")
            self._commands.append((command, future))
            self._wake.notify()
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise
            return future.result()

    def pause(self, generation: Generation) -> bool:
        """Stop generating `generation` after the current step; False if it finished first."""
        def command() -> bool:
            if generation.finish_reason is not None:
                return False
            if generation.state != "running":
                raise ValueError(f"the request is {generation.state}, not running")
            generation.state = "paused"
            return True
        return self._call(command)

    def unpause(self, generation: Generation) -> None:
        """Go on generating a paused generation (its handover failed): its slot and cache are intact."""
        def command() -> None:
            if generation.state == "paused":
                generation.state = "running"
        self._call(command)

    def detach(self, generation: Generation) -> None:
        """Free a paused generation's slot: it was handed over and now lives on elsewhere."""
        def command() -> None:
            if generation.slot is not None and self._running.get(generation.slot) is generation:
                del self._running[generation.slot]
            if generation.finish_reason is None:  # a request cancelled while paused stays finished
                generation.slot, generation.state, generation.cached = None, "detached", 0
        self._call(command)

    def restore(self, generation: Generation) -> None:
        """Take a detached generation back (its destination failed): queue it first; admission prefills its
        prompt and output so far, and decoding goes on from there."""
        def command() -> None:
            if generation.state != "detached":
                raise ValueError(f"the request is {generation.state}, not detached")
            generation.state = "waiting"
            with self._wake:
                self._waiting.appendleft(generation)
        self._call(command)

    def stage(self, prompt_ids: list[int], output_ids: list[int], params: SamplingParams) -> Generation:
        """Take another instance's generation into a free slot now and prefill its tokens, without
        sampling; NoFreeSlot if every slot is busy."""
        if not prompt_ids:
            raise RequestTooLong("the prompt is empty")
        self._check_fits(len(prompt_ids), params)
        if len(output_ids) >= params.max_tokens:
            raise RequestTooLong(f"{len(output_ids)} tokens generated already reach max_tokens ({params.max_tokens})")
        generation = Generation(list(prompt_ids), params, output_ids=list(output_ids), state="staged", counted=False)

        def command() -> Generation:
            free = [s for s in range(self.max_batch) if s not in self._running]
            if not free:
                raise NoFreeSlot(f"all {self.max_batch} slots are busy")
            generation.slot = free[0]
            self._running[generation.slot] = generation
            try:
                self._prefill(generation)
            except Exception:
                del self._running[generation.slot]
                raise
            return generation
        return self._call(command)

    def extend(self, generation: Generation, tokens: list[int]) -> None:
        """Append tokens the source generated since the last round to a staged generation and prefill them."""
        def command() -> None:
            if generation.state != "staged":
                raise ValueError(f"the request is {generation.state}, not staged")
            if len(generation.output_ids) + len(tokens) >= generation.params.max_tokens:
                raise RequestTooLong("the tokens sent reach max_tokens: the request is complete")
            generation.add_tokens(tokens)
            self._prefill(generation)
        self._call(command)

    def resume(self, generation: Generation, tokens: list[int], text: str) -> None:
        """Take over a staged generation: prefill the final tokens, adopt the text its client has seen, and
        sample the next token exactly where the source stopped."""
        def command() -> None:
            if generation.state != "staged":
                raise ValueError(f"the request is {generation.state}, not staged")
            if tokens:
                generation.add_tokens(tokens)
                self._prefill(generation)
            generation.text, generation.state = text, "running"
            logits, generation.held_logits = generation.held_logits, None
            self._accept(generation, logits)
        self._call(command)

    @property
    def vocab_size(self) -> int:
        """The model's logits width: every token id a prompt or logit_bias may name."""
        return self.model.config.vocab_size

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def tokens_in_flight(self) -> int:
        """Prompt + output tokens of the running requests: what a migration would have to recompute."""
        return sum(len(g.prompt_ids) + len(g.output_ids) for g in list(self._running.values()))

    def warm_up(self) -> None:
        """One real forward pass before reporting ready, so the first request pays no lazy init (a decode
        step of one sequence runs the same operations as this one-token prefill)."""
        self.submit(self.tokenizer.encode("Hello") or [0], SamplingParams(max_tokens=1, temperature=0)).wait()

    # -- the engine thread --------------------------------------------------------------------
    def _needs_step(self) -> bool:
        return any(g.state == "running" or g.cancelled for g in self._running.values())

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._commands and not self._needs_step():
                    self._wake.wait()
                commands, self._commands = self._commands, []
                if self._stopping:
                    for _, future in commands:
                        future.set_exception(EngineStopped("the engine has stopped"))
                    return
            for command, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(command())
                    except Exception as exc:  # the caller gets it; the engine goes on
                        future.set_exception(exc)
            with self._wake:
                admitted = []
                free = [s for s in range(self.max_batch) if s not in self._running]
                while self._waiting and free:
                    generation = self._waiting.popleft()
                    generation.slot, generation.state = free.pop(0), "running"
                    generation.scheduled_at = time.monotonic()
                    self._running[generation.slot] = generation
                    admitted.append(generation)
            try:
                for generation in admitted:
                    if generation.cancelled:
                        self._finish(generation, "cancelled")
                    else:
                        self._isolated(generation, self._prefill, generation)
                self._drop_finished()
                if self._needs_step():
                    self._decode_step()
                    self._drop_finished()
            except Exception as exc:  # a failed batched forward fails its requests, never the process
                for generation in list(self._running.values()):
                    self._finish(generation, None, error=f"generation failed: {exc}")
                self._drop_finished()

    def _isolated(self, generation: Generation, work: Callable[..., None], *args: Any) -> None:
        """Run one request's own work (its prefill, sampling its token, emitting its text); a failure there
        fails that request alone (its client gets an error), never its batch-mates."""
        try:
            work(*args)
        except Exception as exc:
            self._finish(generation, None, error=f"generation failed: {type(exc).__name__}: {exc}")

    def _prefill(self, generation: Generation) -> None:
        """Run the context positions not yet in the slot's cache (a new prompt, a restored or staged
        generation's tokens) and sample the next token, or hold the logits while staged."""
        fresh = generation.context()[generation.cached:]
        tokens = torch.tensor([fresh])
        positions = torch.arange(generation.cached, generation.cached + len(fresh))[None]
        echo = generation.params.echo_logprobs and generation.prompt_logprobs is None and generation.cached == 0 \
            and generation.state != "staged"  # a migration's destination: the source has them
        logits = self.model(tokens, positions, self.cache, torch.tensor([generation.slot]), last_only=not echo)
        generation.cached += len(fresh)
        if echo:  # position i predicts prompt token i + 1; the first token has no logprob
            generation.prompt_logprobs = [None] + top_logprobs(logits[0, :len(generation.prompt_ids) - 1],
                                                               tokens[0, 1:len(generation.prompt_ids)],
                                                               generation.params.logprobs or 0)
        if generation.state == "staged":
            generation.held_logits = logits[0, -1]
        elif generation.params.max_tokens == 0:  # echo only: the prompt's logprobs are the answer
            generation.first_token_at = time.monotonic()
            self._finish(generation, "length")
        else:
            self._accept(generation, logits[0, -1])

    def _decode_step(self) -> None:
        for generation in list(self._running.values()):
            if generation.cancelled:
                self._finish(generation, "cancelled")
        batch = [g for g in self._running.values() if g.state == "running"]
        if not batch:
            return
        tokens = torch.tensor([[g.output_ids[-1]] for g in batch])
        positions = torch.tensor([[len(g.prompt_ids) + len(g.output_ids) - 1] for g in batch])
        logits = self.model(tokens, positions, self.cache, torch.tensor([g.slot for g in batch]))
        for row, generation in enumerate(batch):
            generation.cached = int(positions[row, 0]) + 1
            self._isolated(generation, self._accept, generation, logits[row, -1])

    def _accept(self, generation: Generation, logits: torch.Tensor) -> None:
        params = generation.params
        eos = () if params.ignore_eos else sorted(self.tokenizer.eos_token_ids)
        processed = process_logits(logits, params, generation.prompt_ids, generation.output_ids, eos)
        token = next_token(processed, params, len(generation.output_ids))
        now = time.monotonic()
        generation.first_token_at = generation.first_token_at or now
        if token in eos:
            return self._finish(generation, "stop")
        if generation.logprobs is not None:
            generation.logprobs.extend(top_logprobs(logits[None], torch.tensor([token]), params.logprobs))
        generation.output_ids.append(token)
        generation.token_times.append(now)
        if self._emit_text(generation):
            return self._finish(generation, "stop")
        if len(generation.output_ids) >= generation.params.max_tokens or \
                len(generation.prompt_ids) + len(generation.output_ids) >= self.max_seq:
            self._finish(generation, "length")

    def _emit_text(self, generation: Generation, final: bool = False) -> bool:
        """Send the newly decoded text; True when a stop string was reached."""
        full = self.tokenizer.decode(generation.output_ids)
        if full.endswith("\ufffd") and not final:
            return False  # an incomplete UTF-8 sequence: wait for the next token
        stops = generation.params.stop
        cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            ready = full[:cut]
        elif final:
            ready = full
        else:
            ready = full[:len(full) - _held_back(full, stops)]
        if ready.startswith(generation.text) and len(ready) > len(generation.text):
            generation.events.put(("delta", ready[len(generation.text):]))
            generation.text = ready
        return cut >= 0

    def _finish(self, generation: Generation, reason: str | None, error: str | None = None) -> None:
        if generation.finish_reason is not None:
            return
        if error is None:
            self._emit_text(generation, final=True)  # flush text held back for a stop string that never came
        generation.end(reason or "error", error)
        if self.on_finish and generation.counted:
            self.on_finish(generation)

    def _drop_finished(self) -> None:
        for slot in [s for s, g in self._running.items() if g.finish_reason is not None]:
            del self._running[slot]
