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
from swarm.lora import adapter_ref
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


def _served_adapter_equals_peft(swarm, path, adapter, quant: str) -> None:
    """A peer of this format serving the adapter (--adapters) generates what peft on transformers
    quantized the same way generates."""
    from peft import PeftModel

    node = swarm.start_peer("0:4", model=str(path), extra_args=["--quant", quant, "--adapters", str(adapter)])
    reference = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization.reference_config(quant, torch.float32), dtype=torch.float32
    ).eval()
    peft_model = PeftModel.from_pretrained(reference, adapter).eval()
    model = client(swarm, path, quantizations=[quant])
    model.adapter = adapter_ref(adapter)
    try:
        input_ids = prompts(1, 7, seed=11)
        assert torch.equal(model.generate(input_ids, **GREEDY), peft_model.generate(input_ids=input_ids, **GREEDY))
    finally:
        model.close()
        node.stop()


def _lora_grads(lora, peft_model):
    """(ours, peft's) gradients of every LoRA weight of every block."""
    from swarm.lora import PROJECTIONS

    parameters = dict(peft_model.named_parameters())
    for name in lora.target_modules:
        for block in range(lora.config.num_hidden_layers):
            prefix = f"base_model.model.model.layers.{block}.{PROJECTIONS[name]}.{name}"
            for ours, theirs in ((lora.a[name].grad[block], "lora_A"), (lora.b[name].grad[block], "lora_B")):
                yield (name, block, theirs), ours, parameters[f"{prefix}.{theirs}.default.weight"].grad


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_lora_through_quantized_peers_equals_peft_on_the_same_quantized_model(swarm, tiny_model_path, tmp_path, quant):
    """QLoRA: loss and every LoRA gradient through quantized peers equal peft's LoRA on transformers
    quantized with the same BitsAndBytesConfig. int8: within float32 rounding. nf4: loss within 1e-4 and
    each gradient within 2% (relative norm), because on a CPU with AVX512-BF16 bitsandbytes computes NF4
    layers without autograd (the peers' forward, peft's frozen-input layers) with a bfloat16 kernel and
    bfloat16 scales, and those with autograd in float32 (see swarm.quantization.unpack_for_autograd);
    the backward's inputs and output gradients come from that forward."""
    from peft import PeftModel

    from client.lora import RemoteLoRA

    reference = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, quantization_config=quantization.reference_config(quant, torch.float32), dtype=torch.float32
    ).eval()
    torch.manual_seed(6)
    lora = RemoteLoRA(reference.config, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name in lora.target_modules:
            lora.b[name].normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "adapter", base_model_name_or_path=str(tiny_model_path))
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True)
    model = client(swarm, tiny_model_path, quantizations=[quant])
    try:
        input_ids = prompts(2, 12, seed=3)
        expected = peft_model(input_ids=input_ids, labels=input_ids).loss
        expected.backward()
        loss = model(input_ids=input_ids, labels=input_ids, lora=lora).loss
        loss.backward()
    finally:
        model.close()
    _served_adapter_equals_peft(swarm, tiny_model_path, tmp_path / "adapter", quant)
    if quant == "int8":
        assert torch.allclose(loss.detach(), expected.detach(), atol=1e-5), (loss, expected)
        for where, ours, want in _lora_grads(lora, peft_model):
            assert torch.allclose(ours, want, atol=1e-4), (where, (ours - want).abs().max())
        return
    assert torch.allclose(loss.detach(), expected.detach(), rtol=1e-4), (loss, expected)
    errors = {where: float((ours - want).norm() / want.norm()) for where, ours, want in _lora_grads(lora, peft_model)}
    assert max(errors.values()) < 2e-2, errors  # relative error of each gradient (measured: at most 0.9%)


def test_client_finetune_trains_lora_through_nf4_peers_unchanged(swarm, tiny_model_path, tmp_path):
    """`python -m client.finetune`, told only to use nf4 peers, trains an adapter that changes the output."""
    import json
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [3 + (start + j) % 40 for j in range(16)]}) + "\n" for start in range(0, 40, 3)))
    output = tmp_path / "nf4-adapter"
    command = [
        sys.executable, "-m", "client.finetune", "--data", str(data), "--mode", "lora", "--output", str(output),
        "--run-name", "qlora", "--initial-peers", *swarm.initial_peers, "--model", str(tiny_model_path), "--quantizations", "nf4",
        "--lora-r", "4", "--lora-targets", "q_proj", "v_proj", "--batch-size", "7", "--epochs", "2", "--learning-rate", "0.05",
        "--matchmaking-time", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=swarm.env)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(output / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in weights.items())  # B starts at zero
