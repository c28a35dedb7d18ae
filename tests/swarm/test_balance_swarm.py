"""Peers that choose their own blocks, live on 127.0.0.1: they cover the model, heal a gap left by a
killed peer, join where the swarm is weakest, and a peer that leaves is seen leaving at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from peers import placement
from peers import sizing
from swarm.balance import Span
from swarm.tools.local import LOOPBACK, LocalSwarm
from swarm.loop_thread import run_coroutine
from swarm.plan import report
from swarm.records import ModelRecord, PeerState
from tests.conftest import PEER_ENV, make_tiny_llama

pytestmark = pytest.mark.timeout(300)

BLOCKS = 6
FAST = ["--announce-period", "1", "--join-jitter", "0", "--rebalance-period", "2"]
SETTLED = ["--announce-period", "1", "--join-jitter", "0", "--rebalance-period", "30"]  # checks seldom


@pytest.fixture(scope="module")
def six_block_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-6", num_layers=BLOCKS, seed=3)


@pytest.fixture(scope="module")
def reference(six_block_model):
    return AutoModelForCausalLM.from_pretrained(six_block_model, dtype=torch.float32).eval()


def served_range(line: str) -> tuple[int, int]:
    start, end = line.rsplit("blocks", 1)[1].split(":")
    return int(start), int(end)


def assert_generates_exactly(swarm: LocalSwarm, model_path, reference) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_path), initial_peers=swarm.initial_peers)
    try:
        input_ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
        kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))
    finally:
        model.close()


@pytest.fixture(scope="module")
def auto_swarm(six_block_model, tmp_path_factory):
    """Three peers taking 2 blocks each, started one after another, at 1, 2 and 3 tokens/s."""
    with LocalSwarm(tmp_path_factory.mktemp("auto-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        swarm.ranges = {}
        for throughput in ("1", "2", "3"):
            node = swarm.start_peer("2", model=str(six_block_model), extra_args=[*SETTLED, "--throughput", throughput], wait=False)
            swarm._await_listening(node)
            swarm.ranges[node.name] = served_range(node.wait_for("swarm: ready", 120))
        yield swarm


def test_peers_started_one_after_another_cover_every_block(auto_swarm, six_block_model, reference):
    covered = sorted(index for start, end in auto_swarm.ranges.values() for index in range(start, end))
    assert covered == list(range(BLOCKS)), auto_swarm.ranges
    assert_generates_exactly(auto_swarm, six_block_model, reference)


def test_a_redundant_peer_moves_to_cover_a_killed_peers_blocks(auto_swarm, six_block_model, reference):
    """Also: a session on the mover's old blocks goes on after the move (warm handoff), and re-routes
    the killed peer's blocks to the mover's new ones. The newcomer joins the slowest peer's blocks;
    it checks every ~2 s, the others every ~30 s, so it is almost always the one that moves."""
    extra = auto_swarm.start_peer("2", model=str(six_block_model), extra_args=[*FAST, "--throughput", "1"], wait=False)
    auto_swarm._await_listening(extra)
    duplicated = served_range(extra.wait_for("swarm: ready", 120))
    twin = next(node for node in auto_swarm.nodes[1:4] if auto_swarm.ranges[node.name] == duplicated)
    victim = next(
        node for node in auto_swarm.nodes[1:4] if not set(range(*auto_swarm.ranges[node.name])) & set(range(*duplicated))
    )
    gap = auto_swarm.ranges[victim.name]
    model = AutoDistributedModelForCausalLM.from_pretrained(str(six_block_model), initial_peers=auto_swarm.initial_peers)
    try:
        first, second = (torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(seed)) for seed in (4, 5))
        kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        mover_id = peer_id_of(extra)
        model.sequence.ban(peer_id_of(twin))  # so the session runs through the peer that will move
        with model.inference_session(max_length=64) as session:
            turn1 = model.generate(first, max_new_tokens=6, **kwargs)
            assert (mover_id, *duplicated) in session.route
            victim.kill()  # the only peer on `gap`, gone without a goodbye
            started = time.monotonic()
            mover, line = first_line("swarm: moved", [extra, twin], 60)  # record TTL 3 s + a rebalance period + loading
            assert served_range(line) == gap, (duplicated, gap, line)
            print(f"gap {gap} covered again by {mover.name} after {time.monotonic() - started:.1f} s")
            turn2 = model.generate(second, max_new_tokens=6, **kwargs)
            if mover is extra:  # the session still runs on its old blocks, and on its new ones for the gap
                assert (mover_id, *duplicated) in session.route and (mover_id, *gap) in session.route
    finally:
        model.close()
    expected1 = reference.generate(first, max_new_tokens=6, **kwargs)
    assert torch.equal(turn1, expected1)
    assert torch.equal(turn2, reference.generate(torch.cat([expected1, second], dim=1), max_new_tokens=6, **kwargs))
    assert_generates_exactly(auto_swarm, six_block_model, reference)


def first_line(prefix: str, nodes: list, timeout_s: float):
    """(node, line) of the first of `nodes` to print a line starting with `prefix`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in nodes:
            while not node.lines.empty():
                line = node.lines.get_nowait()
                if line.startswith(prefix):
                    return node, line
        time.sleep(0.1)
    raise AssertionError(f"none of {[node.name for node in nodes]} printed {prefix!r} within {timeout_s} s")


