"""The entrypoints as a user meets them: clear errors for bad flags, clean shutdown, stable identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from swarm.local import LOOPBACK, LocalSwarm
from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(180)


def run_peer(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm.peer", "--host-maddrs", LOOPBACK, *args],
        capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blocks", "half", "--new-swarm"], "a count N (e.g. 8) or 'auto'"),
        (["--blocks", "0", "--new-swarm"], "the count must be positive"),
        (["--blocks", "2:1", "--new-swarm"], "0 <= START < END"),
        (["--blocks", "0:9", "--new-swarm"], "has 4 blocks"),
        (["--blocks", "9", "--new-swarm"], "has 4 blocks"),
        (["--blocks", "2", "--throughput", "fast", "--new-swarm"], "--throughput 'fast'"),
        (["--blocks", "0:2"], "--initial-peers"),
    ],
)
def test_bad_flags_get_one_clear_error(tiny_model_path, args, message):
    result = run_peer("--model", str(tiny_model_path), *args)
    assert result.returncode == 2
    assert "swarm: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_and_unreachable_swarm(tiny_model_path, tmp_path):
    result = run_peer("--model", str(tmp_path / "missing"), "--blocks", "0:1", "--new-swarm")
    assert result.returncode == 2 and "unknown model" in result.stderr
    unreachable = "/ip4/127.0.0.1/tcp/9/p2p/QmaEWuKyXxR4m7YBnwxxHhNwVYy5UdEWjsSTQWm9DZF3ox"
    result = run_peer("--model", str(tiny_model_path), "--blocks", "0:1", "--initial-peers", unreachable)
    assert result.returncode == 2 and "could not join the swarm" in result.stderr
    assert "Traceback" not in result.stderr


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("whole_group", [False, True], ids=["sigterm-to-peer", "sigint-to-group"])
def test_signals_stop_the_peer_and_all_its_children(tiny_model_path, tmp_path, whole_group):
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        node = swarm.start_peer("0:4", model=str(tiny_model_path))
        if whole_group:  # what Ctrl-C in a terminal does: every process of the group gets SIGINT
            os.killpg(node.pid, signal.SIGINT)
        else:
            node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while group_alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(node.pid), "the DHT process or p2pd outlived the peer"


def test_a_terminated_local_swarm_still_stops_its_nodes(tmp_path):
    """SIGTERM to a process inside `with LocalSwarm()` (pytest or the demo stopped by a CI timeout) still
    stops the swarm's nodes, which run in process groups of their own."""
    script = (
        "import sys, time\n"
        "from swarm.local import LocalSwarm\n"
        "with LocalSwarm(sys.argv[1]) as swarm:\n"
        "    print(swarm.start_bootstrap().pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    bootstrap = None
    try:
        bootstrap = int(owner.stdout.readline())
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=60) != 0  # interrupted, after the clean-up
        assert not group_alive(bootstrap), "the bootstrap node outlived the terminated swarm"
    finally:
        owner.kill()
        owner.wait()
        if bootstrap is not None and group_alive(bootstrap):
            os.killpg(bootstrap, signal.SIGKILL)


def test_identity_gives_a_stable_peer_id(tiny_model_path, tmp_path):
    identity = tmp_path / "peer.key"
    peer_ids = []
    for attempt in range(2):
        with LocalSwarm(tmp_path / f"run{attempt}", env=PEER_ENV) as swarm:
            node = swarm.start_peer("0:4", model=str(tiny_model_path), extra_args=["--identity", str(identity)])
            peer_ids.append(node.maddrs[0].rsplit("/p2p/", 1)[1])
    assert identity.exists() and peer_ids[0] == peer_ids[1]
