"""Which proposed tokens a speculative round keeps, and how many to propose next: pure functions over
scores and counts, no I/O and no peers.

Each checked position gives one token, decided in order, and a round ends at the first position whose
token differs from the proposal there (`pick`):
- greedy: the most likely token after the logits processors, as plain greedy decoding picks it;
- sampling, proposals without probabilities (prompt lookup): a draw from the model's distribution with
  torch's global generator, exactly as transformers' sampling draws it (one draw per generated token, in
  order), so a seeded run gives plain sampling's tokens whatever was proposed;
- sampling, a draft model's proposals: the speculative-sampling rule (Leviathan et al. 2023, Chen et
  al. 2023): keep the draft's token c with probability min(1, p(c) / q(c)), else draw from the residual
  max(0, p - q), normalised; the tokens are distributed as the model's. Every random number comes from
  a generator seeded by the run's seed and the token's position (`Draws`), so a seeded run gives the
  same tokens whatever the proposal lengths were (they depend on measured times).

`ProposalLength` chooses k, the number of tokens to propose: the k that maximises expected tokens per
millisecond, from the measured acceptance rate (tokens kept per proposal, as a per-token probability)
and the measured cost of a round (a one-token step, which holds the round trip, plus the cost of each
extra token checked and drafted): long trips make long proposals pay; a rate so low that no proposal
pays makes it propose nothing, but for one token every few rounds (fewer after each probe that fails,
and no more than 2% of the time goes to probes), to notice when proposals improve. It proposes only
where that promises 3% more than plain decoding: the model leaves small costs out.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

PRIOR_ACCEPTED, PRIOR_REJECTED = 1.0, 1.0  # a new session assumes half its proposed tokens are kept
ACCEPTANCE_DECAY = 0.9  # each round's weight in the acceptance rate relative to the next one
PRIOR_TOKEN_SHARE = 0.03  # an extra token's cost in a step, as a share of a one-token step, until measured
PRIOR_WEIGHT = 4.0  # how strongly the measured cost per token leans on that prior (in tokens squared)
ROUNDS_TIMED = 32
PROBE_EVERY = 8  # when proposing does not pay, still propose one token every this many rounds,
MOST_ROUNDS_BETWEEN_PROBES = 64  # twice as many after each probe that failed, up to this,
PROBE_BUDGET = 0.02  # and never so often that probes cost more than this share of the time
MARGIN = 0.03  # proposing must promise this much more than plain decoding: costs the model leaves out
MOST_LIKELY_ACCEPTANCE = 0.99  # the rate is capped below 1: the expected gain stays finite


class Draws:
    """Random numbers for sampling with a draft model: an independent generator per (position, use)."""

    DRAFT, ACCEPT, SAMPLE = 0, 1, 2

    def __init__(self, seed: int):
        self.seed = seed

    def generator(self, position: int, use: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + position * 3 + use) % 2**63)

    def draft(self, distribution: torch.Tensor, position: int) -> int:
        """The draft's token at `position`, drawn from its distribution [vocab]."""
        return int(torch.multinomial(distribution, 1, generator=self.generator(position, self.DRAFT)))

    def uniform(self, position: int) -> float:
        return float(torch.rand(1, generator=self.generator(position, self.ACCEPT)))

    def sample(self, distribution: torch.Tensor, position: int) -> int:
        return int(torch.multinomial(distribution, 1, generator=self.generator(position, self.SAMPLE)))


def pick(
    scores: torch.Tensor, *, do_sample: bool, position: int, candidate: int | None = None,
    draft_probs: torch.Tensor | None = None, draws: Draws | None = None,
) -> int:
    """The token at `position` from the model's processed scores [1, vocab] (float32); `candidate`
    and `draft_probs` [vocab]: what was proposed there and, from a draft model, its distribution."""
    if not do_sample:
        return int(scores[0].argmax())
    probs = torch.softmax(scores, dim=-1)  # [1, vocab]
    if draws is None:
        return int(torch.multinomial(probs, num_samples=1)[0, 0])  # as transformers' sampling draws
    probs = probs[0]
    if candidate is None or draft_probs is None:
        return draws.sample(probs, position)
    if draws.uniform(position) * draft_probs[candidate] < probs[candidate]:  # u < p(c) / q(c); q(c) > 0: c was drawn from q
        return candidate
    residual = (probs - draft_probs).clamp(min=0)
    total = residual.sum()
    return draws.sample(residual / total if total > 0 else probs, position)


