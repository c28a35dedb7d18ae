"""Inference sessions on a peer: a session owns its blocks (the stack it opened on), its KV cache, limits,
adapter, step ids and inbox, and turns each step it receives into a reply.

A session's steps reach it two ways: from its client over the session's stream, and pushed by the peer
serving the blocks just before it (`rpc_push`), which sends its output straight on instead of making the
client relay it. A peer that pushes says so in its reply, which it sends at once: waiting for the next hop
to take the push would add a round trip per hop to every token. If the push then fails, a `PushFailed`
follows on the session's stream and the client sends the step itself. A step that arrives twice runs
once. Every reply names its step, so a client re-running a step after a failover can tell stale replies
from current ones.

`PlainSession` is one sequence (or a batch of them) with one cache; a batched session, many independent
sequences on one stream, is `peers.slots.SlotSession`. Compute goes through `peers.scheduler`, replies and
pushes are encoded by `peers.replies`; sessions never touch the compute thread or the network themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator, Callable, Protocol

import torch
from hivemind.proto import runtime_pb2

from peers import replies
from peers.cache import CacheBudget
from peers.compute import Row, Step
from peers.scheduler import Scheduler
from peers.serving import Serving
from peers.validation import Limits, check_span
from swarm import errors
from swarm.messages import PEER_REQUEST, InferenceStep, OpenSession, PushStep
from swarm.swarm_key import SwarmKey, make_proof
from swarm.transport import FrameReader, decode_header, name_tensors

logger = logging.getLogger(__name__)

INPUT_TENSORS = ("hidden_states", "position_ids", "attention_mask")
INBOX_FRAMES = 4  # per session: a client sends one step and waits; pushes beyond this are dropped
DRAIN_TIMEOUT_S = 5.0
PUSH_TIMEOUT_S = 2.0  # for the next hop to take a push; the client sends the step itself otherwise
Response = runtime_pb2.ExpertResponse


class Pusher(Protocol):
    """A session's pushes to next hops (`peers.pushes.PushChannels` over the network; a fake in tests)."""

    async def send(self, target: str, message: runtime_pb2.ExpertRequest) -> Response: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class SessionEnv:
    """What sessions share on one peer: given to each session instead of the servicer itself."""

    serving: Serving
    scheduler: Scheduler
    cache: CacheBudget
    idle_timeout_s: float
    peer_id: str  # this peer's, for proofs to the next hop and pushes to itself
    swarm_key: SwarmKey | None = None  # a private swarm: pushes carry a proof
    new_pusher: Callable[[], Pusher] | None = None  # None: never push
    sessions: dict[tuple[str, int], PlainSession] = dataclasses.field(default_factory=dict)  # (id, first block) -> open

    def deliver(self, header: PushStep, tensors: dict[str, torch.Tensor], sender: str) -> None:
        """Put a push from peer `sender` into the inbox of the session it continues (refused: a typed error)."""
        session = self.sessions.get((header.session_id, header.start_block))
        if session is None or session.inbox.push_from != sender or session.inbox.draining:
            raise errors.UnknownSessionError("no session here takes pushes from this peer")
        try:
            session.inbox.queue.put_nowait(("push", (header, tensors)))
        except asyncio.QueueFull:
            raise errors.OverloadedError("this session's inbox is full") from None


@dataclasses.dataclass
class Inbox:
    """The frames of one session: ("client", frame | None | exception) and ("push", (PushStep, tensors))."""

    push_from: str | None
    queue: asyncio.Queue = dataclasses.field(default_factory=lambda: asyncio.Queue(maxsize=INBOX_FRAMES))
    draining: bool = False  # the session ended: the client's frames are read and dropped
    steps: int = 0
    pushed_steps: int = 0  # of which the previous hop's push arrived first


