"""Speculative decoding through a live local swarm of the tiny Llama: prompt lookup and a draft model,
through transformers' own generate() arguments, give plain decoding's tokens (greedy, and seeded
sampling with prompt lookup), reproducible seeded sampling with a draft, in multi-turn sessions and
with a streamer; peers take back what a round proposed and the model rejected."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM
from swarm.loop_thread import run_coroutine
from swarm.tools.local import LocalSwarm
from tests.conftest import PEER_ENV
from tests.families import make_tiny_model

pytestmark = pytest.mark.timeout(300)

GREEDY = dict(max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)


def repetitive_prompt(seed: int, vocab: int = 128) -> torch.Tensor:
    """A prompt that repeats itself: prompt lookup finds proposals, some kept, some not."""
    base = torch.randint(3, vocab, (1, 7), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base, base[:, :4]], dim=1)


def random_prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def draft(tiny_model_path):
    """The model's own weights as a local draft: every proposal is right."""
    return sure(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval())


def sure(draft):
    """A draft that proposes however unsure it is (the random tiny model's distributions are flat:
    transformers' default threshold, 0.4, would stop it at once)."""
    draft.generation_config.assistant_confidence_threshold = 0.0
    return draft


@pytest.mark.parametrize("prompt", [repetitive_prompt(0), repetitive_prompt(1), random_prompt(2)], ids=["repeats-0", "repeats-1", "random"])
def test_prompt_lookup_gives_plain_greedy_tokens(model, reference, prompt):
    expected = reference.generate(prompt, **GREEDY)
    assert torch.equal(model.generate(prompt, **GREEDY), expected)
    actual = model.generate(prompt, prompt_lookup_num_tokens=8, **GREEDY)
    assert torch.equal(actual, expected)
    stats = model.speculation_stats
    assert stats.tokens == 48 and stats.rounds <= 48


def test_a_draft_that_is_always_right_takes_few_trips(model, reference, draft):
    prompt = random_prompt(3)
    expected = reference.generate(prompt, **GREEDY)
    actual = model.generate(prompt, assistant_model=draft, **GREEDY)
    assert torch.equal(actual, expected)
    stats = model.speculation_stats
    assert stats.accepted == stats.proposed > 0 and stats.rounds < 48 / 3


def test_a_draft_that_is_always_wrong_changes_nothing(model, reference, tiny_model_path):
    wrong = sure(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval())
    with torch.no_grad():
        wrong.lm_head.weight.zero_()  # every logit equal: it always proposes token 0
    prompt = repetitive_prompt(4)
    expected = reference.generate(prompt, **GREEDY)
    assert 0 not in expected[0, prompt.shape[1] :].tolist()
    actual = model.generate(prompt, assistant_model=wrong, **GREEDY)
    assert torch.equal(actual, expected)
    assert model.speculation_stats.proposed and model.speculation_stats.accepted == 0


def test_sampling_with_prompt_lookup_gives_transformers_tokens(model, reference):
    prompt = repetitive_prompt(5)
    kwargs = dict(max_new_tokens=32, do_sample=True, temperature=0.8, top_k=20, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(42)
    expected = reference.generate(prompt, **kwargs)
    torch.manual_seed(42)
    assert torch.equal(model.generate(prompt, prompt_lookup_num_tokens=6, **kwargs), expected)


def test_sampling_with_a_draft_is_reproducible(model, tiny_model_path):
    other = make_tiny_model("llama", tiny_model_path.parent / "other-draft", seed=3)  # a different model, vocabulary 96
    prompt = repetitive_prompt(6, vocab=96)
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=1.0, eos_token_id=None, pad_token_id=0)
    draft = AutoModelForCausalLM.from_pretrained(other).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(prompt, assistant_model=draft, **kwargs)
    draft = sure(AutoModelForCausalLM.from_pretrained(model.config._name_or_path).eval())
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        runs.append(model.generate(prompt, assistant_model=draft, **kwargs))
    assert torch.equal(runs[0], runs[1])


class Collect(BaseStreamer):
    def __init__(self):
        self.pieces: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.pieces.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_multi_turn_session_with_a_streamer(model, reference):
    first, second = repetitive_prompt(7), repetitive_prompt(8)[:, :5]
    expected_first = reference.generate(first, **GREEDY)
    expected = reference.generate(torch.cat([expected_first, second], dim=1), **GREEDY)
    streamer = Collect()
    with model.inference_session(max_length=256) as session:
        answer = model.generate(first, prompt_lookup_num_tokens=8, streamer=streamer, **GREEDY)
        assert torch.equal(answer, expected_first)
        actual = model.generate(second, prompt_lookup_num_tokens=8, **GREEDY)  # only what is new
        assert session.position == actual.shape[1] - 1  # the peers hold every token but the newest, no rejected one
        run_coroutine(session.reopen())  # a fresh route, the history replayed: the session goes on
        more = model.generate(actual[:, -3:], **{**GREEDY, "max_new_tokens": 8})
    assert torch.equal(actual, expected)
    assert streamer.pieces[0] == first[0].tolist() and streamer.ended
    assert sum(streamer.pieces[1:], []) == expected_first[0, first.shape[1] :].tolist()
    assert torch.equal(more, reference.generate(torch.cat([actual, actual[:, -3:]], dim=1), **{**GREEDY, "max_new_tokens": 8}))


def test_batches_are_refused_with_a_clear_message(model):
    with pytest.raises(ValueError, match="one sequence at a time"):
        model.generate(torch.cat([random_prompt(1), random_prompt(2)]), prompt_lookup_num_tokens=4, **GREEDY)


@pytest.fixture(scope="module")
def sliding_swarm(tmp_path_factory):
    """Two peers of a tiny Gemma 3 whose sliding-window layers (window 4) alternate with full ones."""
    path = make_tiny_model("gemma3_text", tmp_path_factory.mktemp("models") / "tiny-gemma3")
    with LocalSwarm(tmp_path_factory.mktemp("sliding-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:2", "2:4"):
            swarm.start_peer(blocks, model=str(path))
        yield swarm, path


def test_speculation_past_a_sliding_window(sliding_swarm):
    swarm, path = sliding_swarm
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    try:
        prompt = repetitive_prompt(9, vocab=96)
        kwargs = {**GREEDY, "max_new_tokens": 32}
        expected = reference.generate(prompt, **kwargs)
        actual = model.generate(prompt, prompt_lookup_num_tokens=6, **kwargs)
        assert torch.equal(actual, expected)
        stats = model.speculation_stats
        assert stats.fallback is None and stats.proposed > stats.accepted  # peers took back rejected tokens past the window
    finally:
        model.close()
