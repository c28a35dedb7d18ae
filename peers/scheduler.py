"""The peer's compute scheduler: it owns the one compute thread, continuous batching of decode steps and
chunked prefill, and returns each step's outputs to whoever asked.

Every torch call of a peer runs on one thread: a second thread would start a second OpenMP pool, whose
spinning workers slow the first one down (measured: ~10-20% per step). A session's step goes one of three
ways (`peers.compute.schedule_of`): into the next batched turn (decode rows, and batched sessions' steps,
shared with every other step waiting then: `peers.batching`), in chunks of PREFILL_CHUNK tokens (a long
prompt, so that decode turns run in between), or as one job. It does not read requests, encode replies or
touch the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from typing import Callable, TypeVar

import torch

from peers import compute
from peers.batching import StepBatcher
from peers.compute import Outputs, Step
from swarm import errors

T = TypeVar("T")


class Scheduler:
    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor, batch_steps: int = 32):
        """`batch_steps`: rows of different sessions run as one batched turn, at most (1: no batching)."""
        self.executor = executor
        self._running = 0  # jobs queued or running on the compute thread
        self.busy_s = 0.0  # time the compute thread has spent on our jobs (for the peer's announced load)
        self._closed = False
        self.batcher = StepBatcher(self.run, compute.run_turn, batch_steps) if batch_steps > 1 else None

    @property
    def stats(self) -> dict[str, int]:
        """Decode rows run, and of those the ones that ran together with others (for rpc_info)."""
        if self.batcher is None:
            return {}
        return {"decode_steps": self.batcher.steps, "batched_steps": self.batcher.batched_steps}

    async def run(self, job: Callable[[], T]) -> T:
        """Run `job` on the compute thread, counted as running (see wait_idle); refused once closed."""
        if self._closed:
            raise errors.PeerUnavailableError("this peer is shutting down")
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, job)
        finally:
            self._running -= 1

    def _timed(self, job: Callable[[], T]) -> T:  # on the compute thread, the only one that adds to busy_s
        started = time.perf_counter()
        try:
            return job()
        finally:
            self.busy_s += time.perf_counter() - started

    async def step(self, step: Step) -> Outputs:
        """A session's step: each row's checked inputs and outputs. A refusal (a SwarmError) comes before
        any compute, its caches unchanged; any other exception may leave them half-updated."""
        how = compute.schedule_of(step)
        if how == "turn":
            if self.batcher is not None:
                return await self.batcher.submit(step, rows=len(step.rows))
            (result,) = await self.run(functools.partial(compute.run_turn, [step]))
            if isinstance(result, BaseException):
                raise result
            return result
        if how == "chunks":
            return await self._chunks(step)
        return await self.run(functools.partial(compute.run_step, step))

    async def _chunks(self, step: Step) -> Outputs:
        """A long one-row step, one compute job per PREFILL_CHUNK tokens: other sessions' decode turns run
        between them instead of waiting for the whole prompt."""
        (row,) = step.rows
        inputs = await self.run(functools.partial(compute.checked, step, row))
        outputs = []
        for first in range(0, inputs.hidden_states.shape[1], compute.PREFILL_CHUNK):
            outputs.append(await self.run(functools.partial(compute.run_chunk, step, inputs, first)))
        return [(inputs, torch.cat(outputs, dim=1))]

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job is queued or running (True), or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._running

    async def close(self) -> None:
        """Refuse new jobs and stop the batcher's worker task; steps still waiting in it fail."""
        self._closed = True
        if self.batcher is not None:
            self.batcher.close()
            await self.batcher.wait_closed()
