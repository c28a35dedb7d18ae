"""The peer's serving pipeline as a unit: sessions, pushes between hops, batching and rollback through
in-process servicers and a fake client stream (tests/fakes.py). No sockets, no subprocesses: what goes
through the peers is compared with the blocks run directly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm import errors
from swarm.blocks import BlockInputs, BlockStack
from swarm.messages import InferenceStep, OpenSession, SlotStep
from tests.fakes import ClientStream, make_servicer

HIDDEN = 32
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def stack_of(model, start: int, end: int) -> BlockStack:
    return BlockStack(model.config, list(model.model.layers)[start:end], start, model.model.rotary_emb)


def reference(model, *pieces: torch.Tensor) -> list[torch.Tensor]:
    """Each piece's outputs through all four blocks, continuing one cache (what a session must give)."""
    stack = stack_of(model, 0, 4)
    cache = stack.new_cache()
    return [stack(BlockInputs(piece), cache) for piece in pieces]


def open_session(session_id: str, start: int, end: int, **extra) -> OpenSession:
    return OpenSession(session_id=session_id, start_block=start, end_block=end, max_length=32, batch_size=1, **extra)


def step(position: int, step_id: int, **extra) -> InferenceStep:
    return InferenceStep(position=position, step_id=step_id, tensor_names=["hidden_states"], **extra)


def run(coroutine_function):
    async def with_executor():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            return await coroutine_function(executor)

    return asyncio.run(with_executor())


def test_a_session_prefills_decodes_and_regenerates_exactly(model):
    prompt, first, second, other = (torch.randn(1, count, HIDDEN) for count in (5, 1, 1, 1))
    expected = reference(model, prompt, first, second)
    regenerated = reference(model, prompt, first, other)[-1]

    async def session(executor):
        servicer = make_servicer(stack_of(model, 0, 4), executor)
        client = ClientStream(servicer)
        client.send(open_session("s", 0, 4))
        await client.receive()  # opened
        outputs = []
        for number, (position, piece) in enumerate([(0, prompt), (5, first), (6, second)]):
            client.send(step(position, number), [piece])
            header, tensors = await client.receive()
            assert header.step_id == number and not header.pushed
            outputs.append(tensors["hidden_states"])
        client.send(step(6, 3), [other])  # the last token again, another choice: the cache rolls back one token
        outputs.append((await client.receive())[1]["hidden_states"])
        await client.close()
        await servicer.close()
        return outputs

    outputs = run(session)
    for output, want in zip(outputs, [*expected, regenerated]):
        torch.testing.assert_close(output, want, atol=1e-5, rtol=0)


async def two_hops(model, executor, push_from: str | None) -> tuple[ClientStream, ClientStream]:
    """A session open on two in-process peers, "front" (blocks 0:2) and "back" (2:4, taking pushes from `push_from`)."""
    peers: dict = {}
    front = make_servicer(stack_of(model, 0, 2), executor, peer_id="front", peers=peers)
    back = make_servicer(stack_of(model, 2, 4), executor, peer_id="back", peers=peers)
    to_front, to_back = ClientStream(front), ClientStream(back)
    to_front.send(open_session("s", 0, 2))
    to_back.send(open_session("s", 2, 4, push_from=push_from))
    await to_front.receive()
    await to_back.receive()
    return to_front, to_back


def test_a_step_pushed_by_the_previous_hop_runs_once_and_the_reply_says_so(model):
    prompt, token = torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN)
    expected = reference(model, prompt, token)

    async def chain(executor):
        to_front, to_back = await two_hops(model, executor, push_from="front")
        outputs = []
        for number, (position, piece) in enumerate([(0, prompt), (4, token)]):
            to_front.send(step(position, number, push_to=["back"]), [piece])
            header, _ = await to_front.receive()
            assert header.pushed  # the front's output is on its way to the back hop: the client sends it nothing
            header, tensors = await to_back.receive()
            assert header.step_id == number
            outputs.append(tensors["hidden_states"])
        # the client's own copy of a pushed step (sent before it learnt of the push) runs no second time
        to_back.send(step(4, 1), [torch.zeros(1, 1, HIDDEN)])
        to_back.send(step(5, 2), [torch.zeros(1, 1, HIDDEN)])
        header, _ = await to_back.receive()
        assert header.step_id == 2
        for stream in (to_front, to_back):
            await stream.close()
        return outputs

    outputs = run(chain)
    for output, want in zip(outputs, expected):
        torch.testing.assert_close(output, want, atol=1e-5, rtol=0)


def test_a_push_that_does_not_arrive_is_followed_by_a_notice_and_the_client_sends_the_step(model):
    """The front hop answers before the back hop took its push (waiting would cost a round trip per
    hop); when the push is refused (here: the back hop takes pushes from nobody), a PushFailed for that
    step follows on the front's stream, and the step the client then sends runs as usual."""
    prompt = torch.randn(1, 4, HIDDEN)
    expected = reference(model, prompt)[0]

    async def chain(executor):
        to_front, to_back = await two_hops(model, executor, push_from=None)  # the back hop refuses pushes
        to_front.send(step(0, 7, push_to=["back"]), [prompt])
        header, tensors = await to_front.receive()
        assert header.type == "result" and header.pushed
        notice, _ = await to_front.receive()
        assert notice.type == "push_failed" and notice.step_id == 7
        to_back.send(step(0, 7), [tensors["hidden_states"]])
        header, tensors = await to_back.receive()
        for stream in (to_front, to_back):
            await stream.close()
        return header, tensors["hidden_states"]

    header, output = run(chain)
    assert header.step_id == 7 and header.compute_ms is not None and header.compute_ms >= 0
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


