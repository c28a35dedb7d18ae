"""`python -m swarm.demo` (`make demo`): a whole swarm on this machine, end to end.

Starts a bootstrap node and three peers serving 10 blocks each of the default model on 127.0.0.1,
generates a completion through them, prints the text, the route and tokens/s, and stops everything.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from swarm.cli import limit_openmp_spinning, setup_logging
from swarm.tools.local import LocalSwarm

PROMPT = "The capital of France is"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    setup_logging()
    limit_openmp_spinning()  # this process is the client, on the same cores as the peers

    from swarm.models import DEFAULT_MODEL, resolve_model

    print(f"swarm demo: preparing {DEFAULT_MODEL} (converted once into the user cache)", flush=True)
    resolve_model(DEFAULT_MODEL)
    log_dir = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    with LocalSwarm(log_dir) as swarm:  # peers use every core; idle ones sleep (limit_openmp_spinning)
        print("swarm demo: starting a bootstrap node and 3 peers on 127.0.0.1 ...", flush=True)
        swarm.start_bootstrap()
        for index, blocks in enumerate(("0:10", "10:20", "20:30")):
            name = f"demo-peer-{index + 1}"
            swarm.start_peer(blocks, model=DEFAULT_MODEL, extra_args=["--public-name", name], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        print(f"swarm demo: swarm ready (logs in {log_dir})", flush=True)
        run_client(swarm.initial_peers, args.prompt, args.max_new_tokens)
    print("swarm demo: all processes stopped", flush=True)
    return 0


def run_client(initial_peers: list[str], prompt: str, max_new_tokens: int) -> None:
    from client import SwarmClient
    from client.timing import summarize

    with SwarmClient(initial_peers=initial_peers) as client:
        input_ids = client.tokenizer(prompt, return_tensors="pt").input_ids
        with client.model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
            started = time.perf_counter()
            output = client.model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
            elapsed_s = time.perf_counter() - started
            route = session.describe_route()
            timing = summarize(list(session.timings))
        new_tokens = output.shape[1] - input_ids.shape[1]
        text = client.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    print("\n=== prompt ===\n" + prompt)
    print("=== completion ===\n" + text.strip())
    print("=== route ===")
    for line in route:
        print("  " + line)
    print("=== where a token's time goes ===")
    for line in timing:
        print("  " + line)
    print(f"=== speed ===\n  {new_tokens} tokens in {elapsed_s:.2f} s: {new_tokens / elapsed_s:.1f} tokens/s (prefill included)\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
