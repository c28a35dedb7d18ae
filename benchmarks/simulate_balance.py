"""Block placement and rebalancing over a simulated swarm of a thousand peers, with the real decisions.

Runs `swarm.balance` (`choose_start` for a joining peer, `plan_move` for every online peer's
periodic check) over a swarm whose peers join and leave at random, and measures what clients would
see: the fraction of blocks served, the weakest block's throughput as a fraction of the upper bound
(every online peer's throughput * blocks spread evenly over the model), and how often peers move.
Prints one line per simulated hour, then a summary with PASS/FAIL against the project's targets:
every gap a departure opens is covered again within one rebalance period + load time; the weakest
block holds at least 0.8 of the bound in steady state (10th percentile after the warm-up); no peer
moves back to a window it left within the last few hours (A -> B -> A). Exits 1 if any fails.

    .venv/bin/python benchmarks/simulate_balance.py [--peers 1000] [--hours 24] [--seed 0]

By default peers join and leave one by one (Poisson arrivals, exponential lifetimes), which
joining peers alone keep balanced. Two stress events exercise the rebalancing itself:
`--burst-peers 500` (that many peers join at once, all placed on the same snapshot, as peers
started together would be) and `--outage-block 40` (every peer serving block 40 leaves at once);
`--lifetime-hours 24` slows the churn, so that joining peers repair less.

The model: events (arrival, loaded, rebalance check, switch, departure) run one at a time in time
order, each decision on the current state (a peer re-reads the DHT just before acting). A moving
peer keeps serving its old blocks until the new ones are loaded (warm handoff) and meanwhile counts
for the balancer where it is going, as `swarm.coverage.peer_spans` does. It does NOT model network
delays, stale DHT reads, failed loads or a peer's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.balance import Span, block_throughputs, choose_start, gaps, plan_move
from swarm.records import PeerState

HOUR_S = 3600.0


@dataclasses.dataclass
class Peer:
    peer_id: str
    throughput: float  # tokens/s
    length: int  # blocks, fixed for the peer's life
    serving_start: int | None = None  # None until its first blocks are loaded
    left_windows: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (start, left at s)


@dataclasses.dataclass
class Stats:
    first_covered_s: float | None = None
    open_gaps: dict[int, tuple[float, str]] = dataclasses.field(default_factory=dict)  # block -> (since s, cause)
    closed_gaps: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (duration s, cause)
    moves: int = 0
    returns: int = 0  # moves back to a window left within the oscillation window
    peer_s: float = 0.0  # online peer-seconds, integrated over time
    ratios: list[float] = dataclasses.field(default_factory=list)  # weakest/bound, sampled after the warm-up


class Simulation:
    """The swarm state, the event queue and the measurements."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.arrivals = random.Random(args.seed)  # who joins, when, for how long
        self.timing = random.Random(args.seed + 1)  # check jitter
        self.decisions = random.Random(args.seed + 2)  # ties inside swarm.balance
        self.peers: dict[str, Peer] = {}
        self.spans: dict[str, Span] = {}  # what the balancer reads from the DHT
        self.serving_count = np.zeros(args.blocks, dtype=np.int64)  # online peers serving each block
        self.serving_tp = np.zeros(args.blocks)  # their summed tokens/s
        self.queue: list[tuple[float, int, str, str]] = []
        self.sequence = 0
        self.now_s = 0.0
        self.stats = Stats()
        self.online = 0  # peers serving blocks
        self.joined = 0

    # events ---------------------------------------------------------------------------------------

    def schedule(self, at_s: float, kind: str, peer_id: str = "") -> None:
        self.sequence += 1
        heapq.heappush(self.queue, (at_s, self.sequence, kind, peer_id))

    def arrive(self, count: int = 1) -> None:
        """`count` peers join at once: all read the same state before any of them announces itself."""
        args, rng = self.args, self.arrivals
        throughputs = block_throughputs(self.spans.values(), args.blocks)
        for _ in range(count):
            peer = self.new_peer()
            start = choose_start(throughputs, peer.length, self.decisions)
            self.spans[peer.peer_id] = Span(peer.peer_id, start, start + peer.length, peer.throughput, PeerState.JOINING)
            self.schedule(self.now_s + args.load_minutes * 60, "loaded", peer.peer_id)
            self.schedule(self.now_s + rng.expovariate(1 / (args.lifetime_hours * HOUR_S)), "depart", peer.peer_id)

    def new_peer(self) -> Peer:
        args, rng = self.args, self.arrivals
        sigma = math.log(args.throughput_spread) / 2  # clip at +-sigma: fastest / slowest = spread
        throughput = args.median_tps * math.exp(max(-sigma, min(sigma, rng.gauss(0, sigma / 2.326))))
        peer = Peer(f"peer{self.joined}", throughput, rng.randint(args.min_blocks, args.max_blocks))
        self.peers[peer.peer_id] = peer
        self.joined += 1
        return peer

    def outage(self) -> None:
        """Every peer serving or loading --outage-block leaves at once (one region's machines, say)."""
        block = self.args.outage_block
        for peer_id, span in list(self.spans.items()):
            if span.start <= block < span.end or self.serves(self.peers[peer_id], block):
                self.depart(self.peers[peer_id])

    def serves(self, peer: Peer, block: int) -> bool:
        return peer.serving_start is not None and peer.serving_start <= block < peer.serving_start + peer.length

    def loaded(self, peer: Peer) -> None:
        span = self.spans[peer.peer_id]
        self.spans[peer.peer_id] = dataclasses.replace(span, state=PeerState.ONLINE)
        peer.serving_start = span.start
        self.serve(peer, span.start)
        self.online += 1
        self.schedule_check(peer)

    def check(self, peer: Peer) -> None:
        move = plan_move(self.spans, self.args.blocks, peer.peer_id, threshold=self.args.threshold, rng=self.decisions)
        if move.start is None:
            self.schedule_check(peer)
            return
        self.stats.moves += 1
        horizon_s = self.now_s - self.args.oscillation_hours * HOUR_S
        if any(start == move.start and left_s >= horizon_s for start, left_s in peer.left_windows):
            self.stats.returns += 1
        end = move.start + peer.length
        self.spans[peer.peer_id] = Span(peer.peer_id, move.start, end, peer.throughput, PeerState.JOINING)
        self.schedule(self.now_s + self.args.load_minutes * 60, "switch", peer.peer_id)

    def switch(self, peer: Peer) -> None:
        """The new blocks are loaded: serve them, then drop the old ones (no gap on blocks in both)."""
        old_start, span = peer.serving_start, self.spans[peer.peer_id]
        self.spans[peer.peer_id] = dataclasses.replace(span, state=PeerState.ONLINE)
        peer.serving_start = span.start
        self.serve(peer, span.start)
        self.unserve(peer, old_start, "switch")
        peer.left_windows.append((old_start, self.now_s))
        self.schedule_check(peer)

    def depart(self, peer: Peer) -> None:
        if peer.serving_start is not None:
            self.unserve(peer, peer.serving_start, "departure")
            self.online -= 1
        del self.peers[peer.peer_id]
        del self.spans[peer.peer_id]

    def schedule_check(self, peer: Peer) -> None:
        period_s = self.args.period_minutes * 60 * self.timing.uniform(0.5, 1.5)
        self.schedule(self.now_s + period_s, "check", peer.peer_id)

    # what clients see -----------------------------------------------------------------------------

    def serve(self, peer: Peer, start: int) -> None:
        window = slice(start, start + peer.length)
        self.serving_count[window] += 1
        self.serving_tp[window] += peer.throughput
        for block in range(start, start + peer.length):
            opened = self.stats.open_gaps.pop(block, None)
            if opened is not None:
                self.stats.closed_gaps.append((self.now_s - opened[0], opened[1]))
        if self.stats.first_covered_s is None and self.serving_count.min() > 0:
            self.stats.first_covered_s = self.now_s

    def unserve(self, peer: Peer, start: int, cause: str) -> None:
        window = slice(start, start + peer.length)
        self.serving_count[window] -= 1
        self.serving_tp[window] -= peer.throughput
        self.serving_tp[window][self.serving_count[window] == 0] = 0.0  # no float residue on a gap
        if self.stats.first_covered_s is None:
            return  # gaps before the swarm first covers the model are the ramp-up, not departures
        for block in range(start, start + peer.length):
            if self.serving_count[block] == 0:
                self.stats.open_gaps[block] = (self.now_s, cause)

    def weakest_over_bound(self) -> float:
        bound = self.serving_tp.sum() / self.args.blocks
        return float(self.serving_tp.min() / bound) if bound > 0 else 0.0

    # the run --------------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        end_s = args.hours * HOUR_S
        for _ in range(args.peers):  # the initial crowd joins over the ramp
            self.schedule(self.arrivals.uniform(0, args.ramp_minutes * 60), "arrive")
        self.schedule(self.arrivals.expovariate(args.peers / (args.lifetime_hours * HOUR_S)), "churn")
        for sample in range(1, int(end_s / (args.sample_minutes * 60)) + 1):
            self.schedule(sample * args.sample_minutes * 60, "sample")
        for hour in range(1, int(args.hours) + 1):
            self.schedule(hour * HOUR_S, "report")
        if args.burst_peers:
            self.schedule(args.burst_at_hours * HOUR_S, "burst")
        if args.outage_block is not None:
            self.schedule(args.outage_at_hours * HOUR_S, "outage")
        print(f"{'hour':>5} {'online':>7} {'covered':>8} {'weakest/bound':>14} {'moves/peer/h':>13}")
        interval = (0, 0.0)  # (moves, peer-seconds) at the last report
        while self.queue and self.queue[0][0] <= end_s:
            at_s, _, kind, peer_id = heapq.heappop(self.queue)
            self.stats.peer_s += self.online * (at_s - self.now_s)
            self.now_s = at_s
            if kind == "report":
                interval = self.report(interval)
            else:
                self.handle(kind, peer_id)

    def handle(self, kind: str, peer_id: str) -> None:
        if kind == "arrive":
            self.arrive()
        elif kind == "churn":  # Poisson arrivals that keep the swarm near --peers
            self.arrive()
            rate = self.args.peers / (self.args.lifetime_hours * HOUR_S)
            self.schedule(self.now_s + self.arrivals.expovariate(rate), "churn")
        elif kind == "burst":
            self.arrive(self.args.burst_peers)
        elif kind == "outage":
            self.outage()
        elif kind == "sample":
            if self.now_s >= self.args.warmup_hours * HOUR_S:
                self.stats.ratios.append(self.weakest_over_bound())
        elif peer_id in self.peers:  # events of a departed peer are dropped
            getattr(self, kind)(self.peers[peer_id])  # loaded, check, switch or depart

    def report(self, interval: tuple[int, float]) -> tuple[int, float]:
        moves, peer_s = self.stats.moves - interval[0], self.stats.peer_s - interval[1]
        covered = 1 - len(gaps(self.serving_tp)) / self.args.blocks
        rate = moves / (peer_s / HOUR_S) if peer_s else 0.0
        weakest = self.weakest_over_bound()
        print(f"{self.now_s / HOUR_S:5.0f} {self.online:7d} {covered:8.3f} {weakest:14.3f} {rate:13.3f}", flush=True)
        return self.stats.moves, self.stats.peer_s


