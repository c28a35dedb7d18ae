"""The resource budget of a peer's inference sessions: KV-cache bytes and concurrent sessions.

A session reserves, when it opens, the cache its longest sequence could need (batch x max_length
tokens over the peer's blocks) and one session slot; it gives both back when it ends, is closed, or
is freed after going idle. A batched session (`peers.slots`) opens with a session slot only and takes
cache for each of its sequences as it starts (`take`), without waiting, and gives it back when the
sequence ends (`give_back`). A session that cannot get them waits up to a limit, then gets a typed
'overloaded' error. This module only counts and waits; the caches belong to the sessions (see
`peers.handler`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from swarm.errors import OverloadedError, SessionLengthError


class CacheBudget:
    def __init__(self, total_bytes: int, bytes_per_token: int, max_sessions: int):
        if bytes_per_token <= 0 or total_bytes < 0 or max_sessions <= 0:
            raise ValueError("a cache budget needs bytes_per_token > 0, total_bytes >= 0 and max_sessions > 0")
        self.total_bytes = total_bytes
        self.bytes_per_token = bytes_per_token
        self.max_sessions = max_sessions
        self.used_bytes = 0
        self.sessions = 0
        self._changed = asyncio.Condition()

    @property
    def total_tokens(self) -> int:
        return self.total_bytes // self.bytes_per_token

    @property
    def tokens_left(self) -> int:
        """Tokens a new session could still reserve (0 while every session slot is taken)."""
        if self.sessions >= self.max_sessions:
            return 0
        return (self.total_bytes - self.used_bytes) // self.bytes_per_token

    def take(self, tokens: int) -> None:
        """Reserve the cache of `tokens` now, or raise `OverloadedError` (no waiting: the caller's other
        sequences would wait with it)."""
        size = tokens * self.bytes_per_token
        if size > self.total_bytes:
            raise SessionLengthError(f"a sequence of {tokens} tokens exceeds this peer's cache of {self.total_tokens} tokens")
        if self.used_bytes + size > self.total_bytes:
            left = (self.total_bytes - self.used_bytes) // self.bytes_per_token
            raise OverloadedError(f"no cache for {tokens} tokens ({left} left)")
        self.used_bytes += size

    async def give_back(self, tokens: int) -> None:
        async with self._changed:
            self.used_bytes -= tokens * self.bytes_per_token
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold a session slot and the cache of `tokens` for the duration of the block; wait up to
        `timeout_s` for them to be free."""
        size = tokens * self.bytes_per_token
        if size > self.total_bytes:
            raise SessionLengthError(
                f"a session of {tokens} tokens exceeds this peer's cache of {self.total_tokens} tokens"
            )
        async with self._changed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(
                        lambda: self.sessions < self.max_sessions and self.used_bytes + size <= self.total_bytes
                    )
            except TimeoutError as exc:
                what = (
                    f"all {self.max_sessions} session slots are taken" if self.sessions >= self.max_sessions
                    else f"no cache for {tokens} tokens ({self.tokens_left} left)"
                )
                raise OverloadedError(f"{what}, waited {timeout_s:g} s") from exc
            self.used_bytes += size
            self.sessions += 1
        try:
            yield
        finally:
            async with self._changed:
                self.used_bytes -= size
                self.sessions -= 1
                self._changed.notify_all()
