"""The client's view of one model's blocks in the swarm: peers from the DHT, their latency, bans,
routes through them, and stateless forward passes with re-routing on transient failures.

Route choice itself is the pure `client.routing.choose_route`; this class gathers its inputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import torch

from client import routing
from client.remote import call_backward, call_forward, call_info
from client.retries import Retries
from swarm import coverage, errors, network
from swarm.blocks import BlockInputs
from swarm.config import ClientConfig
from swarm.loop_thread import run_coroutine
from swarm.lora import AdapterId, adapter_ref
from swarm.records import parse_peer_records
from swarm.swarm_key import SwarmKey, make_proof
from swarm.transport import WIRE_DTYPES

logger = logging.getLogger(__name__)

BAN_BASE_S = 5.0
BAN_MAX_S = 300.0
REFRESH_PERIOD_S = 10.0
MISSED_LOOKUP_GRACE_S = 30.0
MAX_PINGS_PER_UPDATE = 64  # a flood of fake records must not make us dial thousands of peers at once
PINGS_PER_PEER = 3  # a peer's round trip is the fastest of these: the first also dials the peer (measured on
# loopback: 4-14 ms for a first ping, against 1.6 ms for a warm one, which made push_steps="auto" push at random)


class RemoteSequence:
    def __init__(self, config: ClientConfig, *, dht_prefix: str, num_blocks: int):
        if not config.network.initial_peers:
            raise errors.ConfigError("initial_peers is empty: give the multiaddr of at least one peer of the swarm")
        self.config = config
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        self.swarm_key = SwarmKey.load(config.network.swarm_key_path)  # None: a public swarm
        self.dht = network.start_node(config.network, swarm_key=self.swarm_key)
        self.p2p = run_coroutine(self.dht.replicate_p2p())
        self.peer_id = self.p2p.peer_id.to_base58()
        self.spans: dict[str, routing.PeerSpan] = {}
        self.latency_s: dict[str, float] = {}
        self._bans: dict[str, tuple[float, int]] = {}  # peer_id -> (banned until, failures)
        self._updated_at = 0.0
        self._last_seen: dict[str, float] = {}  # peer_id -> when a DHT lookup last listed it online
        self._formats_told: set[tuple[str, ...]] = set()  # mixes of block formats already logged

    # ---- swarm state -------------------------------------------------------------------------
    async def update(self) -> None:
        raw = await asyncio.get_running_loop().run_in_executor(
            None, network.fetch_block_records, self.dht, self.dht_prefix, self.num_blocks
        )
        records = [parse_peer_records(entry, where=f"{self.dht_prefix}.{index}") for index, entry in enumerate(raw)]
        fresh = coverage.peer_spans(records, coverage.SERVING_STATES)
        now = time.monotonic()
        for peer_id in fresh:
            self._last_seen[peer_id] = now
        # a DHT lookup through a stalled node can come back empty for some keys: peers of blocks that
        # came back with no record at all stay routable for a while (a dead one fails fast and is banned)
        empty = {index for index, entry in enumerate(raw) if not entry}
        kept = {
            peer_id: span for peer_id, span in self.spans.items()
            if peer_id not in fresh and set(range(span.start, span.end)) <= empty
            and now - self._last_seen.get(peer_id, 0.0) < MISSED_LOOKUP_GRACE_S
        }
        self.spans = {**kept, **fresh}
        self._updated_at = now
        await self._measure_latencies([peer_id for peer_id in self.spans if peer_id not in self.latency_s])

    async def _measure_latencies(self, peer_ids: list[str]) -> None:
        async def ping(peer_id: str) -> None:
            fastest = float("inf")
            for _ in range(PINGS_PER_PEER):
                started = time.perf_counter()
                try:
                    await call_info(self.p2p, peer_id, self.dht_prefix, self.config.ping_timeout_s, self.proof(peer_id))
                except errors.SwarmError as exc:
                    logger.warning("peer %s did not answer a ping: %s", peer_id[-8:], exc)
                    self.ban(peer_id)
                    return
                fastest = min(fastest, time.perf_counter() - started)
            self.latency_s[peer_id] = fastest

        await asyncio.gather(*(ping(peer_id) for peer_id in peer_ids[:MAX_PINGS_PER_UPDATE]))

    def pushes_pay(self, peer_id: str) -> bool:
        """Whether the previous hop should push steps to `peer_id` (see ClientConfig.push_steps)."""
        if self.config.push_steps != "auto":
            return bool(self.config.push_steps)
        return self.latency_s.get(peer_id, float("inf")) >= self.config.push_min_rtt_s

    def proof(self, peer_id: str) -> str | None:
        """What a call to `peer_id` carries to show we hold the swarm's key (None in a public swarm)."""
        return make_proof(self.swarm_key, self.peer_id, peer_id)

    def wire_dtype(self, peer_id: str) -> torch.dtype | None:
        """The dtype the peer computes in, as it announces it (None if unknown): hidden states travel in it."""
        span = self.spans.get(peer_id)
        dtype = WIRE_DTYPES.get(span.record.dtype) if span is not None and span.record is not None else None
        return dtype if dtype is not None and dtype.is_floating_point else None

    def ban(self, peer_id: str) -> None:
        """Avoid a peer for a while after a transient failure; the ban doubles with each failure."""
        _, failures = self._bans.get(peer_id, (0.0, 0))
        duration = min(BAN_BASE_S * 2**failures, BAN_MAX_S)
        self._bans[peer_id] = (time.monotonic() + duration, failures + 1)
        logger.warning("avoiding peer %s for %.0f s", peer_id[-8:], duration)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer_id for peer_id, (until, _) in self._bans.items() if until > now}

    async def route(
        self, start: int = 0, end: int | None = None, adapter: AdapterId | str | None = None, spread: bool = False, whole: bool = False
    ) -> list[routing.Hop]:
        """A chain of peers through [start, end) (all serving `adapter`, if given): the lowest expected
        time per token (see `routing.choose_route`), or with `spread`, peers drawn by throughput (see `routing.choose_spread_route`);
        with `whole`, one peer for the whole range if any can. Waits up to route_wait_s for missing blocks."""
        end = self.num_blocks if end is None else end
        adapter = adapter_ref(adapter)
        deadline = time.monotonic() + self.config.route_wait_s
        if time.monotonic() - self._updated_at > REFRESH_PERIOD_S:
            await self.update()
        while True:
            try:
                spans = routing.format_spans(self.spans, self.config.quantizations, self.config.dtypes, start, end)
                spans = routing.adapter_spans(spans, adapter, start, end)
                if whole:
                    banned = self.banned()
                    covering = {
                        peer_id: span for peer_id, span in spans.items()
                        if span.start <= start and end <= span.end and peer_id not in banned
                    }
                    spans = covering or spans
                if spread:
                    return routing.choose_spread_route(spans, start, end, banned=self.banned())
                route = routing.choose_route(
                    spans, start, end, latency_s=self.latency_s, banned=self.banned(), prefer=self.config.prefer_quantization
                )
                self._tell_formats(spans, route)
                return route
            except errors.MissingBlocksError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(1.0)
            await self.update()

    def _tell_formats(self, spans: dict[str, routing.PeerSpan], route: list[routing.Hop]) -> None:
        """Log (INFO, once per mix) a route whose hops store their blocks in different formats: all are
        formats the client accepts (ClientConfig.quantizations), and the text differs from a one-format route's."""
        formats = tuple(
            f"{hop.start}:{hop.end} {spans[hop.peer_id].record.precision}" for hop in route if spans[hop.peer_id].record is not None
        )
        if len({text.split(" ", 1)[1] for text in formats}) > 1 and formats not in self._formats_told:
            self._formats_told.add(formats)
            logger.info("this route mixes block formats: %s", ", ".join(formats))

    async def pin_adapter(self, adapter: AdapterId | str | None) -> AdapterId | None:
        """`adapter` (a path, a name or an AdapterId) with its digest, so that a session or a forward
        sticks to one adapter: a bare name is resolved against what peers announce now (it stays bare
        while no peer announces a digest for it; `route` waits for one)."""
        adapter = adapter_ref(adapter)
        if adapter is None or adapter.digest is not None:
            return adapter
        if time.monotonic() - self._updated_at > REFRESH_PERIOD_S:
            await self.update()
        return routing.resolve_adapter(self.spans, adapter)

    # ---- stateless forward and backward ------------------------------------------------------
    async def forward(
        self, inputs: BlockInputs, hops: list | None = None, adapter: AdapterId | str | None = None, spread: bool = False
    ) -> torch.Tensor:
        """Hidden states after all blocks, for a whole sequence (no cache). With `hops`, appends
        (start, end, inputs) for every hop taken: what `backward` needs. `inputs.prompts`, if any, holds
        the deep prompts of every block of the model; each peer gets those of its blocks. With `adapter`,
        only peers serving that LoRA adapter are used, and they apply it. With `spread`, hops are drawn
        by throughput (training) instead of latency."""
        hidden_states, position = inputs.hidden_states, 0
        adapter = await self.pin_adapter(adapter)
        while position < self.num_blocks:
            step_inputs = dataclasses.replace(inputs, hidden_states=hidden_states)
            hidden_states, end = await self._retrying_hop(position, step_inputs, adapter=adapter, spread=spread)
            if hops is not None:
                hops.append((position, end, step_inputs))
            position = end
        return hidden_states

    # ---- training: the batch in pieces, over peers drawn by throughput ----------------------------
    async def train_forward(self, inputs: BlockInputs) -> tuple[torch.Tensor, tuple]:
        """`forward` for training: the batch goes in pieces of at most max_batch_tokens tokens (whole
        rows), all at once, each over peers drawn by throughput. Returns the outputs and what
        `train_backward` needs."""
        batch, length = inputs.hidden_states.shape[:2]
        rows = max(1, self.config.max_batch_tokens // max(1, length))
        pieces = [slice(first, min(first + rows, batch)) for first in range(0, batch, rows)]
        hops: list[list] = [[] for _ in pieces]
        outputs = await asyncio.gather(*(
            self.forward(_rows(inputs, piece, batch, number), hops=piece_hops, spread=True)
            for number, (piece, piece_hops) in enumerate(zip(pieces, hops))
        ))
        shared_prompts = inputs.prompts is not None and inputs.prompts.shape[1] == 1
        return torch.cat(outputs), (list(zip(pieces, hops)), shared_prompts)

    async def train_backward(self, state: tuple, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """`backward` of a `train_forward`: each piece back through its own hops, all at once; the
        gradients of what the pieces share (deep prompts with batch 1, LoRA weights) are summed."""
        pieces, shared_prompts = state
        results = await asyncio.gather(*(
            self.backward(hops, grad_outputs[piece].contiguous(), spread=True) for piece, hops in pieces
        ))
        grad_inputs = torch.cat([grad for grad, _, _ in results])
        grad_prompts = None
        if results[0][1] is not None:
            parts = [grad for _, grad, _ in results]
            grad_prompts = sum(parts) if shared_prompts else torch.cat(parts, dim=1)
        grad_lora = {name: sum(lora[name] for _, _, lora in results) for name in results[0][2]}
        return grad_inputs, grad_prompts, grad_lora

    async def backward(
        self, hops: list, grad_outputs: torch.Tensor, spread: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The gradients of the hidden states entering block 0, of the deep prompts (None without them)
        and of the LoRA weights (by wire name, all blocks), given that of the hidden states leaving the
        last block, through the hops a `forward` took (each on any peer that serves it now)."""
        first = hops[0][2] if hops else BlockInputs(grad_outputs)
        grads = {"prompts": torch.zeros_like(first.prompts) if first.prompts is not None else None}
        if first.lora is not None:
            grads.update({name: torch.zeros_like(tensor) for name, tensor in first.lora.tensors().items()})
        grad = grad_outputs
        for start, end, inputs in reversed(hops):
            grad = await self._backward_span(start, end, inputs, grad, grads, spread)
        prompts = grads.pop("prompts")
        return grad, prompts, grads

    async def _backward_span(
        self, start: int, end: int, inputs: BlockInputs, grad: torch.Tensor, grads: dict, spread: bool = False
    ) -> torch.Tensor:
        retries = Retries(self.config)
        while True:
            hop = (await self.route(start, end, spread=spread, whole=True))[0]
            if hop.end < end:  # the drawn peer does not serve the whole span: split it where its span ends
                # (outside the try: each part routes, bans and retries its own peers, and a part that
                # fails for good is no fault of the peer drawn here)
                middle, _ = await self._retrying_hop(start, inputs, end=hop.end, spread=spread)
                later = dataclasses.replace(inputs, hidden_states=middle)
                grad = await self._backward_span(hop.end, end, later, grad, grads, spread)
                return await self._backward_span(start, hop.end, inputs, grad, grads, spread)
            try:
                grad_inputs, grad_prompts, grad_lora = await call_backward(
                    self.p2p, hop.peer_id, self.dht_prefix, start, end, _for_span(inputs, start, end), grad,
                    self.config.step_timeout_s, self.proof(hop.peer_id),
                )
            except errors.RemoteError as exc:
                if not retries.allow(exc):
                    raise
                logger.warning("backward on %s failed (%s), retry %d", hop.peer_id[-8:], exc, retries.failures)
                self.ban(hop.peer_id)
                continue
            if grad_prompts is not None:
                grads["prompts"][start:end] = grad_prompts
            for name, value in grad_lora.items():  # a peer's gradients for its blocks, in the model's buffer
                grads[name][start:end] = value
            return grad_inputs

    async def _retrying_hop(
        self, position: int, inputs: BlockInputs, end: int | None = None, adapter: AdapterId | None = None, spread: bool = False
    ) -> tuple[torch.Tensor, int]:
        """(outputs, end) of the first hop of a route from `position` (to `end` at most)."""
        retries = Retries(self.config)
        while True:
            hop = (await self.route(position, end, adapter, spread))[0]
            try:
                output = await call_forward(
                    self.p2p, hop.peer_id, self.dht_prefix, hop.start, hop.end, _for_span(inputs, hop.start, hop.end),
                    self.config.step_timeout_s, self.proof(hop.peer_id), adapter, self.wire_dtype(hop.peer_id),
                )
                return output, hop.end
            except errors.RemoteError as exc:
                if not retries.allow(exc):
                    raise
                logger.warning("forward on %s failed (%s), retry %d", hop.peer_id[-8:], exc, retries.failures)
                self.ban(hop.peer_id)

    def close(self) -> None:
        run_coroutine(self.p2p.shutdown())
        network.stop_dht(self.dht)


def _rows(inputs: BlockInputs, rows: slice, batch: int, number: int = 0) -> BlockInputs:
    """The rows `rows` of a batch of `batch` rows (tensors with a batch dimension of 1 are shared);
    piece `number` of the batch draws its own LoRA dropout masks."""
    if rows == slice(0, batch):
        return inputs
    lora = inputs.lora
    if lora is not None and lora.dropout:
        lora = dataclasses.replace(lora, seed=(lora.seed + number) % 2**63)

    def cut(tensor: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
        return tensor if tensor is None or tensor.shape[dim] == 1 else tensor.narrow(dim, rows.start, rows.stop - rows.start)

    return dataclasses.replace(
        inputs, hidden_states=cut(inputs.hidden_states), position_ids=cut(inputs.position_ids),
        attention_mask=cut(inputs.attention_mask), prompts=cut(inputs.prompts, 1), lora=lora,
    )


def _for_span(inputs: BlockInputs, start: int, end: int) -> BlockInputs:
    """What a peer serving blocks [start, end) gets: the deep prompts and LoRA weights of those blocks only."""
    if inputs.prompts is None and inputs.lora is None:
        return inputs
    return dataclasses.replace(
        inputs,
        prompts=inputs.prompts[start:end] if inputs.prompts is not None else None,
        lora=inputs.lora.for_blocks(start, end) if inputs.lora is not None else None,
    )
