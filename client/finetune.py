"""`python -m client.finetune`: fine-tune prompts or LoRA through the swarm, averaging gradients with
every other trainer of the same --run-name over the DHT (hivemind.Optimizer).

The peers keep the model frozen; this process owns the trainable parameters:
- `ptune`: a prefix of --num-prefix-tokens trainable input embeddings;
- `deep_ptune`: that prefix plus one trainable prefix per block (sent to the peers);
- `lora`: LoRA on --lora-targets of every block (sent to the peers); saved as a peft adapter.

Data: JSONL, one example per line: {"text": ...}, or {"prompt": ..., "completion": ...} (the loss
covers the completion only), or {"input_ids": [...]} (already tokenized). Checkpoints go to
--output every --save-every optimizer steps and at the end; a run started again with the same
--output resumes from its last checkpoint (and other trainers' state, when they are ahead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from swarm import settings
from swarm.cli import fail, setup_logging
from swarm.config import DEFAULT_MODEL, LOOPBACK_MADDRS, ClientConfig, NetworkConfig
from swarm.errors import ConfigError, SwarmError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
PROGRESS_FILE = "progress.json"  # where the run stands, rewritten every few seconds (for watchers such as swarm.api)
PROGRESS_PERIOD_S = 2.0
PROMPTS_FILE = "prompts.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # the optimizer's tensors; its settings as JSON in the metadata


def trainer_network() -> NetworkConfig:
    """A trainer's network section: loopback by default, and not in client mode (other trainers dial it to average)."""
    return NetworkConfig(host_maddrs=list(LOOPBACK_MADDRS), client_mode=False)


