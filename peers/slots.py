"""Batched sessions: one inference stream carrying many independent sequences ("slots"), each with its
own KV cache, position and cache reservation, stepped together: a decode step of k sequences is one
message in, one batched forward (shared with other sessions' decode steps waiting at the same time),
one message out.

`plan_step` checks a `SlotStep` against the session's slots (pure); `SlotSession` runs a session: a
step's rows (decode tokens and prefill chunks alike) go to the scheduler as one batched step, which
shares a forward with other sessions' decode steps waiting at the same time. A slot reserves
cache for its sequence when it starts and gives it back when it is released, restarted or the
session ends. No pushes: the client relays every step (`client.batched`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator

import torch
from hivemind.proto import runtime_pb2

from peers import replies
from peers.compute import Row, Step
from peers.sessions import SessionEnv
from peers.validation import Limits, check_span
from swarm import errors
from swarm.messages import MAX_SLOT_STEP_TOKENS, PEER_REQUEST, OpenSession, SlotStep
from swarm.transport import FrameReader, decode_header, name_tensors

logger = logging.getLogger(__name__)

Response = runtime_pb2.ExpertResponse


@dataclasses.dataclass(frozen=True)
class RowPlan:
    slot: int
    position: int  # tokens the slot holds before the step
    tokens: int  # new tokens of this row
    length: int  # tokens reserved for the slot's sequence


def plan_step(
    step: SlotStep, held: dict[int, tuple[int, int]], *, slots: int, max_length: int, shape: tuple[int, int] | None
) -> list[RowPlan]:
    """What each row of `step` does, or the error that refuses the whole step before anything changes.

    `held`: slot -> (tokens in its cache, tokens reserved) before the step; `shape`: (batch, seq) of the
    step's hidden states (None: no tensor)."""
    for name, values in (("release", step.release), ("starts", step.starts), ("slots", step.slots)):
        if len(set(values)) != len(values):
            raise errors.InvalidRequestError(f"{name} lists a slot twice")
        if any(value >= slots for value in values):
            raise errors.InvalidRequestError(f"{name} must lie in 0..{slots - 1}")
    if len(step.start_lengths) != len(step.starts):
        raise errors.InvalidRequestError(f"{len(step.starts)} starts need as many start_lengths, got {len(step.start_lengths)}")
    for slot, length in zip(step.starts, step.start_lengths):
        if length > max_length:
            raise errors.SessionLengthError(f"slot {slot}: length {length} exceeds this session's {max_length}")
    rows = len(step.slots)
    if len(step.positions) != rows or len(step.tokens) != rows:
        raise errors.InvalidRequestError(f"{rows} slots need as many positions and tokens, got {len(step.positions)} and {len(step.tokens)}")
    if rows and step.starts:
        raise errors.InvalidRequestError("a step that starts sequences carries no rows")
    if rows == 0:
        if shape is not None:
            raise errors.InvalidRequestError("a step without rows carries no hidden states")
        return []
    total = sum(step.tokens)
    if shape != (1, total):
        raise errors.InvalidRequestError(f"hidden_states must be [1, {total}, hidden]: the rows' {total} tokens side by side, got {shape}")
    if total > MAX_SLOT_STEP_TOKENS:
        raise errors.InvalidRequestError(f"{total} tokens in one step exceed {MAX_SLOT_STEP_TOKENS}")
    remaining = {slot: value for slot, value in held.items() if slot not in step.release}
    plans = []
    for slot, position, tokens in zip(step.slots, step.positions, step.tokens):
        if slot not in remaining:
            raise errors.InvalidRequestError(f"slot {slot} holds no sequence: start it first")
        cached, reserved = remaining[slot]
        if position != cached:
            raise errors.InvalidRequestError(f"slot {slot} holds {cached} tokens: continue at {cached}, not {position}")
        if position + tokens > reserved:
            raise errors.SessionLengthError(f"slot {slot}: {position} + {tokens} tokens exceed its length of {reserved}")
        plans.append(RowPlan(slot, position, tokens, reserved))
    return plans


@dataclasses.dataclass
class _Slot:
    cache: object  # a DynamicCache over the session's blocks
    length: int  # tokens reserved


