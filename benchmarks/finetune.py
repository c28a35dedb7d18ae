"""Fine-tuning speed: LoRA training through a swarm of 3 peers against local training of the same
LoRA weights (transformers + peft) in one process, and how long an averaging round between two
trainers takes.

Measures, in one run and on the same weights: training tokens/s (forward, backward and AdamW step
on batches of --batch-size x --seq-len tokens; median over --steps steps after a warm-up) for
local peft and through the swarm, then runs two `python -m client.finetune` trainers of one run on
the same swarm and reports their rounds (time inside the optimizer step of a round: gradient
averaging, state averaging and AdamW) from trainer_state.json.

    .venv/bin/python benchmarks/finetune.py [--model smollm2-135m] [--steps 6] [--batch-size 4] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.tools.local import LocalSwarm

TARGETS = ["q_proj", "v_proj"]


def measure(step, batches) -> float:
    """Median training tokens/s of `step(input_ids)` over the batches (the first is a warm-up)."""
    step(batches[0])
    rates = []
    for input_ids in batches[1:]:
        started = time.perf_counter()
        step(input_ids)
        rates.append(input_ids.numel() / (time.perf_counter() - started))
    return statistics.median(rates)


def local_step(source, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(input_ids):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def swarm_step(model, r: int):
    from client.lora import RemoteLoRA

    lora = RemoteLoRA(model.config, r=r, alpha=2 * r, target_modules=TARGETS)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-4)

    def step(input_ids):
        model(input_ids=input_ids, labels=input_ids, lora=lora).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def two_trainers(swarm, model_name: str, folder: Path, args) -> list[dict]:
    """Two client.finetune trainers of one run, each on its own random tokens; their saved states."""
    processes = []
    rows = args.batch_size * args.rounds_per_trainer * 4
    for index in range(2):
        generator = torch.Generator().manual_seed(index)
        data = folder / f"data{index}.jsonl"
        ids = torch.randint(100, 10_000, (rows, args.seq_len), generator=generator).tolist()
        data.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids))
        command = [
            sys.executable, "-m", "client.finetune", "--data", str(data), "--mode", "lora", "--output", str(folder / f"out{index}"),
            "--run-name", "bench", "--initial-peers", *swarm.initial_peers, "--model", model_name, "--lora-r", str(args.lora_r),
            "--batch-size", str(args.batch_size), "--target-batch-size", str(8 * args.batch_size), "--min-trainers", "2",
            "--matchmaking-time", "2", "--max-seq-length", str(args.seq_len),
        ]
        log = open(folder / f"trainer{index}.log", "w")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=swarm.env))
    for index, process in enumerate(processes):
        if process.wait(timeout=1800) != 0:
            raise RuntimeError(f"trainer {index} failed: see {folder / f'trainer{index}.log'}")
    return [json.loads((folder / f"out{index}" / "trainer_state.json").read_text()) for index in range(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--rounds-per-trainer", type=int, default=3, help="averaging rounds the two trainers run")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="tokens per training request through the swarm (default: the client's, 4096); smaller pieces pipeline over the peers")
    parser.add_argument("--skip-trainers", action="store_true", help="measure tokens/s only, not the averaging rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    parser.add_argument("--peer-threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from client import AutoDistributedModelForCausalLM
    from swarm.config import ClientConfig
    from swarm.models import load_config, resolve_model

    source = resolve_model(args.model)
    num_blocks = load_config(source).num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, 10_000, (args.batch_size, args.seq_len), generator=generator) for _ in range(args.steps + 1)]
    print(f"model {args.model} ({num_blocks} blocks), LoRA r={args.lora_r} on {'/'.join(TARGETS)}, batches of "
          f"{args.batch_size}x{args.seq_len} tokens, {args.threads} threads local/client, {args.peer_threads} per peer")

    local_tps = measure(local_step(source, args.lora_r), batches)
    print(f"{'local peft':<22} {local_tps:>8.0f} training tokens/s   1.00", flush=True)

    third = num_blocks // 3
    folder = Path(tempfile.mkdtemp(prefix="swarm-bench-finetune-"))
    with LocalSwarm(folder / "logs", env={"OMP_NUM_THREADS": str(args.peer_threads)}) as swarm:
        swarm.start_bootstrap()
        for blocks in (f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{num_blocks}"):
            swarm.start_peer(blocks, model=args.model, extra_args=["--num-threads", str(args.peer_threads)], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        config = ClientConfig(**({"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}))
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers, client_config=config)
        try:
            swarm_tps = measure(swarm_step(model, args.lora_r), batches)
        finally:
            model.close()
        print(f"{'swarm, 3 peers':<22} {swarm_tps:>8.0f} training tokens/s   {swarm_tps / local_tps:.2f}"
              f"   (pieces of {config.max_batch_tokens} tokens at most)", flush=True)
        if args.skip_trainers:
            return 0
        states = two_trainers(swarm, args.model, folder, args)
    for index, state in enumerate(states):
        seconds = state.get("round_seconds", [])
        median = statistics.median(seconds) if seconds else float("nan")
        print(f"trainer {index}: {len(seconds)} rounds, median round step {median:.2f} s (all: {seconds}), "
              f"loss {state['losses'][0]:.3f} -> {state['losses'][-1]:.3f}")
    shared = set(states[0]["rounds"]) & set(states[1]["rounds"]) - {"0"}
    same = all(
        all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(states[0]["rounds"][n], states[1]["rounds"][n])) for n in shared
    )
    print(f"rounds both trainers went through: {len(shared)}, identical values after each: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
