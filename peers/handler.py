"""The peer's RPC handlers: info, stateless forward, and inference sessions over one open stream.

Every request is decoded and validated before compute; compute runs off the event loop in the
peer's executor. A bad request gets a typed error reply and the peer goes on serving. This module
does not announce anything or load blocks (see `peers.server`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from peers.cache import CacheBudget
from peers.validation import Limits, check_block_inputs, check_span
from swarm import errors
from swarm.blocks import BlockStack
from swarm.protocol import BlockService
from swarm.messages import PEER_REQUEST, ForwardRequest, InferenceStep, OpenSession, PeerInfo, Result, SessionOpened
from swarm.transport import FrameReader, decode_header, encode_error, encode_frame, name_tensors

logger = logging.getLogger(__name__)

INPUT_TENSORS = ("hidden_states", "position_ids", "attention_mask")
DRAIN_TIMEOUT_S = 5.0
Response = runtime_pb2.ExpertResponse


class BlockServicer(BlockService):
    """rpc_info, rpc_forward and rpc_inference for one BlockStack."""

    def __init__(
        self,
        stack: BlockStack,
        info: PeerInfo,
        *,
        cache_tokens: int,
        session_idle_timeout_s: float,
        cache_wait_s: float,
        executor: concurrent.futures.ThreadPoolExecutor,
    ):
        self.stack = stack
        self.info = info
        self.limits = Limits(
            hidden_size=stack.config.hidden_size, max_batch_size=info.max_batch_size, max_length=info.max_length
        )
        self.cache = CacheBudget(cache_tokens)
        self.session_idle_timeout_s = session_idle_timeout_s
        self.cache_wait_s = cache_wait_s
        self.executor = executor  # the peer's single compute thread


    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=self.info.model_dump_json().encode())

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[Response]:
        started = time.perf_counter()
        reader = FrameReader(requests)
        try:
            async with asyncio.timeout(self.session_idle_timeout_s):
                frame = await reader.read()
            if frame is None:
                return
            header = decode_header(PEER_REQUEST, frame[0])
            if not isinstance(header, ForwardRequest):
                raise errors.InvalidRequestError(f"rpc_forward expects a forward request, got {header.type!r}")
            span = check_span(header.start_block, header.end_block, (self.stack.start_block, self.stack.end_block))
            tensors = name_tensors(header, frame[1], INPUT_TENSORS)
            reply = await self._compute(tensors, self.limits, None, span, position=0)
        except Exception as exc:  # a bad request must never take the peer down
            yield self._error_reply(exc, context, "forward")
            await _drain(reader)
            return
        logger.debug("forward peer=%s blocks=%d:%d ms=%.1f", _short(context), *span, 1000 * (time.perf_counter() - started))
        for message in reply:
            yield message
        await _drain(reader)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[Response]:
        reader = FrameReader(requests)
        try:
            opening = await self._read_opening(reader)
        except Exception as exc:
            yield self._error_reply(exc, context, "open")
            await _drain(reader)
            return
        span = (opening.start_block, opening.end_block)
        try:
            async with self.cache.reserve(opening.batch_size * opening.max_length, self.cache_wait_s):
                async for message in self._serve_session(reader, opening, span, context):
                    yield message
        except errors.SwarmError as exc:  # no cache for this session
            yield self._error_reply(exc, context, "open")
            await _drain(reader)

    async def _read_opening(self, reader: FrameReader) -> OpenSession:
        async with asyncio.timeout(self.session_idle_timeout_s):
            frame = await reader.read()
        if frame is None:
            raise errors.InvalidRequestError("stream closed before the session was opened")
        opening = decode_header(PEER_REQUEST, frame[0])
        if not isinstance(opening, OpenSession):
            raise errors.UnknownSessionError(f"no open session: an inference stream starts with 'open', got {opening.type!r}")
        check_span(opening.start_block, opening.end_block, (self.stack.start_block, self.stack.end_block))
        if opening.max_length > self.limits.max_length:
            raise errors.SessionLengthError(f"max_length {opening.max_length} exceeds this peer's {self.limits.max_length}")
        if opening.batch_size > self.limits.max_batch_size:
            raise errors.InvalidRequestError(f"batch size {opening.batch_size} exceeds {self.limits.max_batch_size}")
        return opening

    async def _serve_session(self, reader, opening: OpenSession, span, context) -> AsyncIterator[Response]:
        cache = self.stack.new_cache()
        session_limits = Limits(self.limits.hidden_size, opening.batch_size, opening.max_length)
        (reply,) = encode_frame(SessionOpened(session_id=opening.session_id), [], Response)
        yield reply
        while True:
            try:
                async with asyncio.timeout(self.session_idle_timeout_s):
                    frame = await reader.read()
            except TimeoutError:
                logger.info("session %s idle for %.0f s: freeing its cache", opening.session_id[:8], self.session_idle_timeout_s)
                return
            except errors.SwarmError as exc:  # a malformed frame: end the session, keep serving others
                yield self._error_reply(exc, context, "step")
                await _drain(reader)
                return
            if frame is None:
                return  # the client closed the session
            started = time.perf_counter()
            try:
                reply = await self._session_step(cache, frame, session_limits, span)
            except errors.SwarmError as exc:  # refused before any compute: the cache is intact
                yield self._error_reply(exc, context, "step")
                continue
            except Exception as exc:  # failed mid-compute: the cache may be half-updated, end the session
                yield self._error_reply(exc, context, "step")
                await _drain(reader)
                return
            logger.debug(
                "step peer=%s session=%s blocks=%d:%d ms=%.1f", _short(context), opening.session_id[:8],
                *span, 1000 * (time.perf_counter() - started),
            )
            for message in reply:
                yield message

    async def _session_step(self, cache, frame, limits: Limits, span) -> list[Response]:
        step = decode_header(PEER_REQUEST, frame[0])
        if not isinstance(step, InferenceStep):
            raise errors.InvalidRequestError(f"expected a step, got {step.type!r}")
        cache_length = self.stack.cache_length(cache, span[0])
        if step.position > cache_length:
            raise errors.InvalidRequestError(f"step at position {step.position} but the cache holds {cache_length} tokens")
        tensors = name_tensors(step, frame[1], INPUT_TENSORS)
        return await self._compute(tensors, limits, cache, span, position=step.position)

    async def _compute(self, tensors, limits: Limits, cache, span, *, position: int) -> list[Response]:
        """Validate, roll back and run, all on the compute thread (one OpenMP pool per process)."""
        job = functools.partial(self._compute_sync, tensors, limits, cache, span, position)
        return await asyncio.get_running_loop().run_in_executor(self.executor, job)

    def _compute_sync(self, tensors, limits: Limits, cache, span, position: int) -> list[Response]:
        inputs = check_block_inputs(tensors, limits, past_length=position)
        if cache is not None:
            try:
                self.stack.rollback(cache, span, position)  # the client may regenerate from an earlier token
            except ValueError as exc:
                raise errors.InvalidRequestError(str(exc)) from exc
        return list(_result_messages(self.stack(inputs, cache, span).cpu()))  # framing off the event loop too

    def _error_reply(self, exc: BaseException, context: P2PContext, what: str) -> Response:
        if isinstance(exc, TimeoutError):
            exc = errors.PeerTimeoutError(f"no {what} request within {self.session_idle_timeout_s} s")
        if isinstance(exc, errors.SwarmError):
            logger.warning("refused %s from %s: %s", what, _short(context), str(exc)[:200])
            return encode_error(exc, Response)
        logger.exception("internal error serving %s from %s", what, _short(context))
        return encode_error(errors.RemoteError("internal error on the peer"), Response, code="internal")


def _result_messages(outputs: torch.Tensor):
    return encode_frame(Result(tensor_names=["hidden_states"]), [outputs], Response)


async def _drain(reader: FrameReader, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Read the client's stream to its end before closing ours: closing first would break the pipe
    under the client's last write, and it would lose our reply (asyncio fails buffered reads then)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read() is not None:
                pass
    except (TimeoutError, errors.SwarmError):
        pass


def _short(context: P2PContext) -> str:
    return str(context.remote_id)[-8:]
