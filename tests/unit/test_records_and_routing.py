"""Records as every node reads them, and the client's route choice: pure functions, no sockets."""

from __future__ import annotations

import functools
import math
import random

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from client.routing import HOP_OVERHEAD_S, Hop, PeerSpan, choose_route, choose_spread_route, expected_time_s, missing_blocks
from swarm import errors
from swarm.coverage import SERVING_STATES, peer_spans
from swarm.identity import Identity
from swarm.records import (
    MAX_RECORD_BYTES,
    PROTOCOL_VERSION,
    PeerRecord,
    PeerState,
    RecordShapeValidator,
    parse_models,
    parse_peer_records,
)

pytestmark = pytest.mark.timeout(60)


def record(start: int, end: int, state: str = "online", **overrides) -> dict:
    value = dict(
        protocol_version=PROTOCOL_VERSION, state=state, model="m", start_block=start, end_block=end,
        throughput=10.0, cache_tokens_left=100, dtype="float32", version="0.1.0", public_name=None,
    )
    value.update(overrides)
    return value



# ---- records -----------------------------------------------------------------------------------
@functools.cache
def peer(name: str) -> Identity:
    """A distinct key per name (generated once per test run)."""
    return Identity(RSAPrivateKey(), None)


def owned(identity: Identity) -> bytes:
    return identity.subkey(identity.peer_id)


def test_record_round_trip_and_unknown_fields_ignored():
    parsed = PeerRecord.model_validate({**record(0, 4), "future_field": [1, 2]})
    assert parsed.state == PeerState.ONLINE and parsed.end_block == 4
    assert PeerRecord.model_validate(parsed.to_wire()) == parsed


@pytest.mark.parametrize(
    "bad",
    [
        record(4, 2),
        record(0, 4, throughput=math.nan),
        record(0, 4, throughput=math.inf),
        record(0, 4, throughput="fast"),
        record(0, 4, state="sleeping"),
        record(0, 10**9),
        record(0, 4, public_name="x" * 10_000),
        "not a dict",
        None,
        {"protocol_version": 1},
    ],
)
def test_invalid_records_are_skipped_with_a_warning(bad, caplog):
    good, bad_peer, mallory = peer("good"), peer("bad"), peer("mallory")
    raw = {
        good.subkey(good.peer_id): record(0, 4),
        bad_peer.subkey(bad_peer.peer_id): bad,
        "not-base58-0OIl": record(0, 4),
        good.peer_id: record(0, 4),  # a plain peer id: anyone could have written it
        mallory.subkey(good.peer_id): record(0, 9),  # good's peer id, mallory's key: an impersonation
        b"Qm[owner:ssh-rsa garbage]": record(0, 4),
    }
    parsed = parse_peer_records(raw, where="m.0")
    assert list(parsed) == [good.peer_id] and parsed[good.peer_id].end_block == 4
    assert bad_peer.peer_id[-8:] in caplog.text and "names no peer as its owner" in caplog.text


def test_models_index_takes_owned_entries_and_the_majority_value():
    a, b, c = peer("a"), peer("b"), peer("c")
    entry = dict(model="m", num_blocks=30, protocol_version=PROTOCOL_VERSION)
    raw = {
        a.subkey("m-prefix"): entry, b.subkey("m-prefix"): entry, c.subkey("m-prefix"): {**entry, "num_blocks": 1},
        "m-prefix": {**entry, "num_blocks": 2}, a.subkey("broken"): {"num_blocks": "many"}, b"junk": entry,
    }
    models = parse_models(raw)
    assert list(models) == ["m-prefix"] and models["m-prefix"].num_blocks == 30


def test_record_shape_validator_refuses_what_is_not_shaped_like_ours():
    validator = RecordShapeValidator()
    now = get_dht_time()

    def ok(subkey, value=b"v" * 100, expiration=now + 30):
        return validator.validate(DHTRecord(b"key", MSGPackSerializer.dumps(subkey), value, expiration))

    assert ok(b"Qm...[owner:ssh-rsa AAAA]")
    assert not ok("a plain str subkey")  # a str among bytes subkeys breaks hivemind's heap of them
    assert not ok(None) and not ok(7) and not ok(b"")
    assert not ok(b"x", value=b"v" * (MAX_RECORD_BYTES + 1))
    assert not ok(b"x" * 10_000)
    assert not ok(b"x", expiration=now + 10 * 365 * 86400)
    assert not validator.validate(DHTRecord(b"key", b"\xc1 not msgpack", b"v", now + 30))


