"""A peer dies mid-generation: the session re-routes its blocks and replays its inputs, exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM
from swarm.local import LocalSwarm

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)


class KillAfter(BaseStreamer):
    """Kills the peer serving `block` in the session's route once `tokens` tokens were generated."""

    def __init__(self, swarm: LocalSwarm, session, block: int, tokens: int):
        self.swarm, self.session, self.block, self.tokens = swarm, session, block, tokens
        self.seen = 0
        self.killed: str | None = None

    def put(self, value):
        self.seen += value.numel()
        if self.killed is None and self.seen >= self.tokens:
            peer_id = next(peer for peer, start, end in self.session.route if start <= self.block < end)
            node = next(node for node in self.swarm.nodes if node.maddrs and node.maddrs[0].endswith(peer_id))
            node.kill()
            self.killed = peer_id

    def end(self):
        pass


@pytest.mark.parametrize("kill_after_tokens", [1, 9, 20])
def test_generation_survives_a_killed_peer(tiny_model_path, tmp_path, kill_after_tokens):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(kill_after_tokens))
    kwargs = dict(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = reference.generate(input_ids, **kwargs)
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:2", "2:4", "2:4"):
            swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--announce-period", "1"], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        try:
            with model.inference_session(max_length=64) as session:
                killer = KillAfter(swarm, session, block=2, tokens=input_ids.shape[1] + kill_after_tokens)
                actual = model.generate(input_ids, streamer=killer, **kwargs)
                route = session.route
        finally:
            model.close()
    assert killer.killed is not None and killer.killed not in [peer for peer, _, _ in route]
    assert torch.equal(actual, expected)
