"""The client of the NAT test (tests/swarm/test_nat.py), run in a namespace of its own: one inference
session, generated in phases; between phases it waits for a line on stdin (the test kills or starts
peers meanwhile). Prints one JSON line per phase: the tokens so far, the route and which hops were pushed."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def connections(model) -> dict[str, list[str]]:
    """peer id -> the addresses of our open connections to it (a /p2p-circuit one goes through a relay)."""
    from swarm.loop_thread import run_coroutine

    peers = run_coroutine(model.sequence.p2p.list_peers())
    return {info.peer_id.to_base58(): [str(addr) for addr in info.addrs] for info in peers}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--listen", required=True, help="this client's multiaddr")
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--tokens-per-phase", type=int, nargs="+", default=[4, 4, 4])
    args = parser.parse_args()

    from client import AutoDistributedModelForCausalLM
    from swarm.config import ClientConfig, NetworkConfig

    network = NetworkConfig(initial_peers=args.initial_peers, host_maddrs=[args.listen], client_mode=True)
    config = ClientConfig(network=network, push_steps=True, route_wait_s=60)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers, client_config=config)
    ids = torch.randint(3, 128, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(7))
    total = args.prompt_tokens + sum(args.tokens_per_phase)
    try:
        with model.inference_session(max_length=total) as session:
            for number, count in enumerate(args.tokens_per_phase):
                if number:
                    sys.stdin.readline()  # the test's go-ahead
                ids = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, eos_token_id=None, pad_token_id=0)
                last = session.timings[-1]
                print(json.dumps({
                    "phase": number, "tokens": ids[0].tolist(), "route": [list(hop) for hop in session.route],
                    "pushed": [hop.pushed for hop in last.hops], "connections": connections(model),
                }), flush=True)
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
