"""Exactness on the default model, SmolLM2-135M-Instruct split over three peers (0:10, 10:20, 20:30)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import AutoDistributedModelForCausalLM, SwarmClient

pytestmark = [pytest.mark.timeout(600), pytest.mark.smollm2]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
GREEDY = dict(do_sample=False, max_new_tokens=64, min_new_tokens=64)


@pytest.fixture(scope="module")
def model(smollm2_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=smollm2_swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tokenizer(model):
    return AutoTokenizer.from_pretrained(model.name_or_path)


@pytest.fixture(scope="module")
def reference(model):
    return AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32).eval()


def test_route_spans_three_peers(model):
    with model.inference_session(max_length=16) as session:
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1)
        assert [(start, end) for _, start, end in session.route] == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_equal_transformers(model, reference, tokenizer, prompt):
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(model.generate(input_ids, **GREEDY), reference.generate(input_ids, **GREEDY))


def test_capital_of_france(model, tokenizer):
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(input_ids, max_new_tokens=4, do_sample=False)[0, input_ids.shape[1]:])
    assert "Paris" in text


def test_full_forward_logits_within_1e_4(model, reference, tokenizer):
    input_ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert (model(input_ids).logits - expected).abs().max() < 1e-4


def test_padded_batch_equals_transformers(model, reference, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    kwargs = dict(**batch, do_sample=False, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))


def test_sampling_with_seed_equals_transformers(model, reference, tokenizer):
    input_ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    kwargs = dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=32)
    torch.manual_seed(2024)
    expected = reference.generate(input_ids, **kwargs)
    torch.manual_seed(2024)
    assert torch.equal(model.generate(input_ids, **kwargs), expected)


def test_multi_turn_chat_session(model, reference, tokenizer):
    turns = ["What is the capital of France?", "And of Italy?"]
    conversation: list[dict] = []
    expected = None
    with model.inference_session(max_length=512):
        for turn in turns:
            conversation.append({"role": "user", "content": turn})
            prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids
            actual = model.generate(prompt, do_sample=False, max_new_tokens=24)
            expected = reference.generate(prompt, do_sample=False, max_new_tokens=24)
            assert torch.equal(actual, expected)
            reply = tokenizer.decode(actual[0, prompt.shape[1]:], skip_special_tokens=True)
            conversation.append({"role": "assistant", "content": reply})


def test_long_prompt_activations_above_4_mib(model, reference, tokenizer):
    text = " ".join(f"Item {index} is on the list." for index in range(300))
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :1900]
    assert input_ids.shape[1] * model.config.hidden_size * 4 > 4 * 2**20  # fp32 activations over hivemind's cap
    kwargs = dict(do_sample=False, max_new_tokens=8)
    assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))


def test_text_client_generate_and_stream(smollm2_swarm):
    with SwarmClient(initial_peers=smollm2_swarm.initial_peers) as client:
        text = client.generate("The capital of France is", max_new_tokens=8)
        assert "Paris" in text
        pieces = list(client.stream("The capital of France is", max_new_tokens=8))
        assert "".join(pieces) == text
        abandoned = client.stream("Once upon a time", max_new_tokens=500)
        assert next(abandoned)
        abandoned.close()  # stops the generation behind it instead of running 500 tokens
        sampled = [client.generate("Once upon a time", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5) for _ in range(2)]
        assert sampled[0] == sampled[1]
