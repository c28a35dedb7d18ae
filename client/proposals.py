"""Who proposes the tokens a speculative step checks: n-grams of the text so far, or a small local model.

`PromptLookup` takes transformers' own prompt-lookup search (the continuation of the first earlier
occurrence of the last n-gram, the longest n-gram first); `DraftModel` runs a small causal LM that shares the tokenizer, with its
own KV cache kept across rounds (cropped to what the peers accepted). Both return at most `count`
tokens and say what one more proposed token costs. They do not decide how many tokens to propose
(`client.acceptance.ProposalLength`) or which ones to keep (`client.acceptance`), and never talk to peers.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation import PromptLookupCandidateGenerator

from client.acceptance import Draws
from swarm.blocks import rollback_refusal
from swarm.errors import ConfigError

DEFAULT_NGRAM_SIZE = 2  # transformers' default max_matching_ngram_size
STEADY_FEED = 3  # a draft that feeds at most this many tokens before proposing is in step with the text


@dataclasses.dataclass
class Proposal:
    tokens: list[int]  # proposed continuation, in order
    probs: torch.Tensor | None  # [len(tokens) + extra, vocab]: the draft's distribution at each position (sampling only)
    ms_per_token: float = 0.0  # what proposing one more token costs, as measured so far


class PromptLookup:
    """Proposals copied from the text so far: after the first earlier occurrence of the last n-gram."""

    def __init__(self, max_ngram_size: int | None, eos_token_ids: list[int]):
        eos = torch.tensor(eos_token_ids) if eos_token_ids else None
        # no logits processors here: a stateful one (a seeded sampler) must see each position once, when checked
        self.search = PromptLookupCandidateGenerator(
            eos_token_id=eos, num_output_tokens=1, max_matching_ngram_size=max_ngram_size or DEFAULT_NGRAM_SIZE,
            max_length=2**62,
        )

    def propose(self, input_ids: torch.Tensor, count: int, **_) -> Proposal:  # input_ids [1, length]
        if count < 1:
            return Proposal([], None)
        self.search.num_output_tokens = count
        candidates, _ = self.search.get_candidates(input_ids)
        return Proposal(candidates[0, input_ids.shape[1] :].tolist(), None)  # a search of the text: its cost is negligible


class DraftModel:
    """Proposals from a small local model. Greedy: its most likely tokens, as long as it is at least
    `confidence` sure (transformers' assistant_confidence_threshold). Sampling: each token drawn from
    its distribution (after the same logits processors) with the position's own random draw, one token
    more than asked, so that every position, the last included, is decided by the same rule."""

    def __init__(self, model: PreTrainedModel, *, confidence: float | None, vocab_size: int):
        draft_vocab = model.config.get_text_config().vocab_size
        if draft_vocab != vocab_size:
            raise ConfigError(
                f"the assistant model's vocabulary ({draft_vocab} tokens) differs from the model's ({vocab_size}): "
                "speculative decoding through the swarm needs a draft that shares the tokenizer"
            )
        self.model = model.eval()
        # only the last position's logits: a draft catching up on a prompt would otherwise pay its head on every token
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.confidence = confidence or 0.0
        self.cache = self._new_cache()
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.token_ms = 0.0  # what a proposed token costs, as measured over rounds

    @torch.no_grad()
    def propose(
        self, input_ids: torch.Tensor, count: int, *, processors: Callable | None = None, draws: Draws | None = None,
    ) -> Proposal:
        """Up to `count` tokens after `input_ids` [1, length] (count + 1 with `draws`: sampling)."""
        tokens = input_ids[0].tolist()
        wanted = count + 1 if draws is not None else count  # sampling: even at count 0, the next position is the draft's
        proposed, probs = [], []
        if wanted > 0:
            started = time.perf_counter()
            feed = self._reuse(tokens)
            caught_up = len(feed) <= STEADY_FEED  # a round like the others, not a prompt or a pause to catch up on
            sequence, first_done = input_ids, started
            for _ in range(wanted):
                logits = self.model(
                    input_ids=torch.tensor([feed], device=self.model.device), past_key_values=self.cache, use_cache=True, **self.last_only,
                ).logits[:, -1].float().cpu()  # [1, vocab]: decided on the CPU, where the model's own logits are
                self.cached += feed
                scores = processors(sequence, logits) if processors is not None and draws is not None else logits
                distribution = torch.softmax(scores, dim=-1)[0]  # [vocab]
                if distribution.max() < self.confidence:
                    break
                position = sequence.shape[1]
                token = draws.draft(distribution, position) if draws is not None else int(distribution.argmax())
                proposed.append(token)
                probs.append(distribution)
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
                feed = [token]
                first_done = time.perf_counter() if len(proposed) == 1 else first_done
            ended = time.perf_counter()
            if caught_up and proposed:
                self._time(1000 * (ended - started) / len(proposed))
            elif len(proposed) > 1:  # leave out the first token's forward, which caught up on the text
                self._time(1000 * (ended - first_done) / (len(proposed) - 1))
        return Proposal(proposed, torch.stack(probs) if probs and draws is not None else None, self.token_ms)

    def _time(self, per_token_ms: float) -> None:
        """What a proposed token costs, measured over whole rounds of drafting (overheads included)."""
        self.token_ms = per_token_ms if not self.token_ms else 0.7 * self.token_ms + 0.3 * per_token_ms

    def _new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        cache.activate_past_recording()  # sliding-window layers can take back the last round's tokens
        return cache

    def _reuse(self, tokens: list[int]) -> list[int]:
        """Crop the cache to its longest prefix shared with `tokens` (keeping at least one token to
        feed); the tokens to feed next."""
        shared = 0
        for cached, token in zip(self.cached, tokens[:-1]):
            if cached != token:
                break
            shared += 1
        if self.cached:  # cropping by 0 too: sliding-window layers go back to holding their window
            layers = getattr(self.cache, "layers", [])
            if any(rollback_refusal(layer, layer.get_seq_length() - shared) for layer in layers if layer.get_seq_length() > shared):
                self.cache, shared = self._new_cache(), 0  # a sliding window went past: start over
            else:
                self.cache.crop(shared - len(self.cached))
        self.cached = self.cached[:shared]
        return tokens[shared:]
