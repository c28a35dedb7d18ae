"""Every supported family, split into two stages the way peers run it (`swarm.models` + `BlockStack`,
each stage with its own cache) and a client's edge (`ClientParts`), in float32, bfloat16, int8 and
nf4: the same greedy tokens as transformers' generate() loaded the same way and the same full-forward
logits, from the saved checkpoint. No sockets."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarm import models
from swarm.architecture import SUPPORTED_MODEL_TYPES, Architecture, check_supported
from swarm.blocks import BlockInputs, BlockStack
from swarm.errors import UnsupportedModelError
from swarm.quantization import reference_config
from tests.families import FAMILIES, make_tiny_model

NEW_TOKENS = 12


def test_every_supported_family_has_a_tiny_model():
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


def _stages(source, config, split: int, dtype: torch.dtype = torch.float32, quantization: str = "none") -> list[BlockStack]:
    stages = []
    for start, end in ((0, split), (split, config.num_hidden_layers)):
        layers = [
            models.load_block(source, config, index, dtype=dtype, device="cpu", quantization=quantization) for index in range(start, end)
        ]
        stages.append(BlockStack(config, layers, start, models.load_rotary(config, device="cpu")))
    return stages


FORMATS = [("none", torch.float32), ("none", torch.bfloat16), ("int8", torch.float32), ("nf4", torch.float32)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("quantization, dtype", FORMATS, ids=["float32", "bfloat16", "int8", "nf4"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_family_split_in_two_equals_transformers(tmp_path, model_type, quantization, dtype):
    """In each number format, against transformers loaded the same way (BitsAndBytesConfig, dtype)."""
    path = make_tiny_model(model_type, tmp_path / model_type)
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=reference_config(quantization, dtype)
    ).eval()
    source = models.resolve_model(str(path))
    config = models.load_config(source)
    parts = models.load_client_parts(source, config, dtype=dtype, device="cpu")
    architecture = parts.architecture
    stages = _stages(source, config, 1 + len(model_type) % 3, dtype, quantization)  # splits after 1, 2 or 3 blocks

    def run(input_ids, caches=None):
        hidden_states = architecture.embed(parts.embed_tokens(input_ids))
        for stage, cache in zip(stages, caches or [None] * len(stages)):
            hidden_states = stage(BlockInputs(hidden_states), cache)
        return architecture.logits(parts.lm_head(parts.norm(hidden_states)))

    prompt = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.testing.assert_close(run(expected), reference(expected).logits, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    caches, tokens, step = [stage.new_cache() for stage in stages], prompt, prompt
    for _ in range(NEW_TOKENS):
        step = run(step, caches)[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, step], dim=1)
    assert torch.equal(tokens, expected)


def test_an_unsupported_family_is_refused_naming_the_supported_ones():
    from transformers import GPT2Config, T5Config

    for config in (GPT2Config(), T5Config()):
        with pytest.raises(UnsupportedModelError, match="supported: llama, mistral"):
            check_supported(config)
    Architecture.of(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
