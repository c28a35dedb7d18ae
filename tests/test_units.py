"""Unit tests without sockets: records, routing, wire framing, configuration, the cache budget."""

from __future__ import annotations

import asyncio
import functools
import math
import random

import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from client.routing import PeerSpan, choose_route, choose_spread_route, missing_blocks
from swarm.coverage import SERVING_STATES, peer_spans
from peers.cache import CacheBudget
from peers.validation import Limits, check_block_inputs, check_span
from swarm import errors
from swarm.config import PeerConfig, parse_blocks, parse_throughput
from swarm.identity import Identity
from swarm.messages import PEER_REQUEST, ForwardRequest, InferenceStep
from swarm.records import (
    MAX_RECORD_BYTES, PROTOCOL_VERSION, PeerRecord, PeerState, RecordShapeValidator, parse_models, parse_peer_records,
)
from swarm.transport import FrameReader, decode_header, encode_frame, name_tensors

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


# ---- wire framing ------------------------------------------------------------------------------
async def _aiter(items):
    for item in items:
        yield item


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


def _read(messages, max_frame_bytes=2**30):
    return asyncio.run(FrameReader(_aiter(messages), max_frame_bytes).read())


def test_frame_round_trip_splits_large_tensors():
    hidden = torch.randn(1, 3000, 576)  # 6.9 MB: above hivemind's 4 MiB message cap
    positions = torch.arange(3000).unsqueeze(0)
    header = ForwardRequest(start_block=0, end_block=3, tensor_names=["hidden_states", "position_ids"])
    messages = list(encode_frame(header, [hidden, positions], runtime_pb2.ExpertRequest))
    assert len(messages) > 2 and all(message.ByteSize() < 4 * 2**20 for message in messages)
    metadata, tensors = _read(messages)
    decoded = decode_header(PEER_REQUEST, metadata)
    named = name_tensors(decoded, tensors, ["hidden_states", "position_ids"])
    assert torch.equal(named["hidden_states"], hidden) and torch.equal(named["position_ids"], positions)


def test_bf16_round_trip():
    tensor = torch.randn(2, 3, 8).to(torch.bfloat16)
    (message,) = encode_frame(InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]), [tensor], runtime_pb2.ExpertRequest)
    assert torch.equal(_read([message])[1][0], tensor)


def _tensor_message(**fields) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(**fields)], metadata=b"{}")


@pytest.mark.parametrize(
    "fields",
    [
        dict(buffer=b"\x00" * 12, size=[4], dtype="object"),
        dict(buffer=b"\x00" * 12, size=[4], dtype="float32"),  # 12 bytes for 16 expected
        dict(buffer=b"\x00" * 4, size=[1, 1, 1, 1, 1], dtype="float32"),
        dict(buffer=b"\x00" * 4, size=[1], dtype="float32", compression=runtime_pb2.CompressionType.FLOAT16),
        dict(buffer=b"\x00" * 4, size=[1], dtype="float32", chunks=3),
        dict(buffer=b"\x00" * 8, size=[], dtype="float32"),
    ],
)
def test_malformed_tensors_are_refused(fields):
    with pytest.raises(errors.InvalidRequestError):
        _read([_tensor_message(**fields)])


def test_oversized_frames_and_bad_headers_are_refused():
    with pytest.raises(errors.InvalidRequestError, match="larger"):
        _read([_tensor_message(buffer=b"\x00" * 64, size=[16], dtype="float32")], max_frame_bytes=32)
    with pytest.raises(errors.InvalidRequestError, match="header larger"):
        _read([runtime_pb2.ExpertRequest(metadata=b"{" + b" " * 2**17 + b"}")])
    for metadata in (b"not json", b'{"type": "forward"}', b'{"type": "rm -rf"}', b'{"type":"step","position":-1}'):
        with pytest.raises(errors.InvalidRequestError):
            decode_header(PEER_REQUEST, metadata)


