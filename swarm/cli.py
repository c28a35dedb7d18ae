"""Shared plumbing of the entrypoints: logging set-up, and running until SIGINT/SIGTERM.

Only entrypoints call these; importing swarm modules never configures logging.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import sys
from typing import Awaitable, Callable

from swarm.errors import SwarmError


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
    """Run `main(stop)`; SIGINT/SIGTERM set `stop`. Returns a process exit code."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except SwarmError as exc:
        print(f"swarm: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


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
