"""Continuous batching: decode steps of different inference sessions that wait for the peer's compute
thread at the same time run as one batched forward over its blocks.

There is no waiting window: a step that finds the compute thread idle runs at once, alone; steps that
arrive while it is busy queue up, and the next turn takes all of them (up to `max_steps` rows) together.
An item may carry several rows (a batched session's step, `peers.slots`): it counts as that many.
Sessions join and leave the batch at any step; each keeps its own KV cache and position
(`BlockStack.step_batch`). Prefill runs apart, in chunks (`peers.scheduler`), so a long prompt holds the
thread for one chunk at a time. Items are opaque here: `run_batch` (on the compute thread) runs a turn's
items and returns one result or exception per item.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from swarm import errors

logger = logging.getLogger(__name__)


class StepBatcher:
    def __init__(self, run_compute: Callable[[Callable[[], Any]], Awaitable[Any]], run_batch: Callable[[list], list], max_steps: int):
        """`run_compute(job)` runs a job on the compute thread; `run_batch(items)` (called there)
        returns one result or exception per item."""
        self.run_compute, self.run_batch, self.max_steps = run_compute, run_batch, max_steps
        self._pending: list[tuple[Any, int, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False
        self.steps = self.batched_steps = 0  # rows run, and those run together with others (see rpc_info)

    async def submit(self, item, rows: int = 1) -> Any:
        if self._closed:
            raise errors.PeerUnavailableError("this peer is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, rows, future))
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._take_turn()
                if not batch:
                    continue
                rows = sum(count for _, count, _ in batch)
                self.steps += rows
                self.batched_steps += rows if rows > 1 else 0
                try:
                    results = await self.run_compute(lambda items=[item for item, _, _ in batch]: self.run_batch(items))
                except asyncio.CancelledError:  # closed mid-turn: nobody will answer this turn's steps
                    _fail(batch)
                    raise
                except Exception as exc:  # the whole turn failed: every step in it gets the error
                    results = [exc] * len(batch)
                for (_, _, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def _take_turn(self) -> list[tuple[Any, int, asyncio.Future]]:
        """The pending items of the next turn: in order, up to max_steps rows (at least one item)."""
        taken, rows = 0, 0
        while taken < len(self._pending) and (taken == 0 or rows + self._pending[taken][1] <= self.max_steps):
            rows += self._pending[taken][1]
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return [entry for entry in batch if not entry[2].cancelled()]

    def close(self) -> None:
        """Stop the worker task; steps waiting for a turn (or in the turn it was running) fail, later
        ones are refused."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        pending, self._pending = self._pending, []
        _fail(pending)

    async def wait_closed(self) -> None:
        """Wait until the worker task, cancelled by `close`, has ended."""
        if self._worker is not None:
            await asyncio.wait([self._worker])


def _fail(entries: list[tuple[Any, int, asyncio.Future]]) -> None:
    for _, _, future in entries:
        if not future.done():
            future.set_exception(errors.PeerUnavailableError("this peer is shutting down"))
