"""Who serves which block: the one function (`peer_spans`) that turns validated DHT records into one
span per peer. Routing (`client.routing`), balancing and placement (`swarm.balance`, `peers.placement`),
the dashboard's crawl and `swarm.plan` all read the swarm through it, so they all count the same peers.

Pure: no I/O, and no decision (which route, which blocks, whether to move) is taken here.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from swarm.lora import AdapterId
from swarm.records import PROTOCOL_VERSION, PeerRecord, PeerState

PLACEMENT_STATES = (PeerState.JOINING, PeerState.ONLINE)  # where peers are or will be: a moving peer counts where it goes
SERVING_STATES = (PeerState.ONLINE,)  # who can take a request now: a moving peer counts where it still serves
ALL_STATES = (PeerState.JOINING, PeerState.ONLINE, PeerState.OFFLINE)


@dataclasses.dataclass(frozen=True)
class Span:
    """A peer and the consecutive blocks [start, end) it announces."""

    peer_id: str
    start: int
    end: int
    throughput: float = 1.0  # tokens/s through one block, as announced
    state: PeerState = PeerState.ONLINE
    public_name: str | None = None
    adapters: tuple[AdapterId, ...] = ()  # by name and, where the peer announces it, digest
    record: PeerRecord | None = dataclasses.field(default=None, compare=False, repr=False)  # all it announced

    @property
    def length(self) -> int:
        return self.end - self.start


def peer_spans(
    records_per_block: Sequence[Mapping[str, PeerRecord]], states: Sequence[PeerState] = PLACEMENT_STATES, *, any_version: bool = False
) -> dict[str, Span]:
    """One span per peer whose record is in one of `states`, from the records read under each block's key.

    The rules every reader shares:
    - a record counts only under a block key inside its own range (elsewhere it is stale or misplaced);
    - a range past the model's last block (`len(records_per_block)`) is not real;
    - a record of another protocol version does not count: that peer cannot serve this version's clients
      (unless `any_version`: the dashboard shows every peer, and counts blocks with compatible ones only);
    - a peer with records in several states (moving: online on its old blocks, joining its new ones) counts
      with the state that comes first in `states`."""
    rank = {state: position for position, state in enumerate(states)}
    spans: dict[str, Span] = {}
    for block_index, records in enumerate(records_per_block):
        for peer_id, record in records.items():
            if record.state not in rank or (record.protocol_version != PROTOCOL_VERSION and not any_version):
                continue
            if not record.start_block <= block_index < record.end_block or record.end_block > len(records_per_block):
                continue
            known = spans.get(peer_id)
            if known is None or rank[record.state] < rank[known.state]:
                adapters = tuple(AdapterId(name, record.adapter_digests.get(name)) for name in record.adapters)
                spans[peer_id] = Span(
                    peer_id, record.start_block, record.end_block, record.throughput, record.state, record.public_name, adapters, record,
                )
    return spans
