"""Frames over hivemind streams: a typed header plus named tensors, split into messages under the
4 MiB cap, read back with every tensor checked before it is built (and a frame refused as soon as
its tensors announce more bytes than the reader takes, before they arrive). Also where the exceptions of
talking to a peer (hivemind, asyncio) become `swarm.errors` (starting a DHT node: `swarm.network`).

It does not decide what a tensor should look like for a model: peers check shapes themselves.
Nothing here unpickles: tensors are raw little-endian buffers with a whitelisted dtype.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from types import CodeType
from typing import AsyncIterator, Iterator, Mapping, Sequence, TypeVar

import torch
from google.protobuf.message import DecodeError
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError, read_unsigned_varint
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming
from pydantic import BaseModel, TypeAdapter, ValidationError

from swarm import errors
from swarm.messages import ErrorReply

CHUNK_BYTES = 2**21  # per message: well under hivemind's 4 MiB unary cap
DEFAULT_MAX_FRAME_BYTES = 2**30
MAX_HEADER_BYTES = 2**16
MAX_PARTS_PER_FRAME = 4096
MAX_TENSOR_DIMS = 4
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}

Proto = TypeVar("Proto", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)
Header = TypeVar("Header", bound=BaseModel)


def encode_frame(header: BaseModel, tensors: Sequence[torch.Tensor], proto_type: type[Proto]) -> Iterator[Proto]:
    """Yield the messages of one frame; the last one carries the JSON header. Fields left None are not
    sent (every None field defaults to None): a peer of the same protocol version that predates an
    optional field accepts every message that does not use it."""
    batch: list[runtime_pb2.Tensor] = []
    batch_bytes = 0
    for tensor in tensors:
        serialized = serialize_torch_tensor(tensor.detach().cpu().contiguous())
        for part in split_for_streaming(serialized, CHUNK_BYTES):
            if batch and batch_bytes + len(part.buffer) > CHUNK_BYTES:
                yield proto_type(tensors=batch)
                batch, batch_bytes = [], 0
            batch.append(part)
            batch_bytes += len(part.buffer)
    yield proto_type(tensors=batch, metadata=header.model_dump_json(exclude_none=True).encode())


def encode_error(exc: BaseException, proto_type: type[Proto], code: str | None = None, step_id: int | None = None) -> Proto:
    code = code or str(getattr(exc, "code", None) or "internal")
    header = ErrorReply(code=code, message=str(exc)[:2000] or type(exc).__name__, step_id=step_id)
    (message,) = encode_frame(header, [], proto_type)
    return message


class ByteBudget:
    """Bytes that the frames being read may hold, shared by all the readers of a peer: a reader takes
    a tensor's bytes when its first part announces them, and gives them back once its frame is
    consumed or dropped. One event loop uses it: no lock."""

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes
        self.used_bytes = 0

    def take(self, nbytes: int) -> None:
        if self.used_bytes + nbytes > self.total_bytes:
            raise errors.OverloadedError(
                f"this peer is busy reading other requests ({self.used_bytes} of {self.total_bytes} bytes held); retry later"
            )
        self.used_bytes += nbytes

    def give_back(self, nbytes: int) -> None:
        self.used_bytes -= nbytes


class FrameReader:
    """Reads frames from a stream of messages. A tensor's first part announces its dtype and shape, so a
    frame is refused at the part that makes its announced tensors exceed `max_frame_bytes` (or what
    `budget` has left), before the rest of it arrives; so is a chunk beyond what its tensor announced.

    The bytes a frame took from `budget` are held until the next `read` or `release`."""

    def __init__(
        self, stream: AsyncIterator[Proto], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, budget: ByteBudget | None = None
    ):
        self._stream = stream.__aiter__()
        self.max_frame_bytes = max_frame_bytes  # the caller may change it between frames
        self._budget = budget
        self._held_bytes = 0

    async def read(self) -> tuple[bytes, list[torch.Tensor]] | None:
        """The next frame's (header bytes, tensors), or None once the other side closed the stream."""
        self.release()
        try:
            return await self._read_frame()
        except BaseException:
            self.release()  # the frame's parts are dropped
            raise

    def release(self) -> None:
        """Give the budget back: the last frame's tensors are consumed (or the frame was dropped)."""
        if self._budget is not None:
            self._budget.give_back(self._held_bytes)
        self._held_bytes = 0

    async def discard(self) -> None:
        """Read the stream to its end, keeping nothing."""
        self.release()
        async for _ in self._stream:
            pass

    async def _read_frame(self) -> tuple[bytes, list[torch.Tensor]] | None:
        parts: list[runtime_pb2.Tensor] = []
        announced_bytes = 0  # of the frame's tensors so far
        missing_bytes = 0  # of the current tensor: announced, not yet arrived
        async for message in self._stream:
            if len(parts) + len(message.tensors) > MAX_PARTS_PER_FRAME:
                raise errors.InvalidRequestError(f"more than {MAX_PARTS_PER_FRAME} tensor parts in one frame")
            for part in message.tensors:
                if part.dtype:
                    missing_bytes = _announced_bytes(part)
                    announced_bytes += missing_bytes
                    self._hold(announced_bytes, missing_bytes)
                elif not parts:
                    raise errors.InvalidRequestError("tensor chunk without a header")
                if len(part.buffer) > missing_bytes:
                    raise errors.InvalidRequestError("tensor chunk beyond the size its header announced")
                missing_bytes -= len(part.buffer)
                parts.append(part)
            if message.metadata:
                if len(message.metadata) > MAX_HEADER_BYTES:
                    raise errors.InvalidRequestError(f"message header larger than {MAX_HEADER_BYTES} bytes")
                return bytes(message.metadata), _tensors_from_parts(parts)
        if parts:
            raise errors.InvalidRequestError("stream ended in the middle of a frame")
        return None

    def _hold(self, frame_bytes: int, tensor_bytes: int) -> None:
        """Refuse a frame announcing more than it may carry; take a newly announced tensor's bytes from the budget."""
        limit = self.max_frame_bytes if self._budget is None else min(self.max_frame_bytes, self._budget.total_bytes)
        if frame_bytes > limit:
            raise errors.InvalidRequestError(
                f"frame announces {frame_bytes} bytes of tensors, larger than the {limit} this peer reads in one request"
            )
        if self._budget is not None:
            self._budget.take(tensor_bytes)
            self._held_bytes += tensor_bytes


