"""A thousand malformed or random requests to a live peer: each gets a typed error, none an internal
one, and afterwards the peer still answers a correct request exactly, with its memory bounded."""

from __future__ import annotations

import json
import random

import psutil
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm import errors, protocol
from swarm.loop_thread import run_coroutine
from swarm.messages import PEER_REPLY, ErrorReply, ForwardRequest, InferenceStep, OpenSession, PushStep, SlotStep
from swarm.transport import FrameReader, decode_header, encode_frame

pytestmark = pytest.mark.timeout(600)

REQUESTS = 1000
HIDDEN = 64  # the tiny model's hidden size
Request = runtime_pb2.ExpertRequest


@pytest.fixture(scope="module")
def model(tiny_swarm, tiny_model_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=tiny_swarm.initial_peers)
    yield model
    model.close()


def frame(header, tensors=()) -> list[Request]:
    return list(encode_frame(header, list(tensors), Request))


def random_tensor(rng: random.Random) -> torch.Tensor:
    shape = [rng.choice([0, 1, 2, 3, HIDDEN, HIDDEN + 1, 7]) for _ in range(rng.randint(1, 4))]
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int64])
    tensor = torch.randn(shape).to(dtype) if dtype != torch.int64 else torch.randint(-10, 10_000, shape)
    if dtype.is_floating_point and tensor.numel() and rng.random() < 0.3:
        tensor.view(-1)[0] = rng.choice([float("nan"), float("inf")])
    return tensor


def random_names(rng: random.Random, count: int) -> list[str]:
    pool = ["hidden_states", "position_ids", "attention_mask", "evil", ""]
    return [rng.choice(pool) for _ in range(count)]


