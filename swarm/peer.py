"""`python -m swarm.peer`: serve a range of a model's blocks to the swarm (`--blocks auto` by default:
as many as fit, where the swarm needs them most, moving as the swarm changes).

Builds a PeerConfig from flags, an optional TOML file (`--config`) and SWARM_PEER_* environment
variables (`swarm.settings`), and runs `peers.server.Peer` until SIGINT/SIGTERM.
"""

from __future__ import annotations

import sys

from swarm import settings
from swarm.cli import PEER_SPIN_COUNT, fail, limit_openmp_spinning, limit_p2pd_threads, run_until_signal, setup_logging
from swarm.config import PeerConfig
from swarm.errors import SwarmError

ENV_PREFIX = "SWARM_PEER_"


def parse(argv: list[str] | None = None) -> PeerConfig:
    return settings.parse(PeerConfig, argv, prog="python -m swarm.peer", description=__doc__.split("\n\n")[0], env_prefix=ENV_PREFIX)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse(argv)
    except SwarmError as exc:
        setup_logging()
        return fail(str(exc))
    setup_logging(config.verbose)
    limit_openmp_spinning(PEER_SPIN_COUNT)
    limit_p2pd_threads()
    try:
        from peers.server import Peer  # heavy imports only once the flags are known to be valid

        peer = Peer(config)
    except SwarmError as exc:
        return fail(str(exc))
    return run_until_signal(peer.run)


if __name__ == "__main__":
    sys.exit(main())
