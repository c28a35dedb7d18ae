"""Serving many users: N concurrent streaming clients through the HTTP API (`swarm.api`) against a
local swarm (a bootstrap node and 3 peers, 10 blocks each of the default model).

For N in --streams (default 1, 4, 16), N threads each stream one chat-less completion at a time
with the `openai` package for --seconds; prints aggregate generated tokens/s, time to first token
and time per output token (median and p90), and the ratio of aggregate tokens/s at the largest N
to N = 1. `--max-batch 1` turns the API's batching off (each request its own session, as a plain
client would), `--batch-steps 1` the peers' batching, for comparison.

    .venv/bin/python benchmarks/serving.py [--streams 1 4 16] [--max-tokens 32] [--seconds 30] [--peer-threads N] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.tools.local import LocalSwarm

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "Water boils at", "My favourite book is", "In the beginning", "The quick brown fox"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far (user + system)."""
    try:
        root = psutil.Process(pid)
        return sum(sum(process.cpu_times()[:2]) for process in [root, *root.children(recursive=True)])
    except psutil.Error:
        return float("nan")


def run_streams(client, streams: int, seconds: float, max_tokens: int) -> dict:
    ttft, tpot, tokens, failures = [], [], [0] * streams, []
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        turn = index
        while time.monotonic() < stop_at:
            started, first, count = time.perf_counter(), None, 0
            try:
                for chunk in client.completions.create(
                    model="smollm2-135m", prompt=PROMPTS[turn % len(PROMPTS)], max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True},
                ):
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        count = chunk.usage.completion_tokens
            except Exception as exc:  # counted and reported, never raised in a thread
                failures.append(repr(exc))
                continue
            done = time.perf_counter()
            if first is not None:
                ttft.append(first - started)
            count = count or max_tokens
            if first is not None and count > 1:
                tpot.append((done - first) / (count - 1))
            tokens[index] += count
            turn += len(PROMPTS) // 2 + 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"tokens_s": sum(tokens) / elapsed, "ttft": ttft, "tpot": tpot, "failures": failures, "requests": len(ttft)}


def start_api(swarm: LocalSwarm, folder: Path, extra_args: list[str] = ()):
    """`python -m swarm.api` over `swarm` on a free loopback port, once it answers: (process, openai client)."""
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = subprocess.Popen(
        [sys.executable, "-m", "swarm.api", "--initial-peers", *swarm.initial_peers, "--port", str(port),
         "--jobs-dir", str(folder / "jobs"), *extra_args],
        stdout=open(folder / "api.log", "w"), stderr=subprocess.STDOUT, env=swarm.env, start_new_session=True,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.models.list()
            return api, client
        except openai.APIConnectionError:
            if time.monotonic() > deadline or api.poll() is not None:
                api.kill()
                raise RuntimeError(f"the API did not start: see {folder / 'api.log'}") from None
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--peer-threads", type=int, default=1,
                        help="torch threads per peer (0: torch's choice, all cores); with 16 streams on 2 cores, 1 goes furthest "
                        "with the API's 2 lanes, all cores with --lanes 1")
    parser.add_argument("--batch-steps", type=int, default=32, help="the peers' --batch-steps (1: no batching)")
    parser.add_argument("--max-batch", type=int, default=16, help="the API's --max-batch (1: each request alone)")
    parser.add_argument("--lanes", type=int, default=2, help="the API's --lanes (batched sessions in flight at once)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(tempfile.mkdtemp(prefix="swarm-bench-serving-"))
    threads = ["--num-threads", str(args.peer_threads)] if args.peer_threads else []
    with LocalSwarm(folder, env={"OMP_NUM_THREADS": str(args.peer_threads)} if args.peer_threads else {}) as swarm:
        if not args.peer_threads:
            swarm.env.pop("OMP_NUM_THREADS", None)
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_peer(blocks, model="smollm2-135m", wait=False, extra_args=[*threads, "--batch-steps", str(args.batch_steps)])
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        api, client = start_api(swarm, folder, ["--max-batch", str(args.max_batch), "--lanes", str(args.lanes)])
        try:
            run_streams(client, 1, 3.0, 4)  # warm-up
            print(f"default model through the API (--max-batch {args.max_batch} --lanes {args.lanes}) and 3 peers ({args.peer_threads or 'all'} "
                  f"thread(s) each, --batch-steps {args.batch_steps}), {args.max_tokens} new tokens per request, greedy, "
                  f"{args.seconds:.0f} s per row")
            print(f"{'streams':>7} {'requests':>8} {'tokens/s':>9} {'TTFT med/p90 s':>15} {'TPOT med/p90 ms':>16}  "
                  f"CPU s per token: API / peers  failures")
            processes = {"api": api.pid, **{f"peer{index}": node.pid for index, node in enumerate(swarm.nodes[1:])}}
            rates = {}
            for streams in args.streams:
                before = {name: cpu_seconds(pid) for name, pid in processes.items()}
                result = run_streams(client, streams, args.seconds, args.max_tokens)
                spent = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
                generated = max(1.0, result["tokens_s"] * args.seconds)
                cpu = f"{1000 * spent['api'] / generated:.0f} / " + ", ".join(
                    f"{1000 * value / generated:.0f}" for name, value in spent.items() if name != "api")
                rates[streams] = result["tokens_s"]
                ttft, tpot = result["ttft"], result["tpot"]
                print(f"{streams:>7} {result['requests']:>8} {result['tokens_s']:>9.1f} "
                      f"{statistics.median(ttft) if ttft else float('nan'):>7.2f}/{percentile(ttft, 0.9):<7.2f} "
                      f"{1000 * statistics.median(tpot) if tpot else float('nan'):>8.0f}/{1000 * percentile(tpot, 0.9):<7.0f}  "
                      f"{cpu + ' ms':<28} {len(result['failures'])} {result['failures'][:2]}", flush=True)
            low, high = min(rates), max(rates)
            print(f"aggregate tokens/s at {high} streams over {low}: {rates[high] / rates[low]:.2f}x")
        finally:
            api.terminate()
            api.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
