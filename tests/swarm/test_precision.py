"""Peers in other number formats: int8 and nf4 blocks (bitsandbytes) equal transformers loaded with the
same BitsAndBytesConfig, bfloat16 blocks equal transformers in bfloat16, and a route may mix dtypes.

One swarm of the tiny model: int8 and nf4 peers on 0:2 and 2:4, bfloat16 peers on 0:2 and 2:4, and
a float32 peer on 0:2. Clients pick formats with ClientConfig.quantizations and dtypes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm import quantization
from swarm.config import ClientConfig
from swarm.errors import FormatNotServedError
from swarm.loop_thread import run_coroutine
from swarm.tools.local import LocalSwarm
from tests.conftest import PEER_ENV

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

GREEDY = dict(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
PEERS = [("0:2", "int8", "float32"), ("2:4", "int8", "float32"), ("0:2", "nf4", "float32"), ("2:4", "nf4", "float32"),
         ("0:2", "none", "bfloat16"), ("2:4", "none", "bfloat16"), ("0:2", "none", "float32")]


@pytest.fixture(scope="module")
def swarm(tiny_model_path, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("precision-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks, quant, dtype in PEERS:
            swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--quant", quant, "--dtype", dtype], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        yield swarm


def client(swarm, path, *, dtype=torch.float32, **options):
    config = ClientConfig(route_wait_s=5, **options)
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers, client_config=config, torch_dtype=dtype)


def prompts(count: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_peers_equal_transformers_with_the_same_bitsandbytes_config(swarm, tiny_model_path, quant):
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, quantization_config=quantization.reference_config(quant, torch.float32), dtype=torch.float32
    ).eval()
    model = client(swarm, tiny_model_path, quantizations=[quant])
    try:
        input_ids = prompts(2, 17, seed=0)
        with torch.no_grad():
            expected = reference(input_ids).logits
        actual = model(input_ids).logits
        assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()  # float32 rounding of a split forward
        for seed in range(3):
            input_ids = prompts(1, 5 + 4 * seed, seed=seed)
            assert torch.equal(model.generate(input_ids, **GREEDY), reference.generate(input_ids, **GREEDY)), f"prompt {seed}"
        first, second = prompts(1, 6, seed=8), prompts(1, 4, seed=9)
        with model.inference_session(max_length=128):
            turn1 = model.generate(first, **GREEDY)
            turn2 = model.generate(second, **GREEDY)
        expected1 = reference.generate(first, **GREEDY)
        assert torch.equal(turn1, expected1)
        assert torch.equal(turn2, reference.generate(torch.cat([expected1, second], dim=1), **GREEDY))
        precisions = {span.record.precision for span in model.sequence.spans.values()}
        assert {f"{quant}/float32", "bfloat16", "float32"} <= precisions  # every peer announces its format
    finally:
        model.close()


def test_bfloat16_peers_equal_transformers_in_bfloat16(swarm, tiny_model_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).eval()
    model = client(swarm, tiny_model_path, dtype=torch.bfloat16, dtypes=["bfloat16"])
    try:
        input_ids = prompts(2, 17, seed=0)
        with torch.no_grad():
            expected = reference(input_ids).logits.float()
        actual = model(input_ids).logits.float()
        assert torch.allclose(actual, expected, atol=2e-2), (actual - expected).abs().max()  # bfloat16 keeps ~3 digits
        for seed in range(3):
            input_ids = prompts(1, 5 + 4 * seed, seed=seed)
            assert torch.equal(model.generate(input_ids, **GREEDY), reference.generate(input_ids, **GREEDY)), f"prompt {seed}"
    finally:
        model.close()


def test_a_route_may_mix_dtypes_the_client_converting_at_its_edge(swarm, tiny_model_path):
    """float32 blocks 0:2 then bfloat16 blocks 2:4 compute what those blocks compute in those dtypes."""
    model = client(swarm, tiny_model_path, quantizations=["none"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    try:
        run_coroutine(model.sequence.update())
        spans = model.sequence.spans
        for peer_id in [peer for peer, span in spans.items() if span.record.dtype == "bfloat16" and span.start == 0]:
            model.sequence.ban(peer_id)  # blocks 0:2 must come from the float32 peer
        input_ids = prompts(1, 9, seed=4)
        with torch.no_grad():
            hidden_states = reference.model.embed_tokens(input_ids)
            layers = reference.model.layers
            position_ids = torch.arange(input_ids.shape[1])[None]
            position_embeddings = reference.model.rotary_emb(hidden_states, position_ids)
            for layer in layers[:2]:
                hidden_states = layer(hidden_states, position_ids=position_ids, position_embeddings=position_embeddings)
            layers_bf16 = [layer.to(torch.bfloat16) for layer in layers[2:]]
            hidden_states = hidden_states.to(torch.bfloat16)
            cos, sin = position_embeddings
            for layer in layers_bf16:
                hidden_states = layer(hidden_states, position_ids=position_ids, position_embeddings=(cos.to(torch.bfloat16), sin.to(torch.bfloat16)))
            expected = reference.lm_head(reference.model.norm(hidden_states.float()))
        actual = model(input_ids).logits
        assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()
        text = model.generate(input_ids, **GREEDY)
        assert text.shape == (1, 9 + 32)
    finally:
        model.close()


def test_a_client_that_accepts_no_served_format_gets_a_clear_error(swarm, tiny_model_path):
    model = client(swarm, tiny_model_path, quantizations=["none"], dtypes=["float16"])
    try:
        with pytest.raises(FormatNotServedError, match="served as .*int8/float32.*nf4/float32"):
            model.generate(prompts(1, 4, seed=0), **GREEDY)
    finally:
        model.close()


def test_a_preferred_format_is_routed_through(swarm, tiny_model_path):
    model = client(swarm, tiny_model_path, prefer_quantization="nf4")
    try:
        for _ in range(5):
            route = run_coroutine(model.sequence.route())
            assert [model.sequence.spans[hop.peer_id].record.quantization for hop in route] == ["nf4", "nf4"]
    finally:
        model.close()
