"""Speculative decoding as units, without peers: the acceptance rules, the choice of proposal length,
and the decoding loop run over plain transformers models (a local cache stands in for the session),
compared with transformers' own greedy and sampling."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from client.acceptance import PROBE_EVERY, Draws, ProposalLength, pick
from client.proposals import DraftModel, PromptLookup
from client.speculative import SpeculativeDecoding
from swarm import errors
from swarm.architecture import Architecture
from tests.families import tiny_config

pytestmark = pytest.mark.timeout(120)
VOCAB = 64


class LocalCache(DynamicCache):
    """A transformers cache with the one thing the loop asks of a session besides its length and crop()."""

    def __init__(self, config):
        super().__init__(config=config)
        self.activate_past_recording()  # as peers' caches: sliding-window layers can take back the last step
        self.session = types.SimpleNamespace(plain_only=False, max_length=10**6)


def tiny(seed: int, config=None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = config or LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3 if parameter.dim() == 1 else 0.2)  # wide weights: peaked distributions
    model.architecture = Architecture.of(model.config)
    return model


@pytest.fixture(scope="module")
def target():
    return tiny(0)


def speculate(model, input_ids, proposer, longest=8, adaptive=False, **kwargs):
    loop = SpeculativeDecoding(proposer, longest, adaptive=adaptive)
    output = model.generate(input_ids, custom_generate=loop, past_key_values=LocalCache(model.config), **kwargs)
    return output, loop.stats


def repetitive_prompt(seed: int) -> torch.Tensor:
    base = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base, base[:, :3]], dim=1)


GREEDY = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)


# ---- acceptance rules -------------------------------------------------------------------------------
def test_greedy_pick_is_the_argmax():
    scores = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    assert pick(scores, do_sample=False, position=5, candidate=3) == 1


def test_lookup_sampling_draws_as_transformers_does():
    scores = torch.randn(1, VOCAB)
    torch.manual_seed(7)
    expected = [int(torch.multinomial(torch.softmax(scores, -1), 1)) for _ in range(20)]
    torch.manual_seed(7)
    assert [pick(scores, do_sample=True, position=0, candidate=5) for _ in range(20)] == expected


@pytest.mark.parametrize("draft_is", ["different", "same", "narrower"])
def test_speculative_sampling_rule_yields_the_model_distribution(draft_is):
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = {"different": torch.tensor([0.1, 0.1, 0.2, 0.3, 0.2, 0.1]), "same": p.clone(),
         "narrower": torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])}[draft_is]
    counts = torch.zeros(6)
    runs = 20_000
    for seed in range(runs):
        draws = Draws(seed)
        candidate = draws.draft(q, 3)
        counts[pick(p.log().unsqueeze(0), do_sample=True, position=3, candidate=candidate, draft_probs=q, draws=draws)] += 1
    assert (counts / runs - p).abs().max() < 0.012, counts / runs  # 3.5 standard deviations at p = 0.5


def test_draws_depend_only_on_seed_and_position():
    distribution = torch.full((VOCAB,), 1.0 / VOCAB)
    assert Draws(3).draft(distribution, 10) == Draws(3).draft(distribution, 10)
    assert len({Draws(3).draft(distribution, position) for position in range(40)}) > 10
    assert Draws(3).uniform(10) == Draws(3).uniform(10) != Draws(3).uniform(11)


# ---- proposal length ------------------------------------------------------------------------------
def lengths(trip_ms: float, acceptance: float, rounds: int = 30, longest: int = 32) -> ProposalLength:
    """A controller fed rounds of a step costing `trip_ms` plus 1 ms per token, kept at `acceptance`."""
    length = ProposalLength(longest)
    for index in range(rounds):
        proposed = 2 + index % 7  # varied sizes: the cost per token is measured, not assumed
        kept = min(proposed, round(acceptance * proposed))
        length.record(proposed=proposed, kept=kept, step_tokens=proposed + 1, step_ms=trip_ms + proposed + 1)
    return length


def test_longer_trips_make_longer_proposals():
    short, long = lengths(5.0, 0.8).choose(), lengths(200.0, 0.8).choose()
    assert 1 <= short < long <= 32


def test_better_acceptance_makes_longer_proposals():
    assert lengths(40.0, 0.3).choose() < lengths(40.0, 0.9).choose()


def test_proposals_that_never_pay_stop_but_for_probes():
    length = lengths(10.0, 0.0, rounds=60)
    probes = []
    for index in range(7 * PROBE_EVERY):
        if length.choose():
            probes.append(index)
            length.record(proposed=1, kept=0, step_tokens=2, step_ms=12.0)  # each probe fails: they grow rarer
    assert [later - earlier for earlier, later in zip(probes, probes[1:])] == [2 * PROBE_EVERY, 4 * PROBE_EVERY]
    length.choose()
    while not length.choose():
        pass
    length.record(proposed=1, kept=1, step_tokens=2, step_ms=12.0)  # a probe that pays: back to probing often
    assert length.probe_every == PROBE_EVERY


def test_proposal_length_stays_within_bounds():
    assert lengths(10_000.0, 1.0, longest=5).choose() == 5
    assert ProposalLength(0).choose() == 0
    assert 1 <= ProposalLength(10).choose() <= 10  # before any measurement: a few tokens


def test_a_round_that_fed_a_prompt_does_not_count_as_a_round_cost():
    fed, plain = lengths(20.0, 0.8), lengths(20.0, 0.8)
    fed.record(proposed=4, kept=4, step_tokens=None, step_ms=5000.0)  # a 300-token prompt and 4 proposals
    plain.record(proposed=4, kept=4, step_tokens=5, step_ms=25.0)
    assert fed.step_cost() == lengths(20.0, 0.8).step_cost() and fed.acceptance == plain.acceptance


def test_a_dear_draft_probes_rarely():
    length = lengths(100.0, 0.0, rounds=60)
    length.record(proposed=0, kept=0, step_tokens=1, step_ms=101.0, draft_ms_per_token=30.0)  # a probe: about a round
    chosen = [length.choose() for _ in range(100)]
    assert chosen.count(1) == 2  # every 46 rounds: probes cost 2% of the time


def test_draft_time_shortens_proposals():
    cheap, dear = lengths(20.0, 0.8), lengths(20.0, 0.8)
    dear.record(proposed=0, kept=0, step_tokens=1, step_ms=21.0, draft_ms_per_token=10.0)
    assert dear.choose() < cheap.choose()


# ---- the loop over plain transformers ---------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_lookup_greedy_equals_transformers(target, seed):
    input_ids = repetitive_prompt(seed) if seed < 2 else torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
    expected = target.generate(input_ids, **GREEDY)
    for adaptive in (False, True):
        actual, stats = speculate(target, input_ids, PromptLookup(None, []), adaptive=adaptive, **GREEDY)
        assert torch.equal(actual, expected)
        assert stats.tokens == 40 and stats.rounds <= 40


def test_draft_that_is_always_right_or_always_wrong(target):
    input_ids = repetitive_prompt(3)
    expected = target.generate(input_ids, **GREEDY)
    same = tiny(0)  # the target's own weights: every proposal is kept
    actual, stats = speculate(target, input_ids, DraftModel(same, confidence=None, vocab_size=VOCAB), **GREEDY)
    assert torch.equal(actual, expected)
    assert stats.proposed and stats.accepted == stats.proposed and stats.rounds < 10
    wrong = tiny(0)
    with torch.no_grad():
        wrong.lm_head.weight.zero_()  # every logit equal: always proposes token 0, which the target never picks here
    assert 0 not in expected[0, input_ids.shape[1] :].tolist()
    actual, stats = speculate(target, input_ids, DraftModel(wrong, confidence=None, vocab_size=VOCAB), **GREEDY)
    assert torch.equal(actual, expected)
    assert stats.proposed and stats.accepted == 0


def test_stopping_criteria_cut_inside_a_round(target):
    input_ids = repetitive_prompt(4)
    expected = target.generate(input_ids, **{**GREEDY, "max_new_tokens": 13})
    same = tiny(0)
    actual, stats = speculate(target, input_ids, DraftModel(same, confidence=None, vocab_size=VOCAB), **{**GREEDY, "max_new_tokens": 13})
    assert torch.equal(actual, expected)
    eos = int(expected[0, -5])  # a token the greedy run emits: generation must end right after it
    kwargs = {**GREEDY, "eos_token_id": eos}
    expected = target.generate(input_ids, **kwargs)
    actual, _ = speculate(target, input_ids, DraftModel(same, confidence=None, vocab_size=VOCAB), **kwargs)
    assert torch.equal(actual, expected) and int(actual[0, -1]) == eos


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_speculation_goes_on_past_a_sliding_window(family):
    config = tiny_config(family)
    config.sliding_window, config.vocab_size = 6, VOCAB
    model = tiny(5, config)
    input_ids = repetitive_prompt(5)
    expected = model.generate(input_ids, **GREEDY)
    actual, stats = speculate(model, input_ids, PromptLookup(None, []), **GREEDY)
    assert torch.equal(actual, expected)
    assert stats.proposed > stats.accepted > 0  # rounds kept some proposals and took others back, past the window


def test_sampling_with_prompt_lookup_equals_transformers_sampling(target):
    input_ids = repetitive_prompt(6)
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=0.7, top_k=10, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(11)
    expected = target.generate(input_ids, **kwargs)
    torch.manual_seed(11)
    actual, _ = speculate(target, input_ids, PromptLookup(None, []), **kwargs)
    assert torch.equal(actual, expected)


def test_draft_sampling_is_reproducible_whatever_the_proposal_lengths(target):
    input_ids = repetitive_prompt(7)
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=1.0, eos_token_id=None, pad_token_id=0)
    runs = []
    for longest, adaptive in ((1, False), (3, False), (8, False), (8, True), (8, True)):
        torch.manual_seed(5)
        draft = DraftModel(tiny(1), confidence=None, vocab_size=VOCAB)
        runs.append(speculate(target, input_ids, draft, longest=longest, adaptive=adaptive, **kwargs)[0])
    assert all(torch.equal(run, runs[0]) for run in runs)


def test_draft_sampling_has_the_model_distribution(target):
    """Two tokens after a prompt, over many seeded runs with a draft that disagrees often: their joint
    frequencies match the target's own distribution (chi-square, 15 degrees of freedom)."""
    input_ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(9))
    kwargs = dict(max_new_tokens=2, do_sample=True, top_k=4, temperature=1.0, eos_token_id=None, pad_token_id=0)
    draft = DraftModel(tiny(2), confidence=None, vocab_size=VOCAB)
    counts: dict[tuple[int, int], int] = {}
    runs = 600
    for seed in range(runs):
        torch.manual_seed(seed)
        output, _ = speculate(target, input_ids, draft, longest=2, **kwargs)
        pair = tuple(output[0, -2:].tolist())
        counts[pair] = counts.get(pair, 0) + 1
    expected = {}
    with torch.no_grad():
        first = top_k_probs(target(input_ids).logits[0, -1])
        for token, probability in first.items():
            second = top_k_probs(target(torch.cat([input_ids, torch.tensor([[token]])], 1)).logits[0, -1])
            expected.update({(token, other): probability * share for other, share in second.items()})
    assert set(counts) <= set(expected)
    chi_square = sum((counts.get(pair, 0) - runs * p) ** 2 / (runs * p) for pair, p in expected.items())
    assert chi_square < 37.7, (chi_square, counts)  # the 0.1% critical value at 15 degrees of freedom