def bad_request(rng: random.Random) -> tuple[str, list[Request]]:
    """(rpc name, messages) of one malformed or hostile request."""
    kind = rng.randrange(13)
    if kind == 0:  # bytes that are not JSON
        return "rpc_forward", [Request(metadata=rng.randbytes(rng.randint(1, 300)))]
    if kind == 1:  # JSON of no known message, or with fields we do not take
        value = rng.choice([{"type": "evil"}, {"type": "forward", "start_block": 0, "end_block": 2, "x": 1}, [1, 2], "x"])
        return "rpc_forward", [Request(metadata=json.dumps(value).encode())]
    if kind == 2:  # blocks this peer does not serve, or no blocks at all
        start, end = rng.choice([(0, 9), (2, 4), (3, 3), (1, 0), (4000, 4001)])
        header = ForwardRequest.model_construct(start_block=start, end_block=end, tensor_names=["hidden_states"])  # unchecked
        return "rpc_forward", frame(header, [torch.zeros(1, 2, HIDDEN)])
    if kind == 3:  # random tensors under random names
        tensors = [random_tensor(rng) for _ in range(rng.randint(0, 3))]
        header = ForwardRequest(start_block=0, end_block=2, tensor_names=random_names(rng, len(tensors)))
        return "rpc_forward", frame(header, tensors)
    if kind == 4:  # a tensor whose bytes do not match its shape or whose dtype is unknown
        part = runtime_pb2.Tensor(buffer=rng.randbytes(rng.randint(0, 64)), size=[1, rng.randint(1, 9), HIDDEN],
                                  dtype=rng.choice(["float32", "object", "complex64", "x" * 100]))
        return "rpc_forward", [Request(tensors=[part], metadata=b'{"type": "forward", "start_block": 0, "end_block": 2, '
                                                             b'"tensor_names": ["hidden_states"]}')]
    if kind == 5:  # a step on a stream that never opened a session
        return "rpc_inference", frame(InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]),
                                      [torch.zeros(1, 1, HIDDEN)])
    if kind == 6:  # an opening the peer must refuse
        opening = rng.choice([
            OpenSession(session_id="s", start_block=0, end_block=3, max_length=8, batch_size=1),
            OpenSession(session_id="s", start_block=0, end_block=2, max_length=2**20, batch_size=1),
            OpenSession(session_id="s", start_block=0, end_block=2, max_length=8, batch_size=1000),
        ])
        return "rpc_inference", frame(opening)
    if kind == 7:  # a good opening, then a bad step
        session = rng.randbytes(8).hex()
        step = rng.choice([
            (InferenceStep(position=5, step_id=0, tensor_names=["hidden_states"]), [torch.zeros(1, 1, HIDDEN)]),
            (InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]), [torch.full((1, 1, HIDDEN), float("nan"))]),
            (InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]), [torch.zeros(1, 9, HIDDEN)]),
            (InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]), [torch.zeros(2, 1, HIDDEN)]),
        ])
        opening = OpenSession(session_id=session, start_block=0, end_block=2, max_length=8, batch_size=1)
        return "rpc_inference", [*frame(opening), *frame(*step)]
    if kind == 8:  # a push into a session that does not exist, or is not ours to push into
        push = PushStep(session_id=rng.randbytes(8).hex(), start_block=0, position=0, step_id=0, tensor_names=["hidden_states"])
        return "rpc_push", frame(push, [torch.zeros(1, 1, HIDDEN)])
    if kind == 10:  # a batched session (slots), then a step it must refuse
        opening = OpenSession(session_id=rng.randbytes(8).hex(), start_block=0, end_block=2, max_length=8, batch_size=1, slots=4)
        step = rng.choice([
            (SlotStep(step_id=0, slots=[0], positions=[0], tokens=[1], tensor_names=["hidden_states"]), [torch.zeros(1, 1, HIDDEN)]),
            (SlotStep(step_id=0, starts=[7], start_lengths=[4]), []),
            (SlotStep(step_id=0, starts=[1], start_lengths=[9]), []),
            (SlotStep(step_id=0, release=[2, 2]), []),
            (SlotStep(step_id=0, slots=[1], positions=[0], tokens=[3], tensor_names=["hidden_states"]), [torch.zeros(1, 2, HIDDEN)]),
            (InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"]), [torch.zeros(1, 1, HIDDEN)]),
        ])
        return "rpc_inference", [*frame(opening), *frame(*step)]
    if kind == 11:  # a batched session the peer must refuse
        opening = rng.choice([
            OpenSession(session_id="s", start_block=0, end_block=2, max_length=8, batch_size=2, slots=4),
            OpenSession(session_id="s", start_block=0, end_block=2, max_length=8, batch_size=1, slots=1000),
            OpenSession(session_id="s", start_block=0, end_block=2, max_length=8, batch_size=1, slots=2, push_from="x"),
        ])
        return "rpc_inference", frame(opening)
    if kind == 12:  # pushes over an open push stream: into no session, or garbage
        push = PushStep(session_id=rng.randbytes(8).hex(), start_block=0, position=0, step_id=0, tensor_names=["hidden_states"])
        return "rpc_push_stream", rng.choice([frame(push, [torch.zeros(1, 1, HIDDEN)]), [Request(metadata=rng.randbytes(40))]])
    return "rpc_push", [Request(metadata=rng.randbytes(rng.randint(1, 100)))]  # garbage pushed


def send(model, peer_id: str, rpc: str, messages: list[Request]) -> ErrorReply | None:
    """The first error the peer answered with (None if it answered without one)."""
    seq = model.sequence
    stub = protocol.stub(seq.p2p, PeerID.from_base58(peer_id), seq.dht_prefix)

    async def call():
        if rpc == "rpc_push":
            reply = await stub.rpc_push(messages[0])
            return decode_header(PEER_REPLY, reply.metadata) if reply.metadata else None

        async def requests():
            for message in messages:
                yield message

        reader = FrameReader(await getattr(stub, rpc)(requests()))
        for _ in range(2):  # an opening is answered first, then the step
            read = await reader.read()
            if read is None:
                return None
            header = decode_header(PEER_REPLY, read[0])
            if isinstance(header, ErrorReply):
                return header
        return None

    return run_coroutine(call())


def test_a_thousand_bad_requests_get_typed_errors_and_the_peer_keeps_serving(model, tiny_swarm, tiny_model_path):
    run_coroutine(model.sequence.update())
    peer_id = next(peer_id for peer_id, span in model.sequence.spans.items() if span.start == 0)
    peer = psutil.Process(next(node.pid for node in tiny_swarm.nodes[1:] if node.name.startswith("peer-0-2")))
    rng = random.Random(0)
    codes: dict[str, int] = {}
    for index in range(REQUESTS):
        if index == 100:
            baseline_mib = peer.memory_info().rss / 2**20  # after the first allocations settled
        rpc, messages = bad_request(rng)
        reply = send(model, peer_id, rpc, messages)
        assert reply is not None, f"request {index} ({rpc}) was not refused"
        assert reply.code in errors.WIRE_ERRORS, (index, rpc, reply)  # typed: never "internal"
        codes[reply.code] = codes.get(reply.code, 0) + 1
    grown_mib = peer.memory_info().rss / 2**20 - baseline_mib
    print(f"{REQUESTS} bad requests refused by code: {codes}; peer RSS grew {grown_mib:.1f} MiB after the first 100")
    assert grown_mib < 64
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))
