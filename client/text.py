"""`SwarmClient`: text in, text out, through the swarm (tokenizer and sampling settings included).

A thin layer over `AutoDistributedModelForCausalLM`; it adds nothing to routing or sessions. Sampling is
`client.sampling`'s: each request draws from its own seeded generator, never torch's global one.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from client.model import AutoDistributedModelForCausalLM
from client.sampling import generation_kwargs
from swarm import models
from swarm.config import ClientConfig


class SwarmClient:
    def __init__(
        self,
        initial_peers: list[str],
        model: str = models.DEFAULT_MODEL,
        *,
        dht_prefix: str | None = None,
        client_config: ClientConfig | None = None,
    ):
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            model, initial_peers=initial_peers, dht_prefix=dht_prefix, client_config=client_config
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.model.name_or_path)

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """The completion of `prompt` (without the prompt). temperature 0 means greedy."""
        input_ids = self._encode(prompt)
        output = self.model.generate(input_ids, **generation_kwargs(max_new_tokens, temperature, top_p, seed))
        return self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the completion as they are generated."""
        input_ids = self._encode(prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = generation_kwargs(max_new_tokens, temperature, top_p, seed)
        failure: list[BaseException] = []
        abandoned = threading.Event()  # set when the caller stops iterating: generation stops too
        stop = StoppingCriteriaList([_StopWhenSet(abandoned)])

        def run() -> None:
            try:
                self.model.generate(input_ids, streamer=streamer, stopping_criteria=stop, **kwargs)
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            abandoned.set()
            worker.join()
        if failure:
            raise failure[0]

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        return self.tokenizer(prompt, return_tensors="pt").input_ids


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)