class SlotSession:
    """A batched session: its slots' caches and reservations, stepped as one."""

    def __init__(self, opening: OpenSession, reader: FrameReader, env: SessionEnv, caller: str):
        self.id, self.span = opening.session_id, (opening.start_block, opening.end_block)
        self.slots, self.max_length = opening.slots or 0, opening.max_length
        self.reader, self.env, self.caller = reader, env, caller
        self.stack = env.serving.stack  # the session stays on these blocks, even if the peer moves meanwhile
        check_span(*self.span, (self.stack.start_block, self.stack.end_block))  # the peer may have moved while it waited for cache
        self.adapter = env.serving.adapter_weights(opening, self.span)
        self.table: dict[int, _Slot] = {}
        self.steps = 0

    async def serve(self) -> AsyncIterator[Response]:
        """The session's replies until the client closes it, goes idle, or sends a malformed frame."""
        yield replies.opened(self.id)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.env.idle_timeout_s):
                        frame = await self.reader.read()
                except TimeoutError:
                    logger.info("batched session %s idle for %.0f s: freeing its cache", self.id[:8], self.env.idle_timeout_s)
                    return
                except errors.SwarmError as exc:  # a malformed frame: end the session, keep serving others
                    yield self._refusal(exc)
                    return
                if frame is None:
                    return
                step = None
                try:
                    step = decode_header(PEER_REQUEST, frame[0])
                    if not isinstance(step, SlotStep):
                        raise errors.InvalidRequestError(f"a batched session takes slot steps, got {step.type!r}")
                    outputs = await self._run(step, frame[1])
                except errors.SwarmError as exc:  # refused before any compute: the caches are intact
                    yield self._refusal(exc, getattr(step, "step_id", None))
                    continue
                except Exception as exc:  # failed mid-compute: caches may be half-updated, end the session
                    logger.exception("internal error in batched session %s", self.id[:8])
                    yield replies.error(exc, step_id=getattr(step, "step_id", None), idle_timeout_s=self.env.idle_timeout_s)
                    return
                self.steps += 1
                for message in replies.result(outputs, step_id=step.step_id):
                    yield message
        finally:
            for slot in self.table.values():
                await self.env.cache.give_back(slot.length)
            logger.info("batched session %s on blocks %d:%d ended after %d steps", self.id[:8], *self.span, self.steps)

    async def _run(self, step: SlotStep, tensors) -> torch.Tensor | None:
        named = name_tensors(step, tensors, ("hidden_states",)) if tensors or step.tensor_names else {}
        hidden_states = named.get("hidden_states")
        if hidden_states is not None and hidden_states.ndim != 3:
            raise errors.InvalidRequestError(f"hidden_states must be [1, tokens, hidden], got {list(hidden_states.shape)}")
        self.env.serving.check(self.stack)
        held = {slot: (self.stack.cache_length(entry.cache, self.span[0]), entry.length) for slot, entry in self.table.items()}
        shape = None if hidden_states is None else (hidden_states.shape[0], hidden_states.shape[1])
        plans = plan_step(step, held, slots=self.slots, max_length=self.max_length, shape=shape)
        for slot in step.release:
            await self._free(slot)
        for slot, length in zip(step.starts, step.start_lengths):
            await self._free(slot)
            self.env.cache.take(length)  # OverloadedError: the client tries again later
            self.table[slot] = _Slot(self.stack.new_cache(), length)
        if not plans:
            return None
        hidden_size, rows, first = self.env.serving.limits.hidden_size, [], 0
        for plan in plans:
            piece = hidden_states[:, first : first + plan.tokens]  # [1, tokens, hidden]
            rows.append(Row({"hidden_states": piece}, Limits(hidden_size, 1, plan.length), self.table[plan.slot].cache, plan.position))
            first += plan.tokens
        outputs = await self.env.scheduler.step(Step(self.stack, self.span, self.adapter, rows, batched=True))
        return torch.cat([output for _, output in outputs], dim=1)  # [1, tokens, hidden]: the rows side by side

    async def _free(self, slot: int) -> None:
        entry = self.table.pop(slot, None)
        if entry is not None:
            await self.env.cache.give_back(entry.length)

    def _refusal(self, exc: BaseException, step_id: int | None = None) -> Response:
        logger.warning("refused slot step from %s: %s", self.caller[-8:], str(exc)[:200])
        return replies.error(exc, step_id=step_id, idle_timeout_s=self.env.idle_timeout_s)
