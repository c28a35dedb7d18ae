"""The RPC interface between clients and peers, declared once for both sides.

Peers register an implementation with `register(p2p, implementation, namespace)`; clients call
`stub(p2p, peer_id, namespace)`. Handler names come from this class, so both sides agree. Each RPC
carries frames of `swarm.messages` headers and tensors (see `swarm.transport`).
"""

from __future__ import annotations

from typing import AsyncIterator

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2


class BlockService(ServicerBase):
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """PeerInfo as JSON: model, blocks, limits, versions."""
        raise NotImplementedError

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One ForwardRequest frame in, one Result (or ErrorReply) frame out."""
        raise NotImplementedError

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One BackwardRequest frame in, one Result (grad_inputs) or ErrorReply frame out."""
        raise NotImplementedError

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """OpenSession, then InferenceStep frames; each step answered by one reply frame."""
        raise NotImplementedError

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """One PushStep frame in one message, from the previous hop of a session; an empty reply or an ErrorReply."""
        raise NotImplementedError

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_push over one open stream: each PushStep message answered by an empty reply or an ErrorReply."""
        raise NotImplementedError


async def register(p2p: P2P, implementation: BlockService, namespace: str) -> None:
    await BlockService().add_p2p_handlers(p2p, wrapper=implementation, namespace=namespace)


async def unregister(p2p: P2P, namespace: str) -> None:
    await BlockService().remove_p2p_handlers(p2p, namespace=namespace)


def stub(p2p: P2P, peer_id: PeerID, namespace: str):
    return BlockService.get_stub(p2p, peer_id, namespace=namespace)
