"""The jobs a peer runs on its compute thread: a session step's rows checked (their caches rolled back)
and run in as few forwards as it pays, turns of several sessions' steps batched together, and the
stateless forward and backward.

Plain functions of stacks, tensors and caches that return tensors: no event loop, no network and no
encoding (`peers.scheduler` runs them on the compute thread; sessions and `peers.replies` encode what
they return). What kind of step a row is, is decided here once (`is_decode_row`, `schedule_of`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from peers.validation import Limits, check_block_inputs, check_grad_outputs
from swarm import errors
from swarm.blocks import BlockInputs, BlockStack
from swarm.lora import LoraWeights

PACKED_SCORES_LIMIT = 2**20  # attention scores per head of one packed forward (new tokens x cached + new tokens)
PREFILL_CHUNK = 256  # tokens per compute job of a session's long step: other sessions' decode steps run between


@dataclasses.dataclass
class Row:
    """One sequence (or batch of them) continuing its own cache: the step's tensors as received, checked
    on the compute thread against `limits`."""

    tensors: dict[str, torch.Tensor]  # hidden_states [batch, seq, hidden], position_ids, attention_mask
    limits: Limits
    cache: Any  # a DynamicCache over the step's blocks
    position: int  # tokens the cache holds before the step (a smaller one rolls it back)


@dataclasses.dataclass
class Step:
    """A session's step: rows on one stack's blocks `span`, with one adapter (None: none). `batched`: a
    batched session's step (`peers.slots`), which always shares a turn with other sessions' steps."""

    stack: BlockStack
    span: tuple[int, int]
    adapter: LoraWeights | None
    rows: list[Row]
    batched: bool = False


Outputs = list[tuple[BlockInputs, torch.Tensor]]  # per row: its checked inputs and its outputs [batch, seq, hidden]


def is_decode_row(hidden_states: torch.Tensor, cached_tokens: int, position: int) -> bool:
    """One new token per sequence right after a non-empty cache: a row that can join a padded batch."""
    return hidden_states.ndim == 3 and hidden_states.shape[1] == 1 and 0 < position == cached_tokens


def schedule_of(step: Step) -> Literal["turn", "chunks", "job"]:
    """How the scheduler runs a step: in the next batched turn (decode rows, or a batched session's step),
    in chunks of PREFILL_CHUNK tokens (one long row), or as one job."""
    rows = step.rows
    hidden = [row.tensors.get("hidden_states") for row in rows]
    if any(states is None or "prompts" in row.tensors for states, row in zip(hidden, rows)):
        return "job"  # invalid, or deep prompts: the job's checks say why
    if step.batched or all(
        is_decode_row(states, step.stack.cache_length(row.cache, step.span[0]), row.position) for states, row in zip(hidden, rows)
    ):
        return "turn"
    if len(rows) == 1 and hidden[0].ndim == 3 and hidden[0].shape[1] > PREFILL_CHUNK:
        return "chunks"
    return "job"


def checked(step: Step, row: Row) -> BlockInputs:
    """A row's validated inputs, its cache rolled back to its position (a client may regenerate from an
    earlier token): all layers or none, CacheRollbackError with the cache unchanged where it cannot."""
    inputs = dataclasses.replace(check_block_inputs(row.tensors, row.limits, past_length=row.position), lora=step.adapter)
    step.stack.rollback(row.cache, step.span, row.position)
    return inputs


def run_step(step: Step) -> Outputs:
    """One step alone, as one forward of its rows (or a few)."""
    inputs = [checked(step, row) for row in step.rows]
    outputs = forward_rows(step.stack, [(each, row.cache) for each, row in zip(inputs, step.rows)], step.span)
    return list(zip(inputs, [output.cpu() for output in outputs]))


def run_turn(steps: list[Step]) -> list[Outputs | BaseException]:
    """Steps of several sessions: checked one by one, then each group that can share a forward (same
    stack, blocks and adapter) as one; one result (or the exception that refused it) per step."""
    results: list[Outputs | BaseException | None] = [None] * len(steps)
    inputs: dict[int, list[BlockInputs]] = {}
    groups: dict[tuple, list[tuple[int, BlockInputs, Any]]] = {}
    for number, step in enumerate(steps):
        try:
            inputs[number] = [checked(step, row) for row in step.rows]
        except Exception as exc:
            results[number] = exc
            continue
        members = groups.setdefault((id(step.stack), step.span, id(step.adapter)), [])
        members.extend((number, each, row.cache) for each, row in zip(inputs[number], step.rows))
    outputs: dict[int, list[torch.Tensor]] = {number: [] for number in inputs}
    for members in groups.values():
        first = steps[members[0][0]]
        try:
            group_outputs = forward_rows(first.stack, [(each, cache) for _, each, cache in members], first.span)
        except Exception as exc:  # this group's steps fail; the caches may be half-updated (sessions end)
            for number, _, _ in members:
                results[number] = exc
            continue
        for (number, _, _), output in zip(members, group_outputs):
            outputs[number].append(output.cpu())
    for number in inputs:
        if results[number] is None:
            results[number] = list(zip(inputs[number], outputs[number]))
    assert all(result is not None for result in results), "every step is answered or refused"  # our invariant
    return results  # type: ignore[return-value]


def forward_rows(stack: BlockStack, rows: list[tuple[BlockInputs, Any]], span: tuple[int, int]) -> list[torch.Tensor]:
    """Rows continuing their own caches, in as few forwards as it pays: decode rows left-padded into one
    batch (`step_batch`); rows of several tokens or on empty caches packed side by side with them
    (`step_packed`) while the attention over every row's cache stays small; otherwise those rows one by one."""
    lengths = [stack.cache_length(cache, span[0]) for _, cache in rows]
    decode = [is_decode_row(inputs.hidden_states, length, length) for (inputs, _), length in zip(rows, lengths)]
    if all(decode):
        return stack.step_batch(rows, span)
    counts = [inputs.hidden_states.shape[1] for inputs, _ in rows]
    packable = all(
        inputs.hidden_states.shape[0] == 1 and inputs.attention_mask is None and inputs.position_ids is None for inputs, _ in rows
    )  # a batched session's rows; an ordinary session's (batches, masks) go the other ways
    if len(rows) > 1 and packable and stack.can_pack(span) and sum(counts) * (sum(lengths) + sum(counts)) <= PACKED_SCORES_LIMIT:
        return stack.step_packed(rows, span)
    outputs: list[torch.Tensor | None] = [None] * len(rows)
    batched = [index for index, is_decode in enumerate(decode) if is_decode]
    for index in set(range(len(rows))) - set(batched):
        inputs, cache = rows[index]
        outputs[index] = stack(inputs, cache, span)
    if batched:
        for index, output in zip(batched, stack.step_batch([rows[index] for index in batched], span)):
            outputs[index] = output
    assert all(output is not None for output in outputs), "every row ran"  # our invariant: a dropped row would shift the others
    return outputs  # type: ignore[return-value]