def top_k_probs(logits: torch.Tensor, k: int = 4) -> dict[int, float]:
    values, indices = logits.float().topk(k)
    return dict(zip(indices.tolist(), torch.softmax(values, -1).tolist()))


class RefusingCache(LocalCache):
    """A cache whose 'peers' refuse the first rollback, as a peer that keeps no more than its window would."""

    def __init__(self, config):
        super().__init__(config)
        self.rewound = self.refused = False

        async def reopen():  # the session opens anew and replays: here the cache already holds what was kept
            self.reopened = True

        self.session.reopen = reopen

    def crop(self, tokens_to_remove: int) -> None:
        self.rewound = self.rewound or tokens_to_remove < 0
        super().crop(tokens_to_remove)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.rewound and not self.refused and layer_idx == 0:
            self.refused = True
            raise errors.CacheRollbackError("cannot roll block 0 back: its sliding window of 4 tokens has seen 9")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def test_a_refused_rollback_falls_back_to_plain_decoding(target):
    input_ids = repetitive_prompt(8)
    expected = target.generate(input_ids, **GREEDY)
    cache = RefusingCache(target.config)
    loop = SpeculativeDecoding(PromptLookup(None, []), 8, adaptive=False)
    actual = target.generate(input_ids, custom_generate=loop, past_key_values=cache, **GREEDY)
    assert torch.equal(actual, expected)
    assert cache.refused and cache.reopened and cache.session.plain_only
    assert "sliding window" in loop.stats.fallback
    proposed = loop.stats.proposed
    assert loop.stats.rounds > 40 - proposed  # one token per round after the fallback