def summarize(simulation: Simulation, wall_s: float) -> bool:
    """Prints the summary and PASS/FAIL per target; True when every target passes."""
    args, stats = simulation.args, simulation.stats
    first = "never" if stats.first_covered_s is None else f"{stats.first_covered_s / 60:.1f} min"
    print(f"\nsummary ({wall_s:.0f} s wall): model first fully covered after {first}")
    gaps_restored = summarize_gaps(simulation)
    ratios = sorted(stats.ratios) or [0.0]
    p10 = ratios[len(ratios) // 10]
    print(
        f"  weakest block / bound after {args.warmup_hours:g} h: median {statistics.median(ratios):.3f}, "
        f"10th percentile {p10:.3f}, min {ratios[0]:.3f}"
    )
    moves_per_peer_h = stats.moves / (stats.peer_s / HOUR_S) if stats.peer_s else 0.0
    print(
        f"  moves: {stats.moves} ({moves_per_peer_h:.3f} per peer per hour), {stats.returns} back to a window "
        f"left within {args.oscillation_hours:g} h (A -> B -> A)"
    )
    targets = {
        "coverage restored after every departure": stats.first_covered_s is not None and gaps_restored,
        "weakest block >= 0.8 of the bound (10th percentile)": p10 >= 0.8,
        "no oscillation (A -> B -> A)": stats.returns == 0,
    }
    for name, passed in targets.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    return all(targets.values())


def summarize_gaps(simulation: Simulation) -> bool:
    """Prints the block gaps opened after the model was first covered; True when none outlasted
    one rebalance period + load time."""
    args, stats = simulation.args, simulation.stats
    limit_s = (args.period_minutes + args.load_minutes) * 60
    opened = stats.closed_gaps + [(simulation.now_s - since_s, cause) for since_s, cause in stats.open_gaps.values()]
    durations = [duration_s for duration_s, _ in opened]
    late = sum(duration_s > limit_s for duration_s in durations)
    by_departures = sum(cause == "departure" for _, cause in opened)
    print(
        f"  coverage: {len(opened)} block gaps opened ({by_departures} by departures, {len(opened) - by_departures} "
        f"by switches), {len(stats.open_gaps)} still open; longest {max(durations, default=0) / 60:.1f} min, "
        f"median {statistics.median(durations or [0]) / 60:.1f} min; {late} lasted over {limit_s / 60:.0f} min"
    )
    return late == 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="swarm size the churn keeps (peers)")
    parser.add_argument("--hours", type=float, default=24, help="simulated duration (hours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=80, help="transformer blocks in the model")
    parser.add_argument("--min-blocks", type=int, default=4, help="fewest blocks a peer serves")
    parser.add_argument("--max-blocks", type=int, default=40, help="most blocks a peer serves")
    parser.add_argument("--median-tps", type=float, default=100.0, help="median peer throughput (tokens/s)")
    parser.add_argument("--throughput-spread", type=float, default=30.0, help="fastest / slowest peer (log-normal)")
    parser.add_argument("--lifetime-hours", type=float, default=3.0, help="mean peer lifetime (exponential, hours)")
    parser.add_argument("--ramp-minutes", type=float, default=30.0, help="the initial --peers join over this time (minutes)")
    parser.add_argument("--load-minutes", type=float, default=2.0, help="time to load blocks before serving them (minutes)")
    parser.add_argument("--period-minutes", type=float, default=10.0, help="mean rebalance check period, +-50%% (minutes)")
    parser.add_argument("--threshold", type=float, default=0.1, help="plan_move's threshold")
    parser.add_argument("--burst-peers", type=int, default=0, help="stress: this many peers join at once, on one snapshot")
    parser.add_argument("--burst-at-hours", type=float, default=8.0, help="when the burst joins (hours)")
    parser.add_argument("--outage-block", type=int, default=None, help="stress: every peer serving this block leaves at once")
    parser.add_argument("--outage-at-hours", type=float, default=16.0, help="when the outage happens (hours)")
    parser.add_argument("--warmup-hours", type=float, default=2.0, help="steady-state statistics start after this (hours)")
    parser.add_argument("--sample-minutes", type=float, default=1.0, help="weakest/bound sampling period (minutes)")
    parser.add_argument("--oscillation-hours", type=float, default=3.0, help="a move back within this oscillates (hours)")
    args = parser.parse_args(argv)
    if not 0 < args.min_blocks <= args.max_blocks <= args.blocks:
        parser.error("need 0 < --min-blocks <= --max-blocks <= --blocks")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    simulation = Simulation(args)
    simulation.run()
    passed = summarize(simulation, time.perf_counter() - started)
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
