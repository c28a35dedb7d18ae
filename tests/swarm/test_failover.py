"""Peers die or hang mid-generation: the session re-routes their blocks, replays its inputs and
produces exactly the tokens of a run without faults.

One pool of peers (three per range of a 4-block tiny Llama) serves every trial; killed peers are
replaced before the next one. A trial kills the peer serving some block before the n-th token
(n = 0: before the prefill reaches it), sometimes while a step is in flight, sometimes twice in a
row, and once freezes a peer (SIGSTOP): then only the client's liveness pings tell it the peer is
gone (the step timeout is the default two minutes).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM
from swarm.config import ClientConfig
from swarm.tools.local import LocalSwarm
from swarm.loop_thread import run_coroutine

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(600)

RANGES = ("0:2", "2:4")
PEERS_PER_RANGE = 3
PROMPT_TOKENS, NEW_TOKENS = 7, 24
PEER_ARGS = ["--announce-period", "1"]


def _trials() -> list[tuple[str, list[tuple[int, int, str]]]]:
    """(name, faults); a fault is (tokens generated before it, block whose peer it hits, how)."""
    rng = random.Random(20261123)
    trials = [
        ("prefill, first hop", [(0, 0, "kill")]),
        ("prefill, second hop", [(0, 2, "kill")]),
        ("two in a row, both hops", [(5, 0, "kill"), (5, 2, "kill")]),
        ("two one after another, same blocks", [(3, 2, "kill"), (11, 2, "kill")]),
        ("two one after another, both hops", [(8, 2, "kill"), (17, 0, "kill")]),
        ("frozen peer, liveness ping", [(rng.randrange(1, NEW_TOKENS), rng.choice((0, 2)), "freeze")]),
    ]
    for index in range(10):
        how = "in-flight" if index % 3 == 2 else "kill"  # in flight: leave steps for the fault to land in
        step = rng.randrange(0, NEW_TOKENS - (4 if how == "in-flight" else 1))
        trials.append((f"random {index}", [(step, rng.choice((0, 2)), how)]))
    return trials


TRIALS = _trials()


class Faults(BaseStreamer):
    """Injects faults into a generate() run as its tokens stream out (the prompt counts as token 0)."""

    def __init__(self, pool: "Pool", session, faults: list[tuple[int, int, str]]):
        self.pool, self.session = pool, session
        self.pending = sorted(faults)
        self.generated = -1  # the prompt arrives first
        self.hit: list[str] = []
        self.timers: list[threading.Timer] = []

    def put(self, value):
        self.generated += 1 if self.generated < 0 else value.numel()
        while self.pending and self.pending[0][0] <= self.generated:
            _, block, how = self.pending.pop(0)
            if not self.session.streams:  # before the prefill: open the session now to know its route
                run_coroutine(self.session.open())
            peer_id = next(peer for peer, start, end in self.session.route if start <= block < end)
            if how == "in-flight":  # lands while the next step is on its way or computing
                timer = threading.Timer(random.uniform(0.0, 0.005), self.pool.fault, (peer_id, "kill"))
                timer.start()
                self.timers.append(timer)
            else:
                self.pool.fault(peer_id, how)
            self.hit.append(peer_id)

    def end(self):
        for timer in self.timers:
            timer.join()


class Pool:
    def __init__(self, swarm: LocalSwarm, model_path: str):
        self.swarm, self.model_path = swarm, model_path
        self.nodes: dict[str, object] = {}  # peer id -> node, of live peers
        self.blocks_of: dict[str, str] = {}
        self.frozen: list = []

    def start(self, blocks: list[str]) -> None:
        started = [self.swarm.start_peer(span, model=self.model_path, extra_args=PEER_ARGS, wait=False) for span in blocks]
        for node, span in zip(started, blocks):
            self.swarm.wait_ready(node)
            peer_id = node.maddrs[0].rsplit("/", 1)[-1]
            self.nodes[peer_id], self.blocks_of[peer_id] = node, span

    def fault(self, peer_id: str, how: str) -> None:
        node = self.nodes.pop(peer_id)
        if how == "freeze":  # the peer, its DHT and its p2pd stop answering but keep their connections
            os.killpg(node.pid, signal.SIGSTOP)
            self.frozen.append(node)  # killed before the next trial
        else:
            node.kill()

    def refill(self) -> None:
        while self.frozen:
            self.frozen.pop().kill()
        alive = [self.blocks_of[peer_id] for peer_id in self.nodes]
        missing = [span for span in RANGES for _ in range(PEERS_PER_RANGE - alive.count(span))]
        self.start(missing)


@pytest.fixture(scope="module")
def pool(tiny_model_path, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("failover"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        pool = Pool(swarm, str(tiny_model_path))
        pool.start([span for span in RANGES for _ in range(PEERS_PER_RANGE)])
        # the default step timeout: lost peers are found by liveness pings; pushes on, so that peers
        # killed mid-push are covered too (on loopback, push_steps="auto" would relay)
        config = ClientConfig(route_wait_s=20.0, push_steps=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_model_path), initial_peers=swarm.initial_peers, client_config=config
        )
        try:
            yield pool, model
        finally:
            model.close()


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name, faults", TRIALS, ids=[name for name, _ in TRIALS])
def test_generation_survives_lost_peers(pool, reference, name, faults):
    pool, model = pool
    pool.refill()
    time.sleep(1.0)  # records of the peers killed last time have expired or are about to: either way works
    input_ids = torch.randint(3, 128, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(len(name) * 31 + faults[0][0]))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = reference.generate(input_ids, **kwargs)
    with model.inference_session(max_length=64) as session:
        streamer = Faults(pool, session, faults)
        actual = model.generate(input_ids, streamer=streamer, **kwargs)
        route = [peer for peer, _, _ in session.route]
    assert len(streamer.hit) == len(faults)
    assert not set(streamer.hit) & set(route), "a lost peer is still in the route"
    assert torch.equal(actual, expected)


SPECULATIVE_TRIALS = [
    ("prompt lookup, first hop", "lookup", [(4, 0, "kill")]),
    ("prompt lookup, in flight", "lookup", [(9, 2, "in-flight")]),
    ("draft, both hops", "draft", [(3, 2, "kill"), (14, 0, "kill")]),
    ("draft, in flight", "draft", [(6, 0, "in-flight")]),
]


@pytest.mark.parametrize("name, how, faults", SPECULATIVE_TRIALS, ids=[name for name, _, _ in SPECULATIVE_TRIALS])
def test_speculative_generation_survives_lost_peers(pool, reference, name, how, faults):
    """Peers lost between speculative rounds, or while one is in flight: the same tokens."""
    pool, model = pool
    pool.refill()
    time.sleep(1.0)
    base = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(len(name)))
    input_ids = torch.cat([base, base, base[:, :2]], dim=1)  # repeats: prompt lookup finds proposals
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = reference.generate(input_ids, **kwargs)
    reference.generation_config.assistant_confidence_threshold = 0.0  # propose however unsure (flat random distributions)
    speculation = dict(prompt_lookup_num_tokens=6) if how == "lookup" else dict(assistant_model=reference)
    with model.inference_session(max_length=64) as session:
        streamer = Faults(pool, session, faults)
        actual = model.generate(input_ids, streamer=streamer, **speculation, **kwargs)
        route = [peer for peer, _, _ in session.route]
    assert len(streamer.hit) == len(faults)
    assert not set(streamer.hit) & set(route), "a lost peer is still in the route"
    assert torch.equal(actual, expected)
    assert model.speculation_stats.proposed > 0