class TrainerConfig(BaseModel):
    """Everything `python -m client.finetune` needs (flags, `--config FILE`, SWARM_TRAINER_* variables: `swarm.settings`)."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="JSONL file: text, prompt/completion or input_ids per line")
    output: Path = Field(description="folder for checkpoints and the result")
    run_name: str = Field(min_length=1, description="trainers with the same run name average their gradients")
    client: ClientConfig = Field(default_factory=lambda: ClientConfig(network=trainer_network()), description="how to reach the swarm")
    model: str = Field(DEFAULT_MODEL, description="model name, Hugging Face id or folder, as the peers serve it")
    mode: Literal["lora", "ptune", "deep_ptune"] = Field("lora", description="what to train (see this module's docstring)")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout probability, applied by the peers while training")
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="projections of every block that get LoRA")
    num_prefix_tokens: int = Field(16, ge=1, description="ptune and deep_ptune: trainable prefix length, in tokens")
    learning_rate: float = Field(1e-3, gt=0, description="Adam's learning rate")
    epochs: int = Field(1, ge=1, description="passes over the data")
    batch_size: int = Field(4, ge=1, description="examples per forward and backward")
    grad_accumulation: int = Field(1, ge=1, description="batches per optimizer step of this trainer")
    max_seq_length: int = Field(256, ge=2, description="examples are cut to this many tokens")
    target_batch_size: int | None = Field(
        None, ge=1, description="examples over all trainers per optimizer step; default: this trainer's batch x accumulation"
    )
    matchmaking_time_s: float = Field(5.0, gt=0, description="seconds to gather trainers for averaging")
    min_trainers: int = Field(1, ge=1, description="wait until this many trainers of the run are here")
    wait_trainers_s: float = Field(600.0, ge=0, description="seconds to wait for --min-trainers")
    save_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    seed: int = Field(0, description="the order of this trainer's examples")
    verbose: bool = Field(False, description="log hivemind's progress of the run (samples, rounds, peers)")

    @model_validator(mode="after")
    def _needs_peers(self) -> "TrainerConfig":
        self.client.network.require_initial_peers()
        return self


# ---- data -----------------------------------------------------------------------------------------
def load_examples(path: Path, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per line; labels are -100 where the loss does not look (the prompt)."""
    examples = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--data {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "input_ids" in row:
                ids = [int(token) for token in row["input_ids"]]
                labels = list(ids)
            elif "text" in row:
                ids = _tokenize(tokenizer, str(row["text"]))
                labels = list(ids)
            else:
                prompt, completion = _tokenize(tokenizer, str(row["prompt"])), _tokenize(tokenizer, str(row["completion"]), bos=False)
                ids, labels = prompt + completion, [-100] * len(prompt) + completion
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--data {path}, line {number}: need text, prompt/completion or input_ids ({exc})") from exc
        if len(ids) >= 2:
            examples.append((ids[:max_length], labels[:max_length]))
    if not examples:
        raise ConfigError(f"--data {path}: no example with at least two tokens")
    return examples


def _tokenize(tokenizer, text: str, bos: bool = True) -> list[int]:
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer: give pre-tokenized input_ids in the data")
    return tokenizer(text, add_special_tokens=bos)["input_ids"]


def batches(examples, batch_size: int, rng: random.Random, pad_id: int):
    """Shuffled batches, right-padded: (input_ids, attention_mask, labels)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[index] for index in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, target) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(target)] = torch.tensor(target)
            mask[row, : len(ids)] = 1
        yield input_ids, mask, labels


# ---- trainable parameters ---------------------------------------------------------------------
class Trainable(torch.nn.Module):
    """What this trainer owns, for one --mode, and how it enters the model's forward."""

    def __init__(self, mode: str, config, args: TrainerConfig):
        super().__init__()
        from client.lora import RemoteLoRA

        self.mode = mode
        self.lora = None
        self.prefix = self.deep = None
        if mode == "lora":
            # now, not at the first checkpoint: importing peft (and bitsandbytes with it) takes about 3 s, which
            # mid-run made a trainer miss an averaging round and average with the next round's group
            import peft  # noqa: F401

            self.lora = RemoteLoRA(
                config, r=args.lora_r, alpha=args.lora_alpha, target_modules=args.lora_targets, dropout=args.lora_dropout
            )
        else:
            tokens = args.num_prefix_tokens
            self.prefix = torch.nn.Parameter(torch.randn(1, tokens, config.hidden_size) * config.initializer_range)
            if mode == "deep_ptune":
                self.deep = torch.nn.Parameter(torch.zeros(config.num_hidden_layers, 1, tokens, config.hidden_size))

    def loss(self, model, input_ids, attention_mask, labels) -> torch.Tensor:
        if self.lora is not None:
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, lora=self.lora).loss
        batch, tokens = input_ids.shape[0], self.prefix.shape[1]
        embeds = torch.cat([self.prefix.expand(batch, -1, -1), model.get_input_embeddings()(input_ids).detach()], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, tokens), attention_mask], dim=1)
        labels = torch.cat([labels.new_full((batch, tokens), -100), labels], dim=1)
        return model(inputs_embeds=embeds, attention_mask=mask, labels=labels, deep_prompts=self.deep).loss

    def fingerprint(self) -> list[float]:
        """Three numbers summing up every trainable value (their sum, norm, and projection on a fixed
        random direction), kept per round in trainer_state.json: trainers that averaged a round
        together show the same ones, up to float rounding (hivemind adds averaged deltas in place)."""
        values = torch.cat([parameter.detach().reshape(-1) for parameter in self.parameters()]).double()
        direction = torch.randn(values.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return [values.sum().item(), values.norm().item(), (values @ direction).item()]

    def save(self, folder: Path, base_model: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            self.lora.save_pretrained(folder, base_model_name_or_path=base_model)
        else:
            tensors = {"prefix": self.prefix.detach().contiguous()}
            if self.deep is not None:
                tensors["deep_prompts"] = self.deep.detach().contiguous()
            save_file(tensors, folder / PROMPTS_FILE)

    def load(self, folder: Path) -> None:
        with torch.no_grad():
            if self.lora is not None:
                from client.lora import RemoteLoRA

                saved = RemoteLoRA.from_pretrained(folder, self.lora.config)
                for name in self.lora.target_modules:
                    self.lora.a[name].copy_(saved.a[name])
                    self.lora.b[name].copy_(saved.b[name])
            else:
                tensors = load_file(folder / PROMPTS_FILE)
                self.prefix.copy_(tensors["prefix"])
                if self.deep is not None:
                    self.deep.copy_(tensors["deep_prompts"])


# ---- the loop ---------------------------------------------------------------------------------
def train(args: TrainerConfig) -> dict:
    from transformers import AutoTokenizer

    from client import AutoDistributedModelForCausalLM
    from client.collaboration import join_run, make_optimizer, say_goodbye, wait_for_trainers

    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.client.network.initial_peers, client_config=args.client
    )
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        except (OSError, ValueError):
            tokenizer = None  # a model folder without a tokenizer: pre-tokenized data only
        examples = load_examples(args.data, tokenizer, args.max_seq_length)
        pad_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
        torch.manual_seed(int(hashlib.sha256(args.run_name.encode()).hexdigest()[:15], 16))
        trainable = Trainable(args.mode, model.config, args)  # the same initial values in every trainer of the run
        torch.seed()  # but each trainer its own LoRA dropout masks
        state = {"epoch": 0, "batch": 0, "optimizer_steps": 0, "losses": [], "rounds": {"0": trainable.fingerprint()}}
        resumed = (args.output / STATE_FILE).exists()
        if resumed:
            state = json.loads((args.output / STATE_FILE).read_text())
            trainable.load(args.output)
            logger.info(
                "resuming from %s: epoch %d, batch %d, %d optimizer steps",
                args.output, state["epoch"] + 1, state.get("batch", 0), state["optimizer_steps"],
            )
        optimizer = make_optimizer(
            model.sequence.dht, args.run_name, list(trainable.parameters()), learning_rate=args.learning_rate,
            batch_size=args.batch_size, target_batch_size=args.target_batch_size or args.batch_size * args.grad_accumulation,
            matchmaking_time=args.matchmaking_time_s, verbose=args.verbose,
        )
        if resumed and (args.output / OPTIMIZER_FILE).exists():
            optimizer.load_state_dict(load_optimizer_state(args.output / OPTIMIZER_FILE))
        try:
            if args.min_trainers > 1:
                wait_for_trainers(model.sequence.dht, args.run_name, args.min_trainers, args.wait_trainers_s)
            join_run(optimizer, args.wait_trainers_s)
            state["rounds"].setdefault(str(optimizer.local_epoch), trainable.fingerprint())
            _loop(args, model, trainable, optimizer, examples, pad_id, state)
        finally:
            say_goodbye(optimizer, model.sequence.dht)
        save_checkpoint(args.output, str(model.name_or_path), trainable, optimizer, state)
        return state
    finally:
        model.close()


def save_optimizer_state(state_dict: dict, path: Path) -> None:
    """An optimizer's state_dict as safetensors (nothing pickled): tensors under `<param>.<name>`,
    everything else (param groups, steps kept as numbers, hivemind's local epoch) as JSON."""
    tensors, others = {}, {}
    for key, entry in state_dict["state"].items():
        if isinstance(entry, dict):
            for name, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"{key}.{name}"] = value.detach().contiguous()
                else:
                    others[f"{key}.{name}"] = value
        else:
            others[str(key)] = entry  # hivemind's local_epoch
    meta = {"param_groups": state_dict["param_groups"], "others": others}
    save_file(tensors, path, metadata={"optimizer": json.dumps(meta)})


