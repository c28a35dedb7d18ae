"""Shared plumbing of the entrypoints: logging set-up, OpenMP's idle spinning, the p2pd daemon's
threads, and running until SIGINT/SIGTERM.

Only entrypoints call these; importing swarm modules never configures logging or the environment.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
from typing import Awaitable, Callable

from swarm.errors import SwarmError


# Iterations an idle OpenMP thread (libgomp, torch's CPU thread pool) spins before it sleeps; on this
# project's 2-core VM one iteration takes about 20 ns. libgomp's default, 300,000 (6 ms here), keeps a
# thread busy long after every forward; where a client and peers share the cores, each process's
# spinning threads slow the one computing. Too short a spin costs too: a peer's worker thread then
# sleeps in the gaps between the operations of one forward (15 times per 10-block decode step at
# 10,000, once at 30,000) and every wake-up costs 0.1-0.2 ms on a VM.
# Measured with two 3-peer swarms at once, generations alternating between them (paired): peers at
# 30,000 decode 5% faster than at 10,000, 45,000 3% faster than 30,000, 60,000 3% faster than 45,000,
# and 100,000 9% slower than 60,000 (its threads still spin when the next peer starts computing).
# A client runs one large operation per token (the head) and then Python for milliseconds, so it
# keeps the short count: clients at 50,000 and 300,000 decoded no differently through the same
# 3-peer swarm (paired, time ratios 1.004 and 1.019 against 10,000).
PEER_SPIN_COUNT = "50000"
CLIENT_SPIN_COUNT = "10000"

# Go threads (GOMAXPROCS) that a peer's p2pd daemon (hivemind's libp2p, a child of the peer's DHT
# process, which inherits this environment) runs on. With Go's default (one per core) a message
# through the daemon wakes several threads in turn. Measured on the 2-core VM, 3 peers decoding: one
# thread cut the daemons' context switches per token from 145 to 83 and their CPU time from 3.8 to
# 2.8 ms; paired, decode was 0-4.5% faster (three runs), and a 32 MiB stream through two daemons
# was no slower (230-300 MiB/s either way): the peer's Python event loop, one thread, is the limit.
P2PD_GOMAXPROCS = "1"

# Set to a process id, it makes a node stop (cleanly, its DHT process and p2pd too) once that process
# is no longer its parent: `LocalSwarm` sets it, so that a test run or demo killed by SIGKILL, a
# crash or the OOM killer leaves no swarm behind. The node's process group would otherwise run on.
STOP_WITH_PARENT_ENV = "SWARM_STOP_WITH_PARENT"


def limit_openmp_spinning(spin_count: str = CLIENT_SPIN_COUNT) -> None:
    """Make idle OpenMP threads sleep after `spin_count` iterations, unless the user set
    GOMP_SPINCOUNT or OMP_WAIT_POLICY. Peers pass PEER_SPIN_COUNT.

    libgomp reads the setting when it loads, so this must run before torch is imported."""
    if "torch" in sys.modules:
        logging.getLogger(__name__).debug("torch is already imported: GOMP_SPINCOUNT left as it is")
        return
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = spin_count


def limit_p2pd_threads() -> None:
    """Run the p2pd daemon this process starts on P2PD_GOMAXPROCS Go threads, unless the user set
    GOMAXPROCS. It must run before the DHT starts (the daemon inherits the environment then)."""
    os.environ.setdefault("GOMAXPROCS", P2PD_GOMAXPROCS)


def setup_logging(verbose: bool = False) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack: hangs are diagnosable
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("hivemind", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose:  # our own DEBUG lines only: libraries at DEBUG slow every step down
        for ours in ("swarm", "peers", "client"):
            logging.getLogger(ours).setLevel(logging.DEBUG)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)`; SIGINT/SIGTERM set `stop`, and so does the death of the process named by
    STOP_WITH_PARENT_ENV where it is set. Returns a process exit code."""
    parent = os.environ.pop(STOP_WITH_PARENT_ENV, None)  # not for this node's own children

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watch = asyncio.create_task(_stop_when_orphaned(int(parent), stop)) if parent else None
        try:
            await main(stop)
        finally:
            if watch is not None:
                watch.cancel()

    try:
        asyncio.run(runner())
    except SwarmError as exc:
        print(f"swarm: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    # imported here: swarm.network imports torch, and entrypoints import this module before torch is
    # loaded, so that limit_openmp_spinning can still set GOMP_SPINCOUNT (tests/unit/test_layout.py)
    from swarm.network import PARENT_POLL_S

    while os.getppid() == parent:
        await asyncio.sleep(PARENT_POLL_S)
    logging.getLogger(__name__).warning("the process that started this node (pid %d) is gone: stopping", parent)
    stop.set()


class _Stopped(Exception):
    pass


def serve_http(app, host: str, port: int, banner: str) -> None:
    """Serve an ASGI app with uvicorn until SIGINT / SIGTERM, after printing `banner`; then return,
    so the caller's clean-up (DHT process, p2pd) runs. uvicorn re-raises the signal once it has
    stopped: with the default SIGTERM handler that would kill this process before any clean-up."""
    import uvicorn

    def stopped(signum, frame):
        raise _Stopped()

    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    print(banner, flush=True)
    try:
        server.run()
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fail(message: str) -> int:
    print(f"swarm: error: {message}", file=sys.stderr, flush=True)
    return 2
