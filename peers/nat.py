"""How a peer comes to be reachable: at start it asks swarm nodes to dial it back (`swarm.reachability`);
if none can (a home router's NAT), it restarts its DHT node in client mode behind the swarm's relays
and waits until one carries connections to it (a /p2p-circuit address).

It does not serve, announce or choose blocks (`peers.server`), and it opens no port on a router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import hivemind

from swarm import network, reachability
from swarm.config import NetworkConfig
from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.reachability import Reachability

logger = logging.getLogger(__name__)

CIRCUIT_POLL_S = 0.5


def initial_peer_ids(maddrs: list[str]) -> list[str]:
    """The peer ids named by /p2p/ in multiaddrs, in order, once each."""
    found = []
    for maddr in maddrs:
        peer_id = maddr.rsplit("/p2p/", 1)[1].split("/")[0] if "/p2p/" in maddr else ""
        if peer_id and peer_id not in found:
            found.append(peer_id)
    return found


async def become_reachable(
    dht: hivemind.DHT, config: NetworkConfig, new_identity: Callable[[], Identity], more_checkers: list[str] = ()
) -> tuple[hivemind.DHT, Identity | None]:
    """The DHT node to serve from, and its new identity if it had to restart behind relays (None: it did not).

    Raises ConfigError, after stopping the node, when the peer can be dialed neither directly nor through a relay."""
    if config.is_loopback_only() or config.reachability == "public":
        return dht, None
    loop = asyncio.get_running_loop()
    if config.reachability == "auto":
        maddrs = network.visible_maddrs(dht)
        checkers = [peer_id for peer_id in [*initial_peer_ids(config.initial_peers), *more_checkers] if peer_id != dht.peer_id.to_base58()]
        p2p = await dht.replicate_p2p()
        verdict, reached, answered = await reachability.check(p2p, list(dict.fromkeys(checkers)), maddrs)
        if verdict is Reachability.PUBLIC:
            logger.info("reachability: %d of %d swarm nodes dialed us back at %s: serving directly", answered, answered, " ".join(reached))
            return dht, None
        if verdict is Reachability.UNKNOWN:
            logger.info("reachability: no swarm node answered our dial-back request (a new swarm?): serving directly")
            return dht, None
        logger.info(
            "reachability: none of %d swarm nodes could dial us at %s (behind NAT?): serving through a relay",
            answered, " ".join(reachability.dialable(maddrs)) or "(no dialable address)",
        )
    else:
        logger.info("reachability: private (--reachability private): serving through a relay")
    relays = config.trusted_relays()
    if not relays:
        await loop.run_in_executor(None, network.stop_dht, dht)
        raise ConfigError(_unreachable("no relay to ask (give --relays, or --initial-peers of a node that runs with --relay)"))
    await loop.run_in_executor(None, network.stop_dht, dht)
    identity = new_identity()
    dht = await loop.run_in_executor(None, lambda: network.start_node(config, identity, behind_nat=True))
    try:
        circuit = await _wait_for_circuit(dht, config.relay_wait_s)
    except BaseException:  # cancelled (Ctrl-C) or the daemon broke: the new node must not outlive us
        network.stop_dht(dht)
        raise
    if not circuit:
        await loop.run_in_executor(None, network.stop_dht, dht)
        raise ConfigError(_unreachable(f"no relay of {len(relays)} took this peer within {config.relay_wait_s:.0f} s"))
    logger.info("reachability: reachable through a relay at %s", " ".join(circuit))
    return dht, identity


async def _wait_for_circuit(dht: hivemind.DHT, timeout_s: float) -> list[str]:
    """This node's /p2p-circuit addresses, once it has any (empty after `timeout_s`)."""
    p2p = await dht.replicate_p2p()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            circuit = [str(maddr) for maddr in await p2p.get_visible_maddrs(latest=True) if "/p2p-circuit" in str(maddr)]
        except ValueError:  # no address at all yet
            circuit = []
        if circuit or time.monotonic() > deadline:
            return circuit
        await asyncio.sleep(CIRCUIT_POLL_S)


def _unreachable(why: str) -> str:
    return (
        f"this peer cannot be reached: swarm nodes could not dial it, and {why}. Either forward a TCP port on your "
        "router to this machine and start with --host-maddrs /ip4/0.0.0.0/tcp/PORT --announce-maddrs "
        "/ip4/PUBLIC_IP/tcp/PORT --reachability public, or ask the swarm's operator for the address of a relay (--relays)"
    )
