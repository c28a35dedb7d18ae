"""Wire messages: the typed headers that travel with tensors between clients and peers.

Every frame on the wire is one of these pydantic models (JSON) plus named tensors (see `swarm.transport`).
This module says what a message may contain; it does not check tensors against a model (peers do).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from swarm.records import MAX_BLOCKS

MAX_SESSION_ID_CHARS = 64
MAX_TENSORS_PER_FRAME = 24  # inputs, deep prompts, a gradient and LoRA A/B of 7 projections
MAX_PUSH_HOPS = 32
MAX_SLOTS = 1024  # sequences of one batched session (peers also cap them at their max batch size)
PeerIdText = Annotated[str, Field(min_length=1, max_length=128)]
LoraScaling = Annotated[
    float | None, Field(default=None, ge=0, le=1e4, allow_inf_nan=False, description="alpha / r of the LoRA tensors sent")
]
LoraDropout = Annotated[
    float | None, Field(default=None, ge=0, lt=1, allow_inf_nan=False, description="LoRA dropout on the projections' inputs (training)")
]
LoraSeed = Annotated[int | None, Field(default=None, ge=0, lt=2**63, description="seed of the LoRA dropout masks")]
AdapterName = Annotated[
    str | None, Field(default=None, min_length=1, max_length=128, description="a LoRA adapter the peer serves")
]
AdapterDigest = Annotated[
    str | None, Field(default=None, pattern=r"^[0-9a-f]{16}$", description="that adapter's digest, as the peer announces it")
]
AuthProof = Annotated[str | None, Field(default=None, max_length=128, description="private swarms: see swarm.swarm_key")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    tensor_names: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=list, max_length=MAX_TENSORS_PER_FRAME, description="names of the tensors in this frame, in order"
    )


class ForwardRequest(_Message):
    """Stateless forward of a whole sequence through blocks [start_block, end_block)."""

    type: Literal["forward"] = "forward"
    start_block: int = Field(ge=0, lt=MAX_BLOCKS)
    end_block: int = Field(gt=0, le=MAX_BLOCKS)
    lora_scaling: LoraScaling = None
    lora_dropout: LoraDropout = None
    lora_seed: LoraSeed = None
    adapter: AdapterName = None
    adapter_digest: AdapterDigest = None
    auth: AuthProof = None


class BackwardRequest(_Message):
    """Backward through blocks [start_block, end_block): the inputs of a stateless forward plus
    `grad_outputs`, the gradient of the loss w.r.t. its outputs; answered with the inputs' gradient
    (and those of the deep prompts and LoRA weights it carried)."""

    type: Literal["backward"] = "backward"
    start_block: int = Field(ge=0, lt=MAX_BLOCKS)
    end_block: int = Field(gt=0, le=MAX_BLOCKS)
    lora_scaling: LoraScaling = None
    lora_dropout: LoraDropout = None
    lora_seed: LoraSeed = None
    auth: AuthProof = None


class OpenSession(_Message):
    """First frame of an inference stream: reserves KV cache for batch_size x max_length tokens."""

    type: Literal["open"] = "open"
    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)
    start_block: int = Field(ge=0, lt=MAX_BLOCKS)
    end_block: int = Field(gt=0, le=MAX_BLOCKS)
    max_length: int = Field(gt=0, le=2**20, description="tokens per sequence the session may reach")
    batch_size: int = Field(gt=0, le=1024)
    slots: int | None = Field(
        default=None, gt=0, le=MAX_SLOTS,
        description="a batched session: this many independent sequences, each with its own cache and position, "
        "stepped with SlotStep (batch_size must be 1, max_length is per sequence, no pushes)",
    )
    push_from: PeerIdText | None = Field(
        default=None, description="the previous hop's peer id: the only peer allowed to push steps into this session"
    )
    adapter: AdapterName = None
    adapter_digest: AdapterDigest = None
    auth: AuthProof = None


class InferenceStep(_Message):
    """One step of a session: new hidden states, whose first token sits at `position`.

    A position below the cache length rolls the cache back to it first (regeneration)."""

    type: Literal["step"] = "step"
    position: int = Field(ge=0, le=2**20)
    step_id: int = Field(ge=0, description="increases with every step of the session; a step seen twice runs once")
    push_to: list[PeerIdText] = Field(
        default_factory=list, max_length=MAX_PUSH_HOPS,
        description="the following hops' peer ids: send this step's output straight to the first, which passes it on",
    )


SlotIndex = Annotated[int, Field(ge=0, lt=MAX_SLOTS)]
MAX_SLOT_STEP_TOKENS = 4096  # new tokens in one step of a batched session, over all its rows


class SlotStep(_Message):
    """One step of a batched session (`OpenSession.slots`), in this order:

    1. `release`: these slots' sequences ended; their caches are freed.
    2. `starts`: new sequences (a fresh cache each, cache reserved for `start_lengths[i]` tokens, the
       most that sequence may reach); a slot that holds a sequence is restarted. A step that starts
       sequences carries no rows: a peer without room refuses it, and no earlier hop has run anything.
    3. rows: row i continues sequence `slots[i]` at `positions[i]` (exactly what the slot holds) with
       `tokens[i]` new tokens. The rows' hidden states come side by side along the sequence:
       hidden_states [1, sum(tokens), hidden]; the reply has the outputs in the same layout.
    """

    type: Literal["slots"] = "slots"
    step_id: int = Field(ge=0, description="increases with every step of the session")
    release: list[SlotIndex] = Field(default_factory=list, max_length=MAX_SLOTS)
    starts: list[SlotIndex] = Field(default_factory=list, max_length=MAX_SLOTS)
    start_lengths: list[Annotated[int, Field(gt=0, le=2**20)]] = Field(default_factory=list, max_length=MAX_SLOTS)
    slots: list[SlotIndex] = Field(default_factory=list, max_length=MAX_SLOTS)
    positions: list[Annotated[int, Field(ge=0, le=2**20)]] = Field(default_factory=list, max_length=MAX_SLOTS)
    tokens: list[Annotated[int, Field(gt=0, le=MAX_SLOT_STEP_TOKENS)]] = Field(default_factory=list, max_length=MAX_SLOTS)


class PushStep(_Message):
    """A step pushed by the previous hop of a session (rpc_push): its output, so this peer need not
    wait for the client to relay it. The client sends the same step too; whichever arrives first runs."""

    type: Literal["push"] = "push"
    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)
    start_block: int = Field(ge=0, lt=MAX_BLOCKS, description="the receiving hop's first block")
    position: int = Field(ge=0, le=2**20)
    step_id: int = Field(ge=0)
    push_to: list[PeerIdText] = Field(default_factory=list, max_length=MAX_PUSH_HOPS)
    auth: AuthProof = None


class SessionOpened(_Message):
    type: Literal["opened"] = "opened"
    session_id: str = Field(max_length=MAX_SESSION_ID_CHARS)


class Result(_Message):
    """Output of a forward or a step (hidden_states: after the last requested block) or of a backward
    (grad_inputs: the gradient of the hidden states entering the first one)."""

    type: Literal["result"] = "result"
    step_id: int | None = Field(default=None, description="the session step this answers (None for a forward)")
    pushed: bool = Field(
        default=False,
        description="this output is on its way to the next hop: the client need not send it (a PushFailed follows if it "
        "does not arrive)",
    )
    compute_ms: float | None = Field(
        default=None, ge=0, le=1e7, allow_inf_nan=False, description="time the peer spent on this step, queue and compute, ms"
    )


class PushFailed(_Message):
    """Sent after a Result with pushed=True when the next hop did not take that push: the client sends
    the step to the next hop itself."""

    type: Literal["push_failed"] = "push_failed"
    step_id: int = Field(ge=0)


class ErrorReply(_Message):
    """A typed refusal; `code` is one of `swarm.errors.WIRE_ERRORS`."""

    type: Literal["error"] = "error"
    code: str = Field(max_length=64)
    message: str = Field(max_length=2000)
    step_id: int | None = Field(default=None, description="the session step refused, if any")


class PeerInfo(BaseModel):
    """Answer to rpc_info: enough for a client to check compatibility and measure latency."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    protocol_version: int
    model: str = Field(max_length=256)
    dht_prefix: str = Field(max_length=256)
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    dtype: str = Field(max_length=32)
    quantization: str = Field("none", max_length=16)
    version: str = Field(max_length=64)
    max_batch_size: int = Field(gt=0)
    max_length: int = Field(gt=0)
    decode_steps: int = Field(0, ge=0, description="session decode steps run so far")
    batched_steps: int = Field(0, ge=0, description="of those, steps that ran in one forward with other sessions' steps")


PeerRequest = Annotated[
    Union[ForwardRequest, BackwardRequest, OpenSession, InferenceStep, SlotStep, PushStep], Field(discriminator="type")
]
PeerReply = Annotated[Union[SessionOpened, Result, PushFailed, ErrorReply], Field(discriminator="type")]

PEER_REQUEST = TypeAdapter(PeerRequest)
PEER_REPLY = TypeAdapter(PeerReply)
