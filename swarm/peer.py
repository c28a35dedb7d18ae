"""`python -m swarm.peer`: serve a range of a model's blocks to the swarm (`--blocks auto` by default:
as many as fit, where the swarm needs them most, moving as the swarm changes).

Parses flags (and an optional TOML file and SWARM_PEER_* environment variables) into a PeerConfig and
runs `peers.server.Peer` until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swarm.cli import PEER_SPIN_COUNT, fail, limit_openmp_spinning, limit_p2pd_threads, run_until_signal, setup_logging
from swarm.config import PeerConfig, build_config, env_overrides, load_toml
from swarm.errors import SwarmError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swarm.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML file with PeerConfig fields; flags override it")
    parser.add_argument("--model", help="model name, Hugging Face id or local folder (default: smollm2-135m)")
    parser.add_argument(
        "--blocks", help="START:END (END exclusive), a count N placed where the swarm needs it, or auto (default)"
    )
    parser.add_argument("--initial-peers", nargs="+", metavar="MULTIADDR", help="peers of the swarm to join")
    parser.add_argument("--new-swarm", action="store_true", help="start a new swarm (no initial peers)")
    parser.add_argument("--host-maddrs", nargs="+", metavar="MULTIADDR", help="addresses to listen on")
    parser.add_argument("--announce-maddrs", nargs="+", metavar="MULTIADDR", help="addresses others should dial")
    parser.add_argument("--identity", type=Path, help="private key file for a stable peer id (created if missing)")
    parser.add_argument("--swarm-key", type=Path, help="file with the shared secret of a private swarm: nodes without it are refused")
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--cache-tokens", type=int, help="KV-cache budget in tokens over all sessions")
    parser.add_argument("--cache-gb", type=float, help="KV-cache budget in GiB (replaces --cache-tokens)")
    parser.add_argument("--max-sessions", type=int, help="inference sessions served at once (default 128)")
    parser.add_argument("--batch-steps", type=int, help="decode steps of different sessions batched together, at most (default 32; 1: off)")
    parser.add_argument("--session-idle-timeout", type=float, dest="session_idle_timeout_s",
                        help="free a session's cache after this many seconds without a step (default 300)")
    parser.add_argument("--cache-wait", type=float, dest="cache_wait_s",
                        help="seconds a new session waits for cache or a slot before 'overloaded' (default 10)")
    parser.add_argument("--max-length", type=int, help="longest sequence a session may use, in tokens")
    parser.add_argument("--public-name", help="name shown to others")
    parser.add_argument("--dht-prefix", help="DHT key prefix (default: derived from the model name)")
    parser.add_argument("--announce-period", type=float, dest="announce_period_s", help="seconds between announcements")
    parser.add_argument("--num-threads", type=int, help="torch compute threads")
    parser.add_argument("--throughput", help="tokens/s through one block: auto (measure once, cached; default), eval, or a number")
    parser.add_argument("--max-memory-gb", type=float, help="memory --blocks auto may fill (default: what the device has free)")
    parser.add_argument("--rebalance-period", type=float, dest="rebalance_period_s", help="mean seconds between rebalance checks")
    parser.add_argument("--gap-check-period", type=float, dest="gap_check_period_s",
                        help="mean seconds between checks for blocks nobody serves (default 5)")
    parser.add_argument("--balance-threshold", type=float, help="move when the weakest block gains this fraction (default 0.1)")
    parser.add_argument("--join-jitter", type=float, dest="join_jitter_s", help="max random wait before choosing blocks")
    parser.add_argument("--handoff-grace", type=float, dest="handoff_grace_s", help="seconds old sessions go on after a move")
    parser.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_s", help="seconds to let running steps finish on exit")
    parser.add_argument("--adapters", nargs="+", metavar="DIR", help="peft LoRA adapter folders to serve (safetensors only)")
    parser.add_argument("--verbose", action="store_true", help="log every RPC (DEBUG)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    file_layer = load_toml(args.config) if args.config else {}
    flags = {
        key: getattr(args, key)
        for key in ("model", "blocks", "device", "dtype", "cache_tokens", "cache_gb", "max_sessions", "batch_steps",
                    "session_idle_timeout_s", "cache_wait_s", "max_length", "public_name",
                    "dht_prefix", "announce_period_s", "num_threads", "throughput", "max_memory_gb", "rebalance_period_s",
                    "gap_check_period_s", "balance_threshold", "join_jitter_s", "handoff_grace_s", "shutdown_grace_s", "adapters")
        if getattr(args, key) is not None
    }
    network = {
        key: value
        for key, value in {
            "initial_peers": args.initial_peers,
            "new_swarm": args.new_swarm or None,
            "host_maddrs": args.host_maddrs,
            "announce_maddrs": args.announce_maddrs,
            "identity_path": args.identity,
            "swarm_key_path": args.swarm_key,
        }.items()
        if value is not None
    }
    if network:
        flags["network"] = network
    return build_config(PeerConfig, file_layer, env_overrides("SWARM_PEER_"), flags)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    limit_openmp_spinning(PEER_SPIN_COUNT)
    limit_p2pd_threads()
    try:
        config = config_from_args(args)
        from peers.server import Peer  # heavy imports only once the flags are known to be valid

        peer = Peer(config)
    except SwarmError as exc:
        return fail(str(exc))
    return run_until_signal(peer.run)


if __name__ == "__main__":
    sys.exit(main())
