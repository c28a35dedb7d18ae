"""Speculative decoding through the swarm: several tokens per trip through the chain of peers.

`model.generate(..., prompt_lookup_num_tokens=k)` or `(..., assistant_model=draft)` runs
`SpeculativeDecoding` as transformers' `custom_generate` decoding loop (generate() prepares the
generation config, logits processors and stopping criteria as for any other mode). Each round:
1. a proposer (`client.proposals`) proposes up to k tokens, k chosen by `client.acceptance.ProposalLength`
   from the measured acceptance rate and round time;
2. the pending token and the proposals go through the peers in one step;
3. positions are checked in order (`client.acceptance.pick`): the round keeps the proposals the model
   agrees with and adds the model's own token at the first disagreement (or after the last proposal);
4. the session is rewound to what was kept: each peer drops the rest of its KV cache at the next step,
   all layers or none.

Peers keep the last step's tokens in their sliding-window layers until the next step, so any family
can take back what a round proposed. A peer that refuses anyway (CacheRollbackError: one that keeps
no more than its window) gets a session opened anew, its history replayed, and the session goes on
with plain decoding. One sequence at a time, as transformers' assisted generation.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from transformers.generation import GenerateDecoderOnlyOutput

from client.acceptance import Draws, ProposalLength, pick
from client.proposals import DraftModel, PromptLookup, Proposal
from swarm import errors
from swarm.loop_thread import run_coroutine

logger = logging.getLogger(__name__)

DEFAULT_DRAFT_TOKENS = 20  # transformers' default num_assistant_tokens
DEFAULT_CONFIDENCE = 0.4  # transformers' default assistant_confidence_threshold


@dataclasses.dataclass
class SpeculationStats:
    """What one speculative generate() call did (`model.speculation_stats`)."""

    rounds: int = 0  # steps through the peers, the first (prompt and proposals) included
    tokens: int = 0  # tokens generated
    proposed: int = 0  # proposed tokens the peers checked
    accepted: int = 0  # of them, kept
    fallback: str | None = None  # why the session went on with plain decoding, if it did

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0


class SpeculativeDecoding:
    """A transformers `custom_generate` callable: the decoding loop of one generate() call."""

    def __init__(self, proposer: PromptLookup | DraftModel, longest: int, streamer=None, *, adaptive: bool = True):
        """`longest`: the longest proposal; `adaptive=False`: always propose `longest` tokens (for tests)."""
        if longest < 1:
            raise errors.ConfigError("speculative decoding needs at least 1 proposed token per round")
        self.proposer, self.longest, self.streamer, self.adaptive = proposer, longest, streamer, adaptive
        self.stats = SpeculationStats()

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        if input_ids.shape[0] != 1:
            raise errors.ConfigError(
                f"speculative decoding works on one sequence at a time, as transformers' assisted generation "
                f"(got a batch of {input_ids.shape[0]}); generate the batch without prompt_lookup_num_tokens/assistant_model"
            )
        cache = model_kwargs["past_key_values"]  # client.model.RemoteCache
        text = _Text(input_ids, model_kwargs.get("attention_mask"), logits_processor, stopping_criteria, self.streamer, generation_config)
        draws = Draws(int(torch.randint(0, 2**62, (1,)))) if generation_config.do_sample and isinstance(self.proposer, DraftModel) else None
        length = ProposalLength(self.longest)
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())
        try:
            self._rounds(model, cache, text, length, draws, generation_config)
        finally:
            if self.streamer is not None:
                self.streamer.end()
        self.stats.tokens = text.ids.shape[1] - input_ids.shape[1]
        return text.output(cache)

    def _rounds(self, model, cache, text: "_Text", length: ProposalLength, draws: Draws | None, generation_config) -> None:
        do_sample = bool(generation_config.do_sample)
        while not text.done:
            cached = cache.get_seq_length()
            count = 0 if cache.session.plain_only else length.choose() if self.adaptive else self.longest
            # the text may not pass max_length, nor a step the session's length: plain decoding would not
            room = min(generation_config.max_length - 1, cache.session.max_length) - text.ids.shape[1]
            count = max(min(count, room), 0)
            proposal = self._propose(text.ids, count, text.processors, draws)
            sent = proposal.tokens[:count]
            chunk = torch.cat([text.ids[:, cached:], torch.tensor([sent], dtype=text.ids.dtype)], dim=1)  # [1, pending + k]
            started = time.perf_counter()
            try:
                logits = model(
                    input_ids=chunk, past_key_values=cache, logits_to_keep=len(sent) + 1, **text.mask_and_positions(cached, chunk.shape[1]),
                ).logits[0].float()  # [k + 1, vocab]
            except errors.CacheRollbackError as exc:
                self._fall_back(cache.session, exc)
                continue
            kept = text.check(logits, sent, proposal, do_sample, draws)
            cache.crop(text.ids.shape[1] - 1 - cache.get_seq_length())  # keep all but the newest token (peers: at the next step)
            step_ms = 1000 * (time.perf_counter() - started)
            length.record(
                proposed=len(sent), kept=kept, step_tokens=chunk.shape[1] if chunk.shape[1] == len(sent) + 1 else None,
                step_ms=step_ms, draft_ms_per_token=proposal.ms_per_token,
            )
            self._count(len(sent), kept)
            logger.debug("speculative round: %d proposed, %d kept, %.1f ms", len(sent), kept, step_ms)

    def _propose(self, input_ids, count: int, processors, draws: Draws | None) -> Proposal:
        if count < 1 and draws is None:
            return Proposal([], None)
        return self.proposer.propose(input_ids, count, processors=processors, draws=draws)

    def _count(self, proposed: int, kept: int) -> None:
        self.stats.rounds += 1
        self.stats.proposed += proposed
        self.stats.accepted += kept

    def _fall_back(self, session, exc: errors.CacheRollbackError) -> None:
        """A peer could not roll back: open the session anew, replay what it holds, decode plainly."""
        logger.warning("a peer cannot roll its cache back (%s): this session goes on without speculation", exc)
        self.stats.fallback = str(exc)
        session.plain_only = True
        run_coroutine(session.reopen())


class _Text:
    """The sequence a speculative generate() call grows: its tokens, mask, scores and whether it is done."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, processors, stopping, streamer, generation_config):
        self.ids, self.mask = ids, mask  # [1, length]; the mask: None without padding
        self.processors, self.stopping, self.streamer = processors, stopping, streamer
        self.config = generation_config
        self.scores: list[torch.Tensor] | None = [] if generation_config.return_dict_in_generate and generation_config.output_scores else None
        self.logits: list[torch.Tensor] | None = [] if generation_config.return_dict_in_generate and generation_config.output_logits else None
        self.done = False

    def check(self, logits: torch.Tensor, sent: list[int], proposal: Proposal, do_sample: bool, draws: Draws | None) -> int:
        """Add a token per position of `logits` [k + 1, vocab] until one differs from what was sent
        there, or the text is done; how many sent tokens were kept."""
        for index in range(len(sent) + 1):
            raw = logits[index : index + 1]  # [1, vocab]
            scores = self.processors(self.ids, raw)
            token = pick(
                scores, do_sample=do_sample, position=self.ids.shape[1],
                candidate=proposal.tokens[index] if index < len(proposal.tokens) else None,
                draft_probs=proposal.probs[index] if proposal.probs is not None and index < len(proposal.probs) else None,
                draws=draws,
            )
            self._append(token, scores, raw)
            if index == len(sent) or token != sent[index]:
                return index
            if self.done:
                return index + 1
        return len(sent)

    def _append(self, token: int, scores: torch.Tensor, raw: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, self.ids.new_tensor([[token]])], dim=1)
        self.mask = None if self.mask is None else torch.cat([self.mask, self.mask.new_ones(1, 1)], dim=1)
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(raw.clone())  # not a view: it would keep the round's logits alive
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        self.done = bool(self.stopping(self.ids, scores).all())

    def mask_and_positions(self, start: int, count: int) -> dict:
        """forward() arguments for tokens [start, start + count): none without padding (the session
        counts positions); else the mask so far and positions counted over it, as transformers counts them."""
        if self.mask is None:
            return {}
        mask = torch.cat([self.mask, self.mask.new_ones(1, max(start + count - self.mask.shape[1], 0))], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {"attention_mask": mask[:, : start + count], "position_ids": positions[:, start : start + count]}

    def output(self, cache):
        if not self.config.return_dict_in_generate:
            return self.ids
        return GenerateDecoderOnlyOutput(
            sequences=self.ids, scores=None if self.scores is None else tuple(self.scores),
            logits=None if self.logits is None else tuple(self.logits), past_key_values=cache,
        )


def requested(model, kwargs: dict) -> SpeculativeDecoding | None:
    """The speculative loop for a generate() call whose arguments ask for one (they are taken out of
    `kwargs`), or None."""
    assistant = kwargs.pop("assistant_model", None)
    config = kwargs.get("generation_config") or model.generation_config
    lookup = kwargs.pop("prompt_lookup_num_tokens", None) or getattr(config, "prompt_lookup_num_tokens", None)
    if assistant is None and not lookup:
        return None
    if (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) > 1:
        raise errors.ConfigError("speculative decoding does not combine with beam search")
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if assistant is not None:
        draft_config = assistant.generation_config
        longest = int(kwargs.get("num_assistant_tokens") or getattr(draft_config, "num_assistant_tokens", None) or DEFAULT_DRAFT_TOKENS)
        confidence = getattr(draft_config, "assistant_confidence_threshold", None)
        confidence = DEFAULT_CONFIDENCE if confidence is None else confidence
        proposer: PromptLookup | DraftModel = DraftModel(assistant, confidence=confidence, vocab_size=model.config.vocab_size)
    else:
        longest = int(lookup)
        proposer = PromptLookup(kwargs.pop("max_matching_ngram_size", None) or getattr(config, "max_matching_ngram_size", None), eos)
    kwargs["prompt_lookup_num_tokens"] = None  # generate() runs this loop, not its own assisted decoding
    return SpeculativeDecoding(proposer, longest, streamer=kwargs.pop("streamer", None))
