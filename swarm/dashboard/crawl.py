"""What a swarm looks like right now: every announced model, its blocks and its peers, read from
the DHT (and each peer's latency, measured with a ping). The dashboard serves this as JSON.

Records are validated by `swarm.records` (a malformed or hostile one is skipped with a warning);
nothing here trusts a record beyond its schema. A dead or slow peer costs at most one ping
timeout, pinged in parallel with all the others.
"""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel, Field

from swarm import coverage, network
from swarm.records import ModelRecord, PeerRecord, PeerState, parse_models, parse_peer_records

logger = logging.getLogger(__name__)

MAX_PINGS = 256  # per crawl: a flood of fake records must not make us dial thousands of peers
MAX_MODELS = 32


class PeerView(BaseModel):
    peer_id: str = Field(description="base58 peer id")
    short_id: str = Field(description="the last 8 characters of the peer id")
    public_name: str | None
    start_block: int
    end_block: int = Field(description="one past the last block served")
    state: PeerState
    throughput: float = Field(description="tokens/s the peer announces")
    cache_tokens_left: int
    dtype: str
    quantization: str = Field(description="how the peer stores its blocks' weights: none, int8 or nf4")
    adapters: list[str]
    version: str
    latency_ms: float | None = Field(description="round trip of a ping from the dashboard; null: no answer")


class BlockView(BaseModel):
    index: int
    peers: int = Field(description="online peers serving this block")
    throughput: float = Field(description="summed throughput of those peers, tokens/s")


class ModelView(BaseModel):
    dht_prefix: str
    model: str
    num_blocks: int
    healthy: bool = Field(description="every block is served by at least one online peer")
    missing_blocks: list[int]
    min_block_throughput: float = Field(description="throughput of the weakest block, tokens/s")
    blocks: list[BlockView]
    peers: list[PeerView]


class Totals(BaseModel):
    models: int
    peers: int = Field(description="distinct peers over all models")
    peers_by_state: dict[str, int]
    blocks: int = Field(description="blocks over all models")
    blocks_served: int = Field(description="of those, blocks with an online peer")
    throughput: float = Field(description="summed throughput of online peers, tokens/s")


class SwarmState(BaseModel):
    """`GET /api/v1/state`."""

    updated_at: float = Field(description="unix time of the crawl")
    crawl_seconds: float
    error: str | None = Field(None, description="why the last crawl failed (the state is then the one before)")
    models: list[ModelView]
    totals: Totals


def empty_state() -> SwarmState:
    return SwarmState(updated_at=0.0, crawl_seconds=0.0, models=[], totals=_totals([]))


def crawl(dht, measure) -> SwarmState:
    """Read the swarm once. `measure([(peer_id, dht_prefix), ...]) -> {(peer_id, dht_prefix): seconds
    or None}` pings peers (all at once, each within a timeout)."""
    started = time.time()
    models = parse_models(network.fetch_models(dht))
    if len(models) > MAX_MODELS:
        logger.warning("the swarm announces %d models; showing the first %d", len(models), MAX_MODELS)
    views = []
    for prefix, model in sorted(models.items())[:MAX_MODELS]:
        raw = network.fetch_block_records(dht, prefix, model.num_blocks)
        records = [parse_peer_records(entry, where=f"{prefix}.{index}") for index, entry in enumerate(raw)]
        views.append((prefix, model, records))
    targets = sorted({(peer_id, prefix) for prefix, _, records in views for block in records for peer_id in block})[:MAX_PINGS]
    latencies = measure(targets)
    models_out = [_model_view(prefix, model, records, latencies) for prefix, model, records in views]
    return SwarmState(updated_at=started, crawl_seconds=time.time() - started, models=models_out, totals=_totals(models_out))


def _model_view(prefix: str, model: ModelRecord, records: list[dict[str, PeerRecord]], latencies) -> ModelView:
    peers = coverage.peer_spans(records, coverage.ALL_STATES, any_version=True)  # a moving peer shows where it is going
    serving = coverage.peer_spans(records, coverage.SERVING_STATES)  # blocks count who can take a request now
    blocks = []
    for index in range(model.num_blocks):
        online = [span for span in serving.values() if span.start <= index < span.end]
        blocks.append(BlockView(index=index, peers=len(online), throughput=sum(span.throughput for span in online)))
    missing = [block.index for block in blocks if block.peers == 0]
    peer_views = [
        PeerView(
            peer_id=span.peer_id, short_id=span.peer_id[-8:], public_name=span.public_name, start_block=span.start,
            end_block=span.end, state=span.state, throughput=span.throughput, cache_tokens_left=span.record.cache_tokens_left,
            dtype=span.record.dtype, quantization=span.record.quantization, adapters=[str(adapter) for adapter in span.adapters],
            version=span.record.version,
            latency_ms=_ms(latencies.get((span.peer_id, prefix))),
        )
        for span in sorted(peers.values(), key=lambda span: (span.start, span.peer_id))
        if span.record is not None
    ]
    return ModelView(
        dht_prefix=prefix, model=model.model, num_blocks=model.num_blocks, healthy=not missing, missing_blocks=missing,
        min_block_throughput=min((block.throughput for block in blocks), default=0.0), blocks=blocks, peers=peer_views,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def _totals(models: list[ModelView]) -> Totals:
    peers: dict[str, PeerView] = {}
    for model in models:
        for peer in model.peers:
            peers.setdefault(peer.peer_id, peer)
    by_state = {state.value: 0 for state in PeerState}
    for peer in peers.values():
        by_state[peer.state.value] += 1
    return Totals(
        models=len(models), peers=len(peers), peers_by_state=by_state,
        blocks=sum(model.num_blocks for model in models),
        blocks_served=sum(model.num_blocks - len(model.missing_blocks) for model in models),
        throughput=sum(peer.throughput for peer in peers.values() if peer.state == PeerState.ONLINE),
    )