# ---- routing -----------------------------------------------------------------------------------
def spans(*items) -> dict[str, PeerSpan]:
    return {peer_id: PeerSpan(peer_id, start, end) for peer_id, start, end in items}


def test_route_prefers_fewest_hops():
    swarm = spans(("a", 0, 10), ("b", 10, 20), ("c", 20, 30), ("big", 0, 20))
    route = choose_route(swarm, 0, 30)
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [("big", 0, 20), ("c", 20, 30)]


def test_route_breaks_ties_by_latency():
    swarm = spans(("slow", 0, 4), ("fast", 0, 4))
    route = choose_route(swarm, 0, 4, latency_s={"slow": 0.5, "fast": 0.01})
    assert route[0].peer_id == "fast"


def test_route_uses_part_of_a_span_and_avoids_banned_peers():
    swarm = spans(("a", 0, 6), ("b", 4, 10), ("c", 0, 10))
    route = choose_route(swarm, 5, 10, banned={"c"})
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [("a", 5, 6), ("b", 6, 10)] or [
        (hop.peer_id, hop.start, hop.end) for hop in route
    ] == [("b", 5, 10)]
    assert len(route) == 1 and route[0].peer_id == "b"


def test_missing_blocks_are_named():
    swarm = spans(("a", 0, 3), ("b", 5, 8))
    assert missing_blocks(swarm, 0, 10) == [3, 4, 8, 9]
    with pytest.raises(errors.MissingBlocksError, match="3:5, 8:10"):
        choose_route(swarm, 0, 10)


def test_serving_spans_skip_offline_joining_misplaced_and_other_protocol_records():
    a, off, joining, fibber, old = (peer(name) for name in ("a", "off", "j", "fibber", "old"))
    per_block = [
        parse_peer_records({owned(a): record(0, 2), owned(off): record(0, 2, state="offline"), owned(joining): record(0, 2, state="joining")}),
        parse_peer_records({owned(a): record(0, 2), owned(fibber): record(5, 6), owned(old): record(0, 2, protocol_version=PROTOCOL_VERSION + 1)}),
    ]
    assert set(peer_spans(per_block, SERVING_STATES)) == {a.peer_id}


def test_route_random_ties_spread_load():
    swarm = spans(("x", 0, 4), ("y", 0, 4))
    chosen = {choose_route(swarm, 0, 4, rng=random.Random(seed))[0].peer_id for seed in range(20)}
    assert chosen == {"x", "y"}


def measured(peer_id: str, start: int, end: int, throughput: float = 100.0, **announced) -> PeerSpan:
    """A span with its record: `throughput` tokens/s per block, and what else the peer announces."""
    value = PeerRecord.model_validate(record(start, end, throughput=throughput, **announced))
    return PeerSpan(peer_id, start, end, throughput=throughput, record=value)


def by_id(*items: PeerSpan) -> dict[str, PeerSpan]:
    return {span.peer_id: span for span in items}


def hops(route) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


def test_route_takes_two_fast_nearby_peers_over_one_slow_far_one():
    # far: one hop over all 20 blocks, 150 ms away; near: two hops of 10 blocks, 5 ms away, pushing to each other in 4 ms
    swarm = by_id(
        measured("far", 0, 20), measured("near-1", 0, 10, next_pings={"near-2": 0.004}), measured("near-2", 10, 20),
    )
    latency = {"far": 0.150, "near-1": 0.005, "near-2": 0.005}
    route = choose_route(swarm, 0, 20, latency_s=latency)
    assert hops(route) == [("near-1", 0, 10), ("near-2", 10, 20)]
    near = expected_time_s(swarm, route, latency_s=latency)
    far = expected_time_s(swarm, [Hop("far", 0, 20)], latency_s=latency)
    # 20 blocks at 100 tokens/s = 0.2 s either way; the far one adds 150 ms of round trip, the near ones 2.5 + 2 + 2.5 ms
    assert near == pytest.approx(0.2 + 0.0025 + 0.002 + 0.0025 + 2 * HOP_OVERHEAD_S)
    assert far == pytest.approx(0.2 + 0.150 + HOP_OVERHEAD_S)
    # the far peer, near now, is one hop instead of two: it wins
    assert hops(choose_route(swarm, 0, 20, latency_s={**latency, "far": 0.005})) == [("far", 0, 20)]


