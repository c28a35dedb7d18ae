"""A gap left by a killed peer, live on 127.0.0.1 with the default periods: exactly one redundant
peer covers it within the record TTL + loading + a margin, and no second one piles on."""

from __future__ import annotations

import time

import pytest

from swarm import coverage, network
from swarm.config import LOOPBACK_MADDRS, PeerConfig
from swarm.tools.local import LocalSwarm, Node
from swarm.models import resolve_model
from swarm.records import parse_peer_records
from tests.conftest import PEER_ENV, make_tiny_llama

pytestmark = pytest.mark.timeout(420)

BLOCKS = 8
DEFAULTS = PeerConfig()
RECORD_TTL_S = DEFAULTS.announce_period_s * DEFAULTS.record_ttl_periods  # 30 s: when the swarm learns of the death
MARGIN_S = 30.0  # gap checks (5 s, jittered), a DHT read, loading 4 tiny blocks, on a loaded 2-core machine
WATCH_AFTER_MOVE_S = 20.0  # four default gap checks (5 s): long enough for a second peer to pile on, if it would


@pytest.fixture(scope="module")
def eight_block_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-8", num_layers=BLOCKS, seed=5)


def served_range(line: str) -> tuple[int, int]:
    start, end = line.rsplit("blocks", 1)[1].split(":")
    return int(start), int(end)


def peer_id_of(node: Node) -> str:
    return node.maddrs[0].rsplit("/p2p/", 1)[1]


def spans_on(reader, dht_prefix: str, block_index: int) -> dict[str, coverage.Span]:
    """The joining or online peers whose span (where they are, or are going) holds `block_index`."""
    raw = network.fetch_block_records(reader, dht_prefix, BLOCKS)
    spans = coverage.peer_spans([parse_peer_records(entry) for entry in raw])
    return {peer_id: span for peer_id, span in spans.items() if span.start <= block_index < span.end}


@pytest.mark.slow
def test_a_gap_is_covered_within_the_record_ttl_by_exactly_one_peer(eight_block_model, tmp_path):
    """The only peer of 0:4 (fixed range, 2 tokens/s) is killed; two peers of `--blocks 4` at 1 token/s
    each took 4:8 (the weakest window). Either could cover 0:4 without opening a gap: one must."""
    dht_prefix = resolve_model(str(eight_block_model)).dht_prefix
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        only = swarm.start_peer("0:4", model=str(eight_block_model), extra_args=["--throughput", "2"])
        spares = []
        for _ in range(2):
            node = swarm.start_peer("4", model=str(eight_block_model), extra_args=["--throughput", "1"], wait=False)
            swarm._await_listening(node)
            assert served_range(node.wait_for("swarm: ready", 120)) == (4, 8)
            spares.append(node)
        reader = network.start_dht(
            initial_peers=swarm.initial_peers, host_maddrs=LOOPBACK_MADDRS, client_mode=True, loopback_only=True
        )
        try:
            killed_id = peer_id_of(only)
            only.kill()  # the only peer of blocks 0:4, gone without a goodbye
            killed_at = time.monotonic()
            deadline_s = RECORD_TTL_S + MARGIN_S
            covering: set[str] = set()  # every peer ever seen joining or serving block 0 after the kill
            moved: list[tuple[Node, str, float]] = []
            while time.monotonic() - killed_at < deadline_s or (moved and time.monotonic() - moved[0][2] < WATCH_AFTER_MOVE_S):
                covering |= set(spans_on(reader, dht_prefix, 0)) - {killed_id}
                for node in spares:
                    while not node.lines.empty():
                        line = node.lines.get_nowait()
                        if line.startswith("swarm: moved"):
                            moved.append((node, line, time.monotonic()))
                if not moved and time.monotonic() - killed_at >= deadline_s:
                    break
                time.sleep(0.5)
            assert moved, (
                f"blocks 0:4 still unserved {deadline_s:.0f} s after their only peer was killed "
                f"(record TTL {RECORD_TTL_S:.0f} s + {MARGIN_S:.0f} s); peers seen on block 0: {covering}"
            )
            mover, line, moved_at = moved[0]
            print(f"gap 0:4 covered by {mover.name} {moved_at - killed_at:.1f} s after the kill (record TTL {RECORD_TTL_S:.0f} s)")
            assert served_range(line) == (0, 4), line
            assert len(moved) == 1, [(node.name, line) for node, line, _ in moved]  # nobody piled on
            assert covering == {peer_id_of(mover)}, covering  # not even as a joining record
            final = spans_on(reader, dht_prefix, 0), spans_on(reader, dht_prefix, 4)
            assert set(final[0]) == {peer_id_of(mover)}
            assert set(final[1]) == {peer_id_of(node) for node in spares if node is not mover}
        finally:
            network.stop_dht(reader)
        assert all(node.process.poll() is None for node in spares)
