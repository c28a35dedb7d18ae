"""Single-sequence generation speed: swarms of 1 and 3 peers on loopback against plain transformers.

Measures, in one run and on the same weights: prefill time of a 128-token prompt and greedy decode
tokens/s over 64 new tokens (medians of --repeats runs), for local transformers in this process and
through the swarm; prints the ratios and each peer's memory (RSS of its process group). The
"relay" row turns off peer-to-peer pushes, so every activation goes through the client: the
difference to the row below it is what the pushes save.

    .venv/bin/python benchmarks/generate.py [--model smollm2-135m] [--repeats 3] [--threads 2] [--peer-threads 1]

On a machine with fewer cores than processes (here: 2 cores for a client and 3 peers), peers with
one thread each run fastest: a second OpenMP thread per peer only adds contention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.local import LocalSwarm  # noqa: E402

PROMPT_TOKENS = 128
NEW_TOKENS = 64


def measure(generate, input_ids, repeats: int) -> tuple[float, float]:
    """(median prefill seconds, median decode tokens/s)."""
    prefill_s, decode_tps = [], []
    generate(input_ids, 2)  # warm-up
    for _ in range(repeats):
        started = time.perf_counter()
        generate(input_ids, 1)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        generate(input_ids, NEW_TOKENS)
        total_s = time.perf_counter() - started
        prefill_s.append(first_s)
        decode_tps.append((NEW_TOKENS - 1) / max(total_s - first_s, 1e-9))
    return statistics.median(prefill_s), statistics.median(decode_tps)


def group_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS of the peer process, PSS of its whole group: DHT process and p2pd included, shared pages split)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        pss = sum(process.memory_full_info().pss for process in processes)
        return root.memory_info().rss / 2**20, pss / 2**20
    except psutil.Error:
        return float("nan"), float("nan")


def swarm_run(
    model_name: str, splits: list[str], input_ids, repeats: int, threads: int, push: bool
) -> tuple[float, float, list[tuple[float, float]]]:
    """Start a bootstrap node and one peer per split (`threads` torch threads each); measure through them.

    `push`: peers send their output straight to the next peer (else only the client relays it)."""
    from client import AutoDistributedModelForCausalLM
    from swarm.config import ClientConfig

    log_dir = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    with LocalSwarm(log_dir, env={"OMP_NUM_THREADS": str(threads)}) as swarm:
        swarm.start_bootstrap()
        for blocks in splits:
            swarm.start_peer(blocks, model=model_name, extra_args=["--num-threads", str(threads)], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_name, initial_peers=swarm.initial_peers, client_config=ClientConfig(push_steps=push)
        )
        try:
            def generate(ids, new_tokens):
                return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            prefill_s, decode_tps = measure(generate, input_ids, repeats)
        finally:
            model.close()
        rss = [group_memory_mib(node.pid) for node in swarm.nodes[1:]]
    return prefill_s, decode_tps, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process (local model, client)")
    parser.add_argument("--peer-threads", type=int, default=1, help="torch threads of each peer")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from swarm.models import load_config, resolve_model

    source = resolve_model(args.model)
    num_blocks = load_config(source).num_hidden_layers
    input_ids = torch.randint(100, 10_000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))

    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()

    def local_generate(ids, new_tokens):
        return local.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    local_prefill, local_tps = measure(local_generate, input_ids, args.repeats)
    local_rss = psutil.Process().memory_info().rss / 2**20

    third = num_blocks // 3
    thirds = [f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{num_blocks}"]
    runs = {  # name: (peers' blocks, push)
        "swarm, 1 peer": ([f"0:{num_blocks}"], True),
        "3 peers, relay": (thirds, False),
        "swarm, 3 peers": (thirds, True),
    }
    print(f"model {args.model} ({num_blocks} blocks), prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
          f"{args.threads} threads local/client, {args.peer_threads} per peer, medians of {args.repeats}")
    print(f"{'setup':<16} {'prefill ms':>10} {'decode tok/s':>13} {'ratio vs local':>15}  per peer: RSS / group PSS MiB")
    print(f"{'local':<16} {1000 * local_prefill:>10.0f} {local_tps:>13.1f} {1.0:>15.2f}  (this process: {local_rss:.0f})")
    for name, (splits, push) in runs.items():
        prefill_s, tps, rss = swarm_run(args.model, splits, input_ids, args.repeats, args.peer_threads, push)
        rss_text = ", ".join(f"{main:.0f} / {group:.0f}" for main, group in rss)
        print(f"{name:<16} {1000 * prefill_s:>10.0f} {tps:>13.1f} {tps / local_tps:>15.2f}  {rss_text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
