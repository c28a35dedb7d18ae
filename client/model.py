"""The distributed causal LM: embeddings, final norm and head run locally, every block runs on peers.

`AutoDistributedModelForCausalLM.from_pretrained(name, initial_peers=...)` returns a transformers
`PreTrainedModel` + `GenerationMixin`, so `model(input_ids)` and `model.generate(...)` work as with
plain transformers. The KV cache lives on the peers; `RemoteCache` stands in for it inside generate().
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Iterator

import torch
from transformers import Cache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from client import speculative
from client.lora import RemoteLoRA
from client.sequence import RemoteSequence
from client.session import InferenceSession
from swarm import errors, models
from swarm.blocks import BlockInputs
from swarm.config import ClientConfig
from swarm.loop_thread import run_coroutine
from swarm.lora import AdapterId, LoraWeights, adapter_ref


DEFAULT_SESSION_LENGTH = 2048


class RemoteCache(Cache):
    """generate()'s view of the peers' KV cache: only its length, which is the session's position."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (a number <= 0, as DynamicCache.crop takes); the peers
        drop them from their cache at the session's next step."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, not {tokens_to_remove}")
        self.session.rewind(self.session.position + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise errors.SessionError("beam search is not supported through the swarm; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.session.position:
            raise errors.SessionError("cannot expand the batch of a session that already holds tokens")


class RemoteBlocks(torch.autograd.Function):
    """All blocks on the peers as one autograd node: forward keeps the inputs of every hop, backward
    sends the output gradient back through the same spans (peers recompute; nothing stays on them)."""

    @staticmethod
    def forward(ctx, hidden_states, position_ids, attention_mask, prompts, lora_settings, lora_names, sequence, *lora_tensors):
        lora = None
        if lora_names:
            lora = LoraWeights.from_tensors(lora_settings.scaling, {name: tensor.detach() for name, tensor in zip(lora_names, lora_tensors)})
            lora = dataclasses.replace(lora, dropout=lora_settings.dropout, seed=lora_settings.seed)
        inputs = BlockInputs(hidden_states.detach(), position_ids, attention_mask, None if prompts is None else prompts.detach(), lora)
        outputs, pieces = run_coroutine(sequence.train_forward(inputs))
        ctx.sequence, ctx.pieces, ctx.lora_names = sequence, pieces, lora_names
        return outputs.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        grad, grad_prompts, grad_lora = run_coroutine(
            ctx.sequence.train_backward(ctx.pieces, grad_outputs.contiguous())
        )
        return (grad.to(grad_outputs.dtype), None, None, grad_prompts, None, None, None,
                *(grad_lora[name] for name in ctx.lora_names))


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config, parts: models.ClientParts, sequence: RemoteSequence):
        super().__init__(config)
        self.embed_tokens = parts.embed_tokens
        self.norm = parts.norm
        self.lm_head = parts.lm_head
        self.architecture = parts.architecture  # what the model's forward does outside those modules
        self.sequence = sequence
        self._active_session: InferenceSession | None = None
        self.adapter: AdapterId | None = None  # a LoRA adapter served by peers, used unless a call says otherwise
        self.speculation_stats: speculative.SpeculationStats | None = None  # of the last speculative generate()
        # peers refuse sessions longer than their --max-length (default 8192) and reserve cache for the
        # whole length, so an open-ended session asks for a moderate default, not the model's maximum
        self._default_max_length = min(getattr(config, "max_position_embeddings", DEFAULT_SESSION_LENGTH), DEFAULT_SESSION_LENGTH)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the hidden states entering block 0 [batch, seq, hidden]."""
        return self.architecture.embed(self.embed_tokens(input_ids))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states leaving the last block -> logits [batch, seq, vocab], in the client's dtype."""
        return self.architecture.logits(self.lm_head(self.norm(hidden_states.to(self.dtype))))

    # ---- sessions ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference_session(
        self, max_length: int | None = None, batch_size: int = 1, adapter=...
    ) -> Iterator[InferenceSession]:
        """Keep one session open across generate() calls: later calls continue the same conversation.
        `adapter`: a LoRA adapter served by peers (default: the model's `adapter`; None: no adapter)."""
        if self._active_session is not None:
            raise errors.SessionError("an inference session is already active on this model")
        session = InferenceSession(
            self.sequence, max_length=max_length or self._default_max_length, batch_size=batch_size,
            adapter=self.adapter if adapter is ... else adapter,
        )
        self._active_session = session
        try:
            yield session
        finally:
            self._active_session = None
            session.close()

    @torch.no_grad()
    def generate(
        self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None,
        adapter=..., **kwargs,
    ):
        """transformers generate() through the swarm. Inside `inference_session()`, the prompt may hold
        the whole conversation so far or only what is new; the output holds the whole conversation.
        `adapter`: a LoRA adapter served by peers, for this call (default: the model's `adapter`)."""
        session = session or self._active_session
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if session is not None and adapter is not ... and not _same_adapter(adapter_ref(adapter), session.adapter):
            raise errors.SessionError(f"this inference session uses adapter {session.adapter}, not {adapter}")
        speculation = speculative.requested(self, kwargs)
        if speculation is not None:
            kwargs["custom_generate"] = speculation
            self.speculation_stats = speculation.stats
        if session is None:
            total = _total_length(inputs, kwargs, self.generation_config)
            session = InferenceSession(  # batch size: set at the first step
                self.sequence, max_length=total, adapter=self.adapter if adapter is ... else adapter
            )
            try:
                return super().generate(inputs, past_key_values=RemoteCache(session), **kwargs)
            finally:
                session.close()
        inputs, kwargs = _continue_conversation(session, inputs, kwargs)
        outputs = super().generate(inputs, past_key_values=RemoteCache(session), **kwargs)
        session.history_ids = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        session.history_mask = _extend_mask(kwargs.get("attention_mask"), session.history_ids)
        return outputs

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        deep_prompts: torch.Tensor | None = None,
        lora: "RemoteLoRA | None" = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """transformers' forward. `deep_prompts` [num_blocks, batch or 1, prefix, hidden]: deep prompt
        tuning, added to the first `prefix` hidden states entering each block; `lora`: LoRA weights the
        peers apply to their blocks (both: stateless forward only, not in an inference session)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        inputs_embeds = self.architecture.embed(inputs_embeds)  # as the model's own forward, given embeddings or not
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.int64)
        if isinstance(past_key_values, RemoteCache):
            if deep_prompts is not None or lora is not None:
                raise errors.SessionError("deep prompts and LoRA work in a stateless forward, not in an inference session")
            hidden_states = self._session_step(past_key_values.session, inputs_embeds, position_ids, attention_mask)
        else:
            if position_ids is None:
                position_ids = torch.arange(inputs_embeds.shape[1]).unsqueeze(0)
            lora_weights = lora.weights() if lora is not None else None
            trainable = inputs_embeds.requires_grad or (deep_prompts is not None and deep_prompts.requires_grad) or (
                lora is not None and any(parameter.requires_grad for parameter in lora.parameters())
            )
            if torch.is_grad_enabled() and trainable:  # training: backward runs through the peers
                if self.adapter is not None:
                    raise errors.ConfigError("training on top of a served adapter is not supported; pass lora= instead")
                named = lora_weights.tensors() if lora_weights is not None else {}
                hidden_states = RemoteBlocks.apply(
                    inputs_embeds, position_ids, attention_mask, deep_prompts,
                    lora_weights, list(named), self.sequence, *named.values(),  # its scaling, dropout and seed
                )
            else:
                inputs = BlockInputs(inputs_embeds, position_ids, attention_mask, deep_prompts, lora_weights)
                hidden_states = run_coroutine(self.sequence.forward(inputs, adapter=self.adapter))
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.logits(hidden_states[:, keep].to(inputs_embeds.dtype))  # [batch, seq, vocab]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def _session_step(self, session: InferenceSession, inputs_embeds, position_ids, attention_mask) -> torch.Tensor:
        position = session.position
        if position_ids is None:
            position_ids = torch.arange(position, position + inputs_embeds.shape[1]).unsqueeze(0)
        if not session.streams:
            session.batch_size = inputs_embeds.shape[0]
            run_coroutine(session.open())
        inputs = BlockInputs(inputs_embeds, position_ids, attention_mask)
        return run_coroutine(session.step(inputs, position))

    def close(self) -> None:
        self.sequence.close()


class AutoDistributedModelForCausalLM:
    """Entry point, like transformers' Auto classes."""

    @staticmethod
    def from_pretrained(
        name_or_path: str = models.DEFAULT_MODEL,
        *,
        initial_peers: list[str],
        dht_prefix: str | None = None,
        client_config: ClientConfig | None = None,
        torch_dtype: torch.dtype = torch.float32,
        adapter: str | Path | None = None,
    ) -> DistributedModelForCausalLM:
        """`adapter`: a LoRA adapter peers serve (`--adapters`), by the path of the folder it was saved
        to (then only peers serving that very adapter, same name and digest, are used) or by its name
        (the folder's name); generate() and forward use it unless told otherwise."""
        source = models.resolve_model(name_or_path)
        config = models.load_config(source)
        parts = models.load_client_parts(source, config, dtype=torch_dtype, device="cpu")
        config = copy.deepcopy(config)  # the model's own (its architecture's) stays as it is
        config._name_or_path = str(source.path)
        config._experts_implementation = None  # this model holds no experts: transformers would refuse to choose a kernel for them
        client_config = client_config or ClientConfig()
        network_config = client_config.network.model_copy(update={"initial_peers": list(initial_peers)})
        client_config = client_config.model_copy(update={"network": network_config})
        sequence = RemoteSequence(
            client_config, dht_prefix=dht_prefix or client_config.dht_prefix or source.dht_prefix,
            num_blocks=config.num_hidden_layers,
        )
        model = DistributedModelForCausalLM(config, parts, sequence)
        model.adapter = adapter_ref(adapter)
        if (source.path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(source.path)
        return model.eval()


def _same_adapter(asked: AdapterId | None, used: AdapterId | None) -> bool:
    return asked is used or (asked is not None and used is not None and asked.matches(used))


def _total_length(inputs, kwargs, generation_config) -> int:
    prompt = 0 if inputs is None else inputs.shape[-1]
    if kwargs.get("max_new_tokens") is not None:
        return prompt + kwargs["max_new_tokens"]
    if kwargs.get("max_length") is not None:
        return kwargs["max_length"]
    if kwargs.get("generation_config") is not None and kwargs["generation_config"].max_new_tokens:
        return prompt + kwargs["generation_config"].max_new_tokens
    if generation_config.max_new_tokens:
        return prompt + generation_config.max_new_tokens
    return max(generation_config.max_length or 0, prompt + 1)


def _continue_conversation(session: InferenceSession, inputs, kwargs):
    """Prepend what the session already holds unless the caller passed the whole conversation."""
    history = getattr(session, "history_ids", None)
    if history is None or inputs is None:
        return inputs, kwargs
    if inputs.shape[1] >= history.shape[1] and torch.equal(inputs[:, : history.shape[1]], history):
        return inputs, kwargs
    mask = kwargs.get("attention_mask")
    full_inputs = torch.cat([history, inputs], dim=1)
    if mask is not None or session.history_mask is not None:
        past_mask = session.history_mask if session.history_mask is not None else torch.ones_like(history)
        new_mask = mask if mask is not None else torch.ones_like(inputs)
        kwargs = {**kwargs, "attention_mask": torch.cat([past_mask, new_mask], dim=1)}
    return full_inputs, kwargs


def _extend_mask(mask, sequences):
    if mask is None:
        return None
    extra = sequences.shape[1] - mask.shape[1]
    return torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
