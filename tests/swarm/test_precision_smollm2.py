"""The default model in other number formats: int8, nf4 and bfloat16 peers (nf4 on 0:15 and 15:30, the
others on 0:30) equal transformers loaded with the same BitsAndBytesConfig or dtype, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import AutoDistributedModelForCausalLM
from swarm import quantization
from swarm.config import ClientConfig
from swarm.models import resolve_model
from swarm.tools.local import LocalSwarm
from tests.conftest import PEER_ENV

pytestmark = [pytest.mark.timeout(900), pytest.mark.smollm2, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three largest cities in Japan are"]
GREEDY = dict(do_sample=False, max_new_tokens=32, min_new_tokens=32)
FORMATS = [("int8", "float32"), ("nf4", "float32"), ("none", "bfloat16")]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    resolve_model("smollm2-135m")  # convert once, before the peers race for it
    with LocalSwarm(tmp_path_factory.mktemp("precision-smollm2"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for quant, dtype in FORMATS:  # nf4 through two peers; the others through one each, to keep the suite short
            for blocks in ("0:15", "15:30") if quant == "nf4" else ("0:30",):
                swarm.start_peer(blocks, model="smollm2-135m", extra_args=["--quant", quant, "--dtype", dtype], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        yield swarm


@pytest.mark.parametrize("quant, dtype", FORMATS)
def test_the_default_model_in_each_format_equals_transformers(swarm, quant, dtype):
    torch_dtype = getattr(torch, dtype)
    config = ClientConfig(quantizations=[quant], dtypes=[dtype])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=swarm.initial_peers, client_config=config, torch_dtype=torch_dtype
    )
    try:
        reference = AutoModelForCausalLM.from_pretrained(
            model.name_or_path, quantization_config=quantization.reference_config(quant, torch_dtype), dtype=torch_dtype
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        for prompt in PROMPTS:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            expected = reference.generate(input_ids, **GREEDY)
            assert torch.equal(model.generate(input_ids, **GREEDY), expected), prompt
        input_ids = tokenizer(PROMPTS, return_tensors="pt", padding=True).input_ids[:, :5]
        with torch.no_grad():
            expected = reference(input_ids).logits.float()
        actual = model(input_ids).logits.float()
        tolerance = 1e-3 if dtype == "float32" else 0.1  # bfloat16: logits of ~10-20 keep 2-3 significant digits
        assert torch.allclose(actual, expected, atol=tolerance), (actual - expected).abs().max()
    finally:
        model.close()
