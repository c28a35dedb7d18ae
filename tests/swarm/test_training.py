"""Training through the swarm: gradients of trainable inputs (prompt tuning) flow back through the
peers and equal local autograd on the same weights."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.lora import RemoteLoRA
from client.remote import call_backward, call_forward
from swarm import errors
from swarm.blocks import BlockInputs
from swarm.tools.local import LocalSwarm
from swarm.loop_thread import run_coroutine
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
            route = run_coroutine(model.sequence.route(0))
            assert [hop.peer_id for hop in route] == [nodes[0].maddrs[0].rsplit("/", 1)[-1]]  # fewest hops: 0:4
            loss = model(inputs_embeds=embeds, labels=labels).loss
            nodes[0].kill()
            loss.backward()
        finally:
            model.close()
    assert torch.allclose(loss.detach(), expected_loss, atol=1e-5)
    assert torch.allclose(prefix.grad, expected_grad, atol=1e-4)


def _swarm_lora_equals_peft(model, lora: RemoteLoRA, peft_model, input_ids) -> torch.Tensor:
    """Loss and backward through the swarm with `lora` and locally with peft: the same loss, and the
    same A and B gradients in every block; returns the swarm's loss."""
    expected = peft_model(input_ids=input_ids, labels=input_ids).loss
    expected.backward()
    loss = model(input_ids=input_ids, labels=input_ids, lora=lora).loss
    loss.backward()
    assert torch.allclose(loss.detach(), expected.detach(), atol=1e-5)
    _assert_lora_grads_equal(lora, peft_model)
    return loss.detach()


def _assert_lora_grads_equal(lora: RemoteLoRA, peft_model) -> None:
    """Every block's A and B gradients of `lora` equal those of the same adapter in peft, within 1e-4."""
    parameters = dict(peft_model.named_parameters())
    for name in lora.target_modules:
        for block in range(lora.config.num_hidden_layers):
            prefix = f"base_model.model.model.layers.{block}.{PROJECTIONS[name]}.{name}"
            for ours, theirs in ((lora.a[name].grad[block], "lora_A"), (lora.b[name].grad[block], "lora_B")):
                want = parameters[f"{prefix}.{theirs}.default.weight"].grad
                assert torch.allclose(ours, want, atol=1e-4), (name, block, theirs, (ours - want).abs().max())


def test_lora_dropout_equals_peft_with_the_same_masks(model, tiny_model_path, tmp_path):
    """LoRA dropout applied by the peers: with peft's dropout modules drawing the same masks
    (`swarm.lora.dropout_mask`), loss and gradients equal peft's; the saved adapter records the
    dropout; in eval mode no dropout is applied."""
    from swarm.lora import dropout_mask

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    torch.manual_seed(4)
    lora = RemoteLoRA(reference.config, r=4, alpha=8, target_modules=["q_proj", "up_proj"], dropout=0.3)
    lora.dropout_seed = 1234
    with torch.no_grad():
        for name in lora.target_modules:
            lora.b[name].normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "adapter", base_model_name_or_path=str(tiny_model_path))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == pytest.approx(0.3)
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True)

    class SameMasks(torch.nn.Module):
        def __init__(self, block: int, name: str):
            super().__init__()
            self.block, self.name = block, name

        def forward(self, x):
            return x * dropout_mask(1234, self.block, self.name, x.shape, p=0.3)

    for block, layer in enumerate(peft_model.base_model.model.model.layers):
        for name in lora.target_modules:
            getattr(getattr(layer, PROJECTIONS[name]), name).lora_dropout["default"] = SameMasks(block, name)
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(19))
    loss = _swarm_lora_equals_peft(model, lora, peft_model, input_ids)

    with torch.no_grad():
        no_dropout = model(input_ids=input_ids, labels=input_ids, lora=lora.eval()).loss
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), tmp_path / "adapter"
        ).eval()
        assert torch.allclose(no_dropout, plain(input_ids=input_ids, labels=input_ids).loss, atol=1e-5)
        assert not torch.allclose(no_dropout, loss, atol=1e-4)  # the dropout did something


