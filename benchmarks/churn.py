"""Generation under churn: peers are killed and restarted at random while a client generates.

Starts a local swarm on 127.0.0.1 (a bootstrap node and --peers-per-range peers for each block range),
runs the same --requests greedy generations twice, one after another: first without faults, then
while a background thread SIGKILLs a random peer every --kill-every seconds on average (never the
last ready peer of its range) and starts a replacement for its range --restart-after seconds later.
Prints completed, failed (target 0) and mismatched requests (tokens differing from the run without
faults; target 0: greedy decoding and exact failover), peers killed and restarted, and the slowdown
of the run with faults against the one without. Exits non-zero if any request failed or mismatched.
It does not compare with plain transformers (see tests/test_failover.py and benchmarks/generate.py).

    .venv/bin/python benchmarks/churn.py [--model smollm2-135m] [--requests 12] [--kill-every 4] [--seed 0]

Logs of every node and of the client (retries, re-routes) go to a temporary folder printed at start.
Reading the numbers: a kill between two steps is noticed at the next send, at once; a kill while a
step is in flight is noticed by the client's liveness ping within about a second (a hivemind stream
does not tell a waiting reader that the remote died); --step-timeout only bounds slow steps.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.tools.local import LocalSwarm, LocalSwarmError, Node

# one torch thread per peer (more processes than cores here); peers announce a given throughput
# instead of measuring it at start, so a replacement is ready sooner
PEER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SWARM_PEER_THROUGHPUT": "1"}


@dataclass
class Result:
    seconds: float
    tokens: torch.Tensor | None  # [1, prompt + new]; None if generate() raised
    error: str = ""


class Churn:
    """Kills a random ready peer every ~kill_every_s seconds (exponential gaps), never the last ready
    one of its range, and starts a replacement for that range restart_after_s seconds later.

    Runs in a background thread between start() and stop(); replacements become ready on their own
    (a waiter thread each). It does not stop the swarm: LocalSwarm does."""

    def __init__(self, swarm: LocalSwarm, live: dict[str, list[Node]], args: argparse.Namespace, peer_args: list[str]):
        self.swarm, self.live, self.args, self.peer_args = swarm, live, args, peer_args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self.waiters: list[threading.Thread] = []
        self.session = None  # the running request's InferenceSession, set by the main thread
        self.started_at = 0.0
        self.killed = self.killed_on_route = self.restarted = self.ready = 0
        self.restart_errors: list[str] = []

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()

    def join_waiters(self) -> None:
        """After the swarm is closed: waiters of replacements that never got ready see them exit."""
        for waiter in self.waiters:
            waiter.join()

    def _run(self) -> None:
        next_kill_s = self.rng.expovariate(1 / self.args.kill_every)
        restarts: list[tuple[float, str]] = []  # (due seconds, range)
        while not self.stopping.wait(0.1):
            now_s = time.monotonic() - self.started_at
            for due_s, span in [item for item in restarts if item[0] <= now_s]:
                restarts.remove((due_s, span))
                self._restart(span)
            if now_s >= next_kill_s:  # with no peer to spare, the kill waits for a replacement to be ready
                span = self._kill_one(now_s)
                if span is not None:
                    restarts.append((now_s + self.args.restart_after, span))
                    next_kill_s = now_s + self.rng.expovariate(1 / self.args.kill_every)

    def _kill_one(self, now_s: float) -> str | None:
        with self.lock:
            candidates = [(span, node) for span, nodes in self.live.items() if len(nodes) > 1 for node in nodes]
            if not candidates:
                return None
            span, node = self.rng.choice(candidates)
            self.live[span].remove(node)
        session = self.session
        route = {peer_id for peer_id, _, _ in session.route} if session is not None else set()
        on_route = peer_id_of(node) in route
        node.kill()
        self.killed += 1
        self.killed_on_route += on_route
        print(f"  {now_s:6.1f} s  killed {node.name}{' (on the running route)' if on_route else ''}", flush=True)
        return span

    def _restart(self, span: str) -> None:
        node = self.swarm.start_peer(span, model=self.args.model, extra_args=self.peer_args, wait=False)
        self.restarted += 1
        waiter = threading.Thread(target=self._await_ready, args=(span, node), name=f"wait-{node.name}", daemon=True)
        waiter.start()
        self.waiters.append(waiter)

    def _await_ready(self, span: str, node: Node) -> None:
        try:
            self.swarm.wait_ready(node)
        except LocalSwarmError as exc:
            if not self.stopping.is_set():
                self.restart_errors.append(f"{node.name}: {exc}")
            return
        with self.lock:
            self.live[span].append(node)
            self.ready += 1
        print(f"  {time.monotonic() - self.started_at:6.1f} s  {node.name} ready", flush=True)


class CountingHandler(logging.Handler):
    """Counts WARNING records of the client (retries, re-routes)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def peer_id_of(node: Node) -> str:
    return node.maddrs[0].rsplit("/", 1)[-1] if node.maddrs else ""


