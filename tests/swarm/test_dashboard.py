"""The dashboard against a live local swarm: its JSON API, Prometheus metrics and health check, a
peer leaving (broken) and coming back (healthy), hostile records, an empty swarm, and the page in
a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from swarm import models, network
from swarm.config import LOOPBACK_MADDRS
from swarm.identity import Identity
from swarm.api.jobs import group_alive
from swarm.tools.local import LocalSwarm
from swarm.records import MODELS_KEY, block_key

from tests.conftest import PEER_ENV, stop_group
from tests.swarm.test_dht_records import HOSTILE_VALUES

pytestmark = pytest.mark.timeout(300)


class Dashboard:
    def __init__(self, initial_peers: list[str], log: Path, env: dict):
        with socket.socket() as probe:  # a free port on loopback
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable, "-m", "swarm.dashboard", "--initial-peers", *initial_peers, "--port", str(self.port),
            "--period", "1", "--ping-timeout", "1",
        ]
        self.process = subprocess.Popen(
            command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.wait_until(lambda: self.get("/healthz")[0] == 200, "the first crawl")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def state(self) -> dict:
        status, body = self.get("/api/v1/state")
        assert status == 200, body
        return json.loads(body)

    def wait_until(self, condition, what: str, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the dashboard exited:\n{self.log.read_text()[-3000:]}"
            result = condition()
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; state: {self.get('/api/v1/state')[1][:2000]}")

    def close(self) -> None:
        stop_group(self.process)


@pytest.fixture(scope="module")
def swarm(tiny_model_path, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("dashboard-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:2", "2:4"):
            swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--announce-period", "1", "--public-name", f"peer {blocks}"], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        yield swarm


@pytest.fixture(scope="module")
def dashboard(swarm, tmp_path_factory):
    board = Dashboard(swarm.initial_peers, tmp_path_factory.mktemp("dashboard") / "dashboard.log", swarm.env)
    yield board
    board.close()


def _model(state: dict, name: str) -> dict | None:
    return next((model for model in state["models"] if model["dht_prefix"] == name), None)


def _healthy(dashboard, prefix: str, peers: int):
    def check():
        model = _model(dashboard.state(), prefix)
        online = model and [peer for peer in model["peers"] if peer["state"] == "online"]
        return model if model and model["healthy"] and len(online) == peers else None
    return check


def test_state_metrics_and_health(swarm, dashboard, tiny_model_path):
    prefix = tiny_model_path.name
    model = dashboard.wait_until(_healthy(dashboard, prefix, 2), "both peers")
    assert model["num_blocks"] == 4 and model["missing_blocks"] == []
    assert [block["peers"] for block in model["blocks"]] == [1, 1, 1, 1]
    assert model["min_block_throughput"] == pytest.approx(1.0)
    peers = sorted(model["peers"], key=lambda peer: peer["start_block"])
    assert [(peer["start_block"], peer["end_block"], peer["public_name"]) for peer in peers] == [(0, 2, "peer 0:2"), (2, 4, "peer 2:4")]
    assert all(peer["dtype"] == "float32" and peer["quantization"] == "none" and peer["short_id"] == peer["peer_id"][-8:] for peer in peers)
    dashboard.wait_until(lambda: all(peer["latency_ms"] is not None for peer in _model(dashboard.state(), prefix)["peers"]), "pings")
    totals = dashboard.state()["totals"]
    assert totals["models"] == 1 and totals["peers"] == 2 and totals["blocks_served"] == 4 and totals["peers_by_state"]["online"] == 2

    status, metrics = dashboard.get("/metrics")
    assert status == 200
    assert 'swarm_peers{state="online"} 2.0' in metrics
    name = models.announced_name(models.resolve_model(str(tiny_model_path)))  # a local folder's public name: no path
    assert f'swarm_blocks_served{{model="{name}"}} 4.0' in metrics
    assert f'swarm_min_block_throughput{{model="{name}"}} 1.0' in metrics
    status, body = dashboard.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, page = dashboard.get("/")
    assert status == 200 and "<script>" in page and "http" not in page.split("<script>")[1].split("fetch(")[0]


def test_a_peer_leaving_breaks_the_model_and_a_new_one_heals_it(swarm, dashboard, tiny_model_path):
    prefix = tiny_model_path.name
    dashboard.wait_until(_healthy(dashboard, prefix, 2), "both peers")
    swarm.nodes[2].stop()  # the peer on 2:4 (nodes: bootstrap, 0:2, 2:4)

    def broken():
        model = _model(dashboard.state(), prefix)
        return model if model and not model["healthy"] else None

    model = dashboard.wait_until(broken, "the model to break")
    assert model["missing_blocks"] == [2, 3]
    assert 'swarm_model_healthy{model="' in dashboard.get("/metrics")[1]
    swarm.start_peer("2:4", model=str(tiny_model_path), extra_args=["--announce-period", "1"])
    dashboard.wait_until(_healthy(dashboard, prefix, 2), "a new peer on 2:4")


def test_hostile_records_do_not_break_the_dashboard(swarm, dashboard, tiny_model_path, tmp_path):
    prefix = tiny_model_path.name
    mallory = Identity.load(tmp_path / "mallory.key")
    attacker = network.start_dht(initial_peers=swarm.initial_peers, host_maddrs=LOOPBACK_MADDRS, identity=mallory, loopback_only=True)
    try:
        subkey = mallory.subkey(mallory.peer_id)
        expiration = time.time() + 300
        for index, value in enumerate(HOSTILE_VALUES):
            attacker.store(block_key(prefix, index % 4), subkey=subkey, value=value, expiration_time=expiration)
        attacker.store(MODELS_KEY, subkey=mallory.subkey("ghost"), value={"model": "ghost", "num_blocks": 3, "protocol_version": 2},
                       expiration_time=expiration)
        attacker.store(MODELS_KEY, subkey=mallory.subkey("junk"), value=["not", "a", "model"], expiration_time=expiration)

        def ghost_seen():
            state = dashboard.state()
            return state if _model(state, "ghost") else None

        state = dashboard.wait_until(ghost_seen, "the announced ghost model")
        ghost = _model(state, "ghost")
        assert not ghost["healthy"] and ghost["missing_blocks"] == [0, 1, 2] and ghost["peers"] == []
        model = _model(state, prefix)
        assert model["healthy"] and state["error"] is None
        assert dashboard.get("/")[0] == 200 and dashboard.get("/metrics")[0] == 200
    finally:
        network.stop_dht(attacker)


def test_an_empty_swarm_shows_an_empty_state(tmp_path):
    with LocalSwarm(tmp_path / "empty", env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        board = Dashboard(swarm.initial_peers, tmp_path / "dashboard.log", swarm.env)
        try:
            state = board.state()
            assert state["models"] == [] and state["totals"]["peers"] == 0 and state["error"] is None
            assert board.get("/metrics")[0] == 200
            board.process.send_signal(signal.SIGTERM)  # to the main process only: it stops its DHT process and p2pd itself
            assert board.process.wait(timeout=30) == 0
            assert not group_alive(board.process.pid)
        finally:
            board.close()


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium with chromedriver here (Debian: apt-get install chromium chromium-driver)")
def test_the_page_in_headless_chromium(swarm, dashboard, tiny_model_path, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prefix = tiny_model_path.name
    dashboard.wait_until(_healthy(dashboard, prefix, 2), "both peers")
    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", "--proxy-server=direct://"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(dashboard.url + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-blockmap="{prefix}"] .cell'))
        name = models.announced_name(models.resolve_model(str(tiny_model_path)))
        section = driver.find_element(By.CSS_SELECTOR, f'section[data-model="{name}"]')
        cells = section.find_elements(By.CSS_SELECTOR, ".blocks .cell")
        assert [cell.text for cell in cells] == ["1", "1", "1", "1"]
        rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                for row in section.find_elements(By.CSS_SELECTOR, "table.peers tbody tr")]
        assert sorted(row[2] for row in rows if row[3] == "online") == ["0:2", "2:4"]
        assert "healthy" in section.find_element(By.CSS_SELECTOR, ".badge").text
        assert driver.find_element(By.ID, "total-blocks").text.startswith("4 / ")
        screenshot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