def load_optimizer_state(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as stored:
        meta = json.loads(stored.metadata()["optimizer"])
        tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    state: dict = {}
    for name, value in [*tensors.items(), *meta["others"].items()]:
        key, _, field = name.partition(".")
        if field:
            state.setdefault(int(key), {})[field] = value
        else:
            state[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, base_model: str, trainable: Trainable, optimizer, state: dict) -> None:
    """The trainable values, the optimizer's state (AdamW moments and the run's round) and where the
    loop stands; the state file goes last, so a checkpoint cut short is not taken for a whole one."""
    trainable.save(folder, base_model)
    save_optimizer_state(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    partial = folder / (STATE_FILE + ".partial")
    partial.write_text(json.dumps(state))
    partial.replace(folder / STATE_FILE)


def write_progress(folder: Path, state: dict, total_steps: int) -> None:
    losses = state["losses"]
    progress = {"epoch": state["epoch"], "batch": state.get("batch", 0), "steps": len(losses), "total_steps": total_steps,
                "loss": losses[-1] if losses else None, "optimizer_steps": state["optimizer_steps"], "time": time.time()}
    partial = folder / (PROGRESS_FILE + ".partial")
    partial.write_text(json.dumps(progress))
    partial.replace(folder / PROGRESS_FILE)


def _loop(args: TrainerConfig, model, trainable: Trainable, optimizer, examples, pad_id: int, state: dict) -> None:
    from client.collaboration import wait_until_tracked

    args.output.mkdir(parents=True, exist_ok=True)
    total_steps = -(-len(examples) // args.batch_size) * args.epochs
    reported = 0.0
    for epoch in range(state["epoch"], args.epochs):
        rng = random.Random(f"{args.seed}:{epoch}")  # the same order when an epoch is resumed
        done = state.get("batch", 0)
        progress = tqdm(
            list(batches(examples, args.batch_size, rng, pad_id)), desc=f"epoch {epoch + 1}/{args.epochs}", initial=done
        )
        for number, (input_ids, mask, labels) in enumerate(progress.iterable):
            if number < done:
                continue  # done before this run was resumed
            progress.update()
            loss = trainable.loss(model, input_ids, mask, labels)
            loss.backward()
            before, started = optimizer.local_epoch, time.perf_counter()
            optimizer.step()  # averages with the other trainers once the run reaches its target batch size
            optimizer.zero_grad()
            state["losses"].append(round(loss.item(), 5))
            progress.set_postfix(loss=f"{loss.item():.4f}", round=optimizer.local_epoch)
            state["batch"] = number + 1
            if time.monotonic() - reported > PROGRESS_PERIOD_S:
                write_progress(args.output, state, total_steps)
                reported = time.monotonic()
            if args.min_trainers > 1 and state["optimizer_steps"] == 0 and number == done:  # this run's first step here
                wait_until_tracked(optimizer, args.min_trainers, args.wait_trainers_s)
            if optimizer.local_epoch != before:
                state["optimizer_steps"] += 1
                state["rounds"][str(optimizer.local_epoch)] = trainable.fingerprint()
                state.setdefault("round_seconds", []).append(round(time.perf_counter() - started, 3))
                if state["optimizer_steps"] % args.save_every == 0:
                    save_checkpoint(args.output, str(model.name_or_path), trainable, optimizer, state)
        progress.close()
        state["epoch"], state["batch"] = epoch + 1, 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = settings.parse(
            TrainerConfig, argv, prog="python -m client.finetune", description=__doc__.split("\n\n")[0], env_prefix="SWARM_TRAINER_"
        )
        state = train(args)
    except SwarmError as exc:
        return fail(str(exc))
    losses = state["losses"]
    print(f"finetune: done, {state['optimizer_steps']} optimizer steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
