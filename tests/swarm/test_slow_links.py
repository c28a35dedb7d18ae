"""Emulated slow links (`swarm.tools.delay`): the relay delays and rate-limits what it forwards and
loses nothing; a swarm behind such relays generates exactly, and pushes carry every step on."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

from swarm.tools.delay import DelayRelay, Link, free_port
from swarm.tools.local import LocalSwarm
from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)


def test_a_relay_delays_each_way_limits_the_rate_and_keeps_every_byte():
    payload = os.urandom(300_000)

    async def scenario():
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        relay = DelayRelay(free_port(), target, Link(delay_ms=40, rate_mbit=20))
        await relay.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.listen_port)
        started = time.perf_counter()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        round_trip_s = time.perf_counter() - started
        started = time.perf_counter()
        writer.write(payload)
        echoed = await reader.readexactly(len(payload))
        transfer_s = time.perf_counter() - started
        writer.close()
        await relay.close()
        server.close()
        return round_trip_s, transfer_s, echoed

    round_trip_s, transfer_s, echoed = asyncio.run(scenario())
    assert echoed == payload
    assert round_trip_s >= 0.08  # 40 ms each way, at least: these are lower bounds, never timings
    assert transfer_s >= len(payload) * 8 / 20e6 + 0.08  # at 20 Mbit/s at most (both ways overlap), plus the delays


def test_a_swarm_behind_delaying_relays_generates_exactly_with_pushes(tiny_model_path, reference, tmp_path):
    from client import AutoDistributedModelForCausalLM

    with LocalSwarm(tmp_path, env=PEER_ENV, link=Link(delay_ms=10)) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:2", "2:4"):
            swarm.start_peer(blocks, model=str(tiny_model_path))
        assert all("/tcp/" in maddr for maddr in swarm.initial_peers) and len(swarm.relays) == 3
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        try:
            input_ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))
            kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
            with model.inference_session(max_length=32) as session:
                actual = model.generate(input_ids, **kwargs)
            assert torch.equal(actual, reference.generate(input_ids, **kwargs))
            decoding = [step for step in session.timings if step.tokens == 1]
            assert decoding and all(step.hops[1].pushed for step in decoding)  # round trips of 20 ms: pushes pay
            assert all(step.hops[0].network_ms >= 20 for step in decoding)  # the client's round trip to hop 1
        finally:
            model.close()


def test_the_route_follows_the_measured_round_trips(tiny_model_path, reference, tmp_path):
    """One peer serves every block but is 60 ms away; two nearby peers serve halves; a third half-peer
    is as far as the first. The client takes the two nearby peers: more hops, less time."""
    from client import AutoDistributedModelForCausalLM

    far = Link(delay_ms=60)
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        layout = [("0:4", far), ("0:2", None), ("2:4", None), ("2:4", far)]
        nodes = [swarm.start_peer(blocks, model=str(tiny_model_path), link=link, wait=False) for blocks, link in layout]
        for node in nodes:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        try:
            input_ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(6))
            kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
            with model.inference_session(max_length=16) as session:
                assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))
                route = session.route
            latency = model.sequence.latency_s
            near = sorted(peer_id for peer_id, value in latency.items() if value < 0.06)
            assert len(near) == 2 and sorted(peer_id for peer_id, _, _ in route) == near, (route, latency)
            assert [(start, end) for _, start, end in route] == [(0, 2), (2, 4)]
        finally:
            model.close()