def test_a_padded_prompt_and_a_dict_output(target):
    input_ids = repetitive_prompt(10)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding: the loop passes the mask and positions counted over it
    kwargs = dict(GREEDY, attention_mask=mask, return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected = target.generate(input_ids, **kwargs)
    actual, stats = speculate(target, input_ids, PromptLookup(None, []), **kwargs)
    assert torch.equal(actual.sequences, expected.sequences) and stats.accepted > 0
    assert len(actual.scores) == len(expected.scores) == 40
    assert all(torch.allclose(mine, theirs, atol=1e-4) for mine, theirs in zip(actual.logits, expected.logits))


class ShortSession(LocalCache):
    """A session of `max_length` tokens, which refuses a step that would pass it, as peers do."""

    def __init__(self, config, max_length: int):
        super().__init__(config)
        self.session.max_length = max_length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0 and self.get_seq_length() + key_states.shape[-2] > self.session.max_length:
            raise errors.SessionLengthError(f"{self.get_seq_length() + key_states.shape[-2]} tokens exceed {self.session.max_length}")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def test_proposals_stay_within_the_session_length(target):
    input_ids = repetitive_prompt(11)
    plain = target.generate(input_ids, **GREEDY)
    eos = int(plain[0, input_ids.shape[1] + 4])  # plain decoding stops at its 5th token, inside a session of 8 more
    kwargs = dict(GREEDY, eos_token_id=eos)
    expected = target.generate(input_ids, **kwargs)
    loop = SpeculativeDecoding(DraftModel(tiny(0), confidence=None, vocab_size=VOCAB), 8, adaptive=False)
    actual = target.generate(input_ids, custom_generate=loop, past_key_values=ShortSession(target.config, input_ids.shape[1] + 8), **kwargs)
    assert torch.equal(actual, expected) and loop.stats.proposed
