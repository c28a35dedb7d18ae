"""How long a request keeps re-routing after transient peer failures.

A request (a forward hop, opening a session, replacing a failed hop) survives at least
`max_retries` transient failures, and any number of them within `route_wait_s` of its first
failure. Each failure bans the failing peer, so every retry tries other peers: a swarm whose DHT
still lists several dead peers costs a connection attempt each, not the request. Errors that are
not transient (an invalid request, a local bug) are never retried.
"""

from __future__ import annotations

import time

from swarm import errors
from swarm.config import ClientConfig


class Retries:
    def __init__(self, config: ClientConfig):
        self.max_retries = config.max_retries
        self.window_s = config.route_wait_s
        self.failures = 0
        self._first_failure: float | None = None

    def allow(self, exc: errors.SwarmError) -> bool:
        """Count a failure; True if the request should re-route and try again."""
        if not getattr(exc, "transient", False):
            return False
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        self.failures += 1
        return self.failures <= self.max_retries or now - self._first_failure < self.window_s
