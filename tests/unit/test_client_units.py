"""The client's pure parts: optimizer state on disk, when to push, round trips, its event loop thread."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm import errors

pytestmark = pytest.mark.timeout(60)


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


def test_a_steps_time_is_split_per_hop_into_network_and_compute():
    from client.timing import StepTiming, hop_timing, summarize

    hops = (
        hop_timing("peer-a", 0, 10, waited_ms=70.0, compute_ms=20.0, pushed=False),
        hop_timing("peer-b", 10, 20, waited_ms=45.0, compute_ms=20.0, pushed=True),
        hop_timing("peer-c", 20, 30, waited_ms=10.0, compute_ms=None, pushed=True),  # an older peer reports nothing
    )
    step = StepTiming(position=5, tokens=1, hops=hops, total_ms=125.0)
    assert [hop.network_ms for hop in hops] == [50.0, 25.0, 10.0] and step.network_ms == 85.0 and step.compute_ms == 40.0
    assert hop_timing("p", 0, 1, waited_ms=5.0, compute_ms=9.0, pushed=False).network_ms == 0.0  # clocks disagree: never negative
    lines = summarize([step, StepTiming(0, 16, hops, 400.0)])  # the prefill is left out of the medians
    assert len(lines) == 4 and "network   25.0 ms, compute   20.0 ms (pushed)" in lines[1] and "125.0 ms" in lines[-1]
    assert summarize([]) == ["no steps timed yet"]