def run_requests(model, prompts: list[torch.Tensor], new_tokens: int, churn: Churn | None) -> list[Result]:
    """One greedy generate() per prompt, one after another; an exception counts as a failed request."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    results = []
    for index, input_ids in enumerate(prompts):
        started = time.perf_counter()
        try:
            with model.inference_session(max_length=input_ids.shape[1] + new_tokens) as session:
                if churn is not None:
                    churn.session = session
                tokens = model.generate(input_ids, **kwargs)
            results.append(Result(time.perf_counter() - started, tokens))
        except Exception as exc:  # a benchmark counts failures; the client's log holds the details
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            results.append(Result(time.perf_counter() - started, None, error))
            print(f"  request {index} failed after {results[-1].seconds:.1f} s: {error}", flush=True)
        finally:
            if churn is not None:
                churn.session = None
    return results


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def parse_ranges(text: str | None, num_blocks: int) -> list[str]:
    """'0:10,10:20' -> ['0:10', '10:20'], checked to cover every block; None -> three equal thirds."""
    if text is None:
        third = num_blocks // 3
        return [f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{num_blocks}"]
    spans = [item.strip() for item in text.split(",") if item.strip()]
    covered = set()
    for span in spans:
        start, _, end = span.partition(":")
        covered.update(range(int(start), int(end)))
    if covered != set(range(num_blocks)):
        raise SystemExit(f"--ranges {text!r} must cover blocks 0:{num_blocks} exactly")
    return spans


def start_swarm(swarm: LocalSwarm, spans: list[str], args: argparse.Namespace, peer_args: list[str]) -> dict[str, list[Node]]:
    """Bootstrap node plus --peers-per-range peers per range, started together; returns range -> ready nodes."""
    swarm.start_bootstrap()
    started = [(span, swarm.start_peer(span, model=args.model, extra_args=peer_args, wait=False))
               for span in spans for _ in range(args.peers_per_range)]
    live: dict[str, list[Node]] = {span: [] for span in spans}
    for span, node in started:
        swarm.wait_ready(node)
        live[span].append(node)
    return live


def phase_row(name: str, results: list[Result], mismatched: str) -> tuple[str, list[float]]:
    seconds = [result.seconds for result in results if result.tokens is not None]
    failed = sum(result.tokens is None for result in results)
    median = statistics.median(seconds) if seconds else float("nan")
    row = (f"{name:<8} {len(results):>8} {len(seconds):>9} {failed:>6} {mismatched:>10} "
           f"{median:>8.2f} {percentile(seconds, 0.9):>6.2f} {percentile(seconds, 1.0):>6.2f} "
           f"{sum(result.seconds for result in results):>7.1f}")
    return row, seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name or local folder")
    parser.add_argument("--ranges", help="block ranges of the peers, e.g. 0:10,10:20,20:30 (default: three equal thirds)")
    parser.add_argument("--peers-per-range", type=int, default=2)
    parser.add_argument("--requests", type=int, default=12, help="generations per phase")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills (exponential gaps)")
    parser.add_argument("--restart-after", type=float, default=3.0, help="seconds from a kill to starting a replacement")
    parser.add_argument("--announce-period", type=float, default=1.0, help="peers' DHT announce period; records live 3 of them")
    parser.add_argument("--step-timeout", type=float, default=120.0, help="client: seconds to wait for one step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (the client)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the kills")
    args = parser.parse_args()
    if args.peers_per_range < 2:
        parser.error("--peers-per-range must be at least 2: a range never loses its last ready peer")
    return args


def log_client(log_dir: Path) -> CountingHandler:
    """Client and swarm logs to log_dir/client.log (not the terminal); returns a counter of client WARNINGs."""
    handler = logging.FileHandler(log_dir / "client.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("client", "swarm"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    warnings = CountingHandler()
    logging.getLogger("client").addHandler(warnings)
    return warnings


def print_summary(clean: list[Result], faulty: list[Result], churn: Churn, warnings: tuple[int, int]) -> int:
    """The table, the churn counts and the slowdown; returns failed + mismatched requests."""
    mismatched = sum(
        after.tokens is not None and before.tokens is not None and not torch.equal(after.tokens, before.tokens)
        for before, after in zip(clean, faulty)
    )
    failed = sum(result.tokens is None for result in clean + faulty)
    print(f"{'phase':<8} {'requests':>8} {'completed':>9} {'failed':>6} {'mismatched':>10} "
          f"{'median s':>8} {'p90 s':>6} {'max s':>6} {'total s':>7}")
    clean_row, clean_s = phase_row("clean", clean, "-")
    faulty_row, faulty_s = phase_row("churn", faulty, str(mismatched))
    print(clean_row)
    print(faulty_row)
    print(f"peers killed {churn.killed} ({churn.killed_on_route} on the running route), replacements started "
          f"{churn.restarted} ({churn.ready} ready before the end); client WARNING lines {warnings[0]} clean, "
          f"{warnings[1]} with faults")
    for error in churn.restart_errors:
        print(f"replacement failed: {error.splitlines()[0][:300]}")
    if clean_s and faulty_s:
        median_ratio = statistics.median(faulty_s) / statistics.median(clean_s)
        total_ratio = sum(result.seconds for result in faulty) / sum(result.seconds for result in clean)
        print(f"slowdown with faults: {median_ratio:.2f}x median, {total_ratio:.2f}x total")
    print(f"failed {failed}, mismatched {mismatched} (target 0)")
    return failed + mismatched


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from client import AutoDistributedModelForCausalLM
    from swarm.config import ClientConfig
    from swarm.models import load_config, resolve_model

    source = resolve_model(args.model)  # convert once, before the peers race for it
    config = load_config(source)
    spans = parse_ranges(args.ranges, config.num_hidden_layers)
    generator = torch.Generator().manual_seed(args.seed)
    low, high = (3, config.vocab_size) if config.vocab_size < 1000 else (100, min(config.vocab_size, 10_000))
    prompts = [torch.randint(low, high, (1, args.prompt_tokens), generator=generator) for _ in range(args.requests)]

    log_dir = Path(tempfile.mkdtemp(prefix="swarm-churn-"))
    warnings = log_client(log_dir)
    peer_args = ["--announce-period", str(args.announce_period), "--num-threads", "1"]
    print(f"model {args.model}, ranges {','.join(spans)} x {args.peers_per_range} peers, {args.requests} requests of "
          f"{args.prompt_tokens}+{args.new_tokens} tokens, a kill every ~{args.kill_every:g} s, restart after "
          f"{args.restart_after:g} s, step timeout {args.step_timeout:g} s, seed {args.seed}; logs in {log_dir}", flush=True)

    with LocalSwarm(log_dir, env=PEER_ENV) as swarm:
        live = start_swarm(swarm, spans, args, peer_args)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=swarm.initial_peers, client_config=ClientConfig(step_timeout_s=args.step_timeout)
        )
        churn = Churn(swarm, live, args, peer_args)
        try:
            run_requests(model, prompts[:1], args.new_tokens, None)  # warm-up: connections, first session
            print("without faults ...", flush=True)
            clean = run_requests(model, prompts, args.new_tokens, None)
            warnings_clean = warnings.count
            print("with faults ...", flush=True)
            churn.start()
            faulty = run_requests(model, prompts, args.new_tokens, churn)
        finally:
            churn.stop()
            model.close()
    churn.join_waiters()
    return 1 if print_summary(clean, faulty, churn, (warnings_clean, warnings.count - warnings_clean)) else 0


if __name__ == "__main__":
    sys.exit(main())
