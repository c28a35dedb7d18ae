"""Where a peer's blocks should go: pure functions of the swarm state read from the DHT, no I/O.

The swarm's state is the peers' spans as `swarm.coverage.peer_spans` reads them (joining and online
peers; a moving peer counts where it is going). A block's throughput is the sum of the throughputs of
the peers that serve it.
A joining peer takes the window of consecutive blocks where the swarm is weakest: the window whose
sorted block throughputs are lexicographically smallest (so uncovered blocks first, as many as
fit, then the lowest throughput); among equal windows, the one leaving the unserved blocks in the
fewest runs (flush with a gap's edge), then one at random. A serving peer moves there only if
leaving its blocks opens no gap and the move either covers blocks nobody serves, or raises the
weakest block's throughput by more than a threshold, or evens out an unbalanced swarm. The swarm
is unbalanced while its weakest block is below a fraction of the even spread (every peer's
throughput * blocks spread over the model); there, where one move among a thousand peers rarely
lifts the weakest block by the threshold, a move must raise the weakest block it touches by the
threshold times the peer's own throughput and leave its old blocks stronger than its new ones.
Every move raises the sorted block throughputs lexicographically, so moving back never pays on
the same state. A gap (blocks nobody serves, after a peer died or left) is not left to those
periodic checks: every peer reads the swarm every few seconds, and `plan_gap_cover` names, the
same for every reader, the one redundant peer that covers each gap. `peers.server` reads the DHT
and acts on these answers;
`benchmarks/simulate_balance.py` runs them over a simulated swarm of a thousand peers.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

from swarm.coverage import Span
from swarm.records import PeerState


@dataclasses.dataclass(frozen=True)
class Move:
    """A rebalancing decision; `start` is None when the peer should stay."""

    start: int | None
    reason: str


def block_throughputs(spans: Iterable[Span], num_blocks: int) -> list[float]:
    return _block_sums(spans, num_blocks).tolist()


def _block_sums(spans: Iterable[Span], num_blocks: int) -> np.ndarray:
    """Summed throughput per block, [num_blocks]; exactly 0.0 where no peer with throughput serves."""
    spans = [span for span in spans if span.throughput > 0]
    starts = np.clip(np.array([span.start for span in spans], dtype=np.int64), 0, num_blocks)
    ends = np.clip(np.array([span.end for span in spans], dtype=np.int64), 0, num_blocks)
    throughputs = np.array([span.throughput for span in spans], dtype=np.float64)
    sums = np.cumsum(np.bincount(starts, throughputs, num_blocks + 1) - np.bincount(ends, throughputs, num_blocks + 1))
    serving = np.cumsum(np.bincount(starts, minlength=num_blocks + 1) - np.bincount(ends, minlength=num_blocks + 1))
    return np.where(serving[:num_blocks] > 0, sums[:num_blocks], 0.0)  # no rounding residue on a gap


def gaps(throughputs: Sequence[float]) -> list[int]:
    return [index for index, value in enumerate(throughputs) if value <= 0]


def weakest_windows(throughputs: Sequence[float], length: int) -> list[int]:
    """First blocks of every window of `length` consecutive blocks that a joining peer may take: the
    weakest ones, after the tie-break (see the module docstring). `choose_start` picks one at random."""
    if not 0 < length <= len(throughputs):
        raise ValueError(f"a window of {length} blocks does not fit in {len(throughputs)} blocks")
    keys = [sorted(throughputs[start : start + length]) for start in range(len(throughputs) - length + 1)]
    weakest = min(keys)
    tied = [start for start, key in enumerate(keys) if key == weakest]
    if len(tied) > 1 and weakest[0] <= 0:
        fewest = min(_gap_runs_after(throughputs, start, length) for start in tied)
        tied = [start for start in tied if _gap_runs_after(throughputs, start, length) == fewest]
    return tied


def choose_start(throughputs: Sequence[float], length: int, rng: random.Random | None = None) -> int:
    """First block of the weakest window of `length` consecutive blocks (see the module docstring)."""
    return (rng or random.Random()).choice(weakest_windows(throughputs, length))


def _gap_runs_after(throughputs: Sequence[float], start: int, length: int) -> int:
    """Runs of unserved blocks left once blocks start:start+length are served. Among equally weak
    windows the one leaving the fewest runs wins: a window flush with a gap's edge leaves the rest
    of the gap in one piece that later peers can fill, where one in its middle splits it in two."""
    runs, in_gap = 0, False
    for index, value in enumerate(throughputs):
        unserved = value <= 0 and not start <= index < start + length
        runs += unserved and not in_gap
        in_gap = unserved
    return runs


def plan_move(
    spans: Mapping[str, Span],
    num_blocks: int,
    peer_id: str,
    *,
    threshold: float,
    rng: random.Random | None = None,
    balanced_fraction: float = 0.85,
) -> Move:
    """Should `peer_id` serve another window of the same length? Stays unless it clearly helps.

    The swarm counts as balanced while its weakest block holds `balanced_fraction` of the even spread."""
    me = spans[peer_id]
    here = slice(max(me.start, 0), me.end)
    without_me = _block_sums((span for other_id, span in spans.items() if other_id != peer_id), num_blocks)
    now = without_me.copy()
    now[here] += me.throughput
    if without_me[here].min() <= 0:
        return Move(None, f"the only peer serving some of blocks {me.start}:{me.end}")
    start = choose_start(without_me.tolist(), me.length, rng)
    if start == me.start:
        return Move(None, "already where the swarm is weakest")
    there = slice(start, start + me.length)
    after = without_me.copy()
    after[there] += me.throughput
    gaps_now, gaps_after = int((now <= 0).sum()), int((after <= 0).sum())
    if gaps_after < gaps_now:
        return Move(start, f"covers {gaps_now - gaps_after} blocks nobody serves")
    if gaps_now:
        return Move(None, "moving would not cover any missing block")
    weakest_now, weakest_after = float(now.min()), float(after.min())
    if weakest_after > weakest_now * (1 + threshold):
        return Move(start, f"weakest block {weakest_now:.3g} -> {weakest_after:.3g} tokens/s")
    even = float(now.sum()) / num_blocks
    if weakest_now >= balanced_fraction * even:
        return Move(None, f"weakest block {weakest_now:.3g} is close to the even spread {even:.3g} tokens/s")
    return _even_out(now, after, here, there, threshold * me.throughput, start)


def _even_out(now: np.ndarray, after: np.ndarray, here: slice, there: slice, margin: float, start: int) -> Move:
    """In an unbalanced swarm, one redundant peer's move: it must raise the weakest block it touches
    by more than `margin`, and the blocks it leaves must stay stronger than the ones it joins by
    `margin` (so moving back does not pay, even after a little churn)."""
    touched_now = float(min(now[here].min(), now[there].min()))
    left, joined = float(after[here].min()), float(after[there].min())
    touched_after = min(left, joined)
    if touched_after - touched_now > margin and left - joined >= margin:
        return Move(start, f"weakest block it touches {touched_now:.3g} -> {touched_after:.3g} tokens/s")
    return Move(None, f"weakest block it touches would change {touched_now:.3g} -> {touched_after:.3g}, not enough")


@dataclasses.dataclass(frozen=True)
class GapCover:
    """A peer chosen to move onto blocks nobody serves."""

    peer_id: str
    start: int
    end: int
    reason: str


def plan_gap_cover(spans: Mapping[str, Span], num_blocks: int, *, passed_over: Iterable[str] = ()) -> list[GapCover]:
    """Which peers move to cover the blocks nobody serves; every peer reading the same state gets
    the same answer, so each gap gets one coverer, not a pile of them.

    One coverer at a time: among online peers whose leaving opens no gap (joining peers are busy,
    and count as cover where they are going), the one whose move covers the most unserved blocks;
    ties go to the peer whose old blocks stay strongest without it, then to the smallest peer id.
    It takes the weakest window of its length (`choose_start`'s order, the first of equals). Each
    choice is applied before the next, so two gaps get two coverers, and no peer whose leaving
    would reopen a gap another just covered. Peers in `passed_over` are never chosen."""
    state = dict(sorted(spans.items()))  # sums in one order: every peer computes the same floats
    skip = set(passed_over)
    covers: list[GapCover] = []
    while True:
        sums, counts = _block_sums(state.values(), num_blocks), _block_counts(state.values(), num_blocks)
        missing = sums <= 0
        if not missing.any():
            return covers
        options = []
        for peer_id, span in state.items():
            here = slice(max(span.start, 0), span.end)
            if span.state != PeerState.ONLINE or span.throughput <= 0 or peer_id in skip or counts[here].min() < 2:
                continue
            covered = _most_in_a_window(missing, span.length)
            if covered:
                options.append((-covered, -float(sums[here].min() - span.throughput), peer_id))
        if not options:
            return covers
        covered, _, peer_id = min(options)
        span = state[peer_id]
        without = sums.copy()
        without[max(span.start, 0) : span.end] -= span.throughput
        start = weakest_windows(without.tolist(), span.length)[0]
        covers.append(GapCover(peer_id, start, start + span.length, f"covers {-covered} blocks nobody serves"))
        state[peer_id] = Span(peer_id, start, start + span.length, span.throughput, PeerState.JOINING)


def _block_counts(spans: Iterable[Span], num_blocks: int) -> np.ndarray:
    """Peers with throughput serving each block, [num_blocks]."""
    counts = np.zeros(num_blocks + 1, dtype=np.int64)
    for span in spans:
        if span.throughput > 0:
            counts[min(max(span.start, 0), num_blocks)] += 1
            counts[min(max(span.end, 0), num_blocks)] -= 1
    return np.cumsum(counts)[:num_blocks]


def _most_in_a_window(mask: np.ndarray, length: int) -> int:
    """The most True values of `mask` in any window of `length` consecutive blocks."""
    if not 0 < length <= len(mask):
        return 0
    running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return int((running[length:] - running[:-length]).max())


@dataclasses.dataclass
class GapWatch:
    """`plan_gap_cover` across a peer's gap checks, with a fallback: a peer chosen to cover a gap
    announces itself joining there within a check or two, which closes the gap for everyone. One
    chosen for longer than `patience_s` while the gap stays open (dead with its record still alive,
    a fixed range, a failed load) is passed over until the swarm has no gap: the next best is chosen."""

    patience_s: float
    chosen_since_s: dict[str, float] = dataclasses.field(default_factory=dict)
    passed_over: set[str] = dataclasses.field(default_factory=set)

    def plan(self, spans: Mapping[str, Span], num_blocks: int, now_s: float) -> list[GapCover]:
        if not gaps(block_throughputs(spans.values(), num_blocks)):
            self.chosen_since_s, self.passed_over = {}, set()
            return []
        while True:
            covers = plan_gap_cover(spans, num_blocks, passed_over=self.passed_over)
            self.chosen_since_s = {cover.peer_id: self.chosen_since_s.get(cover.peer_id, now_s) for cover in covers}
            late = {peer_id for peer_id, since_s in self.chosen_since_s.items() if now_s - since_s > self.patience_s}
            if not late:
                return covers
            self.passed_over |= late


def describe_coverage(throughputs: Sequence[float], spans: Iterable[Span]) -> list[str]:
    """One line per block: peers serving it and their summed throughput; gaps marked."""
    spans = list(spans)
    lines = []
    for index, value in enumerate(throughputs):
        serving = [span for span in spans if span.start <= index < span.end]
        joining = sum(span.state == PeerState.JOINING for span in serving)
        note = "  MISSING" if value <= 0 else ""
        extra = f" ({joining} joining)" if joining else ""
        formats = Counter(span.record.precision for span in serving if span.record is not None)
        if formats:
            note += "  " + ", ".join(f"{count} {precision}" for precision, count in sorted(formats.items()))
        lines.append(f"block {index:>4}: {len(serving):>3} peers{extra}, {value:10.1f} tokens/s{note}")
    return lines