def test_long_batches_go_in_pieces_over_every_peer(tiny_model_path, tmp_path, monkeypatch):
    """A training batch longer than max_batch_tokens is split into pieces that run at once, drawn over
    both peers of the blocks by throughput; LoRA and deep prompt gradients (shared by all rows, or one
    per row) still equal peft + local autograd on the whole batch."""
    import client.sequence
    from swarm.config import ClientConfig

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    config = reference.config
    torch.manual_seed(5)
    lora = RemoteLoRA(config, r=2, alpha=4, target_modules=["q_proj", "down_proj"])
    with torch.no_grad():
        for name in lora.target_modules:
            lora.b[name].normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "adapter", base_model_name_or_path=str(tiny_model_path))
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True).eval()
    generator = torch.Generator().manual_seed(23)
    input_ids = torch.randint(3, 128, (16, 6), generator=generator)
    used = []

    def spy(call):
        async def wrapper(p2p, peer_id, *args, **kwargs):
            used.append(peer_id)
            return await call(p2p, peer_id, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(client.sequence, "call_forward", spy(client.sequence.call_forward))
    monkeypatch.setattr(client.sequence, "call_backward", spy(client.sequence.call_backward))
    with LocalSwarm(tmp_path / "swarm", env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_peer("0:4", model=str(tiny_model_path), wait=False) for _ in range(2)]
        for node in nodes:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_model_path), initial_peers=swarm.initial_peers, client_config=ClientConfig(max_batch_tokens=6)
        )
        try:
            for rows in (1, 16):  # deep prompts shared by all rows, then one per row
                init = torch.randn(config.num_hidden_layers, rows, 2, config.hidden_size, generator=generator) * 0.1
                grads = []
                for target, use_hooks in ((peft_model, True), (model, False)):
                    target.zero_grad()
                    lora.zero_grad()
                    deep = torch.nn.Parameter(init.clone())
                    handles = _add_deep_prompts(peft_model.base_model.model, deep) if use_hooks else []
                    try:
                        extra = {} if use_hooks else {"deep_prompts": deep, "lora": lora}
                        loss = target(input_ids=input_ids, labels=input_ids, **extra).loss
                        loss.backward()
                    finally:
                        for handle in handles:
                            handle.remove()
                    grads.append((loss.detach(), deep.grad))
                (want_loss, want_deep), (loss, deep_grad) = grads
                assert torch.allclose(loss, want_loss, atol=1e-5)
                assert deep_grad.shape == init.shape
                assert torch.allclose(deep_grad, want_deep, atol=1e-4), (deep_grad - want_deep).abs().max()
                _assert_lora_grads_equal(lora, peft_model)
        finally:
            model.close()
    peer_ids = {node.maddrs[0].rsplit("/", 1)[-1] for node in nodes}
    assert len(used) == 2 * 2 * 16  # a forward and a backward per row, for each prompt shape
    assert set(used) == peer_ids  # 64 draws between two equal peers: both served (all on one: 2^-63)


BAD_GRADIENTS = {
    "wrong hidden size": torch.zeros(1, 3, 63),
    "integer": torch.zeros(1, 3, 64, dtype=torch.int64),
    "NaN": torch.full((1, 3, 64), float("nan")),
    "another batch": torch.zeros(2, 3, 64),
}


@pytest.mark.parametrize("name", list(BAD_GRADIENTS))
def test_bad_backward_requests_get_typed_errors(model, name):
    sequence = model.sequence
    run_coroutine(sequence.update())
    peer_id = next(peer for peer, span in sequence.spans.items() if span.start == 0)
    call = call_backward(
        sequence.p2p, peer_id, sequence.dht_prefix, 0, 2, BlockInputs(torch.zeros(1, 3, 64)), BAD_GRADIENTS[name], 30
    )
    with pytest.raises(errors.InvalidRequestError, match="grad_outputs"):
        run_coroutine(call)
    good = call_backward(sequence.p2p, peer_id, sequence.dht_prefix, 0, 2, BlockInputs(torch.zeros(1, 3, 64)), torch.ones(1, 3, 64), 30)
    grad_inputs, grad_prompts, grad_lora = run_coroutine(good)
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
    run_coroutine(sequence.update())
    peer_id = next(peer for peer, span in sequence.spans.items() if span.start == 0)
    inputs = BlockInputs(torch.zeros(1, 3, 64), prompts=prompts)  # 3 tokens, blocks 0:2
    with pytest.raises(errors.InvalidRequestError, match="prompts"):
        run_coroutine(call_forward(sequence.p2p, peer_id, sequence.dht_prefix, 0, 2, inputs, 30))


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

    input_ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(17))
    _swarm_lora_equals_peft(model, lora, peft_model, input_ids)

    reloaded = RemoteLoRA.from_pretrained(tmp_path / "adapter", reference.config)
    assert all(torch.equal(reloaded.a[name], lora.a[name].detach()) for name in lora.target_modules)


def _finetune(swarm, model_path, data, output, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "client.finetune", "--data", str(data), "--output", str(output),
        "--initial-peers", *swarm.initial_peers, "--model", str(model_path), *extra,
    ]


