"""`python -m swarm.dht`: a lightweight bootstrap node (DHT only, no blocks) that others join through."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from swarm import network
from swarm.cli import run_until_signal, setup_logging
from swarm.config import NetworkConfig
from swarm.identity import Identity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.dht", description=__doc__.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR", help="join an existing swarm")
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MULTIADDR")
    parser.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MULTIADDR")
    parser.add_argument("--identity", type=Path, help="private key file for a stable peer id (created if missing)")
    parser.add_argument("--swarm-key", type=Path, help="file with the shared secret of a private swarm: nodes without it are refused")
    args = parser.parse_args(argv)
    setup_logging()
    config = NetworkConfig(
        initial_peers=args.initial_peers,
        new_swarm=not args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=args.identity,
        swarm_key_path=args.swarm_key,
    )

    async def serve(stop: asyncio.Event) -> None:
        identity = Identity.load(config.identity_path) if config.identity_path else None  # a stable peer id
        dht = await asyncio.get_running_loop().run_in_executor(None, network.start_node, config, identity)
        try:
            print(f"swarm: listening on {' '.join(network.visible_maddrs(dht))}", flush=True)
            await stop.wait()
        finally:
            network.stop_dht(dht)

    return run_until_signal(serve)


if __name__ == "__main__":
    sys.exit(main())
