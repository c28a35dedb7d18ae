"""A peer bounds what it buffers: a frame is refused from the sizes its tensors announce, before their
bytes arrive, and hostile calls that announce huge tensors and stall neither grow the peer's memory nor
keep an honest client from being served."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from peers.validation import Limits
from swarm import errors, protocol
from swarm.loop_thread import loop, run_coroutine
from swarm.messages import PEER_REPLY, ErrorReply, InferenceStep, OpenSession
from swarm.transport import FrameReader, decode_header, encode_frame

pytestmark = pytest.mark.timeout(600)

HIDDEN = 64  # the tiny model's hidden size
HOSTILE_CALLS = 60
CHUNK = 2**16  # bytes per hostile message
CHUNKS_PER_CALL = 64  # 4 MiB sent by each hostile call before it stalls: 240 MiB in all if a peer kept them
Request = runtime_pb2.ExpertRequest


# ---- FrameReader without sockets ---------------------------------------------------------------
class CountedStream:
    """An async stream of messages that counts how many were taken from it."""

    def __init__(self, messages: list[Request]):
        self.messages, self.taken = messages, 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> Request:
        if self.taken == len(self.messages):
            raise StopAsyncIteration
        self.taken += 1
        return self.messages[self.taken - 1]


def chunked(size: list[int], chunk_bytes: int, chunks: int, metadata: bytes = b"{}") -> list[Request]:
    """A float32 tensor announcing `size` in its first part, then `chunks` chunks in all, each its own message."""
    head = runtime_pb2.Tensor(dtype="float32", size=size, chunks=chunks, buffer=bytes(chunk_bytes))
    tail = [Request(tensors=[runtime_pb2.Tensor(buffer=bytes(chunk_bytes))]) for _ in range(chunks - 1)]
    return [Request(tensors=[head]), *tail, Request(metadata=metadata)]


def test_an_announced_oversized_tensor_is_refused_at_its_first_message():
    stream = CountedStream(chunked([1, 10**6, HIDDEN], 1024, 8))
    with pytest.raises(errors.InvalidRequestError, match="announces 256000000 bytes"):
        asyncio.run(FrameReader(stream, max_frame_bytes=2**20).read())
    assert stream.taken == 1


def test_chunks_beyond_the_announced_size_are_refused():
    stream = CountedStream(chunked([4, HIDDEN], 4 * HIDDEN * 4, 5))  # one chunk holds the whole tensor already
    with pytest.raises(errors.InvalidRequestError, match="beyond the size its header announced"):
        asyncio.run(FrameReader(stream, max_frame_bytes=2**20).read())
    assert stream.taken == 2


def test_frames_share_a_byte_budget_until_consumed():
    from swarm.transport import ByteBudget

    budget = ByteBudget(3000)
    tensor = chunked([256], 1024, 1)  # 1 KiB of float32

    async def scenario():
        first = FrameReader(CountedStream([*tensor, *tensor]), budget=budget)
        second = FrameReader(CountedStream(tensor * 3), budget=budget)
        assert await first.read() is not None and await second.read() is not None
        assert budget.used_bytes == 2048  # both frames are held until consumed
        with pytest.raises(errors.OverloadedError):
            await FrameReader(CountedStream(chunked([512], 2048, 1)), budget=budget).read()
        with pytest.raises(errors.InvalidRequestError, match="larger than the 3000"):  # could never fit: not transient
            await FrameReader(CountedStream(chunked([1024], 4096, 1)), budget=budget).read()
        assert budget.used_bytes == 2048  # a refused frame gives back what it took
        await first.read()  # the first frame is consumed; the next one takes its place
        second.release()
        assert budget.used_bytes == 1024
        await first.discard()
        assert budget.used_bytes == 0

    asyncio.run(scenario())


def test_the_frame_bound_is_what_a_largest_request_carries():
    limits = Limits(hidden_size=8, max_batch_size=4, max_length=32, lora_shapes={"q_proj": (8, 16), "o_proj": (16, 8)})
    blocks, rank = 3, 256
    largest = {
        "hidden_states": torch.zeros(4, 32, 8), "position_ids": torch.zeros(4, 32, dtype=torch.int64),
        "attention_mask": torch.zeros(4, 32, dtype=torch.int64), "prompts": torch.zeros(blocks, 4, 32, 8),
        "lora_a.q_proj": torch.zeros(blocks, rank, 8), "lora_b.q_proj": torch.zeros(blocks, 16, rank),
        "lora_a.o_proj": torch.zeros(blocks, rank, 16), "lora_b.o_proj": torch.zeros(blocks, 8, rank),
    }
    forward_bytes = sum(tensor.nbytes for tensor in largest.values())
    assert limits.frame_bytes(blocks=blocks) == forward_bytes
    assert limits.frame_bytes(blocks=blocks, backward=True) == forward_bytes + largest["hidden_states"].nbytes
    step_bytes = sum(largest[name].nbytes for name in ("hidden_states", "position_ids", "attention_mask"))
    assert limits.frame_bytes() == step_bytes
    assert limits.frame_bytes(tokens=2 * 8) == step_bytes * 16 // (4 * 32)


def test_stateless_calls_beyond_the_limit_are_overloaded(monkeypatch):
    from peers import handler

    monkeypatch.setattr(handler, "STATELESS_WAIT_S", 0.05)

    async def scenario():
        servicer = SimpleNamespace(_stateless_calls=asyncio.Semaphore(1))
        async with handler.BlockServicer._stateless_slot(servicer):
            with pytest.raises(errors.OverloadedError):
                async with handler.BlockServicer._stateless_slot(servicer):
                    pass
        async with handler.BlockServicer._stateless_slot(servicer):  # the first call's turn is over
            pass

    asyncio.run(scenario())


# ---- a live peer ------------------------------------------------------------------------------
def first_peer(model) -> str:
    run_coroutine(model.sequence.update())
    return next(peer_id for peer_id, span in model.sequence.spans.items() if span.start == 0)


def test_a_step_larger_than_its_session_is_refused_from_its_header(model):
    """A session's steps are bounded by its batch x max_length; the client still gets the reply when
    the refused frame ends its stream at once."""
    seq, peer_id = model.sequence, first_peer(model)

    async def call(attempt: int):
        opening = OpenSession(session_id=f"big-{attempt}", start_block=0, end_block=2, max_length=8, batch_size=1)
        step = InferenceStep(position=0, step_id=0, tensor_names=["hidden_states"])
        messages = [*encode_frame(opening, [], Request), *encode_frame(step, [torch.zeros(1, 9, HIDDEN)], Request)]

        async def requests():
            for message in messages:
                yield message

        reader = FrameReader(await protocol.stub(seq.p2p, PeerID.from_base58(peer_id), seq.dht_prefix).rpc_inference(requests()))
        while (frame := await reader.read()) is not None:
            header = decode_header(PEER_REPLY, frame[0])
            if isinstance(header, ErrorReply):
                return errors.error_from_wire(header.code, header.message)
        return None

    for attempt in range(10):
        error = run_coroutine(call(attempt))
        assert isinstance(error, errors.InvalidRequestError) and "announces 2304 bytes" in str(error), error


def hostile_messages(stop: threading.Event):
    """A forward announcing [1, 10**7, hidden] float32 (2.4 GiB), sent slowly, then stalled until `stop`."""
    head = runtime_pb2.Tensor(dtype="float32", size=[1, 10**7, HIDDEN], chunks=10**4, buffer=bytes(CHUNK))

    async def messages():
        yield Request(tensors=[head])
        for _ in range(CHUNKS_PER_CALL - 1):
            await asyncio.sleep(0.01)
            yield Request(tensors=[runtime_pb2.Tensor(buffer=bytes(CHUNK))])
        while not stop.is_set():
            await asyncio.sleep(0.1)

    return messages()


async def hostile_call(model, peer_id: str, stop: threading.Event):
    """The error the peer answers a hostile forward with, and the still open reply stream."""
    seq = model.sequence
    replies = await protocol.stub(seq.p2p, PeerID.from_base58(peer_id), seq.dht_prefix).rpc_forward(hostile_messages(stop))
    frame = await FrameReader(replies).read()
    header = decode_header(PEER_REPLY, frame[0]) if frame is not None else None
    error = errors.error_from_wire(header.code, header.message) if isinstance(header, ErrorReply) else header
    return error, replies


class PeakMemory:
    """The largest RSS of a process, sampled in a thread until stopped."""

    def __init__(self, process: psutil.Process):
        self.process, self.peak_bytes = process, process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def test_hostile_calls_announcing_huge_tensors_neither_grow_the_peer_nor_block_an_honest_client(
    model, reference, tiny_swarm
):
    peer_id = first_peer(model)
    peer = psutil.Process(next(node.pid for node in tiny_swarm.nodes[1:] if node.name.startswith("peer-0-2")))
    input_ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)  # warm: first allocations settled
    baseline_bytes = peer.memory_info().rss
    memory = PeakMemory(peer)
    stop = threading.Event()
    calls = [asyncio.run_coroutine_threadsafe(hostile_call(model, peer_id, stop), loop()) for _ in range(HOSTILE_CALLS)]
    try:
        deadline = time.monotonic() + 60
        while not all(call.done() for call in calls) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # let what the hostile calls sent meanwhile reach the peer
        with torch.no_grad():
            honest = model(input_ids).logits  # while the hostile requests are still open
        grown_mib = (memory.stop() - baseline_bytes) / 2**20
        answered = [call.result()[0] for call in calls if call.done()]
        codes = {code: sum(getattr(error, "code", None) == code for error in answered) for code in ("invalid_request", "overloaded")}
        print(f"{HOSTILE_CALLS} hostile calls: {codes}, {HOSTILE_CALLS - len(answered)} unanswered; peer RSS peak +{grown_mib:.1f} MiB")
        assert torch.allclose(honest, expected, atol=1e-5)
        assert grown_mib < 64, f"the peer buffered hostile frames: RSS grew {grown_mib:.0f} MiB"
        assert len(answered) == HOSTILE_CALLS
        assert all(isinstance(error, (errors.InvalidRequestError, errors.OverloadedError)) for error in answered), answered
    finally:
        stop.set()
        for call in calls:
            try:
                run_coroutine(call.result(timeout=30)[1].aclose())
            except Exception:  # never answered: nothing to close
                pass
