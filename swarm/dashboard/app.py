"""`python -m swarm.dashboard`: a live web page and JSON API showing every model, block and peer of a swarm.

Joins the DHT as a client (settings: `swarm.dashboard.config`), crawls it every --period seconds in a background thread (`swarm.dashboard.crawl`)
and serves what it last saw:

    GET /                the page (self-contained: no CDN, works offline; refreshes itself)
    GET /api/v1/state    the same data as JSON (`swarm.dashboard.crawl.SwarmState`)
    GET /metrics         Prometheus text format
    GET /healthz         200 once a crawl has finished
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from importlib import resources

from swarm import loop_thread, network, settings
from swarm.cli import fail, serve_http, setup_logging
from swarm.dashboard.config import DashboardConfig
from swarm.dashboard.crawl import SwarmState, crawl, empty_state
from swarm.errors import SwarmError
from swarm.swarm_key import SwarmKey, make_proof

logger = logging.getLogger(__name__)


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
    setup_logging()
    dht = crawler = None
    try:
        config = settings.parse(
            DashboardConfig, argv, prog="python -m swarm.dashboard", description=__doc__.split("\n\n")[0], env_prefix="SWARM_DASHBOARD_"
        )
        swarm_key = SwarmKey.load(config.network.swarm_key_path)
        dht = network.start_node(config.network, swarm_key=swarm_key)
        crawler = Crawler(dht, config.period_s, config.ping_timeout_s, swarm_key).start()
        serve_http(create_app(crawler), config.host, config.port, f"swarm: dashboard on http://{config.host}:{config.port}/")
        return 0
    except SwarmError as exc:
        return fail(str(exc))
    finally:
        if crawler is not None:
            crawler.stop()
        if dht is not None:
            network.stop_dht(dht)