def test_route_on_a_uniform_swarm_has_the_fewest_hops():
    swarm = by_id(measured("a", 0, 10), measured("b", 10, 20), measured("c", 20, 30), measured("big", 0, 20))
    latency = dict.fromkeys(swarm, 0.02)
    assert hops(choose_route(swarm, 0, 30, latency_s=latency)) == [("big", 0, 20), ("c", 20, 30)]


def test_route_follows_the_round_trips_peers_announce_to_the_next_ones():
    # both b and c serve the next blocks and are as far from us; a reaches b in 2 ms, c in 80 ms
    swarm = by_id(measured("a", 0, 10, next_pings={"b": 0.002, "c": 0.080}), measured("b", 10, 20), measured("c", 10, 20))
    latency = dict.fromkeys(swarm, 0.04)
    assert [hop.peer_id for hop in choose_route(swarm, 0, 20, latency_s=latency)] == ["a", "b"]


def test_route_avoids_relayed_busy_and_slow_peers():
    latency = {"plain": 0.02, "other": 0.02}
    for announced in ({"using_relay": True}, {"load": 0.8}, {"throughput": 20.0}):
        swarm = by_id(measured("plain", 0, 10), measured("other", 0, 10, **announced))
        chosen = {choose_route(swarm, 0, 10, latency_s=latency, rng=random.Random(seed))[0].peer_id for seed in range(10)}
        assert chosen == {"plain"}, announced
    swarm = by_id(measured("plain", 0, 10), measured("other", 0, 10))  # alike: both get clients
    assert {choose_route(swarm, 0, 10, latency_s=latency, rng=random.Random(seed))[0].peer_id for seed in range(20)} == set(swarm)


def test_records_announce_bounded_round_trips_and_load():
    good = PeerRecord.model_validate(record(0, 4, next_pings={"p": 0.01}, load=0.5, using_relay=True))
    assert good.next_pings == {"p": 0.01} and good.load == 0.5 and good.using_relay
    for bad in ({"next_pings": {"p": -1.0}}, {"next_pings": {"p": math.inf}}, {"next_pings": {f"p{i}": 0.1 for i in range(33)}},
                {"load": 1.5}, {"load": math.nan}):
        with pytest.raises(ValueError):
            PeerRecord.model_validate(record(0, 4, **bad))


# ---- wire framing ------------------------------------------------------------------------------
def test_spread_route_draws_peers_by_throughput_and_covers_the_range():
    swarm = {
        "fast": PeerSpan("fast", 0, 4, throughput=300.0),
        "slow": PeerSpan("slow", 0, 4, throughput=100.0),
        "front": PeerSpan("front", 0, 2, throughput=100.0),
        "back": PeerSpan("back", 2, 4, throughput=100.0),
    }
    rng = random.Random(0)
    counts = {peer_id: 0 for peer_id in swarm}
    for _ in range(4000):
        route = choose_spread_route(swarm, 0, 4, rng=rng)
        assert route[0].start == 0 and route[-1].end == 4
        assert all(a.end == b.start for a, b in zip(route, route[1:]))
        for hop in route:
            counts[hop.peer_id] += 1
    # from block 0: weights fast 1200, slow 400, front 200 (throughput x blocks it takes us through);
    # after front, from block 2: fast 600, slow 200, back 200
    assert counts["fast"] / counts["slow"] == pytest.approx(3.0, rel=0.15)
    assert counts["front"] / 4000 == pytest.approx(200 / 1800, rel=0.2)
    assert counts["back"] / counts["front"] == pytest.approx(200 / 1000, rel=0.3)
    assert {hop.peer_id for hop in choose_spread_route(swarm, 1, 3, banned={"fast", "slow"})} == {"front", "back"}
    with pytest.raises(errors.MissingBlocksError):
        choose_spread_route(swarm, 0, 4, banned={"fast", "slow", "back"})
