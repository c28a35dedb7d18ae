"""What a peer sends: a step's or a call's result, a typed error, and the push of a step's output to
the next hop, each encoded in one place (`swarm.transport` frames).

A reply is encoded once its content is known: nothing edits an encoded frame. Nothing here computes,
decides or sends.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from hivemind.proto import runtime_pb2

from swarm import errors
from swarm.blocks import BlockInputs
from swarm.messages import InferenceStep, PushFailed, PushStep, Result, SessionOpened
from swarm.transport import encode_error, encode_frame, frame_tensors

logger = logging.getLogger(__name__)

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


@dataclasses.dataclass(frozen=True)
class Push:
    """A step's output for the next hop: the header and tensors (delivered in-process when that hop is
    this peer too) and the same as one encoded message (sent over the network otherwise)."""

    header: PushStep
    tensors: dict[str, torch.Tensor]
    message: Request


def opened(session_id: str) -> Response:
    (message,) = encode_frame(SessionOpened(session_id=session_id), [], Response)
    return message


def result(
    outputs: torch.Tensor | None, *, step_id: int | None = None, pushed: bool = False, compute_ms: float | None = None
) -> list[Response]:
    """The messages of a result: hidden states [batch, seq, hidden] (none for a step without rows)."""
    names = [] if outputs is None else ["hidden_states"]
    header = Result(tensor_names=names, step_id=step_id, pushed=pushed, compute_ms=compute_ms)
    return list(encode_frame(header, [] if outputs is None else [outputs], Response))


def push_failed(step_id: int) -> Response:
    """Tells the client that the push of step `step_id`, announced in its result, did not arrive."""
    (message,) = encode_frame(PushFailed(step_id=step_id), [], Response)
    return message


def gradients(named: dict[str, torch.Tensor]) -> list[Response]:
    """A backward's result: grad_inputs, and grad_prompts / grad_lora_* where the request had them."""
    return list(encode_frame(Result(tensor_names=list(named)), [grad.cpu() for grad in named.values()], Response))


def error(exc: BaseException, *, step_id: int | None = None, idle_timeout_s: float | None = None) -> Response:
    """A typed error for the caller: a SwarmError as itself; a timeout waiting for the caller as one;
    anything else (a bug of ours) as an internal error, whose details stay in our log."""
    if isinstance(exc, TimeoutError):
        exc = errors.PeerTimeoutError(f"no request within {idle_timeout_s} s")
    if isinstance(exc, errors.SwarmError):
        return encode_error(exc, Response, step_id=step_id)
    return encode_error(errors.RemoteError("internal error on the peer"), Response, code="internal", step_id=step_id)


def push(session_id: str, step: InferenceStep | PushStep, next_block: int, inputs: BlockInputs, outputs: torch.Tensor,
         auth: str | None) -> Push | None:
    """The push carrying a step's outputs (with its positions and mask) to the next hop, if it fits in
    one message; None for a long prefill, which the client relays."""
    names, tensors = frame_tensors(
        {"hidden_states": outputs, "position_ids": inputs.position_ids, "attention_mask": inputs.attention_mask}
    )
    header = PushStep(
        session_id=session_id, start_block=next_block, position=step.position, step_id=step.step_id,
        push_to=step.push_to[1:], tensor_names=names, auth=auth,
    )
    messages = list(encode_frame(header, tensors, Request))
    if len(messages) != 1:
        return None
    return Push(header, dict(zip(names, tensors)), messages[0])
