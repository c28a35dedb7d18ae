"""The peer's RPC handlers: info, stateless forward and backward, inference sessions over one open stream,
and pushes of a session's steps from the previous hop.

Each handler reads its request, decodes and authenticates it once (`_decode`), checks it against what
this peer serves (`peers.serving`) and hands it on: a session to `peers.sessions` / `peers.slots`, compute
to `peers.scheduler`; replies are encoded by `peers.replies`. A bad request gets a typed error reply and
the peer goes on serving. This module does not announce anything or load blocks (see `peers.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from typing import AsyncIterator, TypeVar

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from pydantic import BaseModel

from peers import compute, replies
from peers.cache import CacheBudget
from peers.scheduler import Scheduler
from peers.serving import Serving
from peers.sessions import INPUT_TENSORS, PlainSession, SessionEnv, drain_reader
from peers.slots import SlotSession
from peers.validation import MAX_STATELESS_CALLS, REQUEST_BUFFER_BYTES, STATELESS_WAIT_S
from swarm import errors
from swarm.lora import wire_names
from swarm.messages import MAX_SLOT_STEP_TOKENS, PEER_REQUEST, BackwardRequest, ErrorReply, ForwardRequest, OpenSession, PushStep
from swarm.protocol import BlockService
from swarm.swarm_key import check_access
from swarm.transport import CHUNK_BYTES, ByteBudget, FrameReader, decode_header, name_tensors, read_message

logger = logging.getLogger(__name__)

STATELESS_TENSORS = (*INPUT_TENSORS, "prompts")  # deep prompts: forward and backward, not sessions
Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse
Header = TypeVar("Header", bound=BaseModel)


@dataclasses.dataclass(frozen=True)
class ServicerConfig:
    idle_timeout_s: float = 300.0  # a call or session waits this long for its next frame
    cache_wait_s: float = 10.0  # a new session waits this long for cache or a session slot


class BlockServicer(BlockService):
    """rpc_info, rpc_forward, rpc_backward, rpc_inference and rpc_push(_stream) for what `serving` serves."""

    def __init__(self, env: SessionEnv, config: ServicerConfig = ServicerConfig()):
        self.env, self.config = env, config
        self.request_buffer = ByteBudget(REQUEST_BUFFER_BYTES)  # tensor bytes of the frames being read, all calls together
        self._stateless_calls = asyncio.Semaphore(MAX_STATELESS_CALLS)

    @property
    def serving(self) -> Serving:
        return self.env.serving

    @property
    def scheduler(self) -> Scheduler:
        return self.env.scheduler

    @property
    def cache(self) -> CacheBudget:
        return self.env.cache

    async def close(self) -> None:
        """Refuse new steps and stop the scheduler's batching (steps still waiting in it fail)."""
        self.serving.closing = True
        await self.scheduler.close()

    # ---- decoding and authenticating a request, once ------------------------------------------
    def _decode(
        self, metadata: bytes, kind: type[Header], context: P2PContext, wrong_kind: type[errors.SwarmError] = errors.InvalidRequestError
    ) -> Header:
        """The request's header, if it is a `kind` (else `wrong_kind`) and its caller may call us (a private
        swarm's proof)."""
        header = decode_header(PEER_REQUEST, metadata)
        if not isinstance(header, kind):
            expected = kind.model_fields["type"].default
            raise wrong_kind(f"expected a {expected!r} request, got {getattr(header, 'type', '?')!r}")
        check_access(self.env.swarm_key, getattr(header, "auth", None), str(context.remote_id), self.env.peer_id)
        return header

    def _error(self, exc: BaseException, context: P2PContext, what: str, step_id: int | None = None) -> Response:
        if isinstance(exc, errors.SwarmError):
            logger.warning("refused %s from %s: %s", what, _short(context), str(exc)[:200])
        elif not isinstance(exc, TimeoutError):
            logger.exception("internal error serving %s from %s", what, _short(context))
        return replies.error(exc, step_id=step_id, idle_timeout_s=self.config.idle_timeout_s)

    # ---- info -----------------------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """This peer's PeerInfo; `request.uid` carries the caller's proof in a private swarm."""
        try:
            check_access(self.env.swarm_key, request.uid, str(context.remote_id), self.env.peer_id)
        except errors.AccessDeniedError as exc:
            logger.warning("refused info from %s: %s", _short(context), exc)
            refusal = ErrorReply(code=exc.code, message=str(exc))
            return runtime_pb2.ExpertInfo(serialized_info=refusal.model_dump_json().encode())
        info = self.serving.info.model_copy(update=self.scheduler.stats)
        return runtime_pb2.ExpertInfo(serialized_info=info.model_dump_json().encode())

    # ---- stateless forward and backward ---------------------------------------------------------
    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for message in self._stateless(requests, context, ForwardRequest):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for message in self._stateless(requests, context, BackwardRequest):
            yield message

    async def _stateless(self, requests, context: P2PContext, kind: type[ForwardRequest] | type[BackwardRequest]):
        """A forward or backward over a whole sequence, without a session: one frame in, one out."""
        started = time.perf_counter()
        blocks = self.serving.blocks[1] - self.serving.blocks[0]
        max_frame_bytes = self.serving.limits.frame_bytes(blocks=blocks, backward=kind is BackwardRequest)
        reader = FrameReader(requests, max_frame_bytes, self.request_buffer)
        what = kind.model_fields["type"].default
        try:
            async with self._stateless_slot():
                try:
                    reply, span = await self._stateless_reply(reader, context, kind)
                finally:
                    reader.release()  # the request's tensors are consumed
        except Exception as exc:  # a bad request must never take the peer down
            yield self._error(exc, context, what)
            await drain_reader(reader)
            return
        if reply is not None:
            logger.debug("%s peer=%s blocks=%d:%d ms=%.1f", what, _short(context), *span, 1000 * (time.perf_counter() - started))
            for message in reply:
                yield message
        await drain_reader(reader)

    @contextlib.asynccontextmanager
    async def _stateless_slot(self) -> AsyncIterator[None]:
        """A turn among the MAX_STATELESS_CALLS forward and backward calls read or computed at once."""
        try:
            async with asyncio.timeout(STATELESS_WAIT_S):
                await self._stateless_calls.acquire()
        except TimeoutError:
            raise errors.OverloadedError(f"{MAX_STATELESS_CALLS} forward and backward calls run here already; retry later") from None
        try:
            yield
        finally:
            self._stateless_calls.release()

    async def _stateless_reply(self, reader: FrameReader, context: P2PContext, kind) -> tuple[list[Response] | None, tuple[int, int]]:
        """The reply of a stateless call's frame, and its blocks (None: the stream closed at once)."""
        async with asyncio.timeout(self.config.idle_timeout_s):
            frame = await reader.read()
        if frame is None:
            return None, (0, 0)
        header = self._decode(frame[0], kind, context)
        stack = self.serving.stack
        span = self.serving.check_span(header.start_block, header.end_block)
        limits = self.serving.limits
        names = (*STATELESS_TENSORS, *wire_names(limits.lora_shapes))
        if isinstance(header, BackwardRequest):
            tensors = name_tensors(header, frame[1], (*names, "grad_outputs"))
            grads = await self.scheduler.run(functools.partial(compute.backward_job, stack, tensors, limits, span, header))
            return replies.gradients(grads), span
        adapter = self.serving.adapter_weights(header, span)
        tensors = name_tensors(header, frame[1], names)
        outputs = await self.scheduler.run(functools.partial(compute.forward_job, stack, tensors, limits, span, header, adapter))
        return replies.result(outputs), span

    # ---- inference sessions ---------------------------------------------------------------------
    async def rpc_inference(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        # an opening carries no tensors; a session's frames are bounded by its own batch x length (below), INBOX_FRAMES
        # and the sessions the cache budget admits, not by the budget shared with stateless calls: a busy peer must
        # refuse new calls, not end the sessions it serves
        reader = FrameReader(requests, 0)
        try:
            opening = await self._read_opening(reader, context)
        except Exception as exc:
            yield self._error(exc, context, "open")
            await drain_reader(reader)
            return
        # a step's tensors: those of batch_size x max_length tokens at most (a batched session's: one step's rows)
        tokens = MAX_SLOT_STEP_TOKENS if opening.slots is not None else opening.batch_size * opening.max_length
        reader.max_frame_bytes = self.serving.limits.frame_bytes(tokens=tokens)
        caller = str(context.remote_id)
        try:
            if opening.slots is not None:  # a batched session takes cache for each sequence as it starts
                async with self.cache.reserve(0, self.config.cache_wait_s):
                    async for message in SlotSession(opening, reader, self.env, caller).serve():
                        yield message
                    await drain_reader(reader)  # after a malformed frame, the client may still be sending
                    return
            async with self.cache.reserve(opening.batch_size * opening.max_length, self.config.cache_wait_s):
                async for message in PlainSession(opening, reader, self.env, caller).serve():
                    yield message
        except errors.SwarmError as exc:  # no cache for this session, or it could not open
            yield self._error(exc, context, "open")
            await drain_reader(reader)
        finally:
            reader.release()  # the session's last frame is consumed

    async def _read_opening(self, reader: FrameReader, context: P2PContext) -> OpenSession:
        async with asyncio.timeout(self.config.idle_timeout_s):
            frame = await reader.read()
        if frame is None:
            raise errors.InvalidRequestError("stream closed before the session was opened")
        opening = self._decode(frame[0], OpenSession, context, wrong_kind=errors.UnknownSessionError)  # streams start with 'open'
        self.serving.check_span(opening.start_block, opening.end_block)
        limits = self.serving.limits
        if opening.max_length > limits.max_length:
            raise errors.SessionLengthError(f"max_length {opening.max_length} exceeds this peer's {limits.max_length}")
        if opening.batch_size > limits.max_batch_size:
            raise errors.InvalidRequestError(f"batch size {opening.batch_size} exceeds {limits.max_batch_size}")
        if opening.slots is not None and (opening.batch_size != 1 or opening.push_from is not None):
            raise errors.InvalidRequestError("a batched session has batch_size 1 per sequence and takes no pushes")
        if opening.slots is not None and opening.slots > limits.max_batch_size:
            raise errors.InvalidRequestError(f"{opening.slots} slots exceed this peer's largest batch of {limits.max_batch_size}")
        return opening

    # ---- pushes between consecutive hops --------------------------------------------------------
    async def rpc_push(self, request: Request, context: P2PContext) -> Response:
        try:
            metadata, tensors = await read_message(request, min(2 * CHUNK_BYTES, self.serving.limits.frame_bytes()))
            header = self._decode(metadata, PushStep, context)
            self.env.deliver(header, name_tensors(header, tensors, INPUT_TENSORS), str(context.remote_id))
        except Exception as exc:
            return self._error(exc, context, "push")
        return Response()

    async def rpc_push_stream(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for request in requests:
            yield await self.rpc_push(request, context)


def _short(context: P2PContext) -> str:
    return str(context.remote_id)[-8:]
