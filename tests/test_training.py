"""Training through the swarm: gradients of trainable inputs (prompt tuning) flow back through the
peers and equal local autograd on the same weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.lora import RemoteLoRA
from client.remote import call_backward, call_forward
from swarm import errors
from swarm.blocks import BlockInputs
from swarm.local import LocalSwarm
from swarm.lora import PROJECTIONS

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)

PREFIX = 4


@pytest.fixture(scope="module")
def model(tiny_swarm, tiny_model_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=tiny_swarm.initial_peers)
    yield model
    model.close()


def _loss_and_grad(model, embed, prefix_init, input_ids, labels, attention_mask=None):
    prefix = torch.nn.Parameter(prefix_init.clone())
    embeds = torch.cat([prefix.expand(input_ids.shape[0], -1, -1), embed(input_ids)], dim=1)
    padded = torch.cat([torch.full((input_ids.shape[0], PREFIX), -100), labels], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([torch.ones(input_ids.shape[0], PREFIX, dtype=attention_mask.dtype), attention_mask], dim=1)
    loss = model(inputs_embeds=embeds, labels=padded, attention_mask=attention_mask).loss
    loss.backward()
    return loss.detach(), prefix.grad


@pytest.mark.parametrize("padded", [False, True])
def test_prompt_tuning_gradients_equal_local_autograd(model, tiny_model_path, padded):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, 128, (2, 10), generator=generator)
    labels = input_ids.clone()
    attention_mask = None
    if padded:  # right padding, masked out of the loss
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 7:] = 0
        labels[1, 7:] = -100
    prefix_init = torch.randn(1, PREFIX, reference.config.hidden_size, generator=generator) * 0.1

    expected_loss, expected_grad = _loss_and_grad(
        reference, reference.get_input_embeddings(), prefix_init, input_ids, labels, attention_mask
    )
    loss, grad = _loss_and_grad(model, model.get_input_embeddings(), prefix_init, input_ids, labels, attention_mask)
    assert torch.allclose(loss, expected_loss, atol=1e-5)
    assert grad is not None and grad.abs().sum() > 0
    assert torch.allclose(grad, expected_grad, atol=1e-4), (grad - expected_grad).abs().max()


def test_backward_survives_the_loss_of_the_forward_peer(tiny_model_path, tmp_path):
    """The forward ran through one peer serving every block; it dies before the backward, which then
    runs through two peers serving halves (recomputing the middle activations) and stays exact."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(3, 128, (1, 9), generator=generator)
    prefix_init = torch.randn(1, PREFIX, reference.config.hidden_size, generator=generator) * 0.1
    expected_loss, expected_grad = _loss_and_grad(reference, reference.get_input_embeddings(), prefix_init, input_ids, input_ids)

    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--announce-period", "1"], wait=False)
                 for blocks in ("0:4", "0:2", "2:4")]
        for node in nodes:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        try:
            prefix = torch.nn.Parameter(prefix_init.clone())
            embeds = torch.cat([prefix, model.get_input_embeddings()(input_ids)], dim=1)
            labels = torch.cat([torch.full((1, PREFIX), -100), input_ids], dim=1)
            route = RemoteExpertWorker.run_coroutine(model.sequence.route(0))
            assert [hop.peer_id for hop in route] == [nodes[0].maddrs[0].rsplit("/", 1)[-1]]  # fewest hops: 0:4
            loss = model(inputs_embeds=embeds, labels=labels).loss
            nodes[0].kill()
            loss.backward()
        finally:
            model.close()
    assert torch.allclose(loss.detach(), expected_loss, atol=1e-5)
    assert torch.allclose(prefix.grad, expected_grad, atol=1e-4)


BAD_GRADIENTS = {
    "wrong hidden size": torch.zeros(1, 3, 63),
    "integer": torch.zeros(1, 3, 64, dtype=torch.int64),
    "NaN": torch.full((1, 3, 64), float("nan")),
    "another batch": torch.zeros(2, 3, 64),
}


@pytest.mark.parametrize("name", list(BAD_GRADIENTS))
def test_bad_backward_requests_get_typed_errors(model, name):
    sequence = model.sequence
    RemoteExpertWorker.run_coroutine(sequence.update())
    peer_id = next(peer for peer, span in sequence.spans.items() if span.start == 0)
    call = call_backward(
        sequence.p2p, peer_id, sequence.dht_prefix, 0, 2, BlockInputs(torch.zeros(1, 3, 64)), BAD_GRADIENTS[name], 30
    )
    with pytest.raises(errors.InvalidRequestError, match="grad_outputs"):
        RemoteExpertWorker.run_coroutine(call)
    good = call_backward(sequence.p2p, peer_id, sequence.dht_prefix, 0, 2, BlockInputs(torch.zeros(1, 3, 64)), torch.ones(1, 3, 64), 30)
    grad_inputs, grad_prompts, grad_lora = RemoteExpertWorker.run_coroutine(good)
    assert grad_inputs.shape == (1, 3, 64) and grad_prompts is None and not grad_lora  # and the peer goes on serving