def _counting_data(path, rows: int, seed: int, length: int = 12):
    """Rows of consecutive token ids from random starts: something even a tiny model learns."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        start = rng.randrange(40)
        lines.append(json.dumps({"input_ids": [3 + (start + j) % 40 for j in range(length)]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_cli_trains_saves_and_resumes(tiny_swarm, tiny_model_path, tmp_path):
    """One trainer, pre-tokenized data, deep prompt tuning: a run of 2 epochs saves its prompts and
    optimizer; run again to 4 epochs, it goes on from there (the next batches, the run's round
    count restored) and the loss goes down."""
    data = _counting_data(tmp_path / "data.jsonl", 8, seed=0)
    output = tmp_path / "out"

    def run(epochs: int) -> subprocess.CompletedProcess:
        command = _finetune(
            tiny_swarm, tiny_model_path, data, output, "--mode", "deep_ptune", "--run-name", "cli", "--batch-size", "4",
            "--epochs", str(epochs), "--learning-rate", "0.05", "--num-prefix-tokens", "3", "--matchmaking-time", "1",
        )
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=tiny_swarm.env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    run(2)
    first = json.loads((output / "trainer_state.json").read_text())
    assert first["epoch"] == 2 and len(first["losses"]) == 4 and first["optimizer_steps"] >= 1
    assert (output / "optimizer.safetensors").exists()
    saved = load_file(output / "prompts.safetensors")
    assert saved["prefix"].shape == (1, 3, 64) and saved["deep_prompts"].shape == (4, 1, 3, 64)
    assert saved["deep_prompts"].abs().sum() > 0

    again = run(4)
    assert "resuming from" in again.stderr, again.stderr[-3000:]
    state = json.loads((output / "trainer_state.json").read_text())
    losses = state["losses"]
    assert state["epoch"] == 4 and len(losses) == 8 and losses[:4] == first["losses"]
    rounds = sorted(map(int, state["rounds"]))
    assert rounds[: len(first["rounds"])] == sorted(map(int, first["rounds"])) and rounds[-1] > max(map(int, first["rounds"]))
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns


@pytest.mark.slow
def test_trainers_average_gradients_join_late_and_leave(tiny_swarm, tiny_model_path, tmp_path):
    """Three LoRA trainers of one run, each on its own data: A and B start together, C joins after the
    first round (it loads the run's state), runs out of data first and leaves; A and B go on. Every
    round that several trainers went through leaves them with the same values; the loss goes down."""
    common = [
        "--mode", "lora", "--run-name", "averaged", "--batch-size", "2", "--target-batch-size", "32",
        "--learning-rate", "0.02", "--lora-r", "4", "--matchmaking-time", "2", "--save-every", "1", "--verbose",
    ]

    def start(name: str, rows: int, *extra: str) -> subprocess.Popen:
        data = _counting_data(tmp_path / f"{name}.jsonl", rows, seed=ord(name))
        log = open(tmp_path / f"{name}.log", "w")
        command = _finetune(tiny_swarm, tiny_model_path, data, tmp_path / name, *common, *extra)
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=tiny_swarm.env)

    # A and B hold enough data to outlast C by many rounds: C takes a few rounds just to start
    trainers = {"a": start("a", 400, "--min-trainers", "2"), "b": start("b", 400, "--min-trainers", "2")}
    try:
        deadline = time.monotonic() + 120
        while "1" not in _rounds(tmp_path / "a"):  # the first averaged round is done
            assert time.monotonic() < deadline and trainers["a"].poll() is None, _tail(tmp_path / "a.log")
            time.sleep(0.5)
        trainers["c"] = start("c", 24)
        for name, process in trainers.items():
            assert process.wait(timeout=240) == 0, _tail(tmp_path / f"{name}.log")
    finally:
        for process in trainers.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    rounds = {name: _rounds(tmp_path / name) for name in trainers}
    for number in sorted(set().union(*rounds.values()), key=int):
        seen = {name: values[number] for name, values in rounds.items() if number in values}
        first, *others = seen
        for other in others:
            assert seen[other] == pytest.approx(seen[first], rel=1e-5, abs=1e-6), (
                f"round {number}: {first} and {other} differ\n{first}: {_tail(tmp_path / f'{first}.log')}\n"
                f"{other}: {_tail(tmp_path / f'{other}.log')}"
            )
    assert len(set(rounds["a"]) & set(rounds["b"])) >= 3, rounds  # 0 and at least two averaged rounds
    joined = min(int(number) for number in rounds["c"] if number != "0")
    assert joined >= 1 and str(joined) in rounds["b"], rounds  # C started from the run's state, not from scratch
    assert len(set(rounds["c"]) & set(rounds["b"])) >= 3, rounds  # and averaged with B after that
    assert max(map(int, rounds["b"])) > max(map(int, rounds["c"])), rounds  # A and B went on after C left
    assert (tmp_path / "c" / "trainer_state.json").stat().st_mtime < (tmp_path / "b" / "trainer_state.json").stat().st_mtime
    for name in ("a", "b"):
        losses = json.loads((tmp_path / name / "trainer_state.json").read_text())["losses"]
        assert sum(losses[-10:]) < sum(losses[:10]), (name, losses)


def _rounds(output) -> dict:
    try:
        return json.loads((output / "trainer_state.json").read_text())["rounds"]
    except (OSError, ValueError):
        return {}


def _tail(path, chars: int = 4000) -> str:
    return path.read_text()[-chars:]
