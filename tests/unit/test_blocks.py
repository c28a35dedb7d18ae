"""BlockStack against the model's own forward, without sockets: slices, caches, padding, rollback."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from swarm import kernels
from swarm.blocks import BlockInputs, BlockStack

pytestmark = pytest.mark.timeout(120)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2)).eval()


def stacks(model, cuts=(0, 1, 3, 4)) -> list[BlockStack]:
    layers = list(model.model.layers)
    return [BlockStack(model.config, layers[a:b], a, model.model.rotary_emb) for a, b in zip(cuts, cuts[1:])]


def run_chain(model, chain, input_ids, attention_mask=None, caches=None):
    hidden = model.model.embed_tokens(input_ids)
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    for index, stack in enumerate(chain):
        hidden = stack(BlockInputs(hidden, position_ids, attention_mask), caches[index] if caches else None)
    return model.lm_head(model.model.norm(hidden))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_chain_of_slices_equals_whole_model(kind):
    model = build(kind)
    input_ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        expected = model(input_ids).logits
    assert torch.allclose(run_chain(model, stacks(model), input_ids), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_chunked_prefill_and_decode_with_cache_equal_full_forward(kind):
    model = build(kind)
    input_ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        expected = model(input_ids).logits
    chain = stacks(model)
    caches = [stack.new_cache() for stack in chain]
    pieces = [input_ids[:, :10], input_ids[:, 10:17], *input_ids[:, 17:].split(1, dim=1)]
    logits = torch.cat([run_chain(model, chain, piece, caches=caches) for piece in pieces], dim=1)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_left_padding_mask_matches_model():
    model = build("llama")
    input_ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(input_ids)
    mask[0, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
    actual = run_chain(model, stacks(model), input_ids, attention_mask=mask)
    assert torch.allclose(actual[mask.bool()], expected[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_cache_rollback_then_regenerate(kind):
    model = build(kind)
    chain = stacks(model, cuts=(0, 2, 4))
    caches = [stack.new_cache() for stack in chain]
    input_ids = torch.randint(0, 128, (1, 7))
    run_chain(model, chain, input_ids, caches=caches)
    for stack, cache in zip(chain, caches):
        stack.rollback(cache, (stack.start_block, stack.end_block), 6)
        assert stack.cache_length(cache, stack.start_block) == 6
    again = run_chain(model, chain, input_ids[:, 6:], caches=caches)
    with torch.no_grad():
        expected = model(input_ids).logits[:, 6:]
    assert torch.allclose(again, expected, atol=1e-5)


def test_sub_span_of_a_stack():
    model = build("llama")
    (stack,) = stacks(model, cuts=(0, 4))
    hidden = torch.randn(1, 5, 64)
    part = stack(BlockInputs(hidden), span=(1, 3))
    (reference,) = stacks(model, cuts=(1, 3))
    assert torch.allclose(part, reference(BlockInputs(hidden)), atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_backward_through_slices_equals_autograd(kind):
    model = build(kind)
    embeds = model.model.embed_tokens(torch.randint(0, 128, (2, 12))).detach().requires_grad_(True)
    weights = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(1))
    (model(inputs_embeds=embeds).logits * weights).sum().backward()
    expected = embeds.grad

    chain, hidden, entered = stacks(model), embeds.detach(), []
    for stack in chain:
        entered.append(hidden)
        hidden = stack(BlockInputs(hidden))
    final = hidden.clone().requires_grad_(True)
    (model.lm_head(model.model.norm(final)) * weights).sum().backward()
    grad = final.grad
    for stack, inputs in zip(reversed(chain), reversed(entered)):
        grad, _, _ = stack.backward(BlockInputs(inputs), grad)
    assert torch.allclose(grad, expected, atol=1e-5), (grad - expected).abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decode_steps_of_several_sessions_in_one_batch_equal_each_alone(kind):
    """Sessions with different lengths (one a left-padded batch of two) decode in one batched forward
    (`step_batch`): the same outputs and caches as each session alone (qwen2's sliding layers: alone)."""
    model = build(kind)
    chain = stacks(model, cuts=(0, 4))
    stack = chain[0]
    torch.manual_seed(1)
    prompts = [torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 12)), torch.randint(0, 128, (2, 8))]
    masks = [None, None, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])]

    def prefill():
        caches = [stack.new_cache() for _ in prompts]
        for ids, mask, cache in zip(prompts, masks, caches):
            run_chain(model, [stack], ids, mask, caches=[cache])
        return caches

    alone, batched = prefill(), prefill()
    tokens = [ids[:, -1:] for ids in prompts]
    full_masks = list(masks)
    for _ in range(4):
        steps, expected = [], []
        for index, (token, cache, mask) in enumerate(zip(tokens, alone, full_masks)):
            length = stack.cache_length(cache, 0)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
                full_masks[index] = mask
            position = (mask.cumsum(-1) - 1)[:, -1:] if mask is not None else torch.tensor([[length]])
            inputs = BlockInputs(model.model.embed_tokens(token), position, mask)
            expected.append(stack(inputs, cache))
            steps.append((inputs, batched[index]))
        outputs = stack.step_batch(steps, (0, 4))
        for got, want in zip(outputs, expected):
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        tokens = [model.lm_head(model.model.norm(out))[:, -1:].argmax(-1) for out in expected]
    for cache_alone, cache_batched in zip(alone, batched):
        for index in range(4):
            assert torch.allclose(cache_alone.layers[index].keys, cache_batched.layers[index].keys, atol=1e-5)