def run_chunk(step: Step, inputs: BlockInputs, first: int) -> torch.Tensor:
    """Tokens first:first+PREFILL_CHUNK of a long one-row step whose inputs are checked already."""
    (row,) = step.rows
    last = first + PREFILL_CHUNK
    piece = dataclasses.replace(
        inputs, hidden_states=inputs.hidden_states[:, first:last],
        position_ids=None if inputs.position_ids is None else inputs.position_ids[:, first:last],
        attention_mask=None if inputs.attention_mask is None else inputs.attention_mask[:, : row.position + last],
    )
    return step.stack(piece, row.cache, step.span).cpu()


# ---- stateless calls ----------------------------------------------------------------------------
def _lora_options(header) -> dict:
    return {"lora_scaling": header.lora_scaling, "lora_dropout": header.lora_dropout or 0.0, "lora_seed": header.lora_seed or 0}


def forward_job(stack: BlockStack, tensors, limits: Limits, span, header, adapter: LoraWeights | None = None) -> torch.Tensor:
    """A forward over a whole sequence, without cache: the outputs [batch, seq, hidden]."""
    inputs = check_block_inputs(tensors, limits, blocks=span[1] - span[0], **_lora_options(header))
    if adapter is not None:
        if inputs.lora is not None:
            raise errors.InvalidRequestError("give LoRA weights or an adapter name, not both")
        inputs = dataclasses.replace(inputs, lora=adapter)
    return stack(inputs, None, span).cpu()


def backward_job(stack: BlockStack, tensors, limits: Limits, span, header) -> dict[str, torch.Tensor]:
    """Gradients of the inputs, then of the deep prompts and LoRA weights the request carried, by wire name."""
    inputs = check_block_inputs(tensors, limits, blocks=span[1] - span[0], **_lora_options(header))
    grad_outputs = check_grad_outputs(tensors.get("grad_outputs"), inputs.hidden_states.shape)
    grad_inputs, grad_prompts, grad_lora = stack.backward(inputs, grad_outputs, span)
    named = {"grad_inputs": grad_inputs}
    if grad_prompts is not None:
        named["grad_prompts"] = grad_prompts
    named.update({f"grad_{name}": grad for name, grad in grad_lora.items()})
    return named
