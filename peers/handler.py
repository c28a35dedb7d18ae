"""The peer's RPC handlers: info, stateless forward, inference sessions over one open stream, and
pushes of a session's steps from the previous hop.

Every request is decoded and validated before compute; compute runs off the event loop in the
peer's executor. A bad request gets a typed error reply and the peer goes on serving. This module
does not announce anything or load blocks (see `peers.server`).

A session's steps reach it two ways: from its client, and pushed by the peer serving the blocks
just before it (`rpc_push`), which sends its output straight on instead of making the client relay
it. A peer that pushed says so in its reply once the next hop has taken the push; only then does
the client skip sending that step itself. A step that arrives twice runs once. Every reply names
its step, so a client re-running a step after a failover can tell stale replies from current ones.
A batched session (`OpenSession.slots`: many sequences on one stream) is served by `peers.slots`,
which runs its steps through `run_decode` here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import time
from typing import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from peers.batching import DecodeJob, StepBatcher
from peers.compute import backward_job, checked_inputs, decode_batch, forward_job
from peers.pushes import PushChannels
from peers.cache import CacheBudget
from peers.slots import serve_slots
from peers.validation import MAX_STATELESS_CALLS, REQUEST_BUFFER_BYTES, STATELESS_WAIT_S, Limits, check_span
from swarm import errors
from swarm.blocks import BlockStack
from swarm.blocks import BlockInputs
from swarm.protocol import BlockService
from swarm.messages import (
    PEER_REQUEST, BackwardRequest, ErrorReply, ForwardRequest, InferenceStep, OpenSession, PeerInfo, PushStep, Result, SessionOpened,
)
from swarm.messages import MAX_SLOT_STEP_TOKENS
from swarm.lora import LoraWeights, projection_shapes, wire_names
from swarm.swarm_key import SwarmKey, check_access, make_proof
from swarm.transport import (
    CHUNK_BYTES, ByteBudget, FrameReader, decode_header, encode_error, encode_frame, frame_tensors, name_tensors, read_message,
)

logger = logging.getLogger(__name__)

INPUT_TENSORS = ("hidden_states", "position_ids", "attention_mask")
STATELESS_TENSORS = (*INPUT_TENSORS, "prompts")  # deep prompts: forward and backward, not sessions
DRAIN_TIMEOUT_S = 5.0
PUSH_TIMEOUT_S = 2.0  # for the next hop to take a push; the client sends the step itself otherwise
PREFILL_CHUNK = 256  # tokens per compute job of a session's long step: other sessions' decode steps run between
INBOX_FRAMES = 4  # per session: a client sends one step and waits; pushes beyond this are dropped
Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


@dataclasses.dataclass
class _Inbox:
    """The frames of one session: ("client", frame | None | exception) and ("push", (PushStep, tensors))."""

    push_from: str | None
    queue: asyncio.Queue = dataclasses.field(default_factory=lambda: asyncio.Queue(maxsize=INBOX_FRAMES))
    draining: bool = False  # the session ended: the client's frames are read and dropped
    steps: int = 0
    pushed_steps: int = 0  # of which the previous hop's push arrived first


class BlockServicer(BlockService):
    """rpc_info, rpc_forward and rpc_inference for one BlockStack."""

    def __init__(
        self,
        stack: BlockStack,
        info: PeerInfo,
        *,
        cache: CacheBudget,
        session_idle_timeout_s: float,
        cache_wait_s: float,
        executor: concurrent.futures.ThreadPoolExecutor,
        p2p: P2P | None = None,
        swarm_key: SwarmKey | None = None,
        adapters: dict[str, LoraWeights] | None = None,
        batch_steps: int = 32,
    ):
        self.stack = stack
        self.info = info
        self.p2p = p2p  # to push steps to the next hop; None: never push
        self.peer_id = str(p2p.peer_id) if p2p is not None else None
        self.swarm_key = swarm_key  # a private swarm: every call must prove it holds the key
        self.adapters = adapters or {}  # name -> LoRA weights of every block of the model
        self.limits = Limits(
            hidden_size=stack.config.hidden_size, max_batch_size=info.max_batch_size, max_length=info.max_length,
            lora_shapes=projection_shapes(stack.config),
        )
        self.cache = cache
        self.session_idle_timeout_s = session_idle_timeout_s
        self.cache_wait_s = cache_wait_s
        self.executor = executor  # the peer's single compute thread
        # decode steps of sessions waiting at the same time run as one batch (see peers.batching)
        self.batcher = StepBatcher(self._run_compute, decode_batch, batch_steps) if batch_steps > 1 else None
        self._inboxes: dict[tuple[str, int], _Inbox] = {}  # (session id, first block) -> inbox
        self._switched_at = 0.0  # when the stack last changed (a move); older sessions may finish within a grace
        self.handoff_grace_s = 0.0
        self.closing = False  # shutting down: running steps finish, new ones are refused
        self._running = 0  # compute jobs queued or running
        self.request_buffer = ByteBudget(REQUEST_BUFFER_BYTES)  # tensor bytes of the frames being read, all calls together
        self._stateless_calls = asyncio.Semaphore(MAX_STATELESS_CALLS)

    # ---- moving and leaving -----------------------------------------------------------------
    def switch(self, stack: BlockStack, info: PeerInfo, handoff_grace_s: float) -> None:
        """Serve `stack` from now on. Sessions opened on the old one may go on for `handoff_grace_s`,
        then their steps are refused with a transient error, so their clients re-route."""
        self.stack, self.info = stack, info
        self._switched_at = time.monotonic()
        self.handoff_grace_s = handoff_grace_s

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no step is queued or running (True), or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._running

    def adapter_weights(self, name: str | None, span: tuple[int, int]) -> LoraWeights | None:
        """The LoRA weights of adapter `name` for blocks `span` (None: no adapter)."""
        if name is None:
            return None
        if name not in self.adapters:
            raise errors.BlocksNotServedError(f"adapter {name!r} is not served here (this peer serves {sorted(self.adapters)})")
        return self.adapters[name].for_blocks(*span)

    def check_serving(self, stack: BlockStack) -> None:
        if self.closing:
            raise errors.PeerUnavailableError("this peer is shutting down")
        if stack is not self.stack and time.monotonic() > self._switched_at + self.handoff_grace_s:
            raise errors.BlocksNotServedError(
                f"this peer moved to blocks {self.stack.start_block}:{self.stack.end_block}"
            )

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """This peer's PeerInfo; `request.uid` carries the caller's proof in a private swarm."""
        try:
            check_access(self.swarm_key, request.uid, str(context.remote_id), self.peer_id)
        except errors.AccessDeniedError as exc:
            logger.warning("refused info from %s: %s", _short(context), exc)
            refusal = ErrorReply(code=exc.code, message=str(exc))
            return runtime_pb2.ExpertInfo(serialized_info=refusal.model_dump_json().encode())
        info = self.info
        if self.batcher is not None:
            info = info.model_copy(update={"decode_steps": self.batcher.steps, "batched_steps": self.batcher.batched_steps})
        return runtime_pb2.ExpertInfo(serialized_info=info.model_dump_json().encode())

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[Response]:
        async for message in self._stateless(requests, context, ForwardRequest):
            yield message

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[Response]:
        async for message in self._stateless(requests, context, BackwardRequest):
            yield message

    async def _stateless(self, requests, context: P2PContext, kind: type) -> AsyncIterator[Response]:
        """A forward or backward over a whole sequence, without a session: one frame in, one out."""
        started = time.perf_counter()
        blocks = self.stack.end_block - self.stack.start_block
        max_frame_bytes = self.limits.frame_bytes(blocks=blocks, backward=kind is BackwardRequest)
        reader = FrameReader(requests, max_frame_bytes, self.request_buffer)
        what = kind.model_fields["type"].default
        try:
            async with self._stateless_slot():
                try:
                    reply, span = await self._stateless_reply(reader, context, kind)
                finally:
                    reader.release()  # the request's tensors are consumed
            if reply is None:
                return
        except Exception as exc:  # a bad request must never take the peer down
            yield self.error_reply(exc, context, what)
            await _drain_reader(reader)
            return
        logger.debug("%s peer=%s blocks=%d:%d ms=%.1f", what, _short(context), *span, 1000 * (time.perf_counter() - started))
        for message in reply:
            yield message
        await _drain_reader(reader)

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

    async def _stateless_reply(self, reader: FrameReader, context: P2PContext, kind: type):
        """The reply messages and the span of a stateless call's frame (None, None: the stream closed at once)."""
        what = kind.model_fields["type"].default
        async with asyncio.timeout(self.session_idle_timeout_s):
            frame = await reader.read()
        if frame is None:
            return None, None
        header = decode_header(PEER_REQUEST, frame[0])
        if not isinstance(header, kind):
            raise errors.InvalidRequestError(f"rpc_{what} expects a {what} request, got {header.type!r}")
        check_access(self.swarm_key, header.auth, str(context.remote_id), self.peer_id)
        stack = self.stack
        self.check_serving(stack)
        span = check_span(header.start_block, header.end_block, (stack.start_block, stack.end_block))
        names = (*STATELESS_TENSORS, *wire_names(self.limits.lora_shapes))
        if kind is BackwardRequest:
            tensors = name_tensors(header, frame[1], (*names, "grad_outputs"))
            job = functools.partial(backward_job, stack, tensors, self.limits, span, header)
        else:
            adapter = self.adapter_weights(header.adapter, span)
            job = functools.partial(
                forward_job, stack, name_tensors(header, frame[1], names), self.limits, span, header, adapter
            )
        return await self._run_compute(job), span

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[Response]:
        reader = FrameReader(requests, 0, self.request_buffer)  # an opening carries no tensors
        try:
            opening = await self._read_opening(reader, context)
        except Exception as exc:
            yield self.error_reply(exc, context, "open")
            await _drain_reader(reader)
            return
        span = (opening.start_block, opening.end_block)
        # a step's tensors: those of batch_size x max_length tokens at most (a batched session's: one step's rows)
        tokens = MAX_SLOT_STEP_TOKENS if opening.slots is not None else opening.batch_size * opening.max_length
        reader.max_frame_bytes = self.limits.frame_bytes(tokens=tokens)
        try:
            if opening.slots is not None:  # a batched session takes cache for each sequence as it starts
                async with self.cache.reserve(0, self.cache_wait_s):
                    async for message in serve_slots(self, reader, opening, span, context):
                        yield message
                    await _drain_reader(reader)  # after a malformed frame, the client may still be sending
                    return
            async with self.cache.reserve(opening.batch_size * opening.max_length, self.cache_wait_s):
                async for message in self._serve_session(reader, opening, span, context):
                    yield message
        except errors.SwarmError as exc:  # no cache for this session
            yield self.error_reply(exc, context, "open")
            await _drain_reader(reader)
        finally:
            reader.release()  # the session's last frame is consumed

    async def _read_opening(self, reader: FrameReader, context: P2PContext) -> OpenSession:
        async with asyncio.timeout(self.session_idle_timeout_s):
            frame = await reader.read()
        if frame is None:
            raise errors.InvalidRequestError("stream closed before the session was opened")
        opening = decode_header(PEER_REQUEST, frame[0])
        if not isinstance(opening, OpenSession):
            raise errors.UnknownSessionError(f"no open session: an inference stream starts with 'open', got {opening.type!r}")
        check_access(self.swarm_key, opening.auth, str(context.remote_id), self.peer_id)
        if self.closing:
            raise errors.PeerUnavailableError("this peer is shutting down")
        check_span(opening.start_block, opening.end_block, (self.stack.start_block, self.stack.end_block))
        if opening.max_length > self.limits.max_length:
            raise errors.SessionLengthError(f"max_length {opening.max_length} exceeds this peer's {self.limits.max_length}")
        if opening.batch_size > self.limits.max_batch_size:
            raise errors.InvalidRequestError(f"batch size {opening.batch_size} exceeds {self.limits.max_batch_size}")
        if opening.slots is not None and (opening.batch_size != 1 or opening.push_from is not None):
            raise errors.InvalidRequestError("a batched session has batch_size 1 per sequence and takes no pushes")
        if opening.slots is not None and opening.slots > self.limits.max_batch_size:
            raise errors.InvalidRequestError(f"{opening.slots} slots exceed this peer's largest batch of {self.limits.max_batch_size}")
        return opening

    async def _serve_session(self, reader, opening: OpenSession, span, context) -> AsyncIterator[Response]:
        key = (opening.session_id, span[0])
        if key in self._inboxes:
            raise errors.InvalidRequestError("this session is already open on these blocks")
        inbox = self._inboxes[key] = _Inbox(push_from=opening.push_from)
        pump = asyncio.create_task(_pump(reader, inbox))
        pushes = PushChannels(self.p2p, self.info.dht_prefix, PUSH_TIMEOUT_S) if self.p2p is not None else None
        try:
            async for message in self._session_steps(inbox, pump, opening, span, context, pushes):
                yield message
        finally:
            del self._inboxes[key]
            pump.cancel()
            if pushes is not None:
                pushes.close()
            logger.info(
                "session %s on blocks %d:%d ended after %d steps (%d pushed by the previous hop)",
                opening.session_id[:8], *span, inbox.steps, inbox.pushed_steps,
            )

    async def _session_steps(self, inbox: _Inbox, pump, opening: OpenSession, span, context, pushes) -> AsyncIterator[Response]:
        stack = self.stack  # the session stays on these blocks, even if the peer moves meanwhile
        adapter = self.adapter_weights(opening.adapter, span)
        cache = stack.new_cache()
        session_limits = Limits(self.limits.hidden_size, opening.batch_size, opening.max_length)
        (reply,) = encode_frame(SessionOpened(session_id=opening.session_id), [], Response)
        yield reply
        last_step_id = -1
        while True:
            try:
                async with asyncio.timeout(self.session_idle_timeout_s):
                    source, item = await inbox.queue.get()
            except TimeoutError:
                logger.info("session %s idle for %.0f s: freeing its cache", opening.session_id[:8], self.session_idle_timeout_s)
                return
            if item is None:
                return  # the client closed the session
            if isinstance(item, errors.SwarmError):  # a malformed frame: end the session, keep serving others
                yield self.error_reply(item, context, "step")
                await _drain(inbox, pump)
                return
            if isinstance(item, BaseException):
                return  # the client's stream broke: it is gone
            started = time.perf_counter()
            step = None
            try:
                step, tensors = _step_of(source, item)
                if step.step_id <= last_step_id:
                    continue  # the other copy of this step ran already
                self.check_serving(stack)
                reply, push = await self._session_step(
                    opening.session_id, stack, cache, step, tensors, session_limits, span, adapter
                )
            except errors.SwarmError as exc:  # refused before any compute: the cache is intact
                yield self.error_reply(exc, context, f"step ({source})", step_id=getattr(step, "step_id", None))
                continue
            except Exception as exc:  # failed mid-compute: the cache may be half-updated, end the session
                yield self.error_reply(exc, context, "step", step_id=getattr(step, "step_id", None))
                await _drain(inbox, pump)
                return
            last_step_id = step.step_id
            inbox.steps += 1
            inbox.pushed_steps += source == "push"
            if push is not None and pushes is not None and await self._push(pushes, opening.session_id, step.push_to[0], push):
                pushed = Result(tensor_names=["hidden_states"], step_id=step.step_id, pushed=True)
                reply[-1].metadata = pushed.model_dump_json().encode()
            logger.debug(
                "step peer=%s session=%s blocks=%d:%d from=%s ms=%.1f", _short(context), opening.session_id[:8],
                *span, source, 1000 * (time.perf_counter() - started),
            )
            for message in reply:
                yield message

    async def _session_step(
        self, session_id: str, stack, cache, step: InferenceStep | PushStep, tensors, limits: Limits, span, adapter=None
    ):
        cache_length = stack.cache_length(cache, span[0])
        if step.position > cache_length:
            raise errors.InvalidRequestError(f"step at position {step.position} but the cache holds {cache_length} tokens")
        return await self._compute(
            stack, tensors, limits, cache, span, position=step.position, step=(session_id, step), adapter=adapter
        )

    # ---- pushes between consecutive hops ----------------------------------------------------
    async def rpc_push(self, request: Request, context: P2PContext) -> Response:
        try:
            metadata, tensors = await read_message(request, min(2 * CHUNK_BYTES, self.limits.frame_bytes()))
            header = decode_header(PEER_REQUEST, metadata)
            if not isinstance(header, PushStep):
                raise errors.InvalidRequestError(f"rpc_push expects a push, got {header.type!r}")
            check_access(self.swarm_key, header.auth, str(context.remote_id), self.peer_id)
            self._deliver(header, name_tensors(header, tensors, INPUT_TENSORS), str(context.remote_id))
        except Exception as exc:
            return self.error_reply(exc, context, "push")
        return Response()

    def _deliver(self, header: PushStep, tensors: dict[str, torch.Tensor], sender: str) -> None:
        inbox = self._inboxes.get((header.session_id, header.start_block))
        if inbox is None or inbox.push_from != sender or inbox.draining:
            raise errors.UnknownSessionError("no session here takes pushes from this peer")
        try:
            inbox.queue.put_nowait(("push", (header, tensors)))
        except asyncio.QueueFull:
            raise errors.OverloadedError("this session's inbox is full") from None

    async def rpc_push_stream(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for request in requests:
            yield await self.rpc_push(request, context)

    async def _push(self, pushes: PushChannels, session_id: str, target: str, header_and_tensors) -> bool:
        """Send a step's output to the next hop; True once it took it (it then owes the client the reply)."""
        header, tensors, message = header_and_tensors
        try:
            if target == self.peer_id:  # the next hop is this peer too
                self._deliver(header, tensors, self.peer_id)
                return True
            reply = await pushes.send(target, message)
        except (errors.SwarmError, ValueError) as exc:
            logger.debug("push of session %s to %s failed: %s", session_id[:8], target[-8:], exc)
            return False
        if reply.metadata:
            logger.debug("push of session %s to %s refused: %s", session_id[:8], target[-8:], reply.metadata[:200])
        return not reply.metadata

    async def _compute(self, stack: BlockStack, tensors, limits: Limits, cache, span, *, position: int, step=None, adapter=None):
        """Validate, roll back and run, all on the compute thread (one OpenMP pool per process).

        Returns the reply messages and, for a session step with hops after this one that fits in one
        message, what to push to the next hop (header, tensors, message); else None."""
        push_auth = None
        if step is not None and step[1].push_to:
            push_auth = make_proof(self.swarm_key, self.peer_id or "", step[1].push_to[0])
        if step is not None and _is_decode_step(tensors, stack, cache, span, position):
            finish = functools.partial(_finish_step, step, span, push_auth)
            return await self.run_decode(DecodeJob(stack, span, adapter, [(tensors, limits, cache, position)], finish))
        hidden_states = tensors.get("hidden_states")
        if step is not None and hidden_states is not None and hidden_states.ndim == 3 and hidden_states.shape[1] > PREFILL_CHUNK:
            inputs = await self._run_compute(functools.partial(checked_inputs, stack, tensors, limits, cache, span, position, adapter))
            outputs = await self._run_chunks(stack, inputs, cache, span, position)
            return _step_reply(step, span, inputs, outputs, push_auth)
        return await self._run_compute(functools.partial(self._compute_sync, stack, tensors, limits, cache, span, position, step, push_auth, adapter))

    async def run_decode(self, job: DecodeJob):
        """Decode rows, batched with other sessions' rows waiting at the same time (if batching is on)."""
        if self.batcher is not None:
            return await self.batcher.submit(job, rows=len(job.rows))
        (result,) = await self._run_compute(functools.partial(decode_batch, [job]))
        if isinstance(result, BaseException):
            raise result
        return result

    async def _run_chunks(self, stack: BlockStack, inputs: BlockInputs, cache, span, position: int) -> torch.Tensor:
        """A long step in chunks of PREFILL_CHUNK tokens, one compute job each, so that other sessions'
        decode steps run in between instead of waiting for the whole prompt."""
        outputs = []
        for first in range(0, inputs.hidden_states.shape[1], PREFILL_CHUNK):
            last = first + PREFILL_CHUNK
            piece = dataclasses.replace(
                inputs, hidden_states=inputs.hidden_states[:, first:last],
                position_ids=None if inputs.position_ids is None else inputs.position_ids[:, first:last],
                attention_mask=None if inputs.attention_mask is None else inputs.attention_mask[:, : position + last],
            )
            outputs.append(await self._run_compute(functools.partial(stack, piece, cache, span)))
        return torch.cat(outputs, dim=1).cpu()

    async def _run_compute(self, job):
        """Run `job` on the peer's compute thread, counted as running (see wait_idle)."""
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, job)
        finally:
            self._running -= 1

    @staticmethod
    def _compute_sync(stack: BlockStack, tensors, limits: Limits, cache, span, position: int, step, push_auth=None, adapter=None):
        inputs = checked_inputs(stack, tensors, limits, cache, span, position, adapter)
        return _step_reply(step, span, inputs, stack(inputs, cache, span).cpu(), push_auth)

    def error_reply(self, exc: BaseException, context: P2PContext, what: str, step_id: int | None = None) -> Response:
        if isinstance(exc, TimeoutError):
            exc = errors.PeerTimeoutError(f"no {what} request within {self.session_idle_timeout_s} s")
        if isinstance(exc, errors.SwarmError):
            logger.warning("refused %s from %s: %s", what, _short(context), str(exc)[:200])
            return encode_error(exc, Response, step_id=step_id)
        logger.exception("internal error serving %s from %s", what, _short(context))
        return encode_error(errors.RemoteError("internal error on the peer"), Response, code="internal", step_id=step_id)