async def read_message(message: Proto, max_frame_bytes: int = 2 * CHUNK_BYTES) -> tuple[bytes, list[torch.Tensor]]:
    """A whole frame sent as one message (a unary call), checked like a streamed one."""

    async def single() -> AsyncIterator[Proto]:
        yield message

    frame = await FrameReader(single(), max_frame_bytes).read()
    if frame is None:
        raise errors.InvalidRequestError("empty message")
    return frame


def decode_header(adapter: TypeAdapter | type[Header], metadata: bytes) -> BaseModel:
    try:
        if isinstance(adapter, TypeAdapter):
            return adapter.validate_json(metadata)
        return adapter.model_validate_json(metadata)
    except ValidationError as exc:
        raise errors.InvalidRequestError(f"invalid message: {_first_error(exc)}") from exc


def name_tensors(header: BaseModel, tensors: list[torch.Tensor], allowed: Sequence[str]) -> dict[str, torch.Tensor]:
    names = list(getattr(header, "tensor_names", []))
    if len(names) != len(tensors) or len(set(names)) != len(names):
        raise errors.InvalidRequestError(f"{len(tensors)} tensors do not match the names {names}")
    unknown = set(names) - set(allowed)
    if unknown:
        raise errors.InvalidRequestError(f"unexpected tensors {sorted(unknown)}; allowed: {list(allowed)}")
    return dict(zip(names, tensors))


def _announced_bytes(head: runtime_pb2.Tensor) -> int:
    """The bytes a tensor's first part announces (dtype x shape), checked before any more of it is read."""
    if head.compression != runtime_pb2.CompressionType.NONE:
        raise errors.InvalidRequestError("compressed tensors are not accepted")
    dtype = WIRE_DTYPES.get(head.dtype)
    if dtype is None:
        raise errors.InvalidRequestError(f"dtype {head.dtype[:32]!r} not accepted; use one of {list(WIRE_DTYPES)}")
    if not 1 <= len(head.size) <= MAX_TENSOR_DIMS:
        raise errors.InvalidRequestError(f"tensors must have 1 to {MAX_TENSOR_DIMS} dimensions, got {len(head.size)}")
    return math.prod(head.size) * max(_itemsizes(dtype))


