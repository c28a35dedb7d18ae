"""What a peer serves right now: its blocks (a `BlockStack`: the one place that holds the peer's block
range), the PeerInfo it answers with (its range taken from the stack), its adapters, the limits every request is checked against, and the
stacks it moved off, each with the grace its sessions still have there.

State and its checks only: it runs nothing and reads no request (`peers.handler` does).
"""

from __future__ import annotations

import time
import weakref

from peers.validation import Limits, check_span
from swarm import errors
from swarm.blocks import BlockStack
from swarm.lora import AdapterId, LoraWeights, projection_shapes
from swarm.messages import ForwardRequest, OpenSession, PeerInfo


class Serving:
    def __init__(self, stack: BlockStack, info: PeerInfo, adapters: dict[AdapterId, LoraWeights] | None = None):
        self.stack, self._info = stack, info
        self.adapters = adapters or {}  # LoRA weights of every block of the model, one adapter per name
        # (adapter, span) -> those of the span: one object that every session on them shares, so their decode
        # steps can share a forward (`peers.compute.run_turn` groups by the adapter's identity)
        self._adapter_spans: dict[tuple[AdapterId, tuple[int, int]], LoraWeights] = {}
        # stacks left by moves -> until when (time.monotonic) their sessions may go on
        self._retired: weakref.WeakKeyDictionary[BlockStack, float] = weakref.WeakKeyDictionary()
        self.closing = False  # shutting down: running steps finish, new ones are refused
        config = stack.config  # one model whatever the blocks: the limits do not change with a move
        self.limits = Limits(config.hidden_size, info.max_batch_size, info.max_length, lora_shapes=projection_shapes(config))

    @property
    def blocks(self) -> tuple[int, int]:
        return self.stack.start_block, self.stack.end_block

    @property
    def info(self) -> PeerInfo:
        return self._info.model_copy(update={"start_block": self.stack.start_block, "end_block": self.stack.end_block})

    def switch(self, stack: BlockStack, handoff_grace_s: float) -> None:
        """Serve `stack` from now on. Sessions opened on the old one may go on for `handoff_grace_s`, then
        their steps are refused with a transient error, so their clients re-route. Each stack left keeps its
        own deadline: a later move does not extend the grace of sessions on older blocks."""
        now = time.monotonic()
        for old, until in list(self._retired.items()):
            if until < now:
                del self._retired[old]
        self._retired[self.stack] = now + handoff_grace_s
        self.stack = stack

    def check(self, stack: BlockStack) -> None:
        """Refuse a step on `stack` once the peer is closing, or moved off it longer ago than its grace."""
        if self.closing:
            raise errors.PeerUnavailableError("this peer is shutting down")
        if stack is not self.stack and time.monotonic() > self._retired.get(stack, float("-inf")):
            raise errors.BlocksNotServedError(f"this peer moved to blocks {self.stack.start_block}:{self.stack.end_block}")

    def check_span(self, start_block: int, end_block: int) -> tuple[int, int]:
        if self.closing:
            raise errors.PeerUnavailableError("this peer is shutting down")
        return check_span(start_block, end_block, self.blocks)

    def adapter_weights(self, request: ForwardRequest | OpenSession, span: tuple[int, int]) -> LoraWeights | None:
        """The LoRA weights for blocks `span` of the adapter a request names (None: no adapter), which
        must be the very adapter we serve under that name when the request gives its digest."""
        if request.adapter is None:
            return None
        wanted = AdapterId(request.adapter, request.adapter_digest)
        for served, weights in self.adapters.items():
            if served.matches(wanted):
                key = (served, span)
                if key not in self._adapter_spans:
                    self._adapter_spans[key] = weights.for_blocks(*span)
                return self._adapter_spans[key]
        serving = ", ".join(sorted(map(str, self.adapters))) or "none"
        raise errors.BlocksNotServedError(f"adapter {wanted} is not served here (this peer serves: {serving})")
