"""The peer's serving path without sockets: rollback all or nothing, decode batching across sessions
on one adapter, the batcher stopped with the peer, and the handoff grace of each stack left."""

from __future__ import annotations

import asyncio
import concurrent.futures
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from peers import serving
from peers.batching import StepBatcher
from peers.compute import Row, Step, checked, run_turn
from peers.validation import Limits
from swarm import errors
from swarm.blocks import BlockInputs, BlockStack
from swarm.lora import AdapterId, LoraWeights, projection_shapes
from swarm.messages import OpenSession
from tests.fakes import make_servicer

pytestmark = pytest.mark.timeout(120)

HIDDEN = 64
WINDOW = 8
COMMON = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


def whole_stack(model) -> BlockStack:
    return BlockStack(model.config, list(model.model.layers), 0, model.model.rotary_emb)


def mixed_stack() -> BlockStack:
    """Four blocks, full and sliding-window attention in turn (window of WINDOW tokens)."""
    torch.manual_seed(0)
    config = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, layer_types=LAYER_TYPES)
    stack = whole_stack(Qwen2ForCausalLM(config).eval())
    assert stack.attention_types == LAYER_TYPES
    return stack


def filled_cache(stack: BlockStack, hidden_states: torch.Tensor, lora=None):
    cache = stack.new_cache()
    stack(BlockInputs(hidden_states, lora=lora), cache)
    return cache


def filled_in_steps(stack: BlockStack, hidden_states: torch.Tensor, sizes: list[int]):
    """A cache fed `hidden_states` [batch, seq, hidden] in steps of `sizes` tokens, as a peer runs steps."""
    cache, position = stack.new_cache(), 0
    for size in sizes:
        row = Row({"hidden_states": hidden_states[:, position : position + size]}, Limits(HIDDEN, 1, 64), cache, position)
        stack(checked(Step(stack, (0, 4), None, []), row), cache)
        position += size
    return cache


def test_a_rollback_past_a_sliding_window_is_refused_and_leaves_the_cache_as_it_was():
    stack = mixed_stack()
    prefix = torch.randn(1, 14, HIDDEN)  # [batch, seq, hidden]: more than the window, in steps of 12, 1 and 1
    cache, untouched = filled_in_steps(stack, prefix, [12, 1, 1]), filled_in_steps(stack, prefix, [12, 1, 1])
    lengths = [cache.get_seq_length(index) for index in range(4)]
    keys = [layer.keys.clone() for layer in cache.layers]
    step = {"hidden_states": torch.randn(1, 1, HIDDEN)}
    with pytest.raises(errors.SwarmError) as refusal:  # a client regenerating from token 10: before the last step
        checked(Step(stack, (0, 4), None, []), Row(step, Limits(HIDDEN, 1, 64), cache, 10))
    assert [cache.get_seq_length(index) for index in range(4)] == lengths == [14, 14, 14, 14]
    assert all(torch.equal(layer.keys, before) for layer, before in zip(cache.layers, keys))
    # the session goes on where it was, as on a cache nobody tried to roll back
    inputs = BlockInputs(step["hidden_states"])
    assert torch.equal(stack(inputs, cache), stack(inputs, untouched))
    assert isinstance(refusal.value, errors.CacheRollbackError)
    assert "sliding window" in str(refusal.value) and not refusal.value.transient


@pytest.mark.parametrize("sizes, back_to", [([12, 5], 13), ([12, 5], 12), ([3, 9], 4), ([20], 9)])
def test_the_last_step_can_be_taken_back_past_a_sliding_window(sizes, back_to):
    """What a speculative round needs: any of the last step's tokens go back, in every layer, and the
    session then computes what a cache that never saw them computes."""
    stack = mixed_stack()
    hidden_states = torch.randn(1, sum(sizes), HIDDEN)  # [batch, seq, hidden]
    cache = filled_in_steps(stack, hidden_states, sizes)
    shorter = filled_in_steps(stack, hidden_states, [size for size in [*sizes[:-1], back_to - sum(sizes[:-1])] if size])
    step = torch.randn(1, 2, HIDDEN)
    row = Row({"hidden_states": step}, Limits(HIDDEN, 1, 64), cache, back_to)
    inputs = checked(Step(stack, (0, 4), None, []), row)
    assert [cache.get_seq_length(index) for index in range(4)] == [back_to] * 4
    other = checked(Step(stack, (0, 4), None, []), Row({"hidden_states": step}, Limits(HIDDEN, 1, 64), shorter, back_to))
    assert torch.allclose(stack(inputs, cache), stack(other, shorter), atol=1e-5)
    assert all(layer.keys.shape[-2] <= WINDOW - 1 + 2 for layer, kind in zip(cache.layers, LAYER_TYPES) if kind == "sliding_attention")


def test_a_rollback_within_the_window_goes_back_in_every_layer():
    stack = mixed_stack()
    prefix = torch.randn(1, 6, HIDDEN)  # [batch, seq, hidden]: less than the window
    cache, shorter = filled_cache(stack, prefix), filled_cache(stack, prefix[:, :4])
    stack.rollback(cache, (0, 4), 4)
    assert [cache.get_seq_length(index) for index in range(4)] == [4, 4, 4, 4]
    inputs = BlockInputs(torch.randn(1, 2, HIDDEN))
    assert torch.allclose(stack(inputs, cache), stack(inputs, shorter), atol=1e-6)


# ---- servicers without a network ------------------------------------------------------------------
def llama_stack() -> BlockStack:
    torch.manual_seed(0)
    return whole_stack(LlamaForCausalLM(LlamaConfig(**COMMON)).eval())


