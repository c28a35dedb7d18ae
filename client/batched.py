"""A batched inference session through a chain of peers: many independent sequences ("slots"), each
with its own cache and position on every peer, stepped together with one message per hop per step
(`peers.slots` serves it). The client relays every step; peers do not push.

It keeps no history, so it cannot replay a failed peer's cache by itself: a transient failure bans
the peer, closes the session and is raised, and the caller (`client.generator`, which holds every
sequence's tokens) opens a new session and starts its sequences again. `OverloadedError` (a peer
has no cache for a sequence that starts) leaves the session open: that sequence can start later.
"""

from __future__ import annotations

import itertools
import logging
import uuid

import torch

from client.remote import SpanStream
from client.retries import Retries
from client.sequence import RemoteSequence
from client.session import open_streams
from swarm import errors
from swarm.lora import AdapterId, adapter_ref
from swarm.messages import SlotStep

logger = logging.getLogger(__name__)


class BatchedSession:
    def __init__(self, sequence: RemoteSequence, *, slots: int, max_length: int, adapter: AdapterId | str | None = None):
        self.sequence = sequence
        self.slots = slots
        self.max_length = max_length  # tokens per sequence
        self.adapter = adapter_ref(adapter)
        self.session_id = uuid.uuid4().hex
        self.streams: list[SpanStream] = []
        self._step_ids = itertools.count()
        self.closed = False

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [(stream.peer_id, stream.start, stream.end) for stream in self.streams]

    async def open(self) -> None:
        """Open a stream on every hop of a route; a peer that fails to open is avoided and the route rebuilt."""
        retries = Retries(self.sequence.config)
        self.adapter = await self.sequence.pin_adapter(self.adapter)
        while True:
            try:
                self.streams = await open_streams(
                    self.sequence, self.session_id, 0, self.sequence.num_blocks, max_length=self.max_length,
                    adapter=self.adapter, slots=self.slots,
                )
                return
            except errors.RemoteError as exc:  # open_streams banned the peer that failed
                if not retries.allow(exc):
                    raise
                logger.warning("opening the batched session failed (%s), retry %d", exc, retries.failures)

    async def step(
        self, slots: list[int] = (), positions: list[int] = (), tokens: list[int] = (), hidden_states: torch.Tensor | None = None,
        *, release: list[int] = (), starts: list[int] = (), start_lengths: list[int] = (),
    ) -> torch.Tensor | None:
        """One step through every hop (see `SlotStep` for the order): free the slots in `release`, start
        new sequences in `starts` (reserving `start_lengths` tokens each; such a step has no rows), then
        run the rows: `hidden_states` [1, sum(tokens), hidden], row i's `tokens[i]` tokens continuing
        sequence `slots[i]` at `positions[i]`. Returns the outputs in the same layout (None: no rows)."""
        if self.closed:
            raise errors.SessionError("this batched session is closed")
        header = SlotStep(
            step_id=next(self._step_ids), release=list(release), starts=list(starts), start_lengths=list(start_lengths),
            slots=list(slots), positions=list(positions), tokens=list(tokens),
        )
        for stream in self.streams:
            try:
                hidden_states = await stream.step_slots(header, hidden_states)
            except errors.RemoteError as exc:
                # no cache for a sequence that starts: the session is fine, the sequence tries again later
                if exc.transient and not isinstance(exc, errors.OverloadedError):
                    logger.warning("peer %s failed for blocks %d:%d (%s)", stream.peer_id[-8:], stream.start, stream.end, exc)
                    self.sequence.ban(stream.peer_id)
                    self.close()
                raise
        return hidden_states

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.closed = True
