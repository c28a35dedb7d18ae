"""Where a peer's blocks should go: pure functions of the swarm state read from the DHT, no I/O.

A block's throughput is the sum of the throughputs of the joining and online peers that serve it.
A joining peer takes the window of consecutive blocks where the swarm is weakest: the window whose
sorted block throughputs are lexicographically smallest (so uncovered blocks first, as many as
fit, then the lowest throughput), ties broken at random. A serving peer moves only if leaving its
blocks opens no gap and the move either covers blocks nobody serves or raises the weakest block's
throughput by more than a threshold. `peers.server` reads the DHT and acts on these answers;
`benchmarks/simulate_balance.py` runs them over a simulated swarm of a thousand peers.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Mapping, Sequence

from swarm.records import PeerRecord, PeerState


@dataclasses.dataclass(frozen=True)
class Span:
    """A peer's blocks as the balancer sees them."""

    peer_id: str
    start: int
    end: int
    throughput: float
    state: PeerState = PeerState.ONLINE

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Move:
    """A rebalancing decision; `start` is None when the peer should stay."""

    start: int | None
    reason: str


def swarm_spans(records_per_block: Sequence[Mapping[str, PeerRecord]]) -> dict[str, Span]:
    """One span per joining or online peer. A record counts only under a block key inside its own
    range; a peer with two ranges (moving: online on the old one, joining the new one) counts on
    the one it is joining, where it will be."""
    spans: dict[str, Span] = {}
    for block_index, records in enumerate(records_per_block):
        for peer_id, record in records.items():
            if record.state == PeerState.OFFLINE or not record.start_block <= block_index < record.end_block:
                continue
            if record.end_block > len(records_per_block):
                continue  # a range past the model's last block is not real
            span = Span(peer_id, record.start_block, record.end_block, record.throughput, record.state)
            known = spans.get(peer_id)
            if known is None or (known.state == PeerState.ONLINE and span.state == PeerState.JOINING):
                spans[peer_id] = span
    return spans


def block_throughputs(spans: Iterable[Span], num_blocks: int) -> list[float]:
    throughputs = [0.0] * num_blocks
    for span in spans:
        for index in range(max(span.start, 0), min(span.end, num_blocks)):
            throughputs[index] += span.throughput
    return throughputs


def gaps(throughputs: Sequence[float]) -> list[int]:
    return [index for index, value in enumerate(throughputs) if value <= 0]


def choose_start(throughputs: Sequence[float], length: int, rng: random.Random | None = None) -> int:
    """First block of the weakest window of `length` consecutive blocks (see the module docstring)."""
    if not 0 < length <= len(throughputs):
        raise ValueError(f"a window of {length} blocks does not fit in {len(throughputs)} blocks")
    rng = rng or random.Random()
    options = [(sorted(throughputs[start : start + length]), rng.random(), start) for start in range(len(throughputs) - length + 1)]
    return min(options)[2]


def plan_move(
    spans: Mapping[str, Span], num_blocks: int, peer_id: str, *, threshold: float, rng: random.Random | None = None
) -> Move:
    """Should `peer_id` serve another window of the same length? Stays unless it clearly helps."""
    me = spans[peer_id]
    others = [span for other_id, span in spans.items() if other_id != peer_id]
    now = block_throughputs(spans.values(), num_blocks)
    without_me = block_throughputs(others, num_blocks)
    if min(without_me[me.start : me.end]) <= 0:
        return Move(None, f"the only peer serving some of blocks {me.start}:{me.end}")
    start = choose_start(without_me, me.length, rng)
    if start == me.start:
        return Move(None, "already where the swarm is weakest")
    after = list(without_me)
    for index in range(start, start + me.length):
        after[index] += me.throughput
    gaps_now, gaps_after = len(gaps(now)), len(gaps(after))
    if gaps_after < gaps_now:
        return Move(start, f"covers {gaps_now - gaps_after} blocks nobody serves")
    if gaps_now:
        return Move(None, "moving would not cover any missing block")
    weakest_now, weakest_after = min(now), min(after)
    if weakest_after > weakest_now * (1 + threshold):
        return Move(start, f"weakest block {weakest_now:.3g} -> {weakest_after:.3g} tokens/s")
    return Move(None, f"weakest block would change {weakest_now:.3g} -> {weakest_after:.3g}, below the threshold")


def describe_coverage(throughputs: Sequence[float], spans: Iterable[Span]) -> list[str]:
    """One line per block: peers serving it and their summed throughput; gaps marked."""
    spans = list(spans)
    lines = []
    for index, value in enumerate(throughputs):
        serving = [span for span in spans if span.start <= index < span.end]
        joining = sum(span.state == PeerState.JOINING for span in serving)
        note = "  MISSING" if value <= 0 else ""
        extra = f" ({joining} joining)" if joining else ""
        lines.append(f"block {index:>4}: {len(serving):>3} peers{extra}, {value:10.1f} tokens/s{note}")
    return lines
