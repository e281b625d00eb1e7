"""The generation scheduler: one model, many requests, progressing together.

One engine thread owns the model and the KV cache. Waiting requests are admitted into free cache
slots (prefill, one request at a time); every loop iteration then advances all running requests
by one token in a single batched forward. HTTP threads only enqueue requests and read events.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.model.llama import KVCache, LlamaDecoder
from runtime.model.sampling import SamplingParams, next_token
from runtime.model.tokenizer import Tokenizer

_ids = itertools.count(1)


class RequestTooLong(ValueError):
    """Prompt plus max_tokens cannot fit in the engine's context."""


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
    first_token_at: float | None = None
    finished_at: float | None = None
    slot: int | None = None
    cancelled: bool = False

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
        dtype = model.model.embed_tokens.weight.dtype
        self.cache = KVCache(model.config, max_batch, self.max_seq, dtype, model.model.embed_tokens.weight.device)
        self.on_finish = on_finish
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: dict[int, Generation] = {}  # slot -> generation
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

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if not prompt_ids:
            raise RequestTooLong("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_seq:
            raise RequestTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"context of {self.max_seq} tokens")
        generation = Generation(list(prompt_ids), params)
        with self._wake:
            self._waiting.append(generation)
            self._wake.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        generation.cancelled = True  # the engine thread frees its slot at the next step

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
        """One real forward pass before reporting ready, so the first request pays no lazy init."""
        self.submit(self.tokenizer.encode("Hello") or [0], SamplingParams(max_tokens=2, temperature=0)).wait()

    # -- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = []
                free = [s for s in range(self.max_batch) if s not in self._running]
                while self._waiting and free:
                    generation = self._waiting.popleft()
                    generation.slot = free.pop(0)
                    self._running[generation.slot] = generation
                    admitted.append(generation)
            try:
                for generation in admitted:
                    self._prefill(generation)
                self._drop_finished()
                if self._running:
                    self._decode_step()
                    self._drop_finished()
            except Exception as exc:  # a failed step fails its requests, never the process
                for generation in list(self._running.values()):
                    self._finish(generation, None, error=f"generation failed: {exc}")
                self._drop_finished()

    def _prefill(self, generation: Generation) -> None:
        if generation.cancelled:
            return self._finish(generation, "cancelled")
        tokens = torch.tensor([generation.prompt_ids])
        positions = torch.arange(len(generation.prompt_ids))[None]
        logits = self.model(tokens, positions, self.cache, torch.tensor([generation.slot]))
        self._accept(generation, logits[0, -1])

    def _decode_step(self) -> None:
        batch = [g for g in self._running.values() if g.finish_reason is None]
        for generation in batch:
            if generation.cancelled:
                self._finish(generation, "cancelled")
        batch = [g for g in batch if g.finish_reason is None]
        if not batch:
            return
        tokens = torch.tensor([[g.output_ids[-1]] for g in batch])
        positions = torch.tensor([[len(g.prompt_ids) + len(g.output_ids) - 1] for g in batch])
        logits = self.model(tokens, positions, self.cache, torch.tensor([g.slot for g in batch]))
        for row, generation in enumerate(batch):
            self._accept(generation, logits[row, -1])

    def _accept(self, generation: Generation, logits: torch.Tensor) -> None:
        token = next_token(logits, generation.params, len(generation.output_ids))
        now = time.monotonic()
        generation.first_token_at = generation.first_token_at or now
        if token in self.tokenizer.eos_token_ids and not generation.params.ignore_eos:
            return self._finish(generation, "stop")
        generation.output_ids.append(token)
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
        generation.finish_reason = reason or "error"
        generation.error = error
        generation.finished_at = time.monotonic()
        generation.events.put(("error", error) if error else ("done", generation.finish_reason))
        if self.on_finish:
            self.on_finish(generation)

    def _drop_finished(self) -> None:
        for slot in [s for s, g in self._running.items() if g.finish_reason is not None]:
            del self._running[slot]
