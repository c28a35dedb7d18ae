"""Where a token's time goes: per hop, the network and compute time of an inference session's steps.

A peer reports the time it spent on a step (queue and compute) in its reply; the client notes when
each hop's reply arrived. A hop's share of a step is the time between the previous hop's reply (or
the step's start) and its own; what its compute does not explain is the network's: the round trip to
the first hop, a push and a reply after it. It does not time the client's own work (embeddings, the
head, sampling), which comes on top of a step's `total_ms`. Pure data, no I/O.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class HopTiming:
    """One hop of one step, in milliseconds."""

    peer_id: str
    start: int  # blocks [start, end)
    end: int
    compute_ms: float  # reported by the peer: queue and compute (0 for a peer that does not report it)
    network_ms: float  # the rest of the time this hop added to the step: messages to, from and between peers
    pushed: bool  # the previous hop pushed the step here (the client did not send it)


@dataclass(frozen=True)
class StepTiming:
    """One step of a session: `tokens` new tokens at `position`, through `hops`, in `total_ms`."""

    position: int
    tokens: int
    hops: tuple[HopTiming, ...]
    total_ms: float

    @property
    def network_ms(self) -> float:
        return sum(hop.network_ms for hop in self.hops)

    @property
    def compute_ms(self) -> float:
        return sum(hop.compute_ms for hop in self.hops)


def hop_timing(
    peer_id: str, start: int, end: int, *, waited_ms: float, compute_ms: float | None, pushed: bool
) -> HopTiming:
    """A hop that answered `waited_ms` after the previous one (or after the step began, for the first)."""
    compute = compute_ms or 0.0
    return HopTiming(peer_id, start, end, round(compute, 3), round(max(0.0, waited_ms - compute), 3), pushed)


def summarize(steps: list[StepTiming]) -> list[str]:
    """Lines for people: per hop, the median network and compute ms of single-token steps (decoding)."""
    decoding = [step for step in steps if step.tokens == 1] or steps
    if not decoding:
        return ["no steps timed yet"]
    lines = []
    for index, hop in enumerate(decoding[-1].hops):
        same = [step.hops[index] for step in decoding if len(step.hops) > index and step.hops[index].peer_id == hop.peer_id]
        network = statistics.median(timing.network_ms for timing in same)
        compute = statistics.median(timing.compute_ms for timing in same)
        via = "pushed" if hop.pushed else "sent by the client"
        lines.append(
            f"hop {index + 1} blocks {hop.start:>3}:{hop.end:<3} peer ...{hop.peer_id[-8:]}: "
            f"network {network:6.1f} ms, compute {compute:6.1f} ms ({via})"
        )
    total = statistics.median(step.total_ms for step in decoding)
    network = statistics.median(step.network_ms for step in decoding)
    compute = statistics.median(step.compute_ms for step in decoding)
    lines.append(
        f"per step (median of {len(decoding)}): {total:.1f} ms through the chain = network {network:.1f} + peers' compute {compute:.1f}"
    )
    return lines
