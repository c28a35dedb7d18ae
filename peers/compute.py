"""The jobs a peer runs on its compute thread: a step's inputs checked (and its cache rolled back),
a stateless forward or backward, and decode rows of several sessions as batched forwards.

Plain functions of a stack, tensors and caches: no event loop and no network (`peers.handler` runs
them in its executor and sends what they return).
"""

from __future__ import annotations

import dataclasses

import torch
from hivemind.proto import runtime_pb2

from peers.batching import DecodeJob
from peers.validation import Limits, check_block_inputs, check_grad_outputs
from swarm import errors
from swarm.blocks import BlockInputs, BlockStack
from swarm.messages import Result
from swarm.transport import encode_frame

Response = runtime_pb2.ExpertResponse
PACKED_SCORES_LIMIT = 2**20  # attention scores per head of one packed forward (new tokens x cached + new tokens)


def checked_inputs(stack: BlockStack, tensors, limits: Limits, cache, span, position: int, adapter) -> BlockInputs:
    """The validated inputs of a step at `position`, the cache rolled back to it (a client may
    regenerate from an earlier token); CacheRollbackError where the cache cannot go back there."""
    inputs = dataclasses.replace(check_block_inputs(tensors, limits, past_length=position), lora=adapter)
    if cache is not None:
        stack.rollback(cache, span, position)  # all layers or none: refused, the cache is unchanged
    return inputs


def decode_batch(jobs: list[DecodeJob]) -> list:
    """Decode rows of several jobs (on the compute thread): validated one by one, then each group
    that can share a forward (same blocks, same adapter) as one batch; one result per job."""
    results: list = [None] * len(jobs)
    checked: dict[int, list[BlockInputs]] = {}
    groups: dict[tuple, list[tuple[int, BlockInputs, object]]] = {}
    for number, job in enumerate(jobs):
        try:
            checked[number] = [
                checked_inputs(job.stack, tensors, limits, None, job.span, position, job.adapter) for tensors, limits, _, position in job.rows
            ]
        except Exception as exc:
            results[number] = exc
            continue
        members = groups.setdefault((id(job.stack), job.span, id(job.adapter)), [])
        members.extend((number, inputs, row[2]) for inputs, row in zip(checked[number], job.rows))
    outputs: dict[int, list[torch.Tensor]] = {number: [] for number in checked}
    for members in groups.values():
        job = jobs[members[0][0]]
        try:
            batch_outputs = _run_rows(job.stack, [(inputs, cache) for _, inputs, cache in members], job.span)
        except Exception as exc:
            for number, _, _ in members:
                results[number] = exc
            continue
        for (number, _, _), output in zip(members, batch_outputs):
            outputs[number].append(output)
    for number in checked:
        if results[number] is None:
            try:
                results[number] = jobs[number].finish(checked[number], outputs[number])
            except Exception as exc:
                results[number] = exc
    return results


def _run_rows(stack: BlockStack, rows: list[tuple[BlockInputs, object]], span: tuple[int, int]) -> list[torch.Tensor]:
    """Rows continuing their own caches, in as few forwards as it pays: one-token rows on non-empty
    caches left-padded into one batch (`step_batch`); rows of several tokens or on empty caches packed
    side by side with them (`step_packed`) while the attention over every row's cache stays small;
    otherwise those rows one by one."""
    lengths = [stack.cache_length(cache, span[0]) for _, cache in rows]
    counts = [inputs.hidden_states.shape[1] for inputs, _ in rows]
    if all(count == 1 and length for count, length in zip(counts, lengths)):
        return stack.step_batch(rows, span)
    packable = all(
        inputs.hidden_states.shape[0] == 1 and inputs.attention_mask is None and inputs.position_ids is None for inputs, _ in rows
    )  # a batched session's rows; an ordinary session's (batches, masks) go the other ways
    if len(rows) > 1 and packable and stack.can_batch(span) and sum(counts) * (sum(lengths) + sum(counts)) <= PACKED_SCORES_LIMIT:
        return stack.step_packed(rows, span)
    outputs: list[torch.Tensor | None] = [None] * len(rows)
    batched = [index for index, (count, length) in enumerate(zip(counts, lengths)) if count == 1 and length]
    for index in set(range(len(rows))) - set(batched):
        inputs, cache = rows[index]
        outputs[index] = stack(inputs, cache, span)
    if batched:
        for index, output in zip(batched, stack.step_batch([rows[index] for index in batched], span)):
            outputs[index] = output
    return outputs


def _lora_options(header) -> dict:
    return {"lora_scaling": header.lora_scaling, "lora_dropout": header.lora_dropout or 0.0, "lora_seed": header.lora_seed or 0}


def forward_job(stack: BlockStack, tensors, limits: Limits, span, header, adapter=None) -> list[Response]:
    inputs = check_block_inputs(tensors, limits, blocks=span[1] - span[0], **_lora_options(header))
    if adapter is not None:
        if inputs.lora is not None:
            raise errors.InvalidRequestError("give LoRA weights or an adapter name, not both")
        inputs = dataclasses.replace(inputs, lora=adapter)
    outputs = stack(inputs, None, span).cpu()
    return list(encode_frame(Result(tensor_names=["hidden_states"]), [outputs], Response))


def backward_job(stack: BlockStack, tensors, limits: Limits, span, header) -> list[Response]:
    """Gradients of the inputs, then of the deep prompts and LoRA weights the request carried."""
    inputs = check_block_inputs(tensors, limits, blocks=span[1] - span[0], **_lora_options(header))
    grad_outputs = check_grad_outputs(tensors.get("grad_outputs"), inputs.hidden_states.shape)
    grad_inputs, grad_prompts, grad_lora = stack.backward(inputs, grad_outputs, span)
    named = {"grad_inputs": grad_inputs}
    if grad_prompts is not None:
        named["grad_prompts"] = grad_prompts
    named.update({f"grad_{name}": grad for name, grad in grad_lora.items()})
    return list(encode_frame(Result(tensor_names=list(named)), [grad.cpu() for grad in named.values()], Response))