def peer_id_of(node) -> str:
    """The peer id in a node's listening multiaddr."""
    return node.maddrs[0].rsplit("/p2p/", 1)[1]


def test_a_joining_peer_takes_the_weakest_blocks(six_block_model, tmp_path):
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        swarm.start_peer("0:6", model=str(six_block_model), extra_args=[*FAST, "--throughput", "10"])
        swarm.start_peer("0:3", model=str(six_block_model), extra_args=[*FAST, "--throughput", "10"])
        plan = subprocess.run(
            [sys.executable, "-m", "swarm.plan", "--initial-peers", *swarm.initial_peers, "--host-maddrs", LOOPBACK,
             "--blocks", "3", "--throughput", "1"],
            capture_output=True, text=True, timeout=60,
        )
        assert plan.returncode == 0, plan.stderr
        assert "healthy" in plan.stdout and "2 peers" in plan.stdout
        assert "would take blocks 3:6" in plan.stdout, plan.stdout
        newcomer = swarm.start_peer("3", model=str(six_block_model), extra_args=[*FAST, "--throughput", "1"], wait=False)
        swarm._await_listening(newcomer)
        assert served_range(newcomer.wait_for("swarm: ready", 120)) == (3, 6)  # 10 tokens/s there, 20 on 0:3


def test_a_leaving_peer_is_seen_offline_long_before_its_record_expires(six_block_model, reference, tmp_path):
    slow_expiry = ["--announce-period", "60", "--join-jitter", "0"]  # records live 180 s
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        staying = swarm.start_peer("auto", model=str(six_block_model), extra_args=[*slow_expiry, "--throughput", "1"], wait=False)
        swarm.wait_ready(staying)
        assert "6 of 6 blocks fit" in staying.log_path.read_text()  # --blocks auto: a tiny model fits whole
        leaving = swarm.start_peer("0:6", model=str(six_block_model), extra_args=[*slow_expiry, "--throughput", "1"])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(six_block_model), initial_peers=swarm.initial_peers)
        try:
            sequence = model.sequence
            run_coroutine(sequence.update())
            assert len(sequence.spans) == 2
            os.kill(leaving.process.pid, signal.SIGTERM)
            started = time.monotonic()
            while time.monotonic() - started < 20:
                run_coroutine(sequence.update())
                if len(sequence.spans) == 1:
                    break
                time.sleep(0.2)
            seen_after = time.monotonic() - started
            assert len(sequence.spans) == 1, sequence.spans
            print(f"the leaving peer was seen offline after {seen_after:.1f} s (its record would live 180 s)")
            assert leaving.process.wait(timeout=30) == 0
            input_ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
            kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))
        finally:
            model.close()
        assert staying.process.poll() is None


def test_plan_report_shows_gaps_and_ties():
    model = ModelRecord(model="m", num_blocks=6, protocol_version=2)
    spans = {"a": Span("a", 0, 2, 1.0), "b": Span("b", 4, 6, 2.0, PeerState.JOINING)}
    lines = report("m", model, spans, 2, 1.0)
    assert "BROKEN: blocks 2:4 are not served" in lines[0]
    assert "MISSING" in lines[3] and "(1 joining)" in lines[5]
    assert lines[-1].endswith("would take blocks 2:4")
    even = report("m", model, {"a": Span("a", 0, 6, 1.0)}, 3, 1.0)
    assert "healthy" in even[0] and "one of blocks 0:3, 1:4, 2:5, 3:6" in even[-1]


def test_auto_block_count_fits_the_memory_budget(six_block_model):
    from swarm.errors import ConfigError
    from swarm.models import load_config, resolve_model

    config = load_config(resolve_model(str(six_block_model)))
    kwargs = dict(dtype=torch.float32, device="cpu", cache_tokens=16384, max_length=8192)
    per_block = sizing.block_memory_bytes(config, torch.float32) + sizing.kv_bytes_per_token(config, torch.float32) * 16384
    reserve = 8 * 8192 * config.hidden_size * 4 + placement.RUNTIME_RESERVE_BYTES
    count, explanation = placement.auto_block_count(config, **kwargs, max_memory_gb=(reserve + 3.5 * per_block) / 2**30)
    assert count == 3 and "3 of 6 blocks fit" in explanation and "--max-memory-gb" in explanation
    assert placement.auto_block_count(config, **kwargs, max_memory_gb=64)[0] == 6  # never more than the model has
    with pytest.raises(ConfigError, match="not enough memory for one block"):
        placement.auto_block_count(config, **kwargs, max_memory_gb=(reserve + 0.5 * per_block) / 2**30)
