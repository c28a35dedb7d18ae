"""The event loop on which a process's client-side network calls run: one daemon thread per process
with a plain asyncio loop (hivemind's P2P and its streams belong to the loop that opened them).

Not hivemind's RemoteExpertWorker, which runs uvloop: a uvloop handle that another thread lets go
of (a client's streams are garbage-collected by whichever thread drops them last) is closed from
that thread while the loop's own thread runs libuv, and the process dies of a segmentation fault in
the loop thread (`uv__run_closing_handles`; see MagicStack/uvloop#706). The test suite's process
did, in CI and on a developer's machine: two of four full runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid: int | None = None


def loop() -> asyncio.AbstractEventLoop:
    """This process's loop, started on first use (and again in a forked child, which has no thread)."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid():
            _loop = asyncio.SelectorEventLoop()  # not asyncio.new_event_loop(): hivemind may have installed uvloop's policy
            _pid = os.getpid()
            threading.Thread(target=_loop.run_forever, name="swarm-loop", daemon=True).start()
        return _loop


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on this process's loop and wait for its result (from any thread but the loop's)."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop()).result()
