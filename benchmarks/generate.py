"""Single-sequence generation speed: swarms of 1 and 3 peers on loopback against plain transformers.

Measures, in one run and on the same weights: prefill time of a 128-token prompt and greedy decode
tokens/s over 64 new tokens, for local transformers and through the swarm, and prints the ratios and
each peer's memory (RSS of its process group). The swarm rows use the client's defaults, which on
loopback relay every activation through the client (`ClientConfig.push_steps="auto"`); the "push"
row makes each peer send its output straight to the next one, as the client does where round trips
are slower.

The machine is shared and noisy, so every swarm setup is measured in --repeats rounds, and each
round also measures the local reference right before the swarm: a round's ratio compares numbers
taken seconds apart, and the printed ratio is the median over rounds.

The local reference is plain transformers with --threads threads, measured twice per round: in this
process, which runs with `GOMP_SPINCOUNT=10000` like the client (peers spin longer, see
`swarm.cli.PEER_SPIN_COUNT`), and in a subprocess with the environment as the user gave it
(libgomp's default spinning, unless the user set it). The reference is the faster of the two
configurations: the one with the higher median tokens/s over every round of the run. Each ratio
compares a round's swarm run with that configuration's run of the same round. The faster run of
each round is printed too: a round's maximum of two noisy runs is biased upwards (it takes the
lucky one), so that ratio is the conservative one.

    .venv/bin/python benchmarks/generate.py [--model smollm2-135m] [--repeats 5] [--threads 2] [--peer-threads N]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.cli import PEER_SPIN_COUNT, limit_openmp_spinning

USER_ENVIRONMENT = dict(os.environ)  # before limit_openmp_spinning(): what the local reference subprocess gets
if "--client-spin=default" not in sys.argv:
    limit_openmp_spinning()  # before torch is imported: this process is the client, on the same cores as the peers

import psutil  # noqa: E402
import torch  # noqa: E402

from swarm.tools.local import LocalSwarm  # noqa: E402

PROMPT_TOKENS = 128
NEW_TOKENS = 64
HERE, USER_ENV = "this process", "user's environment"  # the local reference's two configurations


def measure_once(generate, input_ids) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one generation of NEW_TOKENS tokens."""
    started = time.perf_counter()
    generate(input_ids, 1)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    generate(input_ids, NEW_TOKENS)
    total_s = time.perf_counter() - started
    return first_s, (NEW_TOKENS - 1) / max(total_s - first_s, 1e-9)


def load_local(model_name: str):
    from transformers import AutoModelForCausalLM

    from swarm.models import resolve_model

    local = AutoModelForCausalLM.from_pretrained(resolve_model(model_name).path, dtype=torch.float32).eval()

    def generate(ids, new_tokens):
        return local.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    return generate


def prompt_ids() -> torch.Tensor:
    return torch.randint(100, 10_000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def serve_local(model_name: str, threads: int) -> int:
    """--serve-local: the local reference in this process, one measurement per line read from stdin."""
    torch.set_num_threads(threads)
    generate, input_ids = load_local(model_name), prompt_ids()
    generate(input_ids, 2)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(measure_once(generate, input_ids)), flush=True)
    return 0


class LocalReference:
    """Plain transformers, measured here (spinning limited) and in a subprocess (the user's environment)."""

    def __init__(self, model_name: str, threads: int):
        self.generate, self.input_ids = load_local(model_name), prompt_ids()
        self.generate(self.input_ids, 2)
        self.worker = subprocess.Popen(
            [sys.executable, __file__, "--serve-local", "--model", model_name, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=USER_ENVIRONMENT,
        )
        if self.worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the local reference subprocess did not start")

    def measure(self) -> dict[str, tuple[float, float]]:
        """{configuration: (prefill seconds, decode tokens/s)} of one run in each, measured now."""
        here = measure_once(self.generate, self.input_ids)
        self.worker.stdin.write("measure\n")
        self.worker.stdin.flush()
        user_env = tuple(json.loads(self.worker.stdout.readline()))
        return {HERE: here, USER_ENV: user_env}

    def close(self) -> None:
        self.worker.stdin.close()
        self.worker.wait(timeout=30)


def group_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS of the peer process, PSS of its whole group: DHT process and p2pd included, shared pages split)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        pss = sum(process.memory_full_info().pss for process in processes)
        return root.memory_info().rss / 2**20, pss / 2**20
    except psutil.Error:
        return float("nan"), float("nan")