# ---- peer-side validation ----------------------------------------------------------------------
LIMITS = Limits(hidden_size=8, max_batch_size=4, max_length=32)


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"hidden_states": torch.zeros(1, 2, 9)},
        {"hidden_states": torch.zeros(1, 2, 8, dtype=torch.int64)},
        {"hidden_states": torch.zeros(5, 2, 8)},
        {"hidden_states": torch.full((1, 2, 8), math.nan)},
        {"hidden_states": torch.zeros(1, 2, 8), "position_ids": torch.zeros(1, 3, dtype=torch.int64)},
        {"hidden_states": torch.zeros(1, 2, 8), "position_ids": torch.full((1, 2), 99, dtype=torch.int64)},
        {"hidden_states": torch.zeros(1, 2, 8), "attention_mask": torch.ones(1, 3, dtype=torch.int64)},
        {"hidden_states": torch.zeros(1, 2, 8), "attention_mask": torch.full((1, 2), 7, dtype=torch.int64)},
    ],
)
def test_bad_inputs_are_refused(tensors):
    with pytest.raises(errors.InvalidRequestError):
        check_block_inputs(tensors, LIMITS)


def test_session_length_and_span_limits():
    with pytest.raises(errors.SessionLengthError):
        check_block_inputs({"hidden_states": torch.zeros(1, 4, 8)}, LIMITS, past_length=30)
    with pytest.raises(errors.BlocksNotServedError, match="serves 2:4"):
        check_span(0, 4, (2, 4))
    with pytest.raises(errors.InvalidRequestError, match="empty"):
        check_span(3, 3, (2, 4))
    inputs = check_block_inputs({"hidden_states": torch.zeros(2, 3, 8)}, LIMITS)
    assert inputs.hidden_states.shape == (2, 3, 8)


def test_cache_budget_waits_then_reports_overload():
    async def scenario():
        budget = CacheBudget(total_bytes=100 * 8, bytes_per_token=8, max_sessions=2)
        async with budget.reserve(60, timeout_s=1):
            assert budget.tokens_left == 40 and budget.used_bytes == 480
            with pytest.raises(errors.OverloadedError, match="no cache for 50 tokens"):
                async with budget.reserve(50, timeout_s=0.05):
                    pass
        async with budget.reserve(100, timeout_s=0.05):
            assert budget.tokens_left == 0
        with pytest.raises(errors.SessionLengthError):
            async with budget.reserve(101, timeout_s=0.05):
                pass
        assert budget.tokens_left == 100 and budget.sessions == 0

    asyncio.run(scenario())


def test_cache_budget_limits_concurrent_sessions_and_wakes_waiters():
    async def scenario():
        budget = CacheBudget(total_bytes=1000, bytes_per_token=1, max_sessions=2)
        async with budget.reserve(1, timeout_s=1), budget.reserve(1, timeout_s=1):
            assert budget.tokens_left == 0  # no slot: nothing to offer a new session
            with pytest.raises(errors.OverloadedError, match="all 2 session slots"):
                async with budget.reserve(1, timeout_s=0.05):
                    pass
        held = asyncio.Event()

        async def holder():
            async with budget.reserve(1, timeout_s=1), budget.reserve(1, timeout_s=1):
                held.set()
                await asyncio.sleep(0.1)

        task = asyncio.create_task(holder())
        await held.wait()
        async with budget.reserve(500, timeout_s=2):  # waits for a slot, then gets it
            assert budget.sessions == 1
        await task
        assert budget.sessions == 0 and budget.used_bytes == 0

    asyncio.run(scenario())


# ---- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["0", "-2", "half", "5:3", "-1:4", "a:b", "3:3"])
def test_bad_block_ranges_get_clear_errors(text):
    with pytest.raises(errors.ConfigError, match="--blocks"):
        parse_blocks(text)


def test_blocks_take_a_range_a_count_or_auto():
    assert [parse_blocks(text) for text in ("0:4", "8", "auto")] == [(0, 4), 8, "auto"]
    assert PeerConfig().blocks_spec() == "auto"
    assert PeerConfig(blocks=3).blocks_spec() == 3  # a TOML file may give a number
    assert [parse_throughput(text) for text in ("auto", "eval", "12.5")] == ["auto", "eval", 12.5]
    for text in ("fast", "-1", "inf", "nan"):
        with pytest.raises(errors.ConfigError, match="--throughput"):
            parse_throughput(text)


def test_peer_config_requires_peers_or_new_swarm():
    config = PeerConfig(blocks="0:4")
    assert config.blocks_spec() == (0, 4)
    with pytest.raises(errors.ConfigError, match="--initial-peers"):
        config.network.require_peers_or_new_swarm()


