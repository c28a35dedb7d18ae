"""Generation over slow links: the default model on 3 peers, every node behind a relay that delays
each message by D ms one way (`swarm.tools.delay`, since this kernel has no netem).

For each D in --delays (default 0, 10, 25, 50 ms) it starts a bootstrap node and 3 peers (10 blocks
each) behind relays, and measures single-sequence greedy decoding: ms per token (the median of
--repeats generations of --new-tokens tokens after a prompt of 16). It prints the local compute time
of the same tokens with plain transformers, measured in this run, and the **trips per token**: the
slope of ms/token against D, fitted over all delays. A push chain over 3 peers costs 4 trips
(client -> p1 -> p2 -> p3 -> client); relaying every hop through the client costs 6.

With --streams N (default 16; 0: skip) it also measures N concurrent streams through the HTTP API
(`swarm.api`, batching on) at --stream-delay ms (default 25): aggregate tokens/s.

    .venv/bin/python benchmarks/wan.py [--delays 0 10 25 50] [--repeats 3] [--new-tokens 24] [--streams 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.cli import limit_openmp_spinning

limit_openmp_spinning()

import torch  # noqa: E402

from swarm.tools.delay import Link  # noqa: E402
from swarm.tools.local import LocalSwarm  # noqa: E402

MODEL = "smollm2-135m"
SPLITS = ("0:10", "10:20", "20:30")
PROMPT_TOKENS = 16


def decode_ms(generate, input_ids, new_tokens: int) -> float:
    """ms per decoded token: a generation of `new_tokens` tokens less one of 1 token (prefill and set-up)."""
    started = time.perf_counter()
    generate(input_ids, 1)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    generate(input_ids, new_tokens)
    return 1000 * (time.perf_counter() - started - first_s) / (new_tokens - 1)


def prompt_ids() -> torch.Tensor:
    return torch.randint(100, 10_000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def local_ms(repeats: int, new_tokens: int) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    from swarm.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL).path, dtype=torch.float32).eval()

    def generate(ids, count):
        return model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    generate(prompt_ids(), 2)
    tokens = generate(prompt_ids(), new_tokens)[0, PROMPT_TOKENS:].tolist()
    return statistics.median(decode_ms(generate, prompt_ids(), new_tokens) for _ in range(repeats)), tokens


def start_swarm(folder: Path, delay_ms: float, peer_threads: int, rate_mbit: float | None) -> LocalSwarm:
    swarm = LocalSwarm(folder, env={"OMP_NUM_THREADS": str(peer_threads)}, link=Link(delay_ms, rate_mbit))
    swarm.__enter__()
    try:
        swarm.start_bootstrap()
        for blocks in SPLITS:
            swarm.start_peer(blocks, model=MODEL, wait=False, extra_args=["--num-threads", str(peer_threads)])
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
    except BaseException:
        swarm.__exit__(None, None, None)
        raise
    return swarm


def measure_sequence(swarm: LocalSwarm, repeats: int, new_tokens: int) -> tuple[float, list[int], list[str]]:
    """(median ms/token, the greedy tokens, where a token's time goes) of one client generating alone."""
    from client import AutoDistributedModelForCausalLM
    from client.timing import summarize

    model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=swarm.initial_peers)
    try:
        def generate(ids, count):
            return model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)

        generate(prompt_ids(), 2)  # warm-up: routes, pings, open streams
        with model.inference_session(max_length=PROMPT_TOKENS + new_tokens) as session:
            tokens = generate(prompt_ids(), new_tokens)[0, PROMPT_TOKENS:].tolist()
            timing = summarize(list(session.timings))
        return statistics.median(decode_ms(generate, prompt_ids(), new_tokens) for _ in range(repeats)), tokens, timing
    finally:
        model.close()


def measure_streams(swarm: LocalSwarm, folder: Path, streams: int, seconds: float) -> dict:
    from benchmarks.serving import run_streams, start_api

    api, client = start_api(swarm, folder)
    try:
        run_streams(client, streams, 5.0, 8)  # warm-up
        return run_streams(client, streams, seconds, 32)
    finally:
        api.terminate()
        try:
            api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 10, 25, 50], help="one-way delays per link, ms")
    parser.add_argument("--repeats", type=int, default=3, help="generations per delay (the median is printed)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--peer-threads", type=int, default=1, help="torch threads per peer")
    parser.add_argument("--rate-mbit", type=float, default=None, help="bandwidth cap of every link (default: none)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent API streams at --stream-delay (0: skip)")
    parser.add_argument("--stream-delay", type=float, default=25.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the streams run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)

    local, reference_tokens = local_ms(args.repeats, args.new_tokens)
    print(f"model {MODEL}, 3 peers {', '.join(SPLITS)}, prompt {PROMPT_TOKENS}, {args.new_tokens} new tokens, "
          f"{args.repeats} generations per delay; local transformers: {local:.1f} ms/token", flush=True)
    print(f"{'one-way delay ms':>16} {'decode ms/token':>16} {'tokens equal':>13}", flush=True)
    points, streams = [], None
    for delay in args.delays:
        folder = Path(tempfile.mkdtemp(prefix=f"swarm-bench-wan-{delay:g}-"))
        swarm = start_swarm(folder, delay, args.peer_threads, args.rate_mbit)
        try:
            ms, tokens, timing = measure_sequence(swarm, args.repeats, args.new_tokens)
            points.append((delay, ms))
            print(f"{delay:>16g} {ms:>16.1f} {str(tokens == reference_tokens):>13}", flush=True)
            for line in timing:
                print(f"{'':>18}{line}", flush=True)
            if args.streams and delay == args.stream_delay:
                streams = measure_streams(swarm, folder, args.streams, args.seconds)
        finally:
            swarm.__exit__(None, None, None)
    if len(points) > 1:
        print(f"trips per token (slope of ms/token against the one-way delay): {slope(points):.2f}")
    if streams is not None:
        print(f"{args.streams} streams at {args.stream_delay:g} ms: {streams['tokens_s']:.1f} tokens/s, "
              f"{streams['requests']} requests, {len(streams['failures'])} failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