@dataclasses.dataclass
class ProposalLength:
    """Chooses how many tokens to propose, within [0, longest]."""

    longest: int
    accepted: float = PRIOR_ACCEPTED  # decayed counts of proposed tokens kept, and of rounds ended by a rejection
    rejected: float = PRIOR_REJECTED
    draft_ms_per_token: float = 0.0
    rounds: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=ROUNDS_TIMED))
    unpaid: int = 0  # rounds since proposing last paid, or since the last probe
    probe_every: int = PROBE_EVERY
    probing: bool = False  # the last choice was a probe

    @property
    def acceptance(self) -> float:
        """Estimated probability that a proposed token is kept, given the ones before it were."""
        return self.accepted / (self.accepted + self.rejected)

    def record(self, *, proposed: int, kept: int, step_tokens: int | None, step_ms: float, draft_ms_per_token: float = 0.0) -> None:
        """One round: `proposed` tokens checked, `kept` of them kept, in a step of `step_tokens` tokens
        that took `step_ms` (network, peers and the head; None: a step that also fed a prompt, whose
        time says nothing about a round's); a proposed token costs `draft_ms_per_token` to make."""
        if proposed:
            self.accepted = ACCEPTANCE_DECAY * self.accepted + kept
            self.rejected = ACCEPTANCE_DECAY * self.rejected + (kept < proposed)
            if self.probing:
                self.probe_every = PROBE_EVERY if kept else min(2 * self.probe_every, MOST_ROUNDS_BETWEEN_PROBES)
        self.draft_ms_per_token = draft_ms_per_token or self.draft_ms_per_token
        if step_tokens is not None:
            self.rounds.append((step_tokens, step_ms))

    def step_cost(self) -> tuple[float, float]:
        """(ms of a one-token step, ms per extra token): a line through the rounds' (tokens, ms), its
        slope pulled toward PRIOR_TOKEN_SHARE of the mean where the rounds' sizes barely vary."""
        if not self.rounds:
            return 1.0, PRIOR_TOKEN_SHARE
        mean_tokens = sum(tokens for tokens, _ in self.rounds) / len(self.rounds)
        mean_ms = sum(ms for _, ms in self.rounds) / len(self.rounds)
        spread = sum((tokens - mean_tokens) ** 2 for tokens, _ in self.rounds)
        covariance = sum((tokens - mean_tokens) * (ms - mean_ms) for tokens, ms in self.rounds)
        prior = PRIOR_TOKEN_SHARE * mean_ms / (1 + PRIOR_TOKEN_SHARE * (mean_tokens - 1))
        per_token = min(max((covariance + PRIOR_WEIGHT * prior) / (spread + PRIOR_WEIGHT), 0.0), mean_ms)
        return max(mean_ms - per_token * (mean_tokens - 1), 1e-3), per_token

    def choose(self) -> int:
        one_token_ms, per_token_ms = self.step_cost()
        alpha = min(self.acceptance, MOST_LIKELY_ACCEPTANCE)
        best, best_rate = 0, (1 + MARGIN) / one_token_ms
        for count in range(1, self.longest + 1):
            expected = (1 - alpha ** (count + 1)) / (1 - alpha)  # tokens a round yields: kept ones and the model's own
            rate = expected / (one_token_ms + count * (per_token_ms + self.draft_ms_per_token))
            if rate > best_rate:
                best, best_rate = count, rate
        self.probing = False
        if best == 0 and self.longest:
            # a probe costs a checked token and a drafted one, and a draft's catch-up on the text: about two more
            probe_share = (per_token_ms + 3 * self.draft_ms_per_token) / one_token_ms
            self.unpaid += 1
            self.probing = self.unpaid >= max(self.probe_every, probe_share / PROBE_BUDGET)
            self.unpaid = 0 if self.probing else self.unpaid
            return int(self.probing)
        self.unpaid = 0
        return best