def test_packed_steps_of_several_sequences_equal_each_alone():
    """Sequences with caches of different lengths (one empty) and different numbers of new tokens run
    side by side in one forward (`step_packed`): the same outputs and caches as each alone."""
    model = build("llama")
    stack = stacks(model, cuts=(0, 4))[0]
    torch.manual_seed(2)
    prompts = [torch.randint(0, 128, (1, length)) for length in (6, 0, 11, 3)]
    new = [torch.randint(0, 128, (1, count)) for count in (1, 5, 1, 4)]

    def prefilled():
        caches = [stack.new_cache() for _ in prompts]
        for ids, cache in zip(prompts, caches):
            if ids.shape[1]:
                stack(BlockInputs(model.model.embed_tokens(ids)), cache)
        return caches

    alone, packed = prefilled(), prefilled()
    with torch.no_grad():
        expected = [stack(BlockInputs(model.model.embed_tokens(ids)), cache) for ids, cache in zip(new, alone)]
        got = stack.step_packed([(BlockInputs(model.model.embed_tokens(ids)), cache) for ids, cache in zip(new, packed)], (0, 4))
        follow = [torch.randint(0, 128, (1, 1)) for _ in prompts]  # a decode step after: the caches line up
        expected += [stack(BlockInputs(model.model.embed_tokens(ids)), cache) for ids, cache in zip(follow, alone)]
        got += stack.step_batch([(BlockInputs(model.model.embed_tokens(ids)), cache) for ids, cache in zip(follow, packed)], (0, 4))
    for want, have in zip(expected, got):
        assert want.shape == have.shape and torch.allclose(want, have, atol=1e-5), (want - have).abs().max()
    for cache_alone, cache_packed in zip(alone, packed):
        for index in range(4):
            assert torch.allclose(cache_alone.layers[index].keys, cache_packed.layers[index].keys, atol=1e-5)


def test_rows_linear_is_f_linear_bit_for_bit_outside_batched_steps():
    """`swarm.kernels.linear`: the same bits as `F.linear` for any row count outside `batched_rows()`
    (from 16 rows it takes another route to the same kernel), within float32 rounding inside it;
    bias, bfloat16 and small weights always go to `F.linear`."""
    torch.manual_seed(0)
    weight = torch.randn(1536, 576)
    for rows in (1, 4, 8, 12, 16, 40, 63, 64, 100):
        x = torch.randn(2, rows, 576)[:1]
        expected = torch.nn.functional.linear(x, weight)
        assert torch.equal(kernels.linear(x, weight), expected), rows
        with kernels.batched_rows():
            got = kernels.linear(x, weight)
        assert got.shape == expected.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    layer = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False), torch.nn.Linear(1536, 8))
    kernels.use_rows_linear(layer)
    assert type(layer[0]) is kernels.RowsLinear and type(layer[1]) is torch.nn.Linear  # a bias keeps F.linear
    x = torch.randn(1, 10, 576).bfloat16()
    with kernels.batched_rows():
        assert torch.equal(kernels.linear(x, weight.bfloat16()), torch.nn.functional.linear(x, weight.bfloat16()))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_inputs_without_defaults_give_the_same_outputs_bit_for_bit(kind):
    """What a client leaves out of a step (positions in order, a mask of ones) changes nothing, in a
    prefill and in the decode steps after it; a mask with padding and shifted positions are kept."""
    model = build(kind)
    (stack,) = stacks(model, cuts=(0, 4))
    given, bare = stack.new_cache(), stack.new_cache()
    hidden = torch.randn(1, 12, 64)
    with torch.no_grad():
        for position, length in [(0, 12), (12, 1), (13, 1), (14, 3)]:
            inputs = BlockInputs(
                hidden[:, :length], torch.arange(position, position + length)[None],
                torch.ones(1, position + length, dtype=torch.int64),
            )
            stripped = inputs.without_defaults(position)
            assert stripped.position_ids is None and stripped.attention_mask is None
            assert torch.equal(stack(inputs, given), stack(stripped, bare))
    padded = torch.ones(2, 5, dtype=torch.int64)
    padded[0, :2] = 0
    kept = BlockInputs(torch.randn(2, 1, 64), torch.tensor([[2], [4]]), padded).without_defaults(4)
    assert kept.attention_mask is padded and kept.position_ids is not None
    shifted = BlockInputs(torch.randn(1, 2, 64), torch.tensor([[7, 8]]), torch.ones(1, 2, dtype=torch.int64))
    assert shifted.without_defaults(0).position_ids is not None and shifted.without_defaults(0).attention_mask is None