def test_decode_steps_of_concurrent_sessions_share_a_turn(model):
    prompts = [torch.randn(1, count, HIDDEN) for count in (3, 6, 4)]
    tokens = [torch.randn(1, 1, HIDDEN) for _ in prompts]
    expected = [reference(model, prompt, token)[-1] for prompt, token in zip(prompts, tokens)]

    async def sessions(executor):
        servicer = make_servicer(stack_of(model, 0, 4), executor)
        clients = [ClientStream(servicer, caller=f"client-{number}") for number in range(len(prompts))]
        for number, (client, prompt) in enumerate(zip(clients, prompts)):
            client.send(open_session(f"s{number}", 0, 4))
            await client.receive()
            client.send(step(0, 0), [prompt])
            await client.receive()
        release = threading.Event()
        hold = asyncio.ensure_future(servicer.scheduler.run(lambda: release.wait(10)))  # the decode steps queue up meanwhile
        for client, prompt, token in zip(clients, prompts, tokens):
            client.send(step(prompt.shape[1], 1), [token])
        await asyncio.sleep(0.2)
        release.set()
        await hold
        outputs = [(await client.receive())[1]["hidden_states"] for client in clients]
        stats = servicer.scheduler.stats
        for client in clients:
            await client.close()
        await servicer.close()
        return outputs, stats

    outputs, stats = run(sessions)
    assert stats["batched_steps"] >= 2, stats  # the waiting decode steps ran as one batch
    for output, want in zip(outputs, expected):
        torch.testing.assert_close(output, want, atol=1e-5, rtol=0)


def test_a_refused_step_keeps_the_session_and_its_cache(model):
    prompt, token = torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN)
    expected = reference(model, prompt, token)[-1]

    async def session(executor):
        servicer = make_servicer(stack_of(model, 0, 4), executor)
        client = ClientStream(servicer)
        client.send(open_session("s", 0, 4))
        await client.receive()
        client.send(step(0, 0), [prompt])
        await client.receive()
        client.send(step(9, 1), [token])  # past what the cache holds: refused before any compute
        with pytest.raises(errors.InvalidRequestError, match="cache holds 4 tokens"):
            await client.receive()
        client.send(step(4, 2), [token])
        output = (await client.receive())[1]["hidden_states"]
        await client.close()
        await servicer.close()
        return output

    torch.testing.assert_close(run(session), expected, atol=1e-5, rtol=0)


def test_a_batched_session_steps_its_slots_together(model):
    prompts = [torch.randn(1, count, HIDDEN) for count in (3, 5)]
    tokens = [torch.randn(1, 1, HIDDEN) for _ in prompts]
    expected = [reference(model, prompt, token) for prompt, token in zip(prompts, tokens)]

    async def session(executor):
        servicer = make_servicer(stack_of(model, 0, 4), executor)
        client = ClientStream(servicer)
        client.send(OpenSession(session_id="b", start_block=0, end_block=4, max_length=16, batch_size=1, slots=2))
        await client.receive()
        client.send(SlotStep(step_id=0, starts=[0, 1], start_lengths=[8, 8]))
        await client.receive()
        client.send(SlotStep(step_id=1, slots=[0, 1], positions=[0, 0], tokens=[3, 5], tensor_names=["hidden_states"]),
                    [torch.cat(prompts, dim=1)])
        prefill = (await client.receive())[1]["hidden_states"]
        client.send(SlotStep(step_id=2, slots=[0, 1], positions=[3, 5], tokens=[1, 1], tensor_names=["hidden_states"]),
                    [torch.cat(tokens, dim=1)])
        decode = (await client.receive())[1]["hidden_states"]
        await client.close()
        await servicer.close()
        return prefill, decode

    prefill, decode = run(session)
    torch.testing.assert_close(prefill, torch.cat([want[0] for want in expected], dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(decode, torch.cat([want[1] for want in expected], dim=1), atol=1e-5, rtol=0)


def test_a_session_goes_on_while_stateless_calls_hold_the_whole_read_budget(model):
    """The byte budget bounds what stateless calls buffer; a busy peer refuses new calls, it does not end the
    sessions it serves (their frames are bounded by their own batch x length)."""
    prompt = torch.randn(1, 4, HIDDEN)
    expected = reference(model, prompt)[0]

    async def session(executor):
        servicer = make_servicer(stack_of(model, 0, 4), executor)
        servicer.request_buffer.used_bytes = servicer.request_buffer.total_bytes  # every byte held by other calls
        client = ClientStream(servicer)
        client.send(open_session("s", 0, 4))
        await client.receive()
        client.send(step(0, 0), [prompt])
        output = (await client.receive())[1]["hidden_states"]
        await client.close()
        await servicer.close()
        return output

    torch.testing.assert_close(run(session), expected, atol=1e-5, rtol=0)
