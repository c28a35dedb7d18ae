"""Frames on the wire: splitting, dtypes, and what is refused before any tensor is built."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm import errors
from swarm.messages import PEER_REQUEST, ForwardRequest, InferenceStep
from swarm.transport import FrameReader, decode_header, encode_frame, name_tensors

pytestmark = pytest.mark.timeout(60)


async def _aiter(items):
    for item in items:
        yield item


def _read(messages, max_frame_bytes=2**30):
    return asyncio.run(FrameReader(_aiter(messages), max_frame_bytes).read())


def test_frame_round_trip_splits_large_tensors():
    hidden = torch.randn(1, 3000, 576)  # 6.9 MB: above hivemind's 4 MiB message cap
    positions = torch.arange(3000).unsqueeze(0)
    header = ForwardRequest(start_block=0, end_block=3, tensor_names=["hidden_states", "position_ids"])
    messages = list(encode_frame(header, [hidden, positions], runtime_pb2.ExpertRequest))
    assert len(messages) > 2 and all(message.ByteSize() < 4 * 2**20 for message in messages)
    metadata, tensors = _read(messages)
    decoded = decode_header(PEER_REQUEST, metadata)
    named = name_tensors(decoded, tensors, ["hidden_states", "position_ids"])
    assert torch.equal(named["hidden_states"], hidden) and torch.equal(named["position_ids"], positions)


def test_bf16_round_trip():
    tensor = torch.randn(2, 3, 8).to(torch.bfloat16)
    (message,) = encode_frame(InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]), [tensor], runtime_pb2.ExpertRequest)
    assert torch.equal(_read([message])[1][0], tensor)


def _tensor_message(**fields) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(**fields)], metadata=b"{}")


@pytest.mark.parametrize(
    "fields",
    [
        dict(buffer=b"\x00" * 12, size=[4], dtype="object"),
        dict(buffer=b"\x00" * 12, size=[4], dtype="float32"),  # 12 bytes for 16 expected
        dict(buffer=b"\x00" * 4, size=[1, 1, 1, 1, 1], dtype="float32"),
        dict(buffer=b"\x00" * 4, size=[1], dtype="float32", compression=runtime_pb2.CompressionType.FLOAT16),
        dict(buffer=b"\x00" * 4, size=[1], dtype="float32", chunks=3),
        dict(buffer=b"\x00" * 8, size=[], dtype="float32"),
    ],
)
def test_malformed_tensors_are_refused(fields):
    with pytest.raises(errors.InvalidRequestError):
        _read([_tensor_message(**fields)])


def test_oversized_frames_and_bad_headers_are_refused():
    with pytest.raises(errors.InvalidRequestError, match="larger"):
        _read([_tensor_message(buffer=b"\x00" * 64, size=[16], dtype="float32")], max_frame_bytes=32)
    with pytest.raises(errors.InvalidRequestError, match="header larger"):
        _read([runtime_pb2.ExpertRequest(metadata=b"{" + b" " * 2**17 + b"}")])
    for metadata in (b"not json", b'{"type": "forward"}', b'{"type": "rm -rf"}', b'{"type":"step","position":-1}'):
        with pytest.raises(errors.InvalidRequestError):
            decode_header(PEER_REQUEST, metadata)


