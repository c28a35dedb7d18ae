"""Serving LoRA adapters: peers started with --adapters apply them; a client that asks for one is
routed only through peers serving it, and generates exactly what transformers + peft generate
(with an adapter trained through the swarm by client.finetune: the whole round trip)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm import errors, network
from swarm.tools.local import LocalSwarm
from swarm.records import parse_peer_records

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)

KWARGS = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def adapter_dir(tiny_swarm, tiny_model_path, tmp_path_factory):
    """An adapter trained through the swarm by `python -m client.finetune` (the round trip: train,
    save, serve, generate)."""
    folder = tmp_path_factory.mktemp("adapters")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [3 + (start + j) % 40 for j in range(16)]}) + "\n" for start in range(0, 40, 3)))
    path = folder / "my-adapter"
    command = [
        sys.executable, "-m", "client.finetune", "--data", str(data), "--mode", "lora", "--output", str(path),
        "--run-name", "adapter-round-trip", "--initial-peers", *tiny_swarm.initial_peers, "--model", str(tiny_model_path),
        "--lora-r", "4", "--lora-alpha", "16", "--lora-targets", "q_proj", "v_proj", "down_proj",
        "--batch-size", "7", "--epochs", "4", "--learning-rate", "0.05", "--matchmaking-time", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=tiny_swarm.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {entry.name for entry in path.iterdir()}
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
