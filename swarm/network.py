"""Starting a hivemind DHT node with our defaults, and the DHT reads/writes of block records.

The coroutines below run inside the DHT's own process (`DHT.run_coroutine` pickles them by name), so
they are module-level functions and return plain Python values. Validation of what they return is
the caller's job (`swarm.records.parse_peer_records`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from typing import Any, Sequence

import hivemind
import psutil
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.config import NetworkConfig
from swarm.errors import ConfigError, PeerUnavailableError
from swarm.identity import Identity
from swarm.swarm_key import SwarmKey
from swarm.records import MAX_RECORD_TTL_S, MODELS_KEY, ModelRecord, PeerRecord, RecordShapeValidator, block_keys

logger = logging.getLogger(__name__)

PARENT_POLL_S = 1.0  # how often a DHT process (and a node started by LocalSwarm) checks that its parent lives

LOOKUP_TIMEOUT_S = 60.0
ORPHAN_SHUTDOWN_S = 30.0


class _DHT(hivemind.DHT):
    """hivemind's DHT process, which also shuts itself down, its p2pd with it, once the process that
    started it is gone without stopping it (SIGKILL, a crash, the OOM killer). hivemind's own DHT
    process would run on for ever: it holds a copy of the pipe its parent writes to, so it never
    sees that pipe close. Through that copy it asks itself for hivemind's own shutdown."""

    def __init__(self, *args, **kwargs):
        self._parent_pid = os.getpid()  # before super().__init__, which starts the process
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        threading.Thread(target=self._shut_down_when_orphaned, name="dht-parent-watch", daemon=True).start()
        super().run()

    def _shut_down_when_orphaned(self) -> None:
        while os.getppid() == self._parent_pid:
            time.sleep(PARENT_POLL_S)
        logger.warning("the process that started this DHT node (pid %d) is gone: shutting down", self._parent_pid)
        self._outer_pipe.send(("_shutdown", [], {}))
        time.sleep(ORPHAN_SHUTDOWN_S)  # still running: the shutdown hangs; stop p2pd and leave
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(1)


def start_dht(
    *,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    identity: Identity | None = None,
    swarm_key: SwarmKey | None = None,
    client_mode: bool = False,
    loopback_only: bool = False,
    startup_timeout_s: float = 15.0,
    relay: bool = True,
    via_relays: Sequence[str] = (),
) -> hivemind.DHT:
    """Start a DHT node in its own process and wait until it has joined (or founded) the swarm.

    Every node validates signed records (see `swarm.identity`); `identity` is the key the node signs
    its own records with and, if it has a file, its peer id (default: no records, any peer id).
    With `swarm_key` (a private swarm) it also stores and accepts only records keyed with it.
    `relay`: dial through relays and carry connections to nodes behind NAT; libp2p starts carrying once
    other nodes confirm (AutoNAT) that this one can be dialed. It is not forced at start: p2pd then runs
    two relay services, and in 5 of 8 starts the one with go-libp2p's default limits (128 KiB or 2
    minutes per connection) won (measured; docs/networks.md). `via_relays`: this node is behind NAT; it
    asks these relays (and others it finds) to carry connections to it and announces addresses through
    them (/p2p-circuit), in client mode."""
    identity = identity or Identity.anonymous()
    extra: dict[str, Any] = {}
    if loopback_only:  # no NAT traversal or relays: nothing should ever leave this machine
        extra.update(auto_nat=False, nat_port_map=False, use_relay=False, use_auto_relay=False)
    elif via_relays:
        extra.update(use_relay=True, use_auto_relay=True, trusted_relays=list(via_relays))
        client_mode = True
    else:
        extra.update(use_relay=relay)
    if announce_maddrs:
        extra["announce_maddrs"] = list(announce_maddrs)
    if identity.path is not None:
        extra["identity_path"] = str(identity.path)
        extra["check_if_identity_free"] = not identity.created
    try:
        return _DHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            client_mode=client_mode,
            record_validators=[RecordShapeValidator(), identity.validator] + ([swarm_key.validator()] if swarm_key else []),
            start=True,
            startup_timeout=startup_timeout_s,
            **extra,
        )
    except Exception as exc:  # hivemind reports a failed start in many types; say what it means for us
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if initial_peers:
            raise PeerUnavailableError(f"could not join the swarm through {list(initial_peers)}: {message}") from exc
        raise ConfigError(f"could not start a DHT node on {list(host_maddrs)}: {message}") from exc
    finally:
        identity.forget_file()


