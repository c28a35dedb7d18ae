"""An inference session through a chain of peers, each holding the KV cache of its blocks.

The session keeps every input it sent (hidden states entering each hop, positions, mask), so when a
peer fails it opens streams on replacement peers for exactly that peer's blocks, replays the history
to rebuild their cache, and continues. It does not compute anything locally (see `client.model`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
import uuid

import torch

from client.remote import SpanStream
from client.retries import Retries
from client.sequence import RemoteSequence
from client.timing import HopTiming, StepTiming, hop_timing
from swarm import errors
from swarm.blocks import BlockInputs
from swarm.lora import AdapterId, adapter_ref
from swarm.messages import MAX_PUSH_HOPS

logger = logging.getLogger(__name__)

TIMED_STEPS = 64  # the most recent steps whose timing a session keeps


class InferenceSession:
    def __init__(self, sequence: RemoteSequence, *, max_length: int, batch_size: int = 1, adapter: AdapterId | str | None = None):
        self.sequence = sequence
        self.adapter = adapter_ref(adapter)  # a LoRA adapter every peer of the session serves and applies
        self.max_length = max_length
        self.batch_size = batch_size
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens every hop has in its cache
        self._step_ids = itertools.count()
        self.streams: list[SpanStream] = []
        self._inputs_at: dict[int, History] = {}  # block index -> hidden states that entered it [batch, pos, hidden]
        self._position_ids = History()  # [batch or 1, pos]
        self._attention_mask: torch.Tensor | None = None  # [batch, pos]
        self.closed = False
        self.plain_only = False  # a peer refused to roll back: no speculative decoding in this session
        self.history_ids: torch.Tensor | None = None  # token ids of the conversation, kept by generate()
        self.history_mask: torch.Tensor | None = None
        self.timings: collections.deque[StepTiming] = collections.deque(maxlen=TIMED_STEPS)  # see client.timing

    @property
    def route(self) -> list[tuple[str, int, int]]:
        """(peer_id, start, end) of every hop, in order."""
        return [(stream.peer_id, stream.start, stream.end) for stream in self.streams]

    def describe_route(self) -> list[str]:
        """One human-readable line per hop: blocks, public name, short peer id."""
        lines = []
        for peer_id, start, end in self.route:
            span = self.sequence.spans.get(peer_id)
            name = span.public_name if span is not None and span.public_name else "(unnamed)"
            lines.append(f"blocks {start:>3}:{end:<3} {name:<16} peer ...{peer_id[-12:]}")
        return lines

    async def open(self) -> None:
        """Open streams through every block; a peer that fails to open is avoided and the route rebuilt."""
        retries = Retries(self.sequence.config)
        while True:
            try:
                self.streams = await self._open_streams(0, self.sequence.num_blocks, push_from=None)
                return
            except errors.RemoteError as exc:  # _open_streams banned the peer that failed
                if not retries.allow(exc):
                    raise
                logger.warning("opening the session failed (%s), retry %d", exc, retries.failures)

    async def step(self, inputs: BlockInputs, position: int | None = None) -> torch.Tensor:
        """Run new tokens through all blocks; `position` < self.position rolls the session back first."""
        if self.closed:
            raise errors.SessionError("this inference session is closed")
        position = self.position if position is None else position
        new_tokens = inputs.hidden_states.shape[1]
        if not 0 <= position <= self.position:
            raise errors.SessionError(f"cannot step at position {position}: the session holds {self.position} tokens")
        if position + new_tokens > self.max_length:
            raise errors.SessionLengthError(
                f"{position + new_tokens} tokens exceed this session's max_length={self.max_length}"
            )
        self._truncate(position)
        sent = inputs.without_defaults(position)  # what every hop gets: the defaults cost each hop time to decode
        hidden_states, index, step_id, pushed = inputs.hidden_states, 0, next(self._step_ids), False
        started = last = time.perf_counter()
        hops: list[HopTiming] = []
        while index < len(self.streams):
            stream = self.streams[index]
            self._remember(stream.start, hidden_states, position)
            try:
                hidden_states, result = await stream.step(
                    _with_hidden(sent, hidden_states), position, step_id, self._push_chain(index),
                    pushed_by=self.streams[index - 1] if pushed else None,
                )
                now = time.perf_counter()
                hops.append(hop_timing(
                    stream.peer_id, stream.start, stream.end, waited_ms=1000 * (now - last), compute_ms=result.compute_ms, pushed=pushed,
                ))
                pushed, last = result.pushed, now
                index += 1
            except errors.RemoteError as exc:
                if not exc.transient:
                    raise
                await self._replace(index, exc, step_id)
                # the rest of the step runs anew under a new id: what later hops answer to the old one
                # (a push from the failed peer) is stale, and they recompute at the same position
                step_id, pushed = next(self._step_ids), False
                hops, last = hops[:index], time.perf_counter()
        self.timings.append(StepTiming(position, new_tokens, tuple(hops), round(1000 * (time.perf_counter() - started), 3)))
        self._remember_positions(inputs, position)
        self.position = position + new_tokens
        return hidden_states

    def rewind(self, position: int) -> None:
        """Forget the tokens from `position` on; the peers drop them from their cache at the next step."""
        if not 0 <= position <= self.position:
            raise errors.SessionError(f"cannot rewind to position {position}: the session holds {self.position} tokens")
        self._truncate(position)

    async def reopen(self) -> None:
        """Open streams through every block anew, on a fresh route, and replay the history into them
        (after a peer refused to roll its cache back: only a replay from the start can go back). A peer
        that fails the replay is banned and the route built again, as after a failed step."""
        retries = Retries(self.sequence.config)
        while True:
            for stream in self.streams:
                stream.close()
            self.streams, self.session_id = [], uuid.uuid4().hex
            try:
                await self.open()
                await self._replay(self.streams, next(self._step_ids))
                return
            except errors.RemoteError as exc:
                if getattr(exc, "peer_id", None):
                    self.sequence.ban(exc.peer_id)
                if not exc.transient or not retries.allow(exc):
                    raise
                logger.warning("replaying the session failed (%s), retry %d", exc, retries.failures)

    def _push_chain(self, index: int) -> list[str]:
        """The hops after streams[index] that take pushes from their predecessor, up to the first that does not."""
        chain = []
        for previous, stream in zip(self.streams[index:], self.streams[index + 1 :]):
            if stream.push_from != previous.peer_id or len(chain) == MAX_PUSH_HOPS or not self.sequence.pushes_pay(stream.peer_id):
                break
            chain.append(stream.peer_id)
        return chain

    async def _replace(self, index: int, cause: Exception, step_id: int) -> None:
        """Swap streams[index] for new peer(s) over the same blocks and replay the history into them.

        The replay counts as step `step_id - 1`, the last one the session completed, so that step
        `step_id` then runs on the new peers; hops after them may have it already, pushed to them."""
        failed = self.streams[index]
        logger.warning("peer %s failed for blocks %d:%d (%s): re-routing", failed.peer_id[-8:], failed.start, failed.end, cause)
        failed.close()
        self.sequence.ban(failed.peer_id)
        retries = Retries(self.sequence.config)
        while True:
            replacement = []
            try:
                previous = self.streams[index - 1].peer_id if index > 0 else None
                replacement = await self._open_streams(failed.start, failed.end, push_from=previous)
                await self._replay(replacement, step_id - 1)
                self.streams[index : index + 1] = replacement
                return
            except errors.RemoteError as exc:
                for stream in replacement:
                    stream.close()
                if getattr(exc, "peer_id", None):
                    self.sequence.ban(exc.peer_id)
                if not retries.allow(exc):
                    raise
                logger.warning("replacement failed (%s), retry %d", exc, retries.failures)

    async def _replay(self, streams: list[SpanStream], step_id: int) -> None:
        if self.position == 0:
            return
        hidden_states = self._inputs_at[streams[0].start].view(self.position)
        history = BlockInputs(hidden_states, self._position_ids.view(self.position), self._attention_mask).without_defaults(0)
        for stream in streams:
            self._inputs_at[stream.start] = History()
            self._inputs_at[stream.start].write(hidden_states, 0)
            try:
                hidden_states, _ = await stream.step(_with_hidden(history, hidden_states), 0, step_id)
            except errors.RemoteError as exc:
                exc.peer_id = stream.peer_id  # so the caller bans the peer that failed the replay
                raise

    async def _open_streams(self, start: int, end: int, *, push_from: str | None) -> list[SpanStream]:
        """Streams through [start, end); the first takes pushes from `push_from`, each next one from its predecessor."""
        self.adapter = await self.sequence.pin_adapter(self.adapter)  # a bare name: the adapter served under it, for good
        return await open_streams(
            self.sequence, self.session_id, start, end, max_length=self.max_length, batch_size=self.batch_size,
            adapter=self.adapter, push_from=push_from,
        )

    def _truncate(self, position: int) -> None:
        if position < self.position:
            self.position = position  # History buffers are overwritten from here on
            if self._attention_mask is not None:
                self._attention_mask = self._attention_mask[:, :position]

    def _remember(self, block: int, hidden_states: torch.Tensor, position: int) -> None:
        self._inputs_at.setdefault(block, History()).write(hidden_states, position)

    def _remember_positions(self, inputs: BlockInputs, position: int) -> None:
        if inputs.position_ids is not None:
            self._position_ids.write(inputs.position_ids, position)
        if inputs.attention_mask is not None:
            self._attention_mask = inputs.attention_mask

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.closed = True


async def open_streams(
    sequence: RemoteSequence, session_id: str, start: int, end: int, *, max_length: int, batch_size: int = 1,
    adapter: AdapterId | None = None, push_from: str | None = None, slots: int | None = None,
) -> list[SpanStream]:
    """Streams of session `session_id` through [start, end) over a fresh route. The first takes pushes
    from `push_from`, each next one from its predecessor (`slots`, a batched session: no pushes). A
    peer that fails to open is banned and the error raised: the caller decides whether to retry."""
    streams = []
    try:
        for hop in await sequence.route(start, end, adapter):
            stream = SpanStream(
                sequence.p2p, hop.peer_id, sequence.dht_prefix, hop.start, hop.end, sequence.config.step_timeout_s,
                sequence.proof(hop.peer_id), sequence.wire_dtype(hop.peer_id),
            )
            streams.append(stream)
            await stream.open(session_id, max_length, batch_size, push_from=push_from, adapter=adapter, slots=slots)
            push_from = hop.peer_id if slots is None else None
    except errors.RemoteError as exc:
        for stream in streams:
            stream.close()
        if exc.transient and streams:
            sequence.ban(streams[-1].peer_id)
        raise
    return streams


class History:
    """A sequence of tensors along dim 1 with amortised O(1) appends (no quadratic torch.cat)."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def write(self, values: torch.Tensor, position: int) -> None:  # values: [batch, n, ...]
        """Store `values` at [position, position + n) and forget anything after it."""
        end = position + values.shape[1]
        if self._buffer is None or end > self._buffer.shape[1] or self._buffer.shape[0] != values.shape[0]:
            capacity = max(end, 2 * (self._buffer.shape[1] if self._buffer is not None else 0), 16)
            grown = values.new_empty(values.shape[0], capacity, *values.shape[2:])
            if self._buffer is not None and position:
                grown[:, :position] = self._buffer[:, :position]
            self._buffer = grown
        self._buffer[:, position:end] = values

    def view(self, length: int) -> torch.Tensor | None:
        return None if self._buffer is None else self._buffer[:, :length]


def _with_hidden(inputs: BlockInputs, hidden_states: torch.Tensor) -> BlockInputs:
    return dataclasses.replace(inputs, hidden_states=hidden_states)
