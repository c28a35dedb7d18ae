"""A contiguous slice of a model's decoder layers, run the way the model itself runs them.

`BlockStack` computes rotary position embeddings and attention masks exactly as the model's own
`XxxModel.forward` does (public transformers APIs only), for a stateless forward or one step of a
session with its own `DynamicCache`. It does not validate inputs (peers do) and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm import errors, kernels, quantization
from swarm import lora as lora_weights
from swarm.architecture import Architecture


@dataclass
class BlockInputs:
    hidden_states: torch.Tensor  # [batch, seq, hidden]
    position_ids: torch.Tensor | None = None  # [batch or 1, seq]
    attention_mask: torch.Tensor | None = None  # [batch, past + seq], 1 = attend, 0 = padding
    # deep prompt tuning: added to the first `prefix` hidden states entering each block of the span
    prompts: torch.Tensor | None = None  # [blocks, batch or 1, prefix, hidden]
    lora: "lora_weights.LoraWeights | None" = None  # LoRA of the span's blocks (see swarm.lora)

    def without_defaults(self, past_length: int) -> "BlockInputs":
        """These inputs without the position ids and mask that `BlockStack` assumes when they are
        missing (positions past_length, past_length + 1, ... in every row; a mask of ones over
        past + new tokens): the same outputs, bit for bit, from fewer tensors to send and check."""
        seq_length = self.hidden_states.shape[1]
        position_ids, mask = self.position_ids, self.attention_mask
        if position_ids is not None and position_ids.shape[-1] == seq_length and bool(
            (position_ids == default_position_ids(past_length, seq_length)).all()
        ):
            position_ids = None
        if mask is not None and mask.shape[-1] == past_length + seq_length and bool(mask.all()):
            mask = None
        if position_ids is self.position_ids and mask is self.attention_mask:
            return self
        return replace(self, position_ids=position_ids, attention_mask=mask)


def default_position_ids(past_length: int, seq_length: int) -> torch.Tensor:
    """The positions of new tokens when a step gives none: right after the cache, in every row [1, seq]."""
    return torch.arange(past_length, past_length + seq_length).unsqueeze(0)


class BlockStack(torch.nn.Module):
    """Blocks [start_block, start_block + len(layers)) of one model, on one device and dtype."""

    def __init__(self, config: PretrainedConfig, layers: list[torch.nn.Module], start_block: int, rotary: torch.nn.Module):
        super().__init__()
        self.config = config
        self.layers = torch.nn.ModuleList(layers)
        self.rotary = rotary
        self.start_block = start_block
        self.end_block = start_block + len(layers)
        self.architecture = Architecture.of(config)
        self.attention_types = self.architecture.kinds[self.start_block : self.end_block]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype hidden states are computed in: that of the blocks' floating-point parameters (a
        quantized layer's weight is stored as integers)."""
        return next(parameter.dtype for parameter in self.layers.parameters() if parameter.dtype.is_floating_point)

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    def new_cache(self) -> DynamicCache:
        """A session's cache. Its sliding-window layers keep a step's tokens beyond the window until the
        next step crops them (`rollback`): a client can take back any of the last step's tokens."""
        cache = DynamicCache(config=self.config)
        cache.activate_past_recording()
        return cache

    def cache_length(self, cache: DynamicCache, start_block: int) -> int:
        # layers keep their global index: entries below start_block stay empty
        return cache.get_seq_length(start_block)

    def rollback(self, cache: DynamicCache, span: tuple[int, int], position: int) -> None:
        """Forget cached tokens from `position` on, so the session can continue from there: in every
        layer of `span` or, where one layer cannot go back that far, in none.

        Raises CacheRollbackError, the cache unchanged, where a sliding-window layer no longer holds
        the tokens to go back to."""
        excess = {index: cache.get_seq_length(index) - position for index in range(*span)}
        excess = {index: count for index, count in excess.items() if count > 0}  # layers outside the span were never filled
        for index, count in excess.items():
            refusal = rollback_refusal(_layer(cache, index), count)
            if refusal is not None:
                raise errors.CacheRollbackError(f"cannot roll block {index} back to position {position}: {refusal}")
        for index in range(*span):
            layer = _layer(cache, index)
            if index in excess or (getattr(layer, "record_past", False) and layer.get_seq_length() >= layer.get_max_length()):
                layer.crop(-excess.get(index, 0))  # a sliding-window layer also goes back to holding its window

    @torch.inference_mode()
    def forward(
        self, inputs: BlockInputs, cache: DynamicCache | None = None, span: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Run blocks `span` (default: all); with `cache`, the inputs continue the cached sequence."""
        return self._run(inputs, cache, span)

    def can_batch(self, span: tuple[int, int]) -> bool:
        """Whether `step_batch` batches these blocks: full attention only (a sliding-window layer keeps
        a cache of its own length, which the left padding would not line up with)."""
        kinds = self.attention_types[span[0] - self.start_block : span[1] - self.start_block]
        return all(kind == "full_attention" for kind in kinds)

    def can_pack(self, span: tuple[int, int]) -> bool:
        """Whether `step_packed` runs these blocks: as `can_batch`, with an attention kernel that takes
        its boolean block mask (sdpa; eager kernels, e.g. Gemma 2's, add the mask to the scores)."""
        return self.can_batch(span) and getattr(self.config, "_attn_implementation", None) == "sdpa"

    @torch.inference_mode()
    def step_batch(self, steps: list[tuple[BlockInputs, DynamicCache]], span: tuple[int, int]) -> list[torch.Tensor]:
        """Decode steps (one new token per row) of several sessions, each continuing its own cache, as
        one batched forward; returns each session's outputs and appends to each cache what its own
        step would have. The caches are left-padded to the longest into a temporary batch cache (the
        padding masked out, each row at its own position), and each session's new keys and values
        are copied back from it. Every step has the same LoRA weights (callers group steps by adapter)."""
        start, end = span
        if len(steps) == 1 or not self.can_batch(span):
            return [self._run(inputs, cache, span) for inputs, cache in steps]
        lengths = [self.cache_length(cache, start) for _, cache in steps]
        longest = max(lengths)
        rows = [inputs.hidden_states.shape[0] for inputs, _ in steps]
        batch_cache = self.new_cache()
        for index in range(start, end):
            keys, values = [], []
            for (_, cache), length in zip(steps, lengths):
                layer = _layer(cache, index)
                pad = (0, 0, longest - length, 0)  # left, along the sequence
                keys.append(torch.nn.functional.pad(layer.keys, pad))
                values.append(torch.nn.functional.pad(layer.values, pad))
            batch_cache.update(torch.cat(keys), torch.cat(values), index)
        masks, positions = [], []
        for (inputs, _), length, count in zip(steps, lengths, rows):
            mask = inputs.attention_mask
            if mask is None:
                mask = torch.ones(count, length + 1, dtype=torch.long)
            masks.append(torch.nn.functional.pad(mask.to(torch.long), (longest - length, 0)))
            position = inputs.position_ids if inputs.position_ids is not None else torch.tensor([[length]])
            positions.append(position.expand(count, 1))
        hidden_states = torch.cat([inputs.hidden_states.to(self.device, self.dtype) for inputs, _ in steps])
        with kernels.batched_rows():
            inputs = BlockInputs(hidden_states, torch.cat(positions), torch.cat(masks), lora=steps[0][0].lora)
            outputs = self._run(inputs, batch_cache, span)
        results, first = [], 0
        for (_, cache), count in zip(steps, rows):
            for index in range(start, end):
                layer = _layer(batch_cache, index)
                cache.update(layer.keys[first : first + count, :, -1:], layer.values[first : first + count, :, -1:], index)
            results.append(outputs[first : first + count])
            first += count
        return results

    @torch.inference_mode()
    def step_packed(self, steps: list[tuple[BlockInputs, DynamicCache]], span: tuple[int, int]) -> list[torch.Tensor]:
        """Steps of several sequences (batch 1 each, any number of new tokens, no mask or positions given),
        each continuing its own cache, as one forward over all their tokens side by side along the
        sequence: a block mask lets every token attend to its own sequence's cached and earlier tokens
        only. Returns each sequence's outputs [1, tokens, hidden] and appends to each cache what its own
        step would have. The attention over every sequence's cache costs tokens x cached tokens of all
        of them: callers pack short contexts only. Full attention and sdpa only (`can_pack`)."""
        start, end = span
        lengths = [self.cache_length(cache, start) for _, cache in steps]
        counts = [inputs.hidden_states.shape[1] for inputs, _ in steps]
        cached, total = sum(lengths), sum(counts)
        packed = self.new_cache()
        if cached:
            for index in range(start, end):
                filled = [_layer(cache, index) for (_, cache), length in zip(steps, lengths) if length]
                packed.update(torch.cat([layer.keys for layer in filled], dim=2), torch.cat([layer.values for layer in filled], dim=2), index)
        mask = torch.zeros(total, cached + total, dtype=torch.bool)  # [query tokens, cached + new tokens]
        first_cached = first_new = 0
        for length, count in zip(lengths, counts):
            rows = slice(first_new, first_new + count)
            mask[rows, first_cached : first_cached + length] = True
            mask[rows, cached + first_new : cached + first_new + count] = torch.ones(count, count, dtype=torch.bool).tril()
            first_cached, first_new = first_cached + length, first_new + count
        position_ids = torch.cat([torch.arange(length, length + count) for length, count in zip(lengths, counts)]).unsqueeze(0)
        hidden_states = torch.cat([inputs.hidden_states.to(self.device, self.dtype) for inputs, _ in steps], dim=1)  # [1, total, hidden]
        position_ids, mask = position_ids.to(self.device), mask[None, None].to(self.device)
        layers = self.layers[start - self.start_block : end - self.start_block]
        kinds = self.attention_types[start - self.start_block : end - self.start_block]
        position_embeddings = self.architecture.position_embeddings(self.rotary, hidden_states, position_ids, kinds)
        with lora_weights.applied(layers, steps[0][0].lora, first_block=start), kernels.batched_rows():
            for layer, kind in zip(layers, kinds):
                hidden_states = layer(
                    hidden_states, attention_mask=mask, position_ids=position_ids, past_key_values=packed, use_cache=True,
                    position_embeddings=position_embeddings[kind],
                )
        results, first = [], 0
        for (_, cache), count in zip(steps, counts):
            for index in range(start, end):
                layer = _layer(packed, index)
                new = slice(cached + first, cached + first + count)  # this sequence's tokens in the packed cache
                cache.update(layer.keys[:, :, new], layer.values[:, :, new], index)
            results.append(hidden_states[:, first : first + count])
            first += count
        return results

    def backward(
        self, inputs: BlockInputs, grad_outputs: torch.Tensor, span: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The gradients of the hidden states entering blocks `span`, of the deep prompts (None without
        them) and of the LoRA weights (by wire name; empty without them), given the gradient of the
        hidden states leaving: the forward runs again with autograd on (nothing is kept between calls),
        the blocks frozen."""

        def leaf(tensor: torch.Tensor) -> torch.Tensor:
            # clone(): an inference-mode tensor (a stack's own output) cannot take part in autograd
            return tensor.to(self.device, self.dtype).clone().requires_grad_(True)

        quantization.unpack_for_autograd(self.layers)
        with torch.enable_grad():
            hidden_states = leaf(inputs.hidden_states)
            prompts = leaf(inputs.prompts) if inputs.prompts is not None else None
            lora = None
            if inputs.lora is not None:
                lora = replace(
                    inputs.lora, a={k: leaf(v) for k, v in inputs.lora.a.items()}, b={k: leaf(v) for k, v in inputs.lora.b.items()}
                )
            outputs = self._run(BlockInputs(hidden_states, inputs.position_ids, inputs.attention_mask, prompts, lora), None, span)
            wrt = {"grad_inputs": hidden_states}
            if prompts is not None:
                wrt["grad_prompts"] = prompts
            if lora is not None:
                wrt.update({f"grad_{name}": tensor for name, tensor in lora.tensors().items()})
            grads = torch.autograd.grad(outputs, list(wrt.values()), grad_outputs.to(outputs.device, outputs.dtype).clone())
        named = dict(zip(wrt, grads))
        grad_lora = {name.removeprefix("grad_"): grad for name, grad in named.items() if name.startswith("grad_lora_")}
        return named["grad_inputs"], named.get("grad_prompts"), grad_lora

    def _run(self, inputs: BlockInputs, cache: DynamicCache | None, span: tuple[int, int] | None) -> torch.Tensor:
        start, end = span if span is not None else (self.start_block, self.end_block)
        layers = self.layers[start - self.start_block : end - self.start_block]
        kinds = self.attention_types[start - self.start_block : end - self.start_block]
        hidden_states = inputs.hidden_states.to(self.device, self.dtype)  # [batch, seq, hidden]
        past_length = self.cache_length(cache, start) if cache is not None else 0
        position_ids = inputs.position_ids
        if position_ids is None:
            position_ids = default_position_ids(past_length, hidden_states.shape[1])
        position_ids = position_ids.to(self.device)  # [batch or 1, seq]
        attention_mask = inputs.attention_mask
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        masks = self._masks(hidden_states, attention_mask, cache, position_ids, start, kinds)
        position_embeddings = self.architecture.position_embeddings(self.rotary, hidden_states, position_ids, kinds)
        prompts = inputs.prompts
        if prompts is not None:
            prompts = prompts.to(self.device, self.dtype)
        with lora_weights.applied(layers, inputs.lora, first_block=start):
            for index, (layer, kind) in enumerate(zip(layers, kinds)):
                if prompts is not None:  # out of place: autograd needs the hidden states before the addition
                    prefix = prompts.shape[2]
                    hidden_states = torch.cat([hidden_states[:, :prefix] + prompts[index], hidden_states[:, prefix:]], dim=1)
                hidden_states = layer(
                    hidden_states,
                    attention_mask=masks[kind],
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=cache is not None,
                    position_embeddings=position_embeddings[kind],
                )
        return hidden_states

    def _masks(self, hidden_states, attention_mask, cache, position_ids, start, kinds) -> dict:
        masks = {}
        for kind in set(kinds):
            make_mask = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=start + kinds.index(kind),
            )
        return masks


def rollback_refusal(layer, count: int) -> str | None:
    """Why a cache layer cannot forget its last `count` tokens, or None where it can. A sliding-window
    layer that has seen its whole window holds only its last `window - 1` tokens, and the tokens of the
    last step where it records them (`new_cache`): forgetting more would leave the next step without
    the keys it attends to (transformers' `DynamicSlidingWindowLayer.crop` then raises, or keeps too few)."""
    if not layer.is_croppable:
        return f"its cache ({type(layer).__name__}) cannot be cropped"
    if not layer.is_sliding:
        return None
    length, window = layer.get_seq_length(), layer.get_max_length()
    held = layer.keys.shape[-2] if layer.is_initialized else 0
    if held - count < min(window - 1, length - count):
        return f"its sliding window of {window} tokens has seen {length} and holds only the last {held}, too few to forget {count}"
    return None


def _layer(cache: DynamicCache, index: int) -> Any:
    """Layer `index` of a cache: a full or sliding-window layer (keys, values, crop()), typed loosely by transformers."""
    return cache.layers[index]