def _add_deep_prompts(reference, prompts):
    """Local deep prompt tuning on plain transformers: hooks add prompts[i] to the first positions
    entering layer i. Returns the hook handles."""
    handles = []
    for index, layer in enumerate(reference.model.layers):
        def hook(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            prefix = prompts.shape[2]
            hidden = torch.cat([hidden[:, :prefix] + prompts[index], hidden[:, prefix:]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def test_deep_prompt_gradients_equal_local_autograd(model, tiny_model_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    config = reference.config
    generator = torch.Generator().manual_seed(13)
    input_ids = torch.randint(3, 128, (2, 10), generator=generator)
    labels = torch.cat([torch.full((2, PREFIX), -100), input_ids], dim=1)
    init = torch.randn(config.num_hidden_layers, 1, PREFIX, config.hidden_size, generator=generator) * 0.1
    prefix_init = torch.randn(1, PREFIX, config.hidden_size, generator=generator) * 0.1

    def run(target, embed, use_hooks):
        deep = torch.nn.Parameter(init.clone())
        prefix = torch.nn.Parameter(prefix_init.clone())
        embeds = torch.cat([prefix.expand(2, -1, -1), embed(input_ids)], dim=1)
        handles = _add_deep_prompts(target, deep) if use_hooks else []
        try:
            extra = {} if use_hooks else {"deep_prompts": deep}
            loss = target(inputs_embeds=embeds, labels=labels, **extra).loss
            loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        return loss.detach(), prefix.grad, deep.grad

    expected = run(reference, reference.get_input_embeddings(), use_hooks=True)
    actual = run(model, model.get_input_embeddings(), use_hooks=False)
    assert torch.allclose(actual[0], expected[0], atol=1e-5)
    for got, want in zip(actual[1:], expected[1:]):
        assert got is not None and got.abs().sum() > 0
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("prompts", [torch.zeros(3, 1, 2, 64), torch.zeros(2, 1, 9, 64), torch.full((2, 1, 2, 64), float("inf"))])
def test_bad_deep_prompts_are_refused(model, prompts):
    sequence = model.sequence
    RemoteExpertWorker.run_coroutine(sequence.update())
    peer_id = next(peer for peer, span in sequence.spans.items() if span.start == 0)
    inputs = BlockInputs(torch.zeros(1, 3, 64), prompts=prompts)  # 3 tokens, blocks 0:2
    with pytest.raises(errors.InvalidRequestError, match="prompts"):
        RemoteExpertWorker.run_coroutine(call_forward(sequence.p2p, peer_id, sequence.dht_prefix, 0, 2, inputs, 30))


def test_lora_gradients_equal_peft(model, tiny_model_path, tmp_path):
    """LoRA on every projection: the trainer's weights, saved as a peft adapter and loaded by plain
    peft, give the same loss and the same gradients locally as through the peers."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    torch.manual_seed(3)
    lora = RemoteLoRA(reference.config, r=4, alpha=8)
    with torch.no_grad():
        for name in lora.target_modules:
            lora.b[name].normal_(0, 0.1)  # B starts at zero; make it non-zero so that A gets gradients too
    lora.save_pretrained(tmp_path / "adapter", base_model_name_or_path=str(tiny_model_path))
    assert {path.name for path in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True).eval()

    generator = torch.Generator().manual_seed(17)
    input_ids = torch.randint(3, 128, (2, 10), generator=generator)
    expected = peft_model(input_ids=input_ids, labels=input_ids).loss
    expected.backward()
    loss = model(input_ids=input_ids, labels=input_ids, lora=lora).loss
    loss.backward()

    assert torch.allclose(loss.detach(), expected.detach(), atol=1e-5)
    parameters = dict(peft_model.named_parameters())
    for name in lora.target_modules:
        for block in range(reference.config.num_hidden_layers):
            prefix = f"base_model.model.model.layers.{block}.{PROJECTIONS[name]}.{name}"
            for ours, theirs in ((lora.a[name].grad[block], "lora_A"), (lora.b[name].grad[block], "lora_B")):
                want = parameters[f"{prefix}.{theirs}.default.weight"].grad
                assert torch.allclose(ours, want, atol=1e-4), (name, block, theirs, (ours - want).abs().max())

    reloaded = RemoteLoRA.from_pretrained(tmp_path / "adapter", reference.config)
    assert all(torch.equal(reloaded.a[name], lora.a[name].detach()) for name in lora.target_modules)


def test_finetune_cli_trains_saves_and_resumes(tiny_swarm, tiny_model_path, tmp_path):
    """One trainer, pre-tokenized data, deep prompt tuning: the loss goes down, the prompts are saved,
    and a second run with the same --output resumes from there (nothing left to do)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [3 + (5 * k + j) % 40 for j in range(12)]}) + "\n" for k in range(8)))
    command = [
        sys.executable, "-m", "client.finetune", "--data", str(data), "--mode", "deep_ptune", "--output", str(tmp_path / "out"),
        "--run-name", "cli-test", "--initial-peers", *tiny_swarm.initial_peers, "--model", str(tiny_model_path),
        "--batch-size", "4", "--epochs", "4", "--learning-rate", "0.05", "--num-prefix-tokens", "3", "--matchmaking-time", "1",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=240, env=tiny_swarm.env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    losses = state["losses"]
    assert state["epoch"] == 4 and len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns
    saved = load_file(tmp_path / "out" / "prompts.safetensors")
    assert saved["prefix"].shape == (1, 3, 64) and saved["deep_prompts"].shape == (4, 1, 3, 64)
    assert saved["deep_prompts"].abs().sum() > 0

    again = subprocess.run(command, capture_output=True, text=True, timeout=240, env=tiny_swarm.env)
    assert again.returncode == 0 and "resuming" in again.stderr, again.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["losses"] == losses
