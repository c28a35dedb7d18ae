"""In-process peers for unit tests of the serving pipeline: servicers built without a network, a fake
stream that plays a client's side of an inference session, and a pusher that hands pushes straight to
another in-process servicer. No sockets, no subprocesses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import types

from hivemind.proto import runtime_pb2

from peers.cache import CacheBudget
from peers.handler import BlockServicer, ServicerConfig
from peers.scheduler import Scheduler
from peers.serving import Serving
from peers.sessions import SessionEnv
from swarm.blocks import BlockStack
from swarm.messages import PEER_REPLY, PeerInfo
from swarm.records import PROTOCOL_VERSION
from swarm.transport import FrameReader, decode_header, encode_frame, name_tensors, raise_if_error

Request = runtime_pb2.ExpertRequest


def make_servicer(
    stack: BlockStack, executor: concurrent.futures.ThreadPoolExecutor | None, *, adapters=None, batch_steps: int = 8,
    peer_id: str = "peer-a", peers: dict[str, BlockServicer] | None = None, idle_timeout_s: float = 5.0,
) -> BlockServicer:
    """A servicer of `stack` named `peer_id`; with `peers`, it registers there and pushes to the others."""
    info = PeerInfo(
        protocol_version=PROTOCOL_VERSION, model="tiny", dht_prefix="tiny", start_block=stack.start_block, end_block=stack.end_block,
        dtype="float32", version="test", max_batch_size=4, max_length=64,
    )
    env = SessionEnv(
        serving=Serving(stack, info, adapters), scheduler=Scheduler(executor, batch_steps),  # type: ignore[arg-type]
        cache=CacheBudget(total_bytes=2**20, bytes_per_token=1, max_sessions=8), idle_timeout_s=idle_timeout_s, peer_id=peer_id,
        new_pusher=(lambda: LocalPusher(peer_id, peers)) if peers is not None else None,
    )
    servicer = BlockServicer(env, ServicerConfig(idle_timeout_s=idle_timeout_s, cache_wait_s=1.0))
    if peers is not None:
        peers[peer_id] = servicer
    return servicer


def context(caller: str = "client") -> types.SimpleNamespace:
    return types.SimpleNamespace(remote_id=caller)


class LocalPusher:
    """Pushes from peer `sender` delivered by calling the target servicer's rpc_push directly."""

    def __init__(self, sender: str, peers: dict[str, BlockServicer]):
        self.sender, self.peers = sender, peers

    async def send(self, target: str, message: Request) -> runtime_pb2.ExpertResponse:
        return await self.peers[target].rpc_push(message, context(self.sender))

    def close(self) -> None:
        pass


class ClientStream:
    """The client's side of one rpc_inference call: `send` a header and tensors, `receive` a reply."""

    def __init__(self, servicer: BlockServicer, caller: str = "client"):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._inbox: asyncio.Queue = asyncio.Queue()
        # the peer's side runs on its own, as hivemind drives a handler: it does not wait for us to read
        self._peer = asyncio.ensure_future(self._drive(servicer.rpc_inference(self._requests(), context(caller))))
        self._replies = FrameReader(self._received())

    async def _requests(self):
        while (message := await self._outbox.get()) is not None:
            yield message

    async def _drive(self, replies) -> None:
        try:
            async for message in replies:
                self._inbox.put_nowait(message)
        finally:
            self._inbox.put_nowait(None)

    async def _received(self):
        while (message := await self._inbox.get()) is not None:
            yield message

    def send(self, header, tensors=()) -> None:
        for message in encode_frame(header, list(tensors), Request):
            self._outbox.put_nowait(message)

    async def receive(self, timeout_s: float = 10.0):
        """The next reply's header and its tensors by name; a typed error reply raises it."""
        async with asyncio.timeout(timeout_s):
            frame = await self._replies.read()
        assert frame is not None, "the peer closed the session"
        header = decode_header(PEER_REPLY, frame[0])
        raise_if_error(header)
        return header, name_tensors(header, frame[1], ("hidden_states",)) if frame[1] else {}

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        async with asyncio.timeout(10):
            while await self._replies.read() is not None:
                pass
            await self._peer