def _step_reply(step, span, inputs: BlockInputs, outputs: torch.Tensor, push_auth):
    """The reply messages and, for a session step with hops after this one, what to push there."""
    if step is None:
        return list(encode_frame(Result(tensor_names=["hidden_states"]), [outputs], Response)), None
    session_id, step = step
    reply = list(encode_frame(Result(tensor_names=["hidden_states"], step_id=step.step_id), [outputs], Response))
    push = None
    if step.push_to:
        push = _push_message(session_id, step, span[1], dataclasses.replace(inputs, hidden_states=outputs), push_auth)
    return reply, push


def _finish_step(step, span, push_auth, inputs: list[BlockInputs], outputs: list[torch.Tensor]):
    return _step_reply(step, span, inputs[0], outputs[0].cpu(), push_auth)


def _is_decode_step(tensors: dict, stack: BlockStack, cache, span, position: int) -> bool:
    """One new token per row, right after what the cache holds (not empty: a first step has no cache to
    pad into a batch), nothing else: a step that can join a batch."""
    hidden_states = tensors.get("hidden_states")
    return (
        cache is not None and hidden_states is not None and hidden_states.ndim == 3 and hidden_states.shape[1] == 1
        and "prompts" not in tensors and 0 < position == stack.cache_length(cache, span[0])
    )


