"""Continuous batching on the client: one loop steps every active generation request together through
one batched session (`client.batched`), so concurrent requests share each peer's forward and each
message, and the embedding and head run once per step for all of them.

Requests join at any step and leave when they end. Each turn is one step through the peers whose
rows are every decoding sequence's next token and, within `prefill_chunk` tokens, the prompts of
sequences that start (`BlockStack.step_packed` runs them side by side in one forward), so a long
prompt is fed over several turns and does not stall the others' decoding. A sequence's cache is
reserved on every peer before its first row (a step of its own, which a full peer may refuse: the
sequence then waits). Greedy requests take the argmax; sampling uses each request's own `SeededSampler`. When a
peer fails, the loop opens a new session on a new route and starts every active sequence again from
its tokens (prompt and generated so far): no request is lost and no token changes.

It does not tokenize (callers do), and it applies none of transformers' other logits processors
(repetition penalties and the like): `supports(generation_config)` says whether a config needs them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable

import torch

from client.batched import BatchedSession
from client.retries import Retries
from client.sampling import SeededSampler
from swarm import errors, kernels
from swarm.loop_thread import run_coroutine

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 128
IDLE_CLOSE_S = 30.0  # with no request for this long, close the session (peers free its slot)
OVERLOADED_RETRY_S = 0.5  # a sequence that found no cache on a peer tries again after this
# generation-config fields whose logits processors this loop does not apply, with their neutral values
UNSUPPORTED_OPTIONS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False), "guidance_scale": (None, 1.0),
}


def supports(generation_config) -> bool:
    """Whether this loop generates what generate() would under `generation_config` (greedy or seeded sampling)."""
    return all(getattr(generation_config, name, None) in neutral for name, neutral in UNSUPPORTED_OPTIONS.items())


@dataclasses.dataclass
class GenerationRequest:
    input_ids: list[int]  # the prompt
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()  # generation ends after one of these (it is returned)
    sampler: SeededSampler | None = None  # None: greedy
    on_token: Callable[[int], None] | None = None  # called with each new token, on the loop's thread
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: end at the next step


@dataclasses.dataclass
class _Active:
    request: GenerationRequest
    future: concurrent.futures.Future
    slot: int
    tokens: list[int]  # prompt + generated
    started: bool = False  # its slot holds a fresh sequence with cache reserved on every peer
    cached: int = 0  # tokens the peers hold for this sequence
    retry_at: float = 0.0  # no cache on a peer: do not start again before this
    overloaded_since: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.input_ids) :]

    @property
    def length(self) -> int:
        return len(self.request.input_ids) + self.request.max_new_tokens


class BatchedGenerator:
    """`submit()` requests from any thread; each future resolves to the generated tokens."""

    def __init__(self, model, *, max_batch: int = 16, max_length: int = 2048, adapter: str | None = None, prefill_chunk: int = PREFILL_CHUNK):
        self.model = model  # client.model.DistributedModelForCausalLM: embeddings, norm, head, sequence
        self.max_batch, self.max_length, self.adapter, self.prefill_chunk = max_batch, max_length, adapter, prefill_chunk
        self._queue: list[tuple[GenerationRequest, concurrent.futures.Future]] = []
        self._active: list[_Active] = []
        self._released: list[int] = []  # slots freed since the last step
        self._changed = threading.Condition()
        self._session: BatchedSession | None = None
        self._retries: Retries | None = None
        self._closing = False
        self.steps = 0  # batched steps run, and rows in them (for tests and benchmarks)
        self.rows = 0
        self.resets = 0  # sessions re-opened after a peer failed
        self._thread = threading.Thread(target=self._loop, name="batched-generator", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Requests waiting or running (read without the lock: a hint for choosing among generators)."""
        return len(self._queue) + len(self._active)

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        total = len(request.input_ids) + request.max_new_tokens
        if not request.input_ids or request.max_new_tokens < 1:
            future.set_exception(ValueError("a request needs a prompt and max_new_tokens >= 1"))
        elif total > self.max_length:
            future.set_exception(errors.SessionLengthError(f"{total} tokens exceed the longest sequence served here ({self.max_length})"))
        else:
            with self._changed:
                if self._closing:
                    raise errors.SessionError("the generator is closed")
                self._queue.append((request, future))
                self._changed.notify()
        return future

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout=30)
        for request, future in self._queue:
            future.set_exception(errors.SessionError("the generator closed before this request ran"))
        self._queue.clear()

    # ---- the loop (its own thread) --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._changed:
                self._admit()
                if not self._active and not self._closing:
                    if not self._changed.wait_for(lambda: self._queue or self._closing, timeout=IDLE_CLOSE_S):
                        self._close_session()
                    continue
                if self._closing:
                    break
            try:
                self._turn()
                self._retries = None
            except errors.SwarmError as exc:
                self._recover(exc)
            except Exception as exc:  # a local bug: fail the requests, keep serving new ones
                logger.exception("batched generation failed")
                self._fail_all(exc)
        self._fail_all(errors.SessionError("the generator closed"))
        self._close_session()

    def _admit(self) -> None:
        """Give queued requests free slots (holding the lock)."""
        used = {active.slot for active in self._active}
        free = [slot for slot in range(self.max_batch) if slot not in used]
        while self._queue and free:
            request, future = self._queue.pop(0)
            if future.set_running_or_notify_cancel():
                self._active.append(_Active(request, future, free.pop(0), list(request.input_ids)))

    def _turn(self) -> None:
        """Start the sequences that are new, then one step: every decoding sequence's next token and
        up to `prefill_chunk` tokens of the prompts being fed."""
        self._finish_cancelled()
        if self._session is None:
            self._session = BatchedSession(self.model.sequence, slots=self.max_batch, max_length=self.max_length, adapter=self.adapter)
            self._released.clear()
            run_coroutine(self._session.open())
        now = time.monotonic()
        for active in [active for active in self._active if not active.started and active.retry_at <= now]:
            if not self._start(active):
                break  # a peer is full: later requests wait their turn too
        rows, budget = [], self.prefill_chunk
        for active in self._active:
            if not active.started:
                continue
            pending = len(active.tokens) - active.cached
            if pending == 1 and active.cached:
                rows.append((active, active.tokens[-1:]))
            elif budget > 0:
                rows.append((active, active.tokens[active.cached : active.cached + budget]))
                budget -= len(rows[-1][1])
        if rows:
            self._step(rows)
        else:
            if self._released:
                run_coroutine(self._session.step(release=self._take_released()))
            waiting = [active.retry_at for active in self._active if not active.started]
            time.sleep(max(0.0, min(waiting) - now) if waiting else 0.01)

    def _start(self, active: _Active) -> bool:
        """Reserve the sequence's cache on every peer (a step of its own); False if a peer had no room."""
        released = list(self._released)
        try:
            run_coroutine(self._session.step(
                release=self._take_released(), starts=[active.slot], start_lengths=[active.length],
            ))
        except errors.OverloadedError as exc:  # the hops after the refusing one did not see the releases
            self._released = released + self._released
            active.retry_at = time.monotonic() + OVERLOADED_RETRY_S
            active.overloaded_since = active.overloaded_since or time.monotonic()
            if time.monotonic() - active.overloaded_since > self.model.sequence.config.route_wait_s:
                self._end(active, exc)
            return False
        active.started, active.cached, active.overloaded_since = True, 0, None
        return True

    def _step(self, rows: list[tuple[_Active, list[int]]]) -> None:
        """Feed each row's tokens; sequences whose tokens are all in then get their next token."""
        with torch.no_grad():
            hidden_states = self.model.embed(torch.tensor([[token for _, chunk in rows for token in chunk]]))  # [1, tokens, hidden]
            outputs = run_coroutine(self._session.step(
                [active.slot for active, _ in rows], [active.cached for active, _ in rows], [len(chunk) for _, chunk in rows],
                hidden_states, release=self._take_released(),
            ))
        self.steps += 1
        self.rows += len(rows)
        last, done, first = [], [], 0
        for active, chunk in rows:
            first += len(chunk)
            active.cached += len(chunk)
            if active.cached == len(active.tokens):
                last.append(first - 1)
                done.append(active)
        if done:
            self._extend(done, outputs[0, last].unsqueeze(1))  # [rows, 1, hidden]

    def _extend(self, actives: list[_Active], outputs: torch.Tensor) -> None:
        """Pick each sequence's next token from its last output [rows, 1, hidden]; end those that are done."""
        with torch.no_grad(), kernels.batched_rows():
            logits = self.model.logits(outputs)[:, -1].float()  # [rows, vocab]
        for row, active in enumerate(actives):
            scores = logits[row : row + 1]
            if active.request.sampler is not None:
                scores = active.request.sampler(torch.tensor([active.tokens]), scores)
            token = int(scores.argmax(dim=-1))
            active.tokens.append(token)
            if active.request.on_token is not None:
                active.request.on_token(token)
            if token in active.request.eos_token_ids or len(active.generated) >= active.request.max_new_tokens:
                self._end(active)

    def _finish_cancelled(self) -> None:
        for active in [active for active in self._active if active.request.cancelled.is_set()]:
            self._end(active)

    def _end(self, active: _Active, exc: BaseException | None = None) -> None:
        self._active.remove(active)
        self._released.append(active.slot)  # releasing a slot a peer does not hold is harmless
        if exc is not None:
            active.future.set_exception(exc)
        else:
            active.future.set_result(active.generated)

    def _take_released(self) -> list[int]:
        released, self._released = self._released, []
        return released

    def _recover(self, exc: errors.SwarmError) -> None:
        """After a failed step: open a new session and start every sequence again, or fail them all."""
        self._close_session()
        self._retries = self._retries or Retries(self.model.sequence.config)
        if not self._retries.allow(exc):
            self._fail_all(exc)
            return
        logger.warning("batched session failed (%s): re-routing %d sequences, retry %d", exc, len(self._active), self._retries.failures)
        self.resets += 1
        for active in self._active:
            active.started, active.cached = False, 0

    def _fail_all(self, exc: BaseException) -> None:
        for active in list(self._active):
            self._active.remove(active)
            active.future.set_exception(exc)

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        self._released.clear()