def test_peer_config_layers_file_environment_and_flags(tmp_path, monkeypatch):
    from swarm.peer import parse

    config_file = tmp_path / "peer.toml"
    config_file.write_text('blocks = "0:10"\npublic_name = "from-file"\ncache_tokens = 100\n[network]\nnew_swarm = true\n')
    monkeypatch.setenv("SWARM_PEER_PUBLIC_NAME", "from-env")
    config = parse(["--config", str(config_file), "--cache-tokens", "7"])
    assert (config.blocks, config.public_name, config.cache_tokens, config.network.new_swarm) == ("0:10", "from-env", 7, True)
    with pytest.raises(errors.ConfigError, match="cache_tokens"):
        parse(["--config", str(config_file), "--cache-tokens", "-1"])


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from client.finetune import load_optimizer_state, save_optimizer_state

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    optimizer = torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.95))
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
    state = optimizer.state_dict()
    state["state"]["local_epoch"] = 7  # as hivemind.Optimizer adds it
    save_optimizer_state(state, tmp_path / "optimizer.safetensors")
    loaded = load_optimizer_state(tmp_path / "optimizer.safetensors")
    assert loaded["state"].pop("local_epoch") == 7
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["lr"] == 0.01 and tuple(fresh.param_groups[0]["betas"]) == (0.8, 0.95)
    for index in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[fresh.param_groups[0]["params"][index]][name], optimizer.state[params[index]][name])


def _slot_step(**fields):
    from swarm.messages import SlotStep

    return SlotStep(step_id=0, **fields)


def test_slot_steps_plan_rows_starts_and_releases():
    from peers.slots import RowPlan, plan_step

    held = {0: (5, 20), 1: (3, 10)}  # slot -> (cached tokens, reserved tokens)
    plan = functools.partial(plan_step, slots=4, max_length=64)
    rows = plan(_slot_step(slots=[1, 0], positions=[3, 5], tokens=[1, 6]), held, shape=(1, 7))
    assert rows == [RowPlan(1, 3, 1, 10), RowPlan(0, 5, 6, 20)]  # a decode token and a prefill chunk side by side
    assert plan(_slot_step(starts=[2, 0], start_lengths=[30, 9], release=[1]), held, shape=None) == []
    assert plan(_slot_step(release=[0, 1]), held, shape=None) == []
    refused = [
        (_slot_step(slots=[0], positions=[5], tokens=[1], release=[0]), (1, 1), errors.InvalidRequestError),  # released
        (_slot_step(slots=[0], positions=[4], tokens=[1]), (1, 1), errors.InvalidRequestError),  # not where it stands
        (_slot_step(slots=[0], positions=[5], tokens=[16]), (1, 16), errors.SessionLengthError),  # past its reservation
        (_slot_step(starts=[2], start_lengths=[65]), None, errors.SessionLengthError),  # over max_length
        (_slot_step(starts=[2], start_lengths=[8, 8]), None, errors.InvalidRequestError),
        (_slot_step(starts=[2], start_lengths=[8], slots=[0], positions=[5], tokens=[1]), (1, 1), errors.InvalidRequestError),
        (_slot_step(slots=[3], positions=[0], tokens=[1]), (1, 1), errors.InvalidRequestError),  # holds nothing
        (_slot_step(starts=[4], start_lengths=[8]), None, errors.InvalidRequestError),  # no such slot
        (_slot_step(slots=[0, 0], positions=[5, 5], tokens=[1, 1]), (1, 2), errors.InvalidRequestError),
        (_slot_step(slots=[0, 1], positions=[5, 3], tokens=[1]), (1, 1), errors.InvalidRequestError),
        (_slot_step(slots=[0, 1], positions=[5, 3], tokens=[1, 1]), (2, 1), errors.InvalidRequestError),  # not side by side
        (_slot_step(slots=[0, 1], positions=[5, 3], tokens=[1, 1]), (1, 3), errors.InvalidRequestError),  # token count
        (_slot_step(slots=[0], positions=[5], tokens=[1]), None, errors.InvalidRequestError),  # no hidden states
        (_slot_step(release=[1, 1]), None, errors.InvalidRequestError),
        (_slot_step(), (1, 1), errors.InvalidRequestError),  # hidden states without rows
    ]
    for step, shape, kind in refused:
        with pytest.raises(kind):
            plan(step, held, shape=shape)


