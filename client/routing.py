"""Route choice: which peers carry a sequence through blocks [start, end). Pure functions, no I/O.

A route is a chain of hops, each a peer and the consecutive blocks it runs. The chosen chain has the
lowest expected time per token: round trips (ours to each peer, and those peers announce to the next
ones), compute from each peer's announced throughput and load, a penalty for relayed peers. Peer
state comes from validated DHT records.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from swarm.coverage import Span as PeerSpan  # a peer and its blocks, as `swarm.coverage.peer_spans` reads them
from swarm.errors import AdapterNotServedError, AmbiguousAdapterError, FormatNotServedError, MissingBlocksError
from swarm.lora import AdapterId


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int


def served_adapters(spans: Mapping[str, PeerSpan]) -> list[AdapterId]:
    """Every adapter the peers announce, once, by name then digest."""
    adapters = {adapter for span in spans.values() for adapter in span.adapters}
    return sorted(adapters, key=lambda adapter: (adapter.name, adapter.digest or ""))


def resolve_adapter(spans: Mapping[str, PeerSpan], adapter: AdapterId) -> AdapterId:
    """A bare name -> the adapter peers serve under that name, with its digest (still bare if no peer
    announces a digest for it). Raises AmbiguousAdapterError if they serve several under that name."""
    if adapter.digest is not None:
        return adapter
    named = [served for served in served_adapters(spans) if served.name == adapter.name and served.digest is not None]
    if len(named) > 1:
        raise AmbiguousAdapterError(adapter.name, [str(served) for served in named])
    return named[0] if named else adapter


def adapter_spans(spans: Mapping[str, PeerSpan], adapter: AdapterId | None, start: int, end: int) -> dict[str, PeerSpan]:
    """The spans of the peers serving `adapter` (every span, for None): that very name and digest,
    once a bare name is resolved (`resolve_adapter`); a peer that announces the name without a digest
    counts only while no peer announces one. Raises AdapterNotServedError, listing the adapters the
    peers do serve, if they leave blocks of [start, end) uncovered."""
    if adapter is None:
        return dict(spans)
    adapter = resolve_adapter(spans, adapter)
    serving = {peer_id: span for peer_id, span in spans.items() if adapter in span.adapters}
    missing = missing_blocks(serving, start, end)
    if missing:
        raise AdapterNotServedError(missing, str(adapter), [str(served) for served in served_adapters(spans)])
    return serving


def format_spans(
    spans: Mapping[str, PeerSpan], quantizations: Sequence[str], dtypes: Sequence[str], start: int, end: int
) -> dict[str, PeerSpan]:
    """The spans of the peers whose blocks are stored in an accepted format: one of `quantizations`
    (`PeerRecord.quantization`) computing in one of `dtypes` (a span without a record is kept).
    Raises FormatNotServedError, naming the formats that do serve them, if the others leave blocks of
    [start, end) uncovered."""

    def accepted(span: PeerSpan) -> bool:
        return span.record is None or (span.record.quantization in quantizations and span.record.dtype in dtypes)

    kept = {peer_id: span for peer_id, span in spans.items() if accepted(span)}
    missing = missing_blocks(kept, start, end)
    if missing and not missing_blocks(spans, start, end):
        served = sorted({span.record.precision for span in spans.values() if span.record is not None and not accepted(span)})
        raise FormatNotServedError(missing, [*quantizations, *dtypes], served)
    return kept


def quantization_of(span: PeerSpan) -> str:
    return span.record.quantization if span.record is not None else "none"


def missing_blocks(spans: Mapping[str, PeerSpan], start: int, end: int) -> list[int]:
    covered = set()
    for span in spans.values():
        covered.update(range(max(span.start, start), min(span.end, end)))
    return [index for index in range(start, end) if index not in covered]


HOP_OVERHEAD_S = 0.002  # per hop, beyond network and compute: the Python on both sides (1-4 ms measured, docs/performance.md)
RELAYED_SLOWDOWN = 5.0  # a relayed peer's compute counts this many times (Petals weighs its throughput by 0.2)
MAX_LOAD = 0.9  # a busier peer counts as this busy: its queue makes each step up to 10x longer
OTHER_FORMAT_SLOWDOWN = 10.0  # with a preferred block format, a peer of another format's compute counts this many times


def hop_compute_s(span: PeerSpan, blocks: int, prefer: str | None = None) -> float:
    """Expected seconds for one token through `blocks` of the peer's blocks: its announced throughput,
    slowed by its load (the share of time it is busy with others), by a relay, and, where the client
    prefers a block format (`prefer`) the peer does not store, by OTHER_FORMAT_SLOWDOWN."""
    record = span.record
    load = min(record.load, MAX_LOAD) if record is not None else 0.0
    slowdown = RELAYED_SLOWDOWN if record is not None and record.using_relay else 1.0
    if prefer is not None and quantization_of(span) != prefer:
        slowdown *= OTHER_FORMAT_SLOWDOWN
    return blocks / max(span.throughput, 1e-9) / (1.0 - load) * slowdown


def link_s(previous: PeerSpan | None, span: PeerSpan, rtt_s) -> float:
    """One-way seconds into `span`'s peer: from the client (half our round trip to it), or pushed from
    `previous` (half the round trip `previous` announced to it, else the mean of our two one-way times)."""
    if previous is None:
        return rtt_s(span.peer_id) / 2
    announced = previous.record.next_pings.get(span.peer_id) if previous.record is not None else None
    if announced is not None:
        return announced / 2
    return (rtt_s(previous.peer_id) + rtt_s(span.peer_id)) / 4


def choose_route(
    spans: Mapping[str, PeerSpan],
    start: int,
    end: int,
    *,
    latency_s: Mapping[str, float] | None = None,
    banned: frozenset[str] | set[str] = frozenset(),
    default_latency_s: float = 0.1,
    rng: random.Random | None = None,
    prefer: str | None = None,
) -> list[Hop]:
    """The chain through [start, end) with the lowest expected time per token: into each hop (from the
    client, or pushed from the previous hop), its compute (`hop_compute_s`, with the block format the
    client would `prefer`), HOP_OVERHEAD_S, and back from the last hop to the client. `latency_s`: our measured round trips (`default_latency_s` for a
    peer not measured yet). On a uniform swarm this is the route with the fewest hops; equal routes are
    picked at random, spreading clients over peers.

    Raises MissingBlocksError naming the blocks no usable peer serves."""
    usable = {peer_id: span for peer_id, span in spans.items() if peer_id not in banned}
    missing = missing_blocks(usable, start, end)
    if missing:
        raise MissingBlocksError(missing)
    latency_s = latency_s or {}
    rng = rng or random.Random()

    def rtt_s(peer_id: str) -> float:
        return latency_s.get(peer_id, default_latency_s)

    candidates = list(usable.values())
    rng.shuffle(candidates)
    covering = {position: [span for span in candidates if span.start <= position < span.end] for position in range(start, end)}
    # Dijkstra over (block boundary, peer whose hop ends there): what a hop costs depends on where it comes from
    best: dict[tuple[int, str | None], float] = {(start, None): 0.0}
    previous: dict[tuple[int, str | None], tuple[tuple[int, str | None], Hop]] = {}
    queue = [(0.0, rng.random(), start, None)]
    while queue:
        cost, _, position, last = heapq.heappop(queue)
        if position == end:
            break
        if cost > best.get((position, last), float("inf")):
            continue
        for span in covering[position]:
            target = min(span.end, end)
            added = link_s(usable[last] if last else None, span, rtt_s) + hop_compute_s(span, target - position, prefer) + HOP_OVERHEAD_S
            if target == end:
                added += rtt_s(span.peer_id) / 2  # the last hop answers the client
            state = (target, span.peer_id)
            if cost + added < best.get(state, float("inf")):
                best[state] = cost + added
                previous[state] = ((position, last), Hop(span.peer_id, position, target))
                heapq.heappush(queue, (cost + added, rng.random(), target, span.peer_id))
    route, state = [], (position, last)
    while state != (start, None):
        state, hop = previous[state]
        route.append(hop)
    return route[::-1]


def expected_time_s(
    spans: Mapping[str, PeerSpan], route: list[Hop], *, latency_s: Mapping[str, float] | None = None, default_latency_s: float = 0.1
) -> float:
    """The expected seconds per token of `route`, as `choose_route` counts them."""
    latency_s = latency_s or {}

    def rtt_s(peer_id: str) -> float:
        return latency_s.get(peer_id, default_latency_s)

    total, last = 0.0, None
    for hop in route:
        span = spans[hop.peer_id]
        total += link_s(last, span, rtt_s) + hop_compute_s(span, hop.end - hop.start) + HOP_OVERHEAD_S
        last = span
    return total + (rtt_s(route[-1].peer_id) / 2 if route else 0.0)


def choose_spread_route(
    spans: Mapping[str, PeerSpan],
    start: int,
    end: int,
    *,
    banned: frozenset[str] | set[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[Hop]:
    """A route for throughput rather than latency (training): from each position, a peer serving it
    is drawn with odds proportional to its announced throughput times the blocks it takes us through,
    so concurrent requests spread over every peer of a block in proportion to what it can do.

    Raises MissingBlocksError naming the blocks no usable peer serves."""
    usable = {peer_id: span for peer_id, span in spans.items() if peer_id not in banned}
    missing = missing_blocks(usable, start, end)
    if missing:
        raise MissingBlocksError(missing)
    rng = rng or random.Random()
    route, position = [], start
    while position < end:
        candidates = sorted((span for span in usable.values() if span.start <= position < span.end), key=lambda s: s.peer_id)
        weights = [max(span.throughput, 1e-9) * (min(span.end, end) - position) for span in candidates]
        span = rng.choices(candidates, weights=weights)[0]
        route.append(Hop(span.peer_id, position, min(span.end, end)))
        position = min(span.end, end)
    return route