class PlainSession:
    def __init__(self, opening: OpenSession, reader: FrameReader, env: SessionEnv, caller: str):
        self.id, self.span = opening.session_id, (opening.start_block, opening.end_block)
        self.reader, self.env, self.caller = reader, env, caller
        self.stack = env.serving.stack  # the session stays on these blocks, even if the peer moves meanwhile
        check_span(*self.span, (self.stack.start_block, self.stack.end_block))  # the peer may have moved while it waited for cache
        self.adapter = env.serving.adapter_weights(opening, self.span)
        self.cache = self.stack.new_cache()
        self.limits = Limits(env.serving.limits.hidden_size, opening.batch_size, opening.max_length)
        self.inbox = Inbox(push_from=opening.push_from)
        self.last_step_id = -1
        self._pushes: set[asyncio.Task] = set()  # pushes on their way to the next hop
        self._failed_pushes: collections.deque[int] = collections.deque()  # their step ids, for the client
        self._push_failed = asyncio.Event()

    async def serve(self) -> AsyncIterator[Response]:
        """The session's replies until its client closes it, goes idle, or its stream breaks."""
        key = (self.id, self.span[0])
        if key in self.env.sessions:
            raise errors.InvalidRequestError("this session is already open on these blocks")
        self.env.sessions[key] = self
        pump = asyncio.create_task(_pump(self.reader, self.inbox))
        pusher = self.env.new_pusher() if self.env.new_pusher is not None else None
        try:
            yield replies.opened(self.id)
            async for message in self._steps(pump, pusher):
                yield message
        finally:
            del self.env.sessions[key]
            pump.cancel()
            for task in self._pushes:
                task.cancel()
            if pusher is not None:
                pusher.close()
            logger.info(
                "session %s on blocks %d:%d ended after %d steps (%d pushed by the previous hop)",
                self.id[:8], *self.span, self.inbox.steps, self.inbox.pushed_steps,
            )

    async def _steps(self, pump: asyncio.Task, pusher: Pusher | None) -> AsyncIterator[Response]:
        while True:
            try:
                async with asyncio.timeout(self.env.idle_timeout_s):
                    source, item = await self._next()
            except TimeoutError:
                logger.info("session %s idle for %.0f s: freeing its cache", self.id[:8], self.env.idle_timeout_s)
                return
            if source == "push_failed":
                yield replies.push_failed(item)
                continue
            if item is None:
                return  # the client closed the session
            if isinstance(item, errors.SwarmError):  # a malformed frame: end the session, keep serving others
                yield self._refusal(item, "step")
                await _drain(self.inbox, pump)
                return
            if isinstance(item, BaseException):
                return  # the client's stream broke: it is gone
            started, step = time.perf_counter(), None
            try:
                step, tensors = _step_of(source, item)
                if step.step_id <= self.last_step_id:
                    continue  # the other copy of this step ran already
                outputs, pushed = await self._run(step, tensors, pusher)
            except errors.SwarmError as exc:  # refused before any compute: the cache is intact
                yield self._refusal(exc, f"step ({source})", getattr(step, "step_id", None))
                continue
            except Exception as exc:  # failed mid-compute: the cache may be half-updated, end the session
                logger.exception("internal error in session %s", self.id[:8])
                yield replies.error(exc, step_id=getattr(step, "step_id", None), idle_timeout_s=self.env.idle_timeout_s)
                await _drain(self.inbox, pump)
                return
            self.last_step_id = step.step_id
            self.inbox.steps += 1
            self.inbox.pushed_steps += source == "push"
            compute_ms = 1000 * (time.perf_counter() - started)
            logger.debug(
                "step peer=%s session=%s blocks=%d:%d from=%s ms=%.1f", self.caller[-8:], self.id[:8], *self.span, source, compute_ms
            )
            for message in replies.result(outputs, step_id=step.step_id, pushed=pushed, compute_ms=round(compute_ms, 3)):
                yield message

    async def _next(self) -> tuple[str, object]:
        """The next thing to answer: a step's id whose push failed, or the inbox's next frame."""
        while not self._failed_pushes:
            self._push_failed.clear()
            getting, failing = asyncio.ensure_future(self.inbox.queue.get()), asyncio.ensure_future(self._push_failed.wait())
            try:
                await asyncio.wait({getting, failing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                failing.cancel()
                if not getting.done():
                    getting.cancel()  # asyncio.Queue.get leaves the item in the queue when cancelled before taking it
            if getting.done() and not getting.cancelled():
                return getting.result()
        return "push_failed", self._failed_pushes.popleft()

    async def _run(self, step: InferenceStep | PushStep, tensors: dict[str, torch.Tensor], pusher: Pusher | None):
        """The step's outputs, and whether they are on their way to the next hop (a push in the background)."""
        self.env.serving.check(self.stack)
        cached = self.stack.cache_length(self.cache, self.span[0])
        if step.position > cached:
            raise errors.InvalidRequestError(f"step at position {step.position} but the cache holds {cached} tokens")
        row = Row(tensors, self.limits, self.cache, step.position)
        ((inputs, outputs),) = await self.env.scheduler.step(Step(self.stack, self.span, self.adapter, [row]))
        if not step.push_to or pusher is None:
            return outputs, False
        target = step.push_to[0]
        push = replies.push(self.id, step, self.span[1], inputs, outputs, make_proof(self.env.swarm_key, self.env.peer_id, target))
        if push is None:
            return outputs, False
        if target == self.env.peer_id:  # the next hop is this peer too
            try:
                self.env.deliver(push.header, push.tensors, self.env.peer_id)
            except errors.SwarmError as exc:
                logger.debug("push of session %s to itself refused: %s", self.id[:8], exc)
                return outputs, False
            return outputs, True
        task = asyncio.create_task(self._push(pusher, target, push))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return outputs, True

    async def _push(self, pusher: Pusher, target: str, push: replies.Push) -> None:
        """Send a step's output to the next hop; if it does not take it, tell the client (see `_next`)."""
        try:
            reply = await pusher.send(target, push.message)
            refusal = reply.metadata[:200] if reply.metadata else None
        except (errors.SwarmError, ValueError) as exc:
            refusal = str(exc)
        except Exception as exc:  # a bug of ours or of a library: the client must still learn that the push is lost
            logger.warning("push of session %s to %s failed unexpectedly", self.id[:8], target[-8:], exc_info=True)
            refusal = f"{type(exc).__name__}: {exc}"
        if refusal is not None:
            logger.debug("push of session %s to %s failed: %s", self.id[:8], target[-8:], refusal)
            self._failed_pushes.append(push.header.step_id)
            self._push_failed.set()

    def _refusal(self, exc: BaseException, what: str, step_id: int | None = None) -> Response:
        logger.warning("refused %s from %s: %s", what, self.caller[-8:], str(exc)[:200])
        return replies.error(exc, step_id=step_id, idle_timeout_s=self.env.idle_timeout_s)


def _step_of(source: str, item) -> tuple[InferenceStep | PushStep, dict[str, torch.Tensor]]:
    if source == "push":
        return item
    header = decode_header(PEER_REQUEST, item[0])
    if not isinstance(header, InferenceStep):
        raise errors.InvalidRequestError(f"expected a step, got {header.type!r}")
    return header, name_tensors(header, item[1], INPUT_TENSORS)


async def _pump(reader: FrameReader, inbox: Inbox) -> None:
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


async def drain_reader(reader: FrameReader, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Read the client's stream to its end, keeping nothing, before closing ours: closing first would
    break the pipe under the client's last write, and it would lose our reply (asyncio fails buffered
    reads then)."""
    try:
        async with asyncio.timeout(timeout_s):
            await reader.discard()
    except TimeoutError:
        pass


async def _drain(inbox: Inbox, pump: asyncio.Task, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """drain_reader for a session whose frames a pump reads."""
    inbox.draining = True
    while not inbox.queue.empty():
        inbox.queue.get_nowait()
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(pump)
    except Exception:  # timed out, or the stream broke: nothing more to read
        pass
