"""Number formats as units, no sockets: quantized layers equal transformers' BitsAndBytesConfig ones,
format sizes, --blocks auto packing, refusals before anything is loaded, records and routing by format."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from client.routing import OTHER_FORMAT_SLOWDOWN, PeerSpan, choose_route, format_spans
from peers import placement, sizing
from swarm import balance, models, quantization
from swarm.blocks import BlockInputs, BlockStack
from swarm.errors import ConfigError, FormatNotServedError
from swarm.records import PROTOCOL_VERSION, PeerRecord
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("precision") / "tiny", hidden_size=128)
    source = models.resolve_model(str(path))
    return source, models.load_config(source)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_blocks_compute_what_transformers_quantized_layers_do(tiny, quant):
    source, config = tiny
    reference = AutoModelForCausalLM.from_pretrained(
        source.path, quantization_config=quantization.reference_config(quant, torch.float32), dtype=torch.float32
    ).eval()
    layers = [models.load_block(source, config, index, dtype=torch.float32, device="cpu", quantization=quant) for index in range(4)]
    stack = BlockStack(config, layers, 0, models.load_rotary(config, device="cpu"))
    assert stack.dtype == torch.float32  # the hidden states' dtype, not the integer weights'
    input_ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        expected = reference(input_ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        actual = reference.model.norm(stack(BlockInputs(reference.model.embed_tokens(input_ids))))
    assert torch.equal(actual, expected)


def test_nf4_layers_train_with_their_exact_scales_after_serving(tiny):
    """bitsandbytes' CPU inference kernel rounds an NF4 layer's scales; a backward after it runs on the
    layer as it was quantized."""
    source, config = tiny
    layer = models.load_block(source, config, 1, dtype=torch.float32, device="cpu", quantization="nf4")
    stack = BlockStack(config, [layer], 1, models.load_rotary(config, device="cpu"))
    hidden_states, grad_outputs = torch.randn(1, 5, 128), torch.randn(1, 5, 128)
    before = stack.backward(BlockInputs(hidden_states), grad_outputs)[0]
    stack(BlockInputs(hidden_states))  # inference: may repack the weights
    after = stack.backward(BlockInputs(hidden_states), grad_outputs)[0]
    assert torch.equal(before, after)


def test_format_sizes_and_auto_block_counts():
    """--blocks auto with the same budget: nf4 takes 3-4x the blocks of bfloat16 (about 7x float32), int8 about 2x."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=80, num_attention_heads=32)
    sizes = {quant: sizing.block_memory_bytes(config, torch.bfloat16, quant) for quant in quantization.QUANTIZATIONS}
    assert sizes["none"] / sizes["int8"] == pytest.approx(2.0, rel=0.01) and 3.5 < sizes["none"] / sizes["nf4"] < 3.7
    counts = {}
    for dtype, quant in [(torch.float32, "none"), (torch.bfloat16, "none"), (torch.bfloat16, "int8"), (torch.bfloat16, "nf4")]:
        counts[dtype, quant], explanation = placement.auto_block_count(
            config, dtype=dtype, quantization=quant, device="cpu", cache_tokens=64, max_length=2048, max_memory_gb=8,
        )
        assert ("not quantized" if quant == "none" else quant) in explanation
    bf16 = counts[torch.bfloat16, "none"]
    assert 3 <= counts[torch.bfloat16, "nf4"] / bf16 <= 4 and 1.8 <= counts[torch.bfloat16, "int8"] / bf16 <= 2.1
    assert 6 <= counts[torch.bfloat16, "nf4"] / counts[torch.float32, "none"] <= 8


def test_refusals_come_before_anything_is_loaded(monkeypatch):
    with pytest.raises(ConfigError, match="--quant 'q4'"):
        quantization.check_quantization("q4", "cpu")
    quantization.check_quantization.cache_clear()
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.0" if name == "bitsandbytes" else real_version(name))
    with pytest.raises(ConfigError, match="too old"):
        quantization.check_quantization("nf4", "cpu")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    quantization.check_quantization.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        quantization.check_quantization("int8", "cpu")
    quantization.check_quantization.cache_clear()
    monkeypatch.setattr(sizing, "dtype_works", lambda dtype, device: dtype == torch.float32)
    with pytest.raises(ConfigError, match="--dtype float16: cpu cannot compute in it .* it can in float32"):
        sizing.resolve_dtype("float16", "cpu")


def _span(peer_id: str, start: int, end: int, *, quantization: str = "none", dtype: str = "float32", throughput: float = 10.0):
    record = PeerRecord(
        protocol_version=PROTOCOL_VERSION, state="online", model="m", start_block=start, end_block=end, throughput=throughput,
        cache_tokens_left=100, dtype=dtype, quantization=quantization, version="0.1.0",
    )
    return PeerSpan(peer_id, start, end, throughput, record=record)


def test_records_announce_their_format_and_old_records_count_as_unquantized():
    assert _span("a", 0, 4, quantization="nf4", dtype="bfloat16").record.precision == "nf4/bfloat16"
    assert _span("b", 0, 4, dtype="bfloat16").record.precision == "bfloat16"
    old = PeerRecord.model_validate(dict(
        protocol_version=2, state="online", model="m", start_block=0, end_block=4, throughput=1.0, cache_tokens_left=1,
        dtype="float32", version="0.0.9",
    ))
    assert old.quantization == "none"
    with pytest.raises(ValueError):
        PeerRecord.model_validate({**old.model_dump(), "quantization": "Q" * 40})


def test_routes_keep_to_accepted_formats_and_prefer_one():
    swarm = {span.peer_id: span for span in [
        _span("f32", 0, 4), _span("nf4-a", 0, 2, quantization="nf4"), _span("nf4-b", 2, 4, quantization="nf4"),
        _span("bf16", 2, 4, dtype="bfloat16"),
    ]}
    assert set(format_spans(swarm, ["nf4"], ["float32"], 0, 4)) == {"nf4-a", "nf4-b"}
    assert set(format_spans(swarm, ["none"], ["float32", "bfloat16"], 0, 4)) == {"f32", "bf16"}
    with pytest.raises(FormatNotServedError, match=r"blocks 2:4 .* served as bfloat16, float32, nf4/float32"):
        format_spans(swarm, ["int8"], ["float32"], 2, 4)
    assert [hop.peer_id for hop in choose_route(swarm, 0, 4)] == ["f32"]
    assert [hop.peer_id for hop in choose_route(swarm, 0, 4, prefer="nf4")] == ["nf4-a", "nf4-b"]
    assert OTHER_FORMAT_SLOWDOWN > 1


def test_plan_lists_the_formats_serving_each_block():
    lines = balance.describe_coverage([10.0, 20.0], [_span("a", 0, 2), _span("b", 1, 2, quantization="int8")])
    assert lines[0].endswith("1 float32") and lines[1].endswith("1 float32, 1 int8/float32")
