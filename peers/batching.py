"""Continuous batching: decode steps of different inference sessions that wait for the peer's compute
thread at the same time run as one batched forward over its blocks.

There is no waiting window: a step that finds the compute thread idle runs at once, alone; steps that
arrive while it is busy queue up, and the next turn takes all of them (up to `max_steps`) together.
Sessions join and leave the batch at any step; each keeps its own KV cache and position
(`BlockStack.step_batch`). Prefill runs apart, in chunks (`peers.handler`), so a long prompt holds the
thread for one chunk at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)


class StepBatcher:
    def __init__(self, run_compute: Callable[[Callable[[], Any]], Awaitable[Any]], run_batch: Callable[[list], list], max_steps: int):
        """`run_compute(job)` runs a job on the compute thread; `run_batch(items)` (called there)
        returns one result or exception per item."""
        self.run_compute, self.run_batch, self.max_steps = run_compute, run_batch, max_steps
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.steps = self.batched_steps = 0  # steps run, and those run together with others (see rpc_info)

    async def submit(self, item) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[: self.max_steps], self._pending[self.max_steps :]
                batch = [(item, future) for item, future in batch if not future.cancelled()]
                if not batch:
                    continue
                self.steps += len(batch)
                self.batched_steps += len(batch) if len(batch) > 1 else 0
                try:
                    results = await self.run_compute(lambda items=[item for item, _ in batch]: self.run_batch(items))
                except Exception as exc:  # the whole turn failed: every step in it gets the error
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