def swarm_run(model_name: str, splits: list[str], reference: LocalReference, repeats: int, threads: int | None, push) -> dict:
    """Start a bootstrap node and one peer per split; measure the swarm and the local reference in
    alternating rounds. `threads`: torch threads per peer (None: torch's choice, all cores).
    `push`: ClientConfig.push_steps (True: peers send their output straight to the next peer)."""
    from client import AutoDistributedModelForCausalLM
    from swarm.config import ClientConfig

    log_dir = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    extra_args = ["--num-threads", str(threads)] if threads else []
    env["GOMP_SPINCOUNT"] = os.environ.get("GOMP_SPINCOUNT", PEER_SPIN_COUNT)  # what peers set anyway, unless told
    with LocalSwarm(log_dir, env=env) as swarm:
        if not threads:
            swarm.env.pop("OMP_NUM_THREADS", None)
        swarm.start_bootstrap()
        for blocks in splits:
            swarm.start_peer(blocks, model=model_name, extra_args=extra_args, wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_name, initial_peers=swarm.initial_peers, client_config=ClientConfig(push_steps=push)
        )
        try:
            def generate(ids, new_tokens):
                return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            generate(reference.input_ids, 2)  # warm-up
            rounds = []  # (swarm (prefill s, tokens/s), {local configuration: (prefill s, tokens/s)})
            for _ in range(repeats):
                local = reference.measure()
                rounds.append((measure_once(generate, reference.input_ids), local))
        finally:
            model.close()
        memory = [group_memory_mib(node.pid) for node in swarm.nodes[1:]]
    return {"rounds": rounds, "memory": memory}


def local_medians(results: dict) -> dict[str, float]:
    """{local configuration: median decode tokens/s over every round of every setup}."""
    rounds = [local for result in results.values() for _, local in result["rounds"]]
    return {configuration: statistics.median(local[configuration][1] for local in rounds) for configuration in (HERE, USER_ENV)}


def summary(result: dict, configuration: str) -> dict:
    """Medians of one setup's rounds against the local `configuration`, and against each round's faster run."""
    median, rounds = statistics.median, result["rounds"]
    faster = [max(local.values(), key=lambda run: run[1]) for _, local in rounds]
    return {
        "prefill_s": median(swarm[0] for swarm, _ in rounds), "tps": median(swarm[1] for swarm, _ in rounds),
        "local_tps": median(local[configuration][1] for _, local in rounds),
        "ratios": [swarm[1] / local[configuration][1] for swarm, local in rounds],
        "ratio_vs_faster_run": median(swarm[1] / run[1] for (swarm, _), run in zip(rounds, faster)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per setup (each: local, then swarm)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process (local model, client)")
    parser.add_argument("--peer-threads", type=int, default=0, help="torch threads of each peer (0: torch's choice, all cores)")
    parser.add_argument("--client-spin", choices=["limited", "default"], default="limited",
                        help="this process's OpenMP spinning: limited like the peers', or libgomp's default (give it as --client-spin=default)")
    parser.add_argument("--serve-local", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    USER_ENVIRONMENT.setdefault("HF_HUB_OFFLINE", "1")
    if args.serve_local:
        return serve_local(args.model, args.threads)
    torch.set_num_threads(args.threads)

    from swarm.models import load_config, resolve_model

    num_blocks = load_config(resolve_model(args.model)).num_hidden_layers
    reference = LocalReference(args.model, args.threads)
    third = num_blocks // 3
    thirds = [f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{num_blocks}"]
    runs = {  # name: (peers' blocks, ClientConfig.push_steps)
        "swarm, 1 peer": ([f"0:{num_blocks}"], "auto"),
        "swarm, 3 peers": (thirds, "auto"),  # the default: on loopback it relays (see push_min_rtt_s)
        "3 peers, push": (thirds, True),
    }
    print(f"model {args.model} ({num_blocks} blocks), prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
          f"{args.threads} threads local/client, {args.peer_threads or 'all'} per peer, {args.repeats} rounds per setup")
    results = {}
    try:
        for name, (splits, push) in runs.items():
            results[name] = swarm_run(args.model, splits, reference, args.repeats, args.peer_threads or None, push)
            print(f"measured: {name}", flush=True)
        medians = local_medians(results)
        configuration = max(medians, key=medians.get)  # the faster configuration over the whole run
        print(f"local reference, median tokens/s over all rounds: {medians[HERE]:.1f} in this process (GOMP_SPINCOUNT="
              f"{os.environ.get('GOMP_SPINCOUNT', 'unset')}), {medians[USER_ENV]:.1f} with the user's environment "
              f"(GOMP_SPINCOUNT={USER_ENVIRONMENT.get('GOMP_SPINCOUNT', 'unset')}); the reference is the faster: {configuration}")
        print(f"{'setup':<16} {'prefill ms':>10} {'decode tok/s':>13} {'local tok/s':>12} {'ratio (median)':>15} "
              f"{'vs faster run':>14}  ratio per round; per peer: RSS / group PSS MiB")
        for name, result in results.items():
            row = summary(result, configuration)
            rounds = " ".join(f"{ratio:.2f}" for ratio in row["ratios"])
            memory = ", ".join(f"{rss:.0f} / {pss:.0f}" for rss, pss in result["memory"])
            print(f"{name:<16} {1000 * row['prefill_s']:>10.0f} {row['tps']:>13.1f} {row['local_tps']:>12.1f} "
                  f"{statistics.median(row['ratios']):>15.2f} {row['ratio_vs_faster_run']:>14.2f}  [{rounds}]; {memory}")
    finally:
        reference.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
