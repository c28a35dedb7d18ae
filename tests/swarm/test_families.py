"""Families through peers: for each, a tiny random model made here, served by two peers on blocks 0:2
(one of them a spare) and one on 2:4, equals transformers token for token, in one generate(), over a
multi-turn session, and when the peer of blocks 0:2 dies mid-generation (windows of 4 tokens are
crossed throughout, so sliding-window caches are replayed on failover)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM
from swarm.config import ClientConfig
from swarm.tools.local import LocalSwarm
from tests.conftest import PEER_ENV
from tests.families import make_tiny_model

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

THROUGH_PEERS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere"]
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Greedy, with an explicit attention mask: random tiny models generate the pad token (0) too, which
    transformers would otherwise take for padding in a later turn's prompt."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, **GREEDY, **kwargs)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("families"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        yield swarm


class KillFirstHop(BaseStreamer):
    """Kills the peer serving block 0 once `after` tokens have come out (the prompt counts as none)."""

    def __init__(self, session, nodes, after: int):
        self.session, self.nodes, self.after, self.seen, self.killed = session, nodes, after, -1, None

    def put(self, value):
        self.seen += 1
        if self.seen == self.after and self.killed is None:
            self.killed = next(peer for peer, start, _ in self.session.route if start == 0)
            self.nodes[self.killed].kill()

    def end(self):
        pass


@pytest.mark.parametrize("model_type", THROUGH_PEERS)
def test_a_family_through_two_peers_equals_transformers(swarm, tmp_path, model_type):
    path = make_tiny_model(model_type, tmp_path / model_type)
    started = [swarm.start_peer(blocks, model=str(path), extra_args=["--announce-period", "1"], wait=False) for blocks in ("0:2", "0:2", "2:4")]
    for node in started:
        swarm.wait_ready(node)
    nodes = {node.maddrs[0].rsplit("/", 1)[-1]: node for node in started}
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=swarm.initial_peers, client_config=ClientConfig(route_wait_s=20)
    )
    try:
        generator = torch.Generator().manual_seed(len(model_type))
        prompt, reply = torch.randint(3, 96, (1, 7), generator=generator), torch.randint(3, 96, (1, 5), generator=generator)
        expected = generate(reference, prompt, 16)
        assert torch.equal(generate(model, prompt, 16), expected)

        with model.inference_session(max_length=96) as session:
            turn1 = generate(model, prompt, 8)
            turn2 = generate(model, reply, 8)  # only the new tokens
            assert len(session.route) == 2
        expected1 = generate(reference, prompt, 8)
        assert torch.equal(turn1, expected1)
        assert torch.equal(turn2, generate(reference, torch.cat([expected1, reply], dim=1), 8))

        with model.inference_session(max_length=64) as session:
            streamer = KillFirstHop(session, nodes, after=6)
            actual = generate(model, prompt, 16, streamer=streamer)
            assert streamer.killed is not None and streamer.killed not in [peer for peer, _, _ in session.route]
        assert torch.equal(actual, expected)
    finally:
        model.close()
        for node in started:
            node.stop()