def test_cache_budget_takes_without_waiting_and_gives_back():
    async def run():
        budget = CacheBudget(total_bytes=100, bytes_per_token=10, max_sessions=2)
        budget.take(6)
        with pytest.raises(errors.OverloadedError):
            budget.take(5)
        with pytest.raises(errors.SessionLengthError):
            budget.take(11)
        await budget.give_back(6)
        budget.take(10)
        assert budget.tokens_left == 0

    asyncio.run(run())


def test_step_batcher_counts_rows_per_turn():
    from peers.batching import StepBatcher

    async def run():
        turns = []

        async def run_compute(job):
            await asyncio.sleep(0.01)
            return job()

        def run_batch(items):
            turns.append(list(items))
            return items

        batcher = StepBatcher(run_compute, run_batch, max_steps=4)
        results = await asyncio.gather(*(batcher.submit(name, rows) for name, rows in [("a", 1), ("b", 3), ("c", 2), ("d", 5), ("e", 1)]))
        batcher.close()
        return results, turns

    results, turns = asyncio.run(run())
    assert results == ["a", "b", "c", "d", "e"]
    # all five wait before the first turn: a turn takes items in order up to 4 rows, and at least one item
    assert turns == [["a", "b"], ["c"], ["d"], ["e"]]


def test_pushes_pay_where_round_trips_are_slow():
    from types import SimpleNamespace

    from client.sequence import RemoteSequence
    from swarm.config import ClientConfig

    latency = {"near": 0.001, "far": 0.040}
    view = lambda **config: SimpleNamespace(config=ClientConfig(**config), latency_s=latency)  # noqa: E731
    assert [RemoteSequence.pushes_pay(view(), peer) for peer in ("near", "far", "unmeasured")] == [False, True, True]
    assert RemoteSequence.pushes_pay(view(push_steps=True), "near") and not RemoteSequence.pushes_pay(view(push_steps=False), "far")
    assert RemoteSequence.pushes_pay(view(push_min_rtt_s=0.0005), "near")


def test_a_round_trip_is_the_fastest_of_several_pings(monkeypatch):
    """The first ping of a peer also dials it: its time must not decide whether pushes pay; a peer
    that fails a ping is banned and gets no round trip."""
    from types import SimpleNamespace

    from client import sequence
    from swarm.config import ClientConfig

    calls: dict[str, int] = {}

    async def call_info(p2p, peer_id, namespace, timeout_s, auth=None):
        calls[peer_id] = calls.get(peer_id, 0) + 1
        if peer_id == "dead":
            raise errors.PeerUnavailableError("gone")
        await asyncio.sleep(0.05 if calls[peer_id] == 1 else 0.0)

    monkeypatch.setattr(sequence, "call_info", call_info)
    banned = []
    view = SimpleNamespace(
        p2p=None, dht_prefix="m", config=ClientConfig(), latency_s={}, proof=lambda peer_id: None, ban=banned.append,
    )
    asyncio.run(sequence.RemoteSequence._measure_latencies(view, ["slow-to-dial", "dead"]))
    assert calls == {"slow-to-dial": sequence.PINGS_PER_PEER, "dead": 1}
    assert view.latency_s["slow-to-dial"] < 0.04 and "dead" not in view.latency_s and banned == ["dead"]


def test_client_calls_run_on_one_plain_asyncio_loop_even_where_uvloop_is_installed(monkeypatch):
    """hivemind installs uvloop's policy for the whole process (its RemoteExpertWorker does); the client's
    calls still run on one plain asyncio loop thread: a uvloop handle let go of by another thread
    crashes the process (see swarm.loop_thread)."""
    import threading

    import uvloop

    from swarm import loop_thread

    async def where():
        return asyncio.get_running_loop(), threading.current_thread().name

    monkeypatch.setattr(loop_thread, "_loop", None)  # a loop of this test's own, started under uvloop's policy
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        loop, thread = loop_thread.run_coroutine(where())
    finally:
        asyncio.set_event_loop_policy(previous)
    try:
        assert type(loop) is asyncio.SelectorEventLoop and thread == "swarm-loop"
        assert loop_thread.run_coroutine(where()) == (loop, thread)  # one loop and thread for every call
    finally:
        loop.call_soon_threadsafe(loop.stop)
