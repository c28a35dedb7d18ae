"""Route choice: which peers carry a sequence through blocks [start, end). Pure functions, no I/O.

A route is a chain of hops, each a peer and the consecutive blocks it runs. The chosen chain has
the fewest hops, then the lowest summed latency. Peer state comes from validated DHT records.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Mapping

from swarm.coverage import Span as PeerSpan  # a peer and its blocks, as `swarm.coverage.peer_spans` reads them
from swarm.errors import AdapterNotServedError, AmbiguousAdapterError, MissingBlocksError
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


def missing_blocks(spans: Mapping[str, PeerSpan], start: int, end: int) -> list[int]:
    covered = set()
    for span in spans.values():
        covered.update(range(max(span.start, start), min(span.end, end)))
    return [index for index in range(start, end) if index not in covered]


def choose_route(
    spans: Mapping[str, PeerSpan],
    start: int,
    end: int,
    *,
    latency_s: Mapping[str, float] | None = None,
    banned: frozenset[str] | set[str] = frozenset(),
    default_latency_s: float = 0.1,
    rng: random.Random | None = None,
) -> list[Hop]:
    """Fewest hops through [start, end), ties broken by summed latency, then at random.

    Raises MissingBlocksError naming the blocks no usable peer serves."""
    usable = {peer_id: span for peer_id, span in spans.items() if peer_id not in banned}
    missing = missing_blocks(usable, start, end)
    if missing:
        raise MissingBlocksError(missing)
    latency_s = latency_s or {}
    rng = rng or random.Random()
    candidates = list(usable.values())
    rng.shuffle(candidates)  # equal-cost routes are picked at random, spreading clients over peers
    # Dijkstra over block boundaries: from boundary b a peer serving b can take us to the end of its span
    best: dict[int, tuple[int, float]] = {start: (0, 0.0)}
    previous: dict[int, Hop] = {}
    queue = [(0, 0.0, rng.random(), start)]
    while queue:
        hops, latency, _, position = heapq.heappop(queue)
        if position == end:
            break
        if best.get(position, (hops, latency)) < (hops, latency):
            continue
        for span in candidates:
            if not span.start <= position < span.end:
                continue
            target = min(span.end, end)
            cost = (hops + 1, latency + latency_s.get(span.peer_id, default_latency_s))
            if cost < best.get(target, (float("inf"), 0.0)):
                best[target] = cost
                previous[target] = Hop(span.peer_id, position, target)
                heapq.heappush(queue, (*cost, rng.random(), target))
    route, position = [], end
    while position != start:
        hop = previous[position]
        route.append(hop)
        position = hop.start
    return route[::-1]


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
