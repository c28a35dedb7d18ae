"""Emulated WAN links in user space: TCP relays that delay (and rate-limit) what they forward.

This kernel has no `netem`, so a link's one-way delay and bandwidth are emulated by a relay in front
of a node's real port: every chunk read from one side is written to the other `delay_ms` later, and
no faster than `rate_mbit`. A node listens on its real port and announces the relay's
(`--announce-maddrs`), so every connection to it, from clients and from other peers, pays the delay
each way: a message between two nodes crosses exactly one relay. It does not emulate loss, jitter
or NAT.

`python -m swarm.tools.delay --delay-ms 25 LISTEN_PORT=TARGET_PORT ...` runs relays on 127.0.0.1
until it is stopped, printing `swarm: relaying` once they all listen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Link:
    """What a relay does to every byte: `delay_ms` one way, at most `rate_mbit` (None: unlimited)."""

    delay_ms: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self):
        if self.delay_ms < 0 or (self.rate_mbit is not None and self.rate_mbit <= 0):
            raise ValueError(f"a link needs delay_ms >= 0 and rate_mbit > 0, got {self}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    """Copy one direction: each chunk is written `delay_ms` after it was read, and after the chunks
    before it have gone out at `rate_mbit`. Reading never waits for the delay, as on a real wire."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    wire_free_at = 0.0

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    delivering = asyncio.ensure_future(deliver())
    try:
        while chunk := await reader.read(CHUNK_BYTES):
            now = loop.time()
            if link.rate_mbit is not None:  # serialised on the wire, then in flight for delay_ms
                wire_free_at = max(wire_free_at, now) + len(chunk) * 8 / (link.rate_mbit * 1e6)
                now = wire_free_at
            queue.put_nowait((now + link.delay_ms / 1000, chunk))
            if delivering.done():
                break
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await delivering
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


class DelayRelay:
    """One relay: 127.0.0.1:`listen_port` -> 127.0.0.1:`target_port`, through `link`."""

    def __init__(self, listen_port: int, target_port: int, link: Link):
        self.listen_port, self.target_port, self.link = listen_port, target_port, link
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.listen_port)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(HOST, self.target_port)
            except OSError:
                client_writer.close()
                return
            self._writers.update((client_writer, target_writer))
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(_pump(client_reader, target_writer, self.link))
                    group.create_task(_pump(target_reader, client_writer, self.link))
            finally:
                for writer in (client_writer, target_writer):
                    writer.close()
                    self._writers.discard(writer)
        finally:
            self._tasks.discard(asyncio.current_task())

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop listening and end every connection (closing their sockets ends their pumps)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()


async def _run(pairs: list[tuple[int, int]], link: Link, ready: str) -> None:
    relays = [DelayRelay(listen, target, link) for listen, target in pairs]
    for relay in relays:
        await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(ready, flush=True)
    await stop.wait()
    for relay in relays:
        await relay.close()


def _pair(text: str) -> tuple[int, int]:
    listen, _, target = text.partition("=")
    try:
        return int(listen), int(target)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LISTEN_PORT=TARGET_PORT, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.tools.delay", description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", type=_pair, metavar="LISTEN_PORT=TARGET_PORT", help="relays on 127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every link, in milliseconds")
    parser.add_argument("--rate-mbit", type=float, default=None, help="bandwidth of every link and direction, in Mbit/s")
    args = parser.parse_args(argv)
    try:
        link = Link(args.delay_ms, args.rate_mbit)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.monotonic()
    ports = " ".join(f"{listen}->{target}" for listen, target in args.pairs)
    asyncio.run(_run(args.pairs, link, f"swarm: relaying {ports} ({link.delay_ms:g} ms, {link.rate_mbit or 'unlimited'} Mbit/s)"))
    logger.info("relays stopped after %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
