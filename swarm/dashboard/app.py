"""`python -m swarm.dashboard`: a live web page and JSON API showing every model, block and peer of a swarm.

Joins the DHT as a client, crawls it every --period seconds in a background thread (`swarm.dashboard.crawl`)
and serves what it last saw:

    GET /                the page (self-contained: no CDN, works offline; refreshes itself)
    GET /api/v1/state    the same data as JSON (`swarm.dashboard.crawl.SwarmState`)
    GET /metrics         Prometheus text format
    GET /healthz         200 once a crawl has finished
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from importlib import resources
from pathlib import Path

from swarm import loop_thread, network
from swarm.cli import fail, serve_http, setup_logging
from swarm.config import LOOPBACK_MADDRS, NetworkConfig
from swarm.dashboard.crawl import SwarmState, crawl, empty_state
from swarm.errors import SwarmError
from swarm.swarm_key import SwarmKey, make_proof

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swarm.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR", help="peers of the swarm")
    parser.add_argument("--host", default="127.0.0.1", help="address the web server listens on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--period", type=float, default=10.0, help="seconds between crawls of the swarm")
    parser.add_argument("--ping-timeout", type=float, default=2.0, help="seconds a peer has to answer a latency ping")
    parser.add_argument("--host-maddrs", nargs="+", default=list(LOOPBACK_MADDRS), metavar="MULTIADDR")
    parser.add_argument("--swarm-key", type=Path, help="file with the shared secret of a private swarm")
    args = parser.parse_args(argv)
    if args.period <= 0 or args.ping_timeout <= 0:
        parser.error("--period and --ping-timeout must be positive")
    return args


class Crawler:
    """Crawls in a background thread; `state` is always the last complete crawl."""

    def __init__(self, dht, period_s: float, ping_timeout_s: float, swarm_key: SwarmKey | None = None):
        self.dht, self.period_s, self.ping_timeout_s, self.swarm_key = dht, period_s, ping_timeout_s, swarm_key
        self._run = loop_thread.run_coroutine
        self.p2p = self._run(dht.replicate_p2p())
        self.state: SwarmState = empty_state()
        self.crawls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="crawler", daemon=True)

    def start(self) -> "Crawler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period_s + 30)

    def crawl_once(self) -> None:
        try:
            self.state = crawl(self.dht, self._measure)
        except Exception as exc:  # a crawl must never take the dashboard down: keep the last state, say why
            logger.exception("crawl failed")
            self.state = self.state.model_copy(update={"error": f"{type(exc).__name__}: {exc}"[:500]})
        self.crawls += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.crawl_once()
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    def _measure(self, targets: list[tuple[str, str]]) -> dict:
        from client.remote import call_info

        own_id = self.p2p.peer_id.to_base58()

        async def ping(peer_id: str, prefix: str) -> float | None:
            started = time.perf_counter()
            try:
                await call_info(self.p2p, peer_id, prefix, self.ping_timeout_s, make_proof(self.swarm_key, own_id, peer_id))
            except (SwarmError, ValueError):  # ValueError: a record naming a peer id that is not one
                return None
            return time.perf_counter() - started

        async def ping_all() -> list:
            return await asyncio.gather(*(ping(peer_id, prefix) for peer_id, prefix in targets))

        return dict(zip(targets, self._run(ping_all()))) if targets else {}


def create_app(crawler: Crawler):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    app = FastAPI(title="swarm dashboard", docs_url="/api/docs", redoc_url=None)
    page = resources.files("swarm.dashboard").joinpath("page.html").read_text()

    class StateCollector:
        def collect(self):
            state = crawler.state
            by_state = GaugeMetricFamily("swarm_peers", "Peers of the swarm, by state", labels=["state"])
            for name, count in state.totals.peers_by_state.items():
                by_state.add_metric([name], count)
            yield by_state
            covered = GaugeMetricFamily("swarm_blocks_served", "Blocks with at least one online peer", labels=["model"])
            total = GaugeMetricFamily("swarm_blocks", "Blocks of the model", labels=["model"])
            weakest = GaugeMetricFamily(
                "swarm_min_block_throughput", "Throughput of the model's weakest block, tokens/s", labels=["model"]
            )
            healthy = GaugeMetricFamily("swarm_model_healthy", "1 if every block has an online peer", labels=["model"])
            for model in state.models:
                covered.add_metric([model.model], model.num_blocks - len(model.missing_blocks))
                total.add_metric([model.model], model.num_blocks)
                weakest.add_metric([model.model], model.min_block_throughput)
                healthy.add_metric([model.model], 1.0 if model.healthy else 0.0)
            yield from (covered, total, weakest, healthy)
            yield GaugeMetricFamily("swarm_crawl_timestamp_seconds", "Unix time of the last crawl", value=state.updated_at)

    registry = CollectorRegistry()
    registry.register(StateCollector())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/v1/state", response_model=SwarmState)
    def state() -> SwarmState:
        return crawler.state

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz")
    def healthz():
        if crawler.crawls == 0:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok", "updated_at": crawler.state.updated_at}

    return app


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    dht = crawler = None
    try:
        swarm_key = SwarmKey.load(args.swarm_key)
        dht = network.start_dht(
            initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, client_mode=True,
            loopback_only=NetworkConfig(host_maddrs=args.host_maddrs).is_loopback_only(), swarm_key=swarm_key,
        )
        crawler = Crawler(dht, args.period, args.ping_timeout, swarm_key).start()
        serve_http(create_app(crawler), args.host, args.port, f"swarm: dashboard on http://{args.host}:{args.port}/")
        return 0
    except SwarmError as exc:
        return fail(str(exc))
    finally:
        if crawler is not None:
            crawler.stop()
        if dht is not None:
            network.stop_dht(dht)
