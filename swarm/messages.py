"""Wire messages: the typed headers that travel with tensors between clients and peers.

Every frame on the wire is one of these pydantic models (JSON) plus named tensors (see `swarm.transport`).
This module says what a message may contain; it does not check tensors against a model (peers do).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from swarm.records import MAX_BLOCKS

MAX_SESSION_ID_CHARS = 64
MAX_TENSORS_PER_FRAME = 8


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


class OpenSession(_Message):
    """First frame of an inference stream: reserves KV cache for batch_size x max_length tokens."""

    type: Literal["open"] = "open"
    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)
    start_block: int = Field(ge=0, lt=MAX_BLOCKS)
    end_block: int = Field(gt=0, le=MAX_BLOCKS)
    max_length: int = Field(gt=0, le=2**20, description="tokens per sequence the session may reach")
    batch_size: int = Field(gt=0, le=1024)


class InferenceStep(_Message):
    """One step of a session: new hidden states, whose first token sits at `position`.

    A position below the cache length rolls the cache back to it first (regeneration)."""

    type: Literal["step"] = "step"
    position: int = Field(ge=0, le=2**20)


class SessionOpened(_Message):
    type: Literal["opened"] = "opened"
    session_id: str = Field(max_length=MAX_SESSION_ID_CHARS)


class Result(_Message):
    """Output of a forward or a step: the hidden states after the last requested block."""

    type: Literal["result"] = "result"


class ErrorReply(_Message):
    """A typed refusal; `code` is one of `swarm.errors.WIRE_ERRORS`."""

    type: Literal["error"] = "error"
    code: str = Field(max_length=64)
    message: str = Field(max_length=2000)


class PeerInfo(BaseModel):
    """Answer to rpc_info: enough for a client to check compatibility and measure latency."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    protocol_version: int
    model: str = Field(max_length=256)
    dht_prefix: str = Field(max_length=256)
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    dtype: str = Field(max_length=32)
    version: str = Field(max_length=64)
    max_batch_size: int = Field(gt=0)
    max_length: int = Field(gt=0)


PeerRequest = Annotated[Union[ForwardRequest, OpenSession, InferenceStep], Field(discriminator="type")]
PeerReply = Annotated[Union[SessionOpened, Result, ErrorReply], Field(discriminator="type")]

PEER_REQUEST = TypeAdapter(PeerRequest)
PEER_REPLY = TypeAdapter(PeerReply)
