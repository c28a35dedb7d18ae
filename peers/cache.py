"""The KV-cache budget of a peer, counted in tokens (batch x max_length) over all open sessions.

It only counts and waits; the caches themselves belong to the sessions (see `peers.handler`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from swarm.errors import OverloadedError, SessionLengthError


class CacheBudget:
    def __init__(self, total_tokens: int):
        self.total_tokens = total_tokens
        self.used_tokens = 0
        self._changed = asyncio.Condition()

    @property
    def tokens_left(self) -> int:
        return self.total_tokens - self.used_tokens

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold `tokens` for the duration of the block; wait up to `timeout_s` for them to be free."""
        if tokens > self.total_tokens:
            raise SessionLengthError(f"a session of {tokens} tokens exceeds this peer's cache of {self.total_tokens}")
        async with self._changed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: self.tokens_left >= tokens)
            except TimeoutError as exc:
                raise OverloadedError(f"no cache for {tokens} tokens within {timeout_s} s") from exc
            self.used_tokens += tokens
        try:
            yield
        finally:
            async with self._changed:
                self.used_tokens -= tokens
                self._changed.notify_all()
