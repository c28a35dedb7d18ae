"""A session's pushes to the next hop over one open stream (`rpc_push_stream`) instead of a new
stream per push (`rpc_push`): on an open stream a push costs one message each way, where a unary
call first opens and negotiates a stream through both p2pd daemons.

It does not decide what to push, nor whether the next hop takes it (`peers.handler` does).
"""

from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import errors, protocol
from swarm.transport import translated_errors

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


class _Channel:
    def __init__(self):
        self.outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self.replies: AsyncIterator[Response] | None = None

    async def requests(self) -> AsyncIterator[Request]:
        while (message := await self.outbox.get()) is not None:
            yield message


class PushChannels:
    """The open push streams of one session, one per next hop; `close()` ends them all."""

    def __init__(self, p2p: P2P, namespace: str, timeout_s: float):
        self.p2p, self.namespace, self.timeout_s = p2p, namespace, timeout_s
        self._channels: dict[str, _Channel] = {}
        # pushes run in the background, and answers on a stream come in order: one push at a time per target
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def send(self, target: str, message: Request) -> Response:
        """Push `message` to peer `target` and return its answer (empty, or an ErrorReply's frame).

        Raises a SwarmError if the push did not arrive in time; that stream is then dropped, so that a
        late answer cannot pass for the next push's."""
        try:
            async with translated_errors(target[-8:]), asyncio.timeout(self.timeout_s), self._locks[target]:
                channel = self._channels.get(target)
                if channel is None:
                    channel = self._channels[target] = _Channel()
                    stub = protocol.stub(self.p2p, PeerID.from_base58(target), self.namespace)
                    channel.replies = (await stub.rpc_push_stream(channel.requests())).__aiter__()
                channel.outbox.put_nowait(message)
                try:
                    return await anext(channel.replies)
                except StopAsyncIteration:
                    raise errors.PeerUnavailableError(f"peer {target[-8:]} closed the push stream") from None
        except BaseException:
            self._drop(target)
            raise

    def close(self) -> None:
        for target in list(self._channels):
            self._drop(target)

    def _drop(self, target: str) -> None:
        channel = self._channels.pop(target, None)
        if channel is not None:
            channel.outbox.put_nowait(None)
