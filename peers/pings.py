"""A peer's round trips to the peers that serve the block right after its own, which it announces
(`PeerRecord.next_pings`) so that clients can weigh the push from it to each of them when they
choose a route (`client.routing.choose_route`).

It measures and picks whom to measure; it does not read the DHT or announce (`peers.server` does).
"""

from __future__ import annotations

import asyncio
import time
from typing import Mapping

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.coverage import Span
from swarm.records import MAX_NEXT_PINGS

PINGS_PER_PEER = 2  # the fastest counts: the first may also dial the peer
PING_TIMEOUT_S = 2.0


def next_hops(spans: Mapping[str, Span], end_block: int, me: str) -> list[str]:
    """The peers that could take a push from us: those serving block `end_block`, at most MAX_NEXT_PINGS."""
    serving = sorted(peer_id for peer_id, span in spans.items() if span.start <= end_block < span.end and peer_id != me)
    return serving[:MAX_NEXT_PINGS]


async def round_trip_s(p2p: P2P, peer_id: str, namespace: str, auth: str | None, timeout_s: float = PING_TIMEOUT_S) -> float | None:
    """The fastest of PINGS_PER_PEER `rpc_info` calls to `peer_id`, in seconds; None if it did not answer."""
    fastest = None
    stub = protocol.stub(p2p, PeerID.from_base58(peer_id), namespace)
    for _ in range(PINGS_PER_PEER):
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                await stub.rpc_info(runtime_pb2.ExpertUID(uid=auth or ""), timeout=timeout_s)
        except Exception:  # unreachable, gone, or refusing us: no round trip to announce
            return None
        elapsed = time.perf_counter() - started
        fastest = elapsed if fastest is None else min(fastest, elapsed)
    return fastest


async def measure(p2p: P2P, peer_ids: list[str], namespace: str, proof) -> dict[str, float]:
    """{peer id: round trip s}; a peer that did not answer counts as PING_TIMEOUT_S (a push to it would
    fail and the client relay it: routes should not count on it). `proof(peer_id)`: what a call carries."""
    found = await asyncio.gather(*(round_trip_s(p2p, peer_id, namespace, proof(peer_id)) for peer_id in peer_ids))
    return {peer_id: round(PING_TIMEOUT_S if rtt is None else rtt, 6) for peer_id, rtt in zip(peer_ids, found)}