def test_closing_the_servicer_stops_its_batcher():
    stack = llama_stack()

    async def run():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            peer = make_servicer(stack, executor)
            cache = filled_cache(stack, torch.randn(1, 3, HIDDEN))
            job = Step(stack, (0, 4), None, [Row({"hidden_states": torch.randn(1, 1, HIDDEN)}, Limits(HIDDEN, 1, 64), cache, 3)])
            await peer.scheduler.step(job)
            worker = peer.scheduler.batcher._worker
            assert worker is not None and not worker.done()
            await peer.close()
            assert worker.done() and worker.cancelled()
            assert peer.serving.closing
            with pytest.raises(errors.PeerUnavailableError):
                await peer.scheduler.step(job)
            assert peer.scheduler.batcher._worker is worker  # no new worker after closing

    asyncio.run(run())


def test_steps_waiting_in_a_closed_batcher_fail_instead_of_hanging():
    async def run():
        never = asyncio.Event()

        async def run_compute(job):
            await never.wait()

        batcher = StepBatcher(run_compute, lambda items: items, max_steps=1)
        steps = [asyncio.create_task(batcher.submit(name)) for name in ("running", "waiting")]
        await asyncio.sleep(0.01)  # the first turn is running, the second step waits
        batcher.close()
        await batcher.wait_closed()
        async with asyncio.timeout(5):
            return await asyncio.gather(*steps, return_exceptions=True)

    results = asyncio.run(run())
    assert [type(result) for result in results] == [errors.PeerUnavailableError] * 2


def random_adapter(stack: BlockStack, rank: int = 4) -> LoraWeights:
    shapes = projection_shapes(stack.config)
    a = {name: torch.randn(4, rank, shapes[name][0]) * 0.1 for name in ("q_proj", "v_proj", "down_proj")}
    b = {name: torch.randn(4, shapes[name][1], rank) * 0.1 for name in a}
    return LoraWeights(scaling=2.0, a=a, b=b)


def test_decode_steps_of_two_sessions_on_one_adapter_share_a_forward(monkeypatch):
    stack = llama_stack()
    span, limits = (0, 4), Limits(HIDDEN, 1, 64)
    prefixes = [torch.randn(1, 5, HIDDEN), torch.randn(1, 3, HIDDEN)]  # [batch, seq, hidden] each
    steps = [torch.randn(1, 1, HIDDEN) for _ in prefixes]
    forwards = []
    step_batch = stack.step_batch
    monkeypatch.setattr(stack, "step_batch", lambda rows, span: forwards.append(len(rows)) or step_batch(rows, span))

    async def run():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            peer = make_servicer(stack, executor, adapters={AdapterId("tuned", "0" * 16): random_adapter(stack)})
            opening = OpenSession(session_id="s", start_block=span[0], end_block=span[1], max_length=64, batch_size=1, adapter="tuned")
            adapters = [peer.serving.adapter_weights(opening, span) for _ in prefixes]  # each session asks for its own
            caches = [filled_cache(stack, prefix, adapter) for prefix, adapter in zip(prefixes, adapters)]
            jobs = [
                Step(stack, span, adapter, [Row({"hidden_states": step}, limits, cache, cache.get_seq_length(0))])
                for adapter, cache, step in zip(adapters, caches, steps)
            ]
            results = await asyncio.gather(*(peer.scheduler.step(job) for job in jobs))
            await peer.close()
            return [output for ((_, output),) in results], adapters[0]

    outputs, adapter = asyncio.run(run())
    assert forwards == [2]
    for prefix, step, output in zip(prefixes, steps, outputs):
        alone = stack(BlockInputs(step, lora=adapter), filled_cache(stack, prefix, adapter))
        assert torch.allclose(output, alone, atol=1e-5)


def test_a_batched_decode_of_one_session_on_an_adapter_applies_it_to_every_row():
    """A batched session's rows (`peers.slots`) on an adapter: one forward, LoRA included."""
    stack = llama_stack()
    span, limits = (0, 4), Limits(HIDDEN, 1, 64)
    adapter = random_adapter(stack)
    prefixes = [torch.randn(1, 5, HIDDEN), torch.randn(1, 3, HIDDEN)]
    steps = [torch.randn(1, 1, HIDDEN) for _ in prefixes]
    rows = [Row({"hidden_states": step}, limits, filled_cache(stack, prefix, adapter), prefix.shape[1]) for prefix, step in zip(prefixes, steps)]
    (result,) = run_turn([Step(stack, span, adapter, rows, batched=True)])
    outputs = [output for _, output in result]
    for prefix, step, output in zip(prefixes, steps, outputs):
        alone = stack(BlockInputs(step, lora=adapter), filled_cache(stack, prefix, adapter))
        assert torch.allclose(output, alone, atol=1e-5)


def test_each_stack_left_keeps_its_own_handoff_grace(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(serving, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    model = LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    layers = list(model.model.layers)
    first, second, third = (BlockStack(model.config, layers[a:b], a, model.model.rotary_emb) for a, b in [(0, 2), (1, 3), (2, 4)])
    peer = make_servicer(first, executor=None, batch_steps=1).serving
    grace_s = 10.0
    peer.switch(second, grace_s)  # left `first` at 100
    now[0] = 105.0
    peer.switch(third, grace_s)  # left `second` at 105
    now[0] = 109.0
    peer.check(first)
    peer.check(second)
    now[0] = 111.0  # past the grace of `first`, within that of `second`
    with pytest.raises(errors.BlocksNotServedError):
        peer.check(first)
    peer.check(second)
    peer.check(third)
    now[0] = 116.0
    with pytest.raises(errors.BlocksNotServedError):
        peer.check(second)
    peer.check(third)