def start_node(
    config: NetworkConfig, identity: Identity | None = None, swarm_key: SwarmKey | None = None, *, behind_nat: bool = False
) -> hivemind.DHT:
    """A node as its NetworkConfig says: a peer, a bootstrap node, or (client_mode) a client, the dashboard
    or `swarm.plan`. `swarm_key`: the one already loaded from `config.swarm_key_path`, if the caller has it.
    `behind_nat`: others cannot dial this node; it takes connections through `config.trusted_relays()`."""
    return start_dht(
        initial_peers=config.initial_peers,
        host_maddrs=config.host_maddrs,
        announce_maddrs=config.announce_maddrs,
        identity=identity,
        swarm_key=swarm_key or SwarmKey.load(config.swarm_key_path),
        client_mode=config.client_mode,
        loopback_only=config.is_loopback_only(),
        startup_timeout_s=config.connect_timeout_s,
        relay=config.relay,
        via_relays=config.trusted_relays() if behind_nat else (),
    )


def stop_dht(dht: hivemind.DHT, timeout_s: float = 5.0) -> None:
    """Shut the DHT process down; kill it if it does not stop (e.g. after a Ctrl-C reached it too)."""
    dht.shutdown()
    dht.join(timeout_s)
    if dht.is_alive():
        dht.kill()
        dht.join()


def visible_maddrs(dht: hivemind.DHT, latest: bool = False) -> list[str]:
    """The addresses others may dial (`latest`: asked of the daemon now, e.g. once a relay took us)."""
    return [str(maddr) for maddr in dht.get_visible_maddrs(latest=latest)]


def announce(
    dht: hivemind.DHT,
    *,
    dht_prefix: str,
    identity: Identity,
    record: PeerRecord,
    num_blocks: int,
    ttl_s: float,
    timeout_s: float | None = None,
    keys_of: tuple[int, int] | None = None,
) -> None:
    """Store `record` under every block key of its range (or of the blocks `keys_of`), plus the
    models index entry, each under a subkey this node owns and signed (see `swarm.identity`)."""
    model_record = ModelRecord(model=record.model, num_blocks=num_blocks, protocol_version=record.protocol_version)
    start, end = keys_of or (record.start_block, record.end_block)
    coroutine = functools.partial(
        _store_records,
        keys=block_keys(dht_prefix, start, end),
        subkey=identity.subkey(identity.peer_id),
        value=record.to_wire(),
        models_entry=(identity.subkey(dht_prefix), model_record.model_dump(mode="json")),
        ttl_s=ttl_s,
    )
    dht.run_coroutine(coroutine, return_future=True).result(timeout=timeout_s)


async def _store_records(
    dht: hivemind.DHT, node: DHTNode, *, keys: list[str], subkey: bytes, value: dict, models_entry: tuple, ttl_s: float
) -> None:
    expiration_time = get_dht_time() + ttl_s
    prefix, model_value = models_entry
    all_keys = [*keys, MODELS_KEY]
    await node.store_many(
        all_keys,
        [value] * len(keys) + [model_value],
        expiration_time=expiration_time,
        subkeys=[subkey] * len(keys) + [prefix],
        num_workers=len(all_keys),
    )


def fetch_models(dht: hivemind.DHT) -> dict[Any, Any]:
    """Raw subkey (`<dht prefix>[owner:...]`) -> value mapping of the models index (unvalidated;
    may be hostile: see `swarm.records.parse_models`)."""
    return _lookup(dht, [MODELS_KEY]).get(MODELS_KEY, {})


def fetch_block_records(dht: hivemind.DHT, dht_prefix: str, num_blocks: int) -> list[dict[Any, Any]]:
    """Raw subkey -> value mappings for blocks 0..num_blocks-1 (signatures checked by hivemind,
    the rest unvalidated: see `swarm.records.parse_peer_records`)."""
    keys = block_keys(dht_prefix, 0, num_blocks)
    found = _lookup(dht, keys)
    return [found.get(key, {}) for key in keys]


def _lookup(dht: hivemind.DHT, keys: list[str]) -> dict[str, dict[Any, Any]]:
    """A read that cannot hang its caller: a DHT process that stalls (seen once in a test, with
    hostile records around) gets LOOKUP_TIMEOUT_S, then a transient error."""
    future = dht.run_coroutine(functools.partial(_get_subkey_values, keys=keys), return_future=True)
    try:
        return future.result(timeout=LOOKUP_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise PeerUnavailableError(f"the DHT did not answer a lookup of {len(keys)} keys within {LOOKUP_TIMEOUT_S:.0f} s") from None


async def _get_subkey_values(dht: hivemind.DHT, node: DHTNode, *, keys: list[str]) -> dict[str, dict[Any, Any]]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=len(keys))
    result: dict[str, dict[Any, Any]] = {}
    now = get_dht_time()
    for key, entry in found.items():
        if entry is None or not hasattr(entry.value, "items"):
            continue  # absent, or a plain value where subkeys belong: not ours to read
        result[key] = {  # a record "valid" for days was not written by one of our peers: ignore it
            subkey: item.value for subkey, item in entry.value.items() if now < item.expiration_time <= now + MAX_RECORD_TTL_S
        }
    return result
