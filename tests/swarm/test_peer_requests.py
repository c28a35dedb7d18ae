"""Bad requests to a live peer get typed errors, and the peer keeps serving correct ones exactly."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.remote import SpanStream, _input_tensors, call_forward, call_info
from swarm import errors, protocol
from swarm.blocks import BlockInputs
from swarm.loop_thread import run_coroutine
from swarm.messages import PEER_REPLY, InferenceStep, PushStep
from swarm.transport import FrameReader, decode_header, encode_frame, raise_if_error

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model(tiny_swarm, tiny_model_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=tiny_swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def first_peer(model) -> str:
    run_coroutine(model.sequence.update())
    return next(peer_id for peer_id, span in model.sequence.spans.items() if span.start == 0)


def forward(model, peer_id, start, end, inputs):
    seq = model.sequence
    return run_coroutine(call_forward(seq.p2p, peer_id, seq.dht_prefix, start, end, inputs, 30))


def raw_forward(model, peer_id, messages) -> Exception:
    """Send hand-made messages; return the error the peer answered with."""
    seq = model.sequence

    async def call():
        async def requests():
            for message in messages:
                yield message

        replies = await protocol.stub(seq.p2p, PeerID.from_base58(peer_id), seq.dht_prefix).rpc_forward(requests())
        metadata, _ = await FrameReader(replies).read()
        header = decode_header(PEER_REPLY, metadata)
        return errors.error_from_wire(header.code, header.message)

    return run_coroutine(call())


BAD_INPUTS = {
    "wrong hidden size": BlockInputs(torch.zeros(1, 3, 65)),
    "2-d hidden states": BlockInputs(torch.zeros(3, 64)),
    "integer hidden states": BlockInputs(torch.zeros(1, 3, 64, dtype=torch.int64)),
    "NaN": BlockInputs(torch.full((1, 3, 64), math.nan)),
    "infinity": BlockInputs(torch.full((1, 3, 64), math.inf)),
    "position ids of another length": BlockInputs(torch.zeros(1, 3, 64), torch.zeros(1, 4, dtype=torch.int64)),
    "negative positions": BlockInputs(torch.zeros(1, 3, 64), torch.full((1, 3), -5, dtype=torch.int64)),
    "mask of another length": BlockInputs(torch.zeros(1, 3, 64), None, torch.ones(1, 7, dtype=torch.int64)),
    "huge batch": BlockInputs(torch.zeros(1000, 1, 64)),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_tensors_are_refused(model, first_peer, name):
    with pytest.raises(errors.InvalidRequestError):
        forward(model, first_peer, 0, 2, BAD_INPUTS[name])


def test_blocks_the_peer_does_not_serve(model, first_peer):
    with pytest.raises(errors.BlocksNotServedError, match="serves 0:2"):
        forward(model, first_peer, 0, 4, BlockInputs(torch.zeros(1, 3, 64)))


@pytest.mark.parametrize(
    "messages",
    [
        [runtime_pb2.ExpertRequest(metadata=b"\x00\xffgarbage")],
        [runtime_pb2.ExpertRequest(metadata=b'{"type": "forward", "start_block": 0, "end_block": 2, "evil": 1}')],
        [runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"abc", size=[1, 1, 64], dtype="float32")], metadata=b"{}")],
        [runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"abcd", size=[1], dtype="object")], metadata=b"{}")],
    ],
    ids=["garbage-bytes", "unknown-field", "short-buffer", "object-dtype"],
)
def test_garbage_is_refused(model, first_peer, messages):
    assert isinstance(raw_forward(model, first_peer, messages), errors.InvalidRequestError)


def test_session_errors_are_typed(model, first_peer):
    seq = model.sequence

    async def scenario():
        stream = SpanStream(seq.p2p, first_peer, seq.dht_prefix, 0, 2, 30)
        stream._send(InferenceStep(position=0, step_id=0), [])
        with pytest.raises(errors.UnknownSessionError):
            await stream.open("s", 8, 1)  # the peer sees a step before any open
        stream = SpanStream(seq.p2p, first_peer, seq.dht_prefix, 0, 2, 30)
        await stream.open("s2", max_length=8, batch_size=1)
        await stream.step(BlockInputs(torch.zeros(1, 6, 64)), 0, step_id=0)
        with pytest.raises(errors.SessionLengthError):
            await stream.step(BlockInputs(torch.zeros(1, 3, 64)), 6, step_id=1)
        with pytest.raises(errors.InvalidRequestError, match="cache holds 6"):
            await stream.step(BlockInputs(torch.zeros(1, 1, 64)), 9, step_id=2)
        await stream.step(BlockInputs(torch.zeros(1, 1, 64)), 6, step_id=3)  # the session survives its errors
        stream.close()
        too_long = SpanStream(seq.p2p, first_peer, seq.dht_prefix, 0, 2, 30)
        with pytest.raises(errors.SessionLengthError):
            await too_long.open("s3", max_length=10**6, batch_size=1)

    run_coroutine(scenario())


def test_peer_still_serves_exactly_after_bad_requests(model, first_peer, tiny_model_path):
    info = run_coroutine(call_info(model.sequence.p2p, first_peer, model.sequence.dht_prefix, 5))
    assert (info.start_block, info.end_block) == (0, 2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)


def test_steps_run_once_and_pushes_come_only_from_the_previous_hop(model, first_peer):
    seq = model.sequence
    step = BlockInputs(torch.randn(1, 1, 64))

    async def scenario():
        stream = SpanStream(seq.p2p, first_peer, seq.dht_prefix, 0, 2, 30)
        await stream.open("dedup", max_length=8, batch_size=1, push_from="QmSomeOtherPeerThatIsNotTheClient")
        first, _ = await stream.step(step, 0, step_id=1)
        names, tensors = _input_tensors(step)
        stream._send(InferenceStep(position=1, step_id=1, tensor_names=names), tensors)  # a copy: skipped, no reply
        second, _ = await stream.step(step, 1, step_id=2)  # answered with step 2, not with the copy of step 1
        assert not torch.equal(first, second)  # the cache grew by one token only once
        push = PushStep(session_id="dedup", start_block=0, position=2, step_id=3, tensor_names=names)
        (message,) = encode_frame(push, tensors, runtime_pb2.ExpertRequest)
        reply = await protocol.stub(seq.p2p, PeerID.from_base58(first_peer), seq.dht_prefix).rpc_push(message)
        with pytest.raises(errors.UnknownSessionError):  # we are not the peer this session takes pushes from
            raise_if_error(decode_header(PEER_REPLY, reply.metadata))
        third, header = await stream.step(step, 2, step_id=3)
        assert torch.equal(third, await _replayed(stream, step, first_peer)) and not header.pushed
        stream.close()

    async def _replayed(stream, step, peer_id):  # the same three steps in a fresh session
        fresh = SpanStream(seq.p2p, peer_id, seq.dht_prefix, 0, 2, 30)
        await fresh.open("fresh", max_length=8, batch_size=1)
        for position in range(3):
            output, _ = await fresh.step(step, position, step_id=position)
        fresh.close()
        return output

    run_coroutine(scenario())


def test_replies_to_earlier_steps_are_skipped():
    """After a failover the client re-runs a step under a new id; a later hop may still answer the
    old id (it ran the failed peer's push): that reply is stale and skipped."""
    from client.remote import _read_result
    from swarm.messages import ErrorReply, Result

    def frame(header, tensors=()):
        return list(encode_frame(header, list(tensors), runtime_pb2.ExpertResponse))

    async def replies():
        for message in [
            *frame(Result(tensor_names=["hidden_states"], step_id=4), [torch.zeros(1, 1, 64)]),
            *frame(ErrorReply(code="invalid_request", message="stale", step_id=4)),
            *frame(Result(tensor_names=["hidden_states"], step_id=5, pushed=True), [torch.ones(1, 1, 64)]),
        ]:
            yield message

    (hidden_states,), header = asyncio.run(
        _read_result(FrameReader(replies()).read, "peer", {"hidden_states": torch.Size([1, 1, 64])}, step_id=5)
    )
    assert torch.equal(hidden_states, torch.ones(1, 1, 64)) and header.pushed


def test_a_push_that_fails_makes_the_client_send_the_step_itself(model, first_peer):
    """The first hop answers at once that it pushed; the second hop refuses the push (its session takes
    pushes from nobody), the first says so on its stream, and the client sends the step itself: the
    step ends with the same output as without pushes."""
    second_peer = _second_peer(model)
    step = BlockInputs(torch.randn(1, 3, 64))

    async def scenario():
        front, back = await _two_hops(model, first_peer, "refused-push", push_from=None)  # the back hop refuses pushes
        middle, header = await front.step(step, 0, step_id=0, push_to=[second_peer])
        assert header.pushed and header.compute_ms is not None
        output, _ = await asyncio.wait_for(back.step(BlockInputs(middle), 0, step_id=0, pushed_by=front), 20)
        front.close()
        back.close()
        return output

    output = run_coroutine(scenario())
    expected = forward(model, second_peer, 2, 4, BlockInputs(forward(model, first_peer, 0, 2, step)))
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


def test_a_pushed_step_that_never_comes_is_sent_by_the_client_after_a_grace(model, first_peer):
    """The previous hop promised a push, then went silent (a dead machine sends nothing to notice it
    by): after PUSH_GRACE_S the client sends the step itself, instead of waiting out the step timeout."""
    from client.remote import PUSH_GRACE_S

    second_peer = _second_peer(model)
    step = BlockInputs(torch.randn(1, 2, 64))

    async def scenario():
        silent, back = await _two_hops(model, first_peer, "silent-push", push_from=first_peer)  # silent is sent nothing
        started = asyncio.get_running_loop().time()
        output, _ = await asyncio.wait_for(back.step(step, 0, step_id=0, pushed_by=silent), 20)
        waited = asyncio.get_running_loop().time() - started
        silent.close()
        back.close()
        return output, waited

    output, waited = run_coroutine(scenario())
    assert waited >= PUSH_GRACE_S  # sent only once the grace was over (a lower bound, not a timing)
    torch.testing.assert_close(output, forward(model, second_peer, 2, 4, step), atol=1e-5, rtol=0)


def _second_peer(model) -> str:
    return next(peer_id for peer_id, span in model.sequence.spans.items() if span.start == 2)


async def _two_hops(model, first_peer: str, session_id: str, push_from: str | None) -> tuple[SpanStream, SpanStream]:
    """Streams of one session on the first peer (blocks 0:2) and the second (2:4, taking pushes from `push_from`)."""
    seq = model.sequence
    front = SpanStream(seq.p2p, first_peer, seq.dht_prefix, 0, 2, 30)
    back = SpanStream(seq.p2p, _second_peer(model), seq.dht_prefix, 2, 4, 30)
    await front.open(session_id, max_length=8, batch_size=1)
    await back.open(session_id, max_length=8, batch_size=1, push_from=push_from)
    return front, back
