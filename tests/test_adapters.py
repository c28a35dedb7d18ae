"""Serving LoRA adapters: peers started with --adapters apply them; a client that asks for one is
routed only through peers serving it, and generates exactly what transformers + peft generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.lora import RemoteLoRA
from swarm import errors, network
from swarm.local import LocalSwarm
from swarm.records import parse_peer_records

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)

KWARGS = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_path, tmp_path_factory):
    config = AutoModelForCausalLM.from_pretrained(tiny_model_path).config
    torch.manual_seed(5)
    lora = RemoteLoRA(config, r=4, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for name in lora.target_modules:
            lora.b[name].normal_(0, 0.3)  # a trained adapter: B is not zero
    path = tmp_path_factory.mktemp("adapters") / "my-adapter"
    lora.save_pretrained(path, base_model_name_or_path=str(tiny_model_path))
    return path


@pytest.fixture(scope="module")
def swarm(tiny_model_path, adapter_dir, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("adapter-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        with_adapter = ["--announce-period", "1", "--adapters", str(adapter_dir)]
        nodes = [
            swarm.start_peer("0:2", model=str(tiny_model_path), extra_args=with_adapter, wait=False),
            swarm.start_peer("2:4", model=str(tiny_model_path), extra_args=with_adapter, wait=False),
            swarm.start_peer("0:4", model=str(tiny_model_path), extra_args=["--announce-period", "1"], wait=False),
        ]
        for node in nodes:
            swarm.wait_ready(node)
        yield swarm


@pytest.fixture(scope="module")
def references(tiny_model_path, adapter_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), adapter_dir).eval()
    return base, tuned


def test_generation_with_an_adapter_equals_peft(swarm, tiny_model_path, references):
    base, tuned = references
    input_ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(21))
    expected = tuned.generate(input_ids=input_ids, **KWARGS)
    assert not torch.equal(expected, base.generate(input_ids, **KWARGS))  # the adapter changes the output
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_model_path), initial_peers=swarm.initial_peers, adapter="my-adapter"
    )
    try:
        with model.inference_session(max_length=32) as session:
            assert torch.equal(model.generate(input_ids, **KWARGS), expected)
            route = [(start, end) for _, start, end in session.route]
        assert route == [(0, 2), (2, 4)]  # the peer on 0:4 does not serve the adapter
        assert torch.equal(model.generate(input_ids, adapter=None, **KWARGS), base.generate(input_ids, **KWARGS))
        with torch.no_grad():
            logits = model(input_ids).logits  # a stateless forward applies it too
            assert torch.allclose(logits, tuned(input_ids=input_ids).logits, atol=1e-4)
        raw = network.fetch_block_records(model.sequence.dht, tiny_model_path.name, 4)
        announced = {record.adapters for entry in raw for record in parse_peer_records(entry).values()}
        assert announced == {("my-adapter",), ()}
    finally:
        model.close()


def test_an_unknown_adapter_is_missing_everywhere(swarm, tiny_model_path):
    from swarm.config import ClientConfig

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_model_path), initial_peers=swarm.initial_peers, adapter="nobody-serves-this",
        client_config=ClientConfig(route_wait_s=1.0),
    )
    try:
        with pytest.raises(errors.MissingBlocksError):
            model.generate(torch.tensor([[5, 6, 7]]), **KWARGS)
    finally:
        model.close()