def _itemsizes(dtype: torch.dtype) -> tuple[int, ...]:
    return (2, 4) if dtype == torch.bfloat16 else (torch.empty((), dtype=dtype).element_size(),)  # hivemind may send bf16 as fp32


def _tensors_from_parts(parts: list[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    groups: list[list[runtime_pb2.Tensor]] = []
    for part in parts:
        if part.dtype:
            groups.append([part])
        elif groups:
            groups[-1].append(part)
        else:
            raise errors.InvalidRequestError("tensor chunk without a header")
    return [_decode_tensor(group) for group in groups]


def _decode_tensor(group: list[runtime_pb2.Tensor]) -> torch.Tensor:
    """One tensor from its parts; its head passed `_announced_bytes` (compression, dtype, dimensions) as it arrived."""
    head = group[0]
    dtype, shape = WIRE_DTYPES[head.dtype], list(head.size)
    if head.chunks not in (0, len(group)):
        raise errors.InvalidRequestError(f"tensor announced {head.chunks} chunks but {len(group)} arrived")
    buffer_bytes = sum(len(part.buffer) for part in group)
    if buffer_bytes not in [math.prod(shape) * itemsize for itemsize in _itemsizes(dtype)]:
        raise errors.InvalidRequestError(f"shape {shape} of {head.dtype} does not match {buffer_bytes} bytes")
    whole = runtime_pb2.Tensor()
    whole.CopyFrom(head)
    whole.buffer = b"".join(part.buffer for part in group)
    whole.requires_grad = False
    return deserialize_torch_tensor(whole)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(item) for item in first.get("loc", ()))
    return f"{where}: {first.get('msg', '')}"[:300]


# The only ValueErrors and TypeErrors raised while talking to a peer that come from the peer's side:
# hivemind's readers of a stream finding bytes that are not a message (a length prefix that overflows,
# a marker that is neither message nor error). Any other ValueError (pydantic's ValidationError is one)
# or TypeError is a bug of ours: it is raised as it is, and neither bans the peer nor is retried.
_STREAM_READERS = frozenset({read_unsigned_varint.__code__, P2P.receive_protobuf.__code__})


@contextlib.asynccontextmanager
async def translated_errors(peer: str) -> AsyncIterator[None]:
    """Turn library and network exceptions raised while talking to `peer` into swarm errors."""
    try:
        yield
    except errors.SwarmError:
        raise
    except asyncio.CancelledError:
        raise
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise errors.PeerTimeoutError(f"peer {peer} did not answer in time") from exc
    except P2PHandlerError as exc:
        raise errors.RemoteError(f"peer {peer} failed: {str(exc)[:300]}") from exc
    except (P2PDaemonError, ConnectionError, EOFError, OSError, asyncio.IncompleteReadError) as exc:
        raise errors.PeerUnavailableError(f"peer {peer} is unreachable: {type(exc).__name__}: {exc}"[:400]) from exc
    except (DecodeError, ValueError, TypeError) as exc:
        if not isinstance(exc, DecodeError) and _raised_in(exc) not in _STREAM_READERS:
            raise
        raise errors.PeerMisbehavedError(f"peer {peer} sent a malformed message: {type(exc).__name__}: {exc}"[:400]) from exc


def _raised_in(exc: BaseException) -> CodeType | None:
    """The code of the function that raised `exc` (the innermost frame of its traceback)."""
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return None if traceback is None else traceback.tb_frame.f_code


def raise_if_error(header: BaseModel) -> None:
    if isinstance(header, ErrorReply):
        raise errors.error_from_wire(header.code, header.message)


def frame_tensors(mapping: Mapping[str, torch.Tensor | None]) -> tuple[list[str], list[torch.Tensor]]:
    """Drop None entries; return the names and tensors in a stable order."""
    present = {name: tensor for name, tensor in mapping.items() if tensor is not None}
    return list(present), list(present.values())
