"""A local swarm of subprocesses on 127.0.0.1: a bootstrap node and peers, started in their own
process groups, awaited through their `swarm:` lines (never a fixed sleep), and stopped as groups.

Used by the demo, the tests and the benchmarks. With a `Link`, every node sits behind a delaying
relay (`swarm.tools.delay`) and announces the relay's port, so that every hop pays the link's delay.
It does not pick models or block ranges.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from swarm.cli import STOP_WITH_PARENT_ENV
from swarm.tools.delay import Link, free_port

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class LocalSwarmError(RuntimeError):
    pass


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log_path: Path
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)
    maddrs: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalSwarmError(f"{self.name}: no '{prefix}' line within {timeout_s} s; log: {self.log_tail()}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.process.poll() is not None:
                    raise LocalSwarmError(f"{self.name} exited with {self.process.returncode}; log: {self.log_tail()}") from None
                continue
            if line.startswith(prefix):
                return line

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Signal the node (it stops its own children), wait, then kill whatever is left of its group."""
        try:
            self.process.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # DHT child, p2pd: nothing may outlive the node
        except ProcessLookupError:
            pass
        self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole group at once: the node vanishes without a goodbye."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class LocalSwarm:
    """Start nodes with `start_bootstrap()` / `start_peer()`; `close()` stops them all."""

    def __init__(
        self, log_dir: Path, *, env: dict[str, str] | None = None, startup_timeout_s: float = 180.0, link: Link | None = None
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # nodes stop by themselves if this process dies without stopping them (SIGKILL, a crash)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", STOP_WITH_PARENT_ENV: str(os.getpid()), **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.nodes: list[Node] = []
        self.initial_peers: list[str] = []
        self.link = link  # every node behind a relay that delays what reaches it, and what it answers
        self.relays: list[Node] = []

    def __enter__(self) -> "LocalSwarm":
        self._restore_sigterm = _sigterm_interrupts()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.close()
        finally:
            self._restore_sigterm()

    def start_bootstrap(
        self, extra_args: list[str] = (), *, link: Link | None = None, listen: str | None = None, prefix: list[str] = ()
    ) -> Node:
        """`link`: this node's own (default: the swarm's). `listen`: its multiaddr (default: loopback, any
        port). `prefix`: what the command runs under, e.g. `ip netns exec NAME` (swarm.tools.netns). The
        first node started becomes the swarm's initial peer; a later bootstrap node joins through it."""
        name = f"bootstrap-{len(self.nodes)}" if self.initial_peers else "bootstrap"
        joining = ["--initial-peers", *self.initial_peers] if self.initial_peers else []
        node = self._spawn(name, [*prefix, sys.executable, "-m", "swarm.dht", *self._listen_args(name, link, listen), *joining, *extra_args])
        self._await_listening(node)
        self.initial_peers = self.initial_peers or node.maddrs
        return node

    def start_peer(
        self, blocks: str, *, model: str, extra_args: list[str] = (), wait: bool = True, link: Link | None = None,
        listen: str | None = None, prefix: list[str] = (),
    ) -> Node:
        """`link`, `listen`, `prefix`: as for `start_bootstrap`."""
        name = f"peer-{blocks.replace(':', '-')}-{len(self.nodes)}"
        args = [*prefix, sys.executable, "-m", "swarm.peer", "--model", model, "--blocks", blocks, *self._listen_args(name, link, listen)]
        args += ["--initial-peers", *self.initial_peers] if self.initial_peers else ["--new-swarm"]
        node = self._spawn(name, [*args, *extra_args])
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node: Node) -> None:
        self._await_listening(node)
        node.wait_for("swarm: ready", self.startup_timeout_s)
        if not self.initial_peers:
            self.initial_peers = node.maddrs

    def _listen_args(self, name: str, link: Link | None = None, listen: str | None = None) -> list[str]:
        """Where a node listens: `listen` or any loopback port, or (with a link) a fixed one behind a relay it announces."""
        link = link or self.link
        if link is None:
            return ["--host-maddrs", listen or LOOPBACK]
        port, relay_port = free_port(), free_port()
        relay = self._spawn(f"{name}-relay", [
            sys.executable, "-m", "swarm.tools.delay", f"{relay_port}={port}", "--delay-ms", str(link.delay_ms),
            *(["--rate-mbit", str(link.rate_mbit)] if link.rate_mbit is not None else []),
        ])
        self.nodes.remove(relay)  # self.nodes: the swarm's own nodes, in the order they started
        self.relays.append(relay)
        relay.wait_for("swarm: relaying", self.startup_timeout_s)
        return ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{relay_port}"]

    def close(self) -> None:
        for node in [*reversed(self.nodes), *self.relays]:
            node.stop()
        self.nodes.clear()
        self.relays.clear()

    def _await_listening(self, node: Node) -> None:
        line = node.wait_for("swarm: listening on", self.startup_timeout_s)
        node.maddrs = line.split("listening on", 1)[1].split()

    def _spawn(self, name: str, args: list[str]) -> Node:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log_file, text=True, env=self.env, start_new_session=True
        )
        log_file.close()
        node = Node(name, process, log_path)
        threading.Thread(target=_pump, args=(process, node, log_path), daemon=True).start()
        self.nodes.append(node)
        return node


def _sigterm_interrupts() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt in the main thread while a swarm is open, so `with LocalSwarm()`
    stops its nodes when pytest, the demo or a benchmark is terminated: by default SIGTERM ends Python
    without clean-up, and the nodes, in groups of their own, would run on. Returns what undoes it; a
    handler someone else installed, or a call from another thread, is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None
    signal.signal(signal.SIGTERM, _interrupt)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is _interrupt:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _pump(process: subprocess.Popen, node: Node, log_path: Path) -> None:
    with open(log_path.with_suffix(".out"), "w") as out:
        for line in process.stdout:
            out.write(line)
            out.flush()
            node.lines.put(line.rstrip("\n"))