def _push_message(session_id: str, step, next_block: int, outputs: BlockInputs, auth: str | None = None):
    """The PushStep carrying this step's output to the next hop, if it fits in one message."""
    names, tensors = frame_tensors(
        {"hidden_states": outputs.hidden_states, "position_ids": outputs.position_ids, "attention_mask": outputs.attention_mask}
    )
    header = PushStep(
        session_id=session_id,
        start_block=next_block, position=step.position, step_id=step.step_id, push_to=step.push_to[1:], tensor_names=names,
        auth=auth,
    )
    messages = list(encode_frame(header, tensors, Request))
    if len(messages) != 1:
        return None  # a long prefill: the client relays it
    return header, dict(zip(names, tensors)), messages[0]


def _step_of(source: str, item) -> tuple[InferenceStep | PushStep, dict[str, torch.Tensor]]:
    if source == "push":
        return item
    header = decode_header(PEER_REQUEST, item[0])
    if not isinstance(header, InferenceStep):
        raise errors.InvalidRequestError(f"expected a step, got {header.type!r}")
    return header, name_tensors(header, item[1], INPUT_TENSORS)


async def _pump(reader: FrameReader, inbox: _Inbox) -> None:
    """Move the client's frames into the session's inbox; after the session ended, read and drop them.

    The request buffer counts the frame being read, not those already queued: INBOX_FRAMES at most per
    session, each within the session's batch x length, and the cache budget bounds the sessions."""
    try:
        while True:
            frame = await reader.read()
            if not inbox.draining:
                await inbox.queue.put(("client", frame))
            if frame is None:
                return
    except Exception as exc:  # a malformed frame (the session ends) or a broken stream
        if not inbox.draining:
            await inbox.queue.put(("client", exc))
        with contextlib.suppress(Exception):  # read the rest, keeping nothing: the client gets the error reply (see _drain)
            await reader.discard()


async def _drain_reader(reader: FrameReader, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Read the client's stream to its end, keeping nothing, before closing ours: closing first would
    break the pipe under the client's last write, and it would lose our reply (asyncio fails buffered
    reads then)."""
    try:
        async with asyncio.timeout(timeout_s):
            await reader.discard()
    except TimeoutError:
        pass


async def _drain(inbox: _Inbox, pump: asyncio.Task, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """_drain_reader for a session whose frames a pump reads."""
    inbox.draining = True
    while not inbox.queue.empty():
        inbox.queue.get_nowait()
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(pump)
    except Exception:  # timed out, or the stream broke: nothing more to read
        pass


def _short(context: P2PContext) -> str:
    return str(context.remote_id)[-8:]
