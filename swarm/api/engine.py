"""The HTTP API's generation engine: one swarm connection, the tokenizer, and text generation for
every request, streamed as text pieces.

Requests run through `client.generator.BatchedGenerator`s: concurrent requests share a batched
session, so every peer runs one forward and receives one message per step for all of them. There
are `lanes` generators per adapter, each with its own session, and a request joins the least busy:
while one lane's step runs on one peer, another lane's step can run on the next one (a single
session keeps only one peer busy at a time). With `max_batch` 1, or a generation config that needs logits processors the batched loop
lacks, each request runs its own transformers `generate()` in a thread, with its own session. So
does a request that asks for speculative decoding (or gets the server's default): the batched loop
keeps plain decoding. This module does not speak HTTP (`swarm.api` does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import AsyncIterator

import torch
from transformers import AsyncTextIteratorStreamer, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from client import AutoDistributedModelForCausalLM
from client.generator import BatchedGenerator, GenerationRequest, supports
from client.sampling import SeededSampler, generation_kwargs
from swarm.api.config import SpeculationConfig
from swarm.api.schema import ChatMessage
from swarm.config import DEFAULT_MAX_LENGTH, ClientConfig
from swarm.errors import ConfigError
from swarm.lora import AdapterId

MAX_CONCURRENT_GENERATIONS = 64  # unbatched requests, each in a thread of its own


class Engine:
    def __init__(
        self, model_name: str, initial_peers: list[str], config: ClientConfig, *, max_batch: int = 16, lanes: int = 2,
        max_length: int | None = None, speculation: SpeculationConfig | None = None,
    ):
        self.name = model_name
        self.model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=initial_peers, client_config=config)
        self.speculation = speculation or SpeculationConfig()
        self.draft = None if self.speculation.draft_model is None else load_draft(self.speculation.draft_model, self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model.name_or_path)
        self.executor = concurrent.futures.ThreadPoolExecutor(MAX_CONCURRENT_GENERATIONS, thread_name_prefix="generate")
        self.max_batch, self.lanes = max_batch, lanes
        self.max_length = max_length or min(getattr(self.model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH), DEFAULT_MAX_LENGTH)
        self.batched = max_batch > 1 and supports(self.model.generation_config)
        self._generators: dict[AdapterId | None, list[BatchedGenerator]] = {}  # by adapter: its lanes
        self._lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos]) - {None}

    def encode(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def encode_chat(self, messages: list[ChatMessage]) -> torch.Tensor:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"model {self.name} has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(
            [message.model_dump() for message in messages], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        return ids

    def speculation_for(self, kind: str | None, tokens: int | None) -> SpeculationConfig:
        """A request's speculative decoding: what it asks for, else the server's; ConfigError for a draft
        this server does not have."""
        chosen = self.speculation.model_copy(update={
            "speculation": kind or self.speculation.speculation,
            "speculative_tokens": tokens or self.speculation.speculative_tokens,
        })
        if chosen.speculation == "draft" and self.draft is None:
            raise ConfigError("this server has no draft model (start it with --draft-model): use speculation 'prompt_lookup' or 'none'")
        return chosen

    async def generate(
        self, input_ids: torch.Tensor, *, max_tokens: int, temperature: float, top_p: float, seed: int | None,
        stops: list[str], adapter: str | None, speculation: SpeculationConfig | None = None,
    ) -> AsyncIterator[tuple[str, str | None, int]]:
        """Yield (text piece, finish reason or None, tokens generated so far); the last item has the
        finish reason ("stop": end of sequence or a stop string; "length": max_tokens). `adapter` is the name
        of an adapter the peers serve, never a path: an HTTP caller must not make this server read its disk.
        `speculation` (see `speculation_for`; default: the server's): anything but none runs alone."""
        adapter_id = None if adapter is None else AdapterId(adapter)
        speculation = speculation or self.speculation_for(None, None)
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if speculation.speculation == "none":
            start = self._start_batched if self.batched else self._start_alone
            output, stop, generated = start(input_ids, streamer, max_tokens, temperature, top_p, seed, adapter_id)
        else:
            output, stop, generated = self._start_alone(
                input_ids, streamer, max_tokens, temperature, top_p, seed, adapter_id, self._speculative_kwargs(speculation)
            )
        text, sent, reason = "", 0, None
        hold = max((len(stop_text) for stop_text in stops), default=1) - 1  # a piece that may begin a stop string waits
        try:
            async for piece in streamer:
                text += piece
                cut = min((text.find(stop_text) for stop_text in stops if stop_text in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    stop()
                    break
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold], None, generated[0]
                    sent = len(text) - hold
            tokens = await output
        finally:
            stop()
        if reason is None:
            ended = bool(tokens) and tokens[-1] in self.eos_token_ids
            reason = "stop" if len(tokens) < max_tokens or ended else "length"
        yield text[sent:], reason, len(tokens)

    def _start_batched(self, input_ids, streamer, max_tokens, temperature, top_p, seed, adapter):
        """Submit to the batched generator: (awaitable generated tokens, stop(), [tokens so far])."""
        generated = [0]

        def on_token(token: int) -> None:
            generated[0] += 1
            streamer.put(torch.tensor([token]))

        sampler = SeededSampler(temperature, top_p, seed) if temperature > 0 else None
        request = GenerationRequest(input_ids[0].tolist(), max_tokens, self.eos_token_ids, sampler, on_token)
        streamer.put(input_ids)  # the prompt, which the streamer skips
        future = self._generator(adapter).submit(request)
        future.add_done_callback(lambda _: streamer.end())  # always end the stream
        return asyncio.wrap_future(future), request.cancelled.set, generated

    def _speculative_kwargs(self, speculation: SpeculationConfig) -> dict:
        if speculation.speculation == "draft":
            return dict(assistant_model=self.draft, num_assistant_tokens=speculation.speculative_tokens)
        return dict(prompt_lookup_num_tokens=speculation.speculative_tokens)

    def _start_alone(self, input_ids, streamer, max_tokens, temperature, top_p, seed, adapter, speculative=None):
        """Run transformers generate() in a thread of its own: (awaitable generated tokens, stop(), [tokens so far]).
        `speculative`: generate() arguments for speculative decoding."""
        loop = asyncio.get_running_loop()
        stopped = threading.Event()
        generated = [0]

        class Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                generated[0] = ids.shape[1] - input_ids.shape[1]
                return torch.full((ids.shape[0],), stopped.is_set(), dtype=torch.bool)

        kwargs = generation_kwargs(max_tokens, temperature, top_p, seed)
        extra = ({} if adapter is None else {"adapter": adapter}) | (speculative or {})

        def run() -> list[int]:
            try:
                output = self.model.generate(input_ids, streamer=streamer, stopping_criteria=StoppingCriteriaList([Stop()]), **kwargs, **extra)
                return output[0, input_ids.shape[1] :].tolist()
            finally:
                loop.call_soon_threadsafe(streamer.text_queue.put_nowait, streamer.stop_signal)  # always end the stream

        return loop.run_in_executor(self.executor, run), stopped.set, generated

    def _generator(self, adapter: AdapterId | None) -> BatchedGenerator:
        """The least busy lane for `adapter` (lanes start on first use)."""
        with self._lock:
            if adapter not in self._generators:
                self._generators[adapter] = [
                    BatchedGenerator(self.model, max_batch=self.max_batch, max_length=self.max_length, adapter=adapter)
                    for _ in range(self.lanes)
                ]
            return min(self._generators[adapter], key=lambda generator: generator.load)

    def batching_stats(self) -> dict[str, int]:
        """Batched steps run so far and the sequences they carried (rows), over every lane."""
        generators = [generator for lanes in self._generators.values() for generator in lanes]
        return {"steps": sum(generator.steps for generator in generators), "rows": sum(generator.rows for generator in generators)}

    def close(self) -> None:
        for generator in (generator for lanes in self._generators.values() for generator in lanes):
            generator.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.model.close()


def load_draft(name: str, model) -> torch.nn.Module:
    """The server's draft model, on the CPU in float32 like the client's own parts; ConfigError if it
    cannot propose tokens for `model` (another vocabulary)."""
    from transformers import AutoModelForCausalLM

    from swarm import models

    draft = AutoModelForCausalLM.from_pretrained(models.resolve_model(name).path, dtype=torch.float32).eval()
    if draft.config.get_text_config().vocab_size != model.config.vocab_size:
        raise ConfigError(f"draft model {name} has another vocabulary than {model.name_or_path}: it must share the tokenizer")
    return draft
