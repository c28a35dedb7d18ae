"""Checks of a request's tensors against what this peer serves, before any compute.

Pure functions over tensors and limits; they raise `InvalidRequestError` / `SessionLengthError` with
a message the client can act on, and never touch the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from swarm.blocks import BlockInputs
from swarm.errors import BlocksNotServedError, InvalidRequestError, SessionLengthError
from swarm.lora import MAX_RANK, LoraWeights

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_WIRE_BYTES = 4  # the largest float on the wire: float32 (bfloat16 may travel as float32 too)
INT_WIRE_BYTES = 8  # int64: position ids and attention masks
REQUEST_BUFFER_BYTES = 2**30  # tensor bytes that all requests being read may hold together
MAX_STATELESS_CALLS = 32  # forward and backward calls read or computed at once; more wait, then get 'overloaded'
STATELESS_WAIT_S = 5.0  # how long such a call waits for its turn


@dataclass(frozen=True)
class Limits:
    hidden_size: int
    max_batch_size: int
    max_length: int  # tokens per sequence, cache included
    lora_shapes: dict | None = None  # projection -> (in_features, out_features); None: no LoRA accepted

    def frame_bytes(self, *, tokens: int | None = None, blocks: int = 0, backward: bool = False) -> int:
        """The most tensor bytes a request may carry and pass the checks below: hidden_states [batch, seq, hidden],
        position_ids [batch, seq] and attention_mask [batch, <= max_length] for `tokens` = batch x length (default:
        the largest batch of the longest sequence); for a stateless call through up to `blocks` blocks, deep
        prompts [blocks, batch, prefix <= seq, hidden] and LoRA A/B of those blocks; for a backward, grad_outputs."""
        tokens = self.max_batch_size * self.max_length if tokens is None else tokens
        hidden_bytes = tokens * self.hidden_size * FLOAT_WIRE_BYTES
        lora_bytes = blocks * MAX_RANK * FLOAT_WIRE_BYTES * sum(sum(shape) for shape in (self.lora_shapes or {}).values())
        grad_bytes = hidden_bytes if backward else 0
        return hidden_bytes + 2 * tokens * INT_WIRE_BYTES + blocks * hidden_bytes + lora_bytes + grad_bytes


def check_span(start_block: int, end_block: int, served: tuple[int, int]) -> tuple[int, int]:
    """A non-empty range inside what this peer serves; outside it is a transient error (the client's
    view of the swarm may be older than this peer's last move: it re-routes)."""
    if not start_block < end_block:
        raise InvalidRequestError(f"empty block range {start_block}:{end_block}")
    if not served[0] <= start_block < end_block <= served[1]:
        raise BlocksNotServedError(f"blocks {start_block}:{end_block} requested, this peer serves {served[0]}:{served[1]}")
    return start_block, end_block


def check_block_inputs(
    tensors: dict[str, torch.Tensor], limits: Limits, *, past_length: int = 0, blocks: int | None = None,
    lora_scaling: float | None = None, lora_dropout: float = 0.0, lora_seed: int = 0,
) -> BlockInputs:
    """Validate hidden_states [batch, seq, hidden], position_ids [batch|1, seq], attention_mask [batch, past+seq],
    and deep prompts [blocks, batch|1, prefix <= seq, hidden] (only where `blocks` is given)."""
    hidden_states = tensors.get("hidden_states")
    if hidden_states is None:
        raise InvalidRequestError("hidden_states missing")
    if hidden_states.dtype not in FLOAT_DTYPES:
        raise InvalidRequestError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    if hidden_states.ndim != 3 or hidden_states.shape[2] != limits.hidden_size:
        raise InvalidRequestError(
            f"hidden_states must be [batch, seq, {limits.hidden_size}], got {list(hidden_states.shape)}"
        )
    batch_size, seq_length, _ = hidden_states.shape
    if not 1 <= batch_size <= limits.max_batch_size:
        raise InvalidRequestError(f"batch size {batch_size} outside 1..{limits.max_batch_size}")
    if seq_length < 1:
        raise InvalidRequestError("empty sequence")
    if past_length + seq_length > limits.max_length:
        raise SessionLengthError(f"{past_length} + {seq_length} tokens exceed the limit of {limits.max_length}")
    if not torch.isfinite(hidden_states).all():
        raise InvalidRequestError("hidden_states contain NaN or infinite values")
    position_ids = _check_position_ids(tensors.get("position_ids"), batch_size, seq_length, limits.max_length)
    attention_mask = _check_attention_mask(tensors.get("attention_mask"), batch_size, past_length + seq_length)
    prompts = tensors.get("prompts")
    if prompts is not None:
        if blocks is None:
            raise InvalidRequestError("deep prompts are accepted by stateless forward and backward only")
        if (
            prompts.dtype not in FLOAT_DTYPES or prompts.ndim != 4 or prompts.shape[0] != blocks
            or prompts.shape[1] not in (1, batch_size) or not 1 <= prompts.shape[2] <= seq_length
            or prompts.shape[3] != limits.hidden_size
        ):
            raise InvalidRequestError(
                f"prompts must be floating point [{blocks}, {batch_size} or 1, 1..{seq_length}, {limits.hidden_size}], "
                f"got {prompts.dtype} {list(prompts.shape)}"
            )
        if not torch.isfinite(prompts).all():
            raise InvalidRequestError("prompts contain NaN or infinite values")
    lora = _check_lora(tensors, limits, blocks, lora_scaling)
    if lora is not None:
        lora = replace(lora, dropout=lora_dropout, seed=lora_seed)
    return BlockInputs(hidden_states, position_ids, attention_mask, prompts, lora)


def _check_lora(tensors: dict[str, torch.Tensor], limits: Limits, blocks: int | None, scaling: float | None):
    """LoRA weights of the span's blocks: lora_a.<proj> [blocks, r, in] and lora_b.<proj> [blocks, out, r]."""
    named = {name: tensor for name, tensor in tensors.items() if name.startswith("lora_")}
    if not named:
        return None
    if blocks is None or scaling is None or not limits.lora_shapes:
        raise InvalidRequestError("LoRA weights need a stateless forward or backward with lora_scaling")
    lora = LoraWeights.from_tensors(scaling, named)
    if set(lora.a) != set(lora.b) or not set(lora.a) <= set(limits.lora_shapes):
        raise InvalidRequestError(f"LoRA needs A and B of projections among {sorted(limits.lora_shapes)}, got {sorted(named)}")
    for name in lora.a:
        a, b = lora.a[name], lora.b[name]
        in_features, out_features = limits.lora_shapes[name]
        rank = a.shape[1] if a.ndim == 3 else -1
        if (
            a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype or not 1 <= rank <= MAX_RANK
            or list(a.shape) != [blocks, rank, in_features] or list(b.shape) != [blocks, out_features, rank]
        ):
            raise InvalidRequestError(
                f"LoRA of {name} must be floating point A [{blocks}, r <= {MAX_RANK}, {in_features}] and "
                f"B [{blocks}, {out_features}, r], got {list(a.shape)} and {list(b.shape)}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidRequestError(f"LoRA of {name} contains NaN or infinite values")
    return lora


def check_grad_outputs(grad_outputs, shape: torch.Size) -> torch.Tensor:
    """The gradient sent with a backward request: floating point, finite, shaped like the hidden states."""
    if grad_outputs is None:
        raise InvalidRequestError("grad_outputs missing")
    if grad_outputs.dtype not in FLOAT_DTYPES or grad_outputs.shape != shape:
        raise InvalidRequestError(
            f"grad_outputs must be floating point {list(shape)}, got {grad_outputs.dtype} {list(grad_outputs.shape)}"
        )
    if not torch.isfinite(grad_outputs).all():
        raise InvalidRequestError("grad_outputs contain NaN or infinite values")
    return grad_outputs


def _check_position_ids(position_ids, batch_size: int, seq_length: int, max_length: int):
    if position_ids is None:
        return None
    if position_ids.dtype != torch.int64 or position_ids.ndim != 2:
        raise InvalidRequestError(f"position_ids must be int64 [batch, seq], got {position_ids.dtype} {list(position_ids.shape)}")
    if position_ids.shape[0] not in (1, batch_size) or position_ids.shape[1] != seq_length:
        raise InvalidRequestError(f"position_ids shape {list(position_ids.shape)} does not match [{batch_size}, {seq_length}]")
    if position_ids.min() < 0 or position_ids.max() >= max_length:
        raise InvalidRequestError(f"position_ids must lie in 0..{max_length - 1}")
    return position_ids


def _check_attention_mask(attention_mask, batch_size: int, total_length: int):
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.int64 or list(attention_mask.shape) != [batch_size, total_length]:
        raise InvalidRequestError(
            f"attention_mask must be int64 [{batch_size}, {total_length}], "
            f"got {attention_mask.dtype} {list(attention_mask.shape)}"
        )
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise InvalidRequestError("attention_mask values must be 0 or 1")
    return attention_mask
