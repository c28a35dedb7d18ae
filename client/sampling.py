"""Sampling that several threads can run at once, each request with its own seed.

transformers' `do_sample=True` draws from torch's global generator, which concurrent requests share:
with a seed per request their draws would interleave. `SeededSampler` is a logits processor that
applies temperature and top-p (transformers' own warpers) and draws the next token from its own
`torch.Generator`; everything but that token gets -inf, so greedy decoding picks it.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


class SeededSampler(LogitsProcessor):
    def __init__(self, temperature: float, top_p: float = 1.0, seed: int | None = None):
        if not temperature > 0:
            raise ValueError("SeededSampler needs temperature > 0 (0 is greedy: use no sampler)")
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator)  # [batch, 1]
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter(1, chosen, 0.0)


def generation_kwargs(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict:
    """generate() arguments for one request: greedy at temperature 0, else seeded sampling."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need temperature >= 0 and 0 < top_p <= 1")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if temperature > 0:
        kwargs["logits_processor"] = LogitsProcessorList([SeededSampler(temperature, top_p, seed)])
    return kwargs
