"""`python -m swarm.dht`: a lightweight bootstrap node (DHT only, no blocks) that others join through.

Builds a BootstrapConfig from flags, an optional TOML file (`--config`) and SWARM_DHT_* environment
variables (`swarm.settings`); without --initial-peers it founds a new swarm.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from swarm import network, reachability, settings
from swarm.cli import fail, run_until_signal, setup_logging
from swarm.config import BootstrapConfig
from swarm.errors import SwarmError
from swarm.identity import Identity

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config = settings.parse(
            BootstrapConfig, argv, prog="python -m swarm.dht", description=__doc__.split("\n\n")[0], env_prefix="SWARM_DHT_"
        ).network
    except SwarmError as exc:
        return fail(str(exc))

    async def serve(stop: asyncio.Event) -> None:
        identity = Identity.load(config.identity_path) if config.identity_path else None  # a stable peer id
        dht = await asyncio.get_running_loop().run_in_executor(None, network.start_node, config, identity)
        try:
            await reachability.serve(await dht.replicate_p2p())  # others ask us whether they can be dialed
            if config.relay and not config.is_loopback_only():
                logger.info("relay: will carry connections to peers behind NAT once other nodes find this one dialable")
            print(f"swarm: listening on {' '.join(network.visible_maddrs(dht))}", flush=True)
            await stop.wait()
        finally:
            network.stop_dht(dht)

    return run_until_signal(serve)


if __name__ == "__main__":
    sys.exit(main())
