"""Exactness through a live local swarm of the tiny random Llama: the swarm equals plain transformers."""

from __future__ import annotations

import re
import time

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from swarm.config import ClientConfig

pytestmark = pytest.mark.timeout(300)


def prompts(count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (count, length), generator=generator)


def test_full_forward_logits_match(model, reference):
    input_ids = prompts(2, 17)
    with torch.no_grad():
        expected = reference(input_ids).logits
    actual = model(input_ids).logits
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_generation_matches(model, reference, seed):
    input_ids = prompts(1, 5 + seed * 7, seed=seed)
    kwargs = dict(max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = reference.generate(input_ids, **kwargs)
    actual = model.generate(input_ids, **kwargs)
    assert torch.equal(actual, expected)


def test_batch_with_left_padding_matches(model, reference):
    input_ids = prompts(3, 9, seed=5)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    attention_mask[1, :2] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = reference.generate(input_ids, **kwargs)
    actual = model.generate(input_ids, **kwargs)
    assert torch.equal(actual, expected)


def test_sampling_with_seed_matches(model, reference):
    input_ids = prompts(1, 6, seed=7)
    kwargs = dict(max_new_tokens=32, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(123)
    expected = reference.generate(input_ids, **kwargs)
    torch.manual_seed(123)
    actual = model.generate(input_ids, **kwargs)
    assert torch.equal(actual, expected)


def test_multi_turn_session_continues_without_recomputing(model, reference):
    first, second = prompts(1, 6, seed=8), prompts(1, 4, seed=9)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with model.inference_session(max_length=128) as session:
        turn1 = model.generate(first, max_new_tokens=10, **kwargs)
        turn2 = model.generate(second, max_new_tokens=10, **kwargs)  # only the new user tokens
        assert session.position == turn2.shape[1] - 1  # the last sampled token is not processed yet
    expected1 = reference.generate(first, max_new_tokens=10, **kwargs)
    expected2 = reference.generate(torch.cat([expected1, second], dim=1), max_new_tokens=10, **kwargs)
    assert torch.equal(turn1, expected1)
    assert torch.equal(turn2, expected2)


def test_streamer_receives_every_token(model):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    streamer = Collect()
    input_ids = prompts(1, 5, seed=3)
    output = model.generate(input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer)
    assert streamer.tokens == [*output[0].tolist(), "end"]


def session_summary(node, session_id: str, timeout_s: float = 15.0) -> re.Match:
    """The line a peer logs when a session ends: steps run, and how many the previous hop pushed."""
    pattern = re.compile(rf"session {session_id[:8]} on blocks \d+:\d+ ended after (\d+) steps \((\d+) pushed")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = pattern.search(node.log_path.read_text(errors="replace"))
        if match:
            return match
        time.sleep(0.1)
    raise AssertionError(f"{node.name} logged no end of session {session_id[:8]}: {node.log_tail()}")


def test_peers_push_each_step_to_the_next_peer(reference, tiny_swarm, tiny_model_path):
    """Pushes on (push_steps="auto", the default, relays on loopback: round trips are too cheap here for
    pushes to pay): each step reaches the second peer from the first over one open push stream."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_model_path), initial_peers=tiny_swarm.initial_peers, client_config=ClientConfig(push_steps=True)
    )
    try:
        input_ids = prompts(1, 5, seed=11)
        kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        with model.inference_session(max_length=64) as session:
            actual = model.generate(input_ids, **kwargs)
        assert torch.equal(actual, reference.generate(input_ids, **kwargs))
        steps, pushed = map(int, session_summary(tiny_swarm.nodes[2], session.session_id).groups())  # the peer on 2:4
        assert steps == 16 and pushed > 0
    finally:
        model.close()


def test_relaying_through_the_client_alone_is_exact(tiny_swarm, tiny_model_path, reference):
    config = ClientConfig(push_steps=False)
    relayed = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_model_path), initial_peers=tiny_swarm.initial_peers, client_config=config
    )
    try:
        input_ids = prompts(1, 5, seed=12)
        kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        with relayed.inference_session(max_length=64) as session:
            actual = relayed.generate(input_ids, **kwargs)
        assert torch.equal(actual, reference.generate(input_ids, **kwargs))
        assert session_summary(tiny_swarm.nodes[2], session.session_id).groups() == ("16", "0")
    finally:
        relayed.close()
