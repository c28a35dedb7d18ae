"""The entrypoints as a user meets them: clear errors for bad flags, clean shutdown, stable identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from swarm.tools.local import LOOPBACK, LocalSwarm
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
        "from swarm.tools.local import LocalSwarm\n"
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


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_owner_leaves_no_node_dht_process_or_p2pd_behind(tmp_path):
    """SIGKILL to a process running a LocalSwarm and a DHT node of its own, so that no clean-up runs in
    it (a crash, the OOM killer): the swarm's nodes stop by themselves, and so do the DHT process it
    started and that process's p2pd."""
    script = (
        "import sys, time, psutil\n"
        "from swarm import network\n"
        "from swarm.tools.local import LOOPBACK, LocalSwarm\n"
        "with LocalSwarm(sys.argv[1]) as swarm:\n"
        "    swarm.start_bootstrap()\n"
        "    dht = network.start_dht(initial_peers=swarm.initial_peers, host_maddrs=[LOOPBACK], client_mode=True, loopback_only=True)\n"
        "    print(' '.join(str(child.pid) for child in psutil.Process().children(recursive=True)), flush=True)\n"
        "    time.sleep(120)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    descendants: list[int] = []
    try:
        descendants = [int(pid) for pid in owner.stdout.readline().split()]
        names = [psutil.Process(pid).name() for pid in descendants]
        assert names.count("p2pd") == 2, names  # the bootstrap's and our DHT process's
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 60
        while any(running(pid) for pid in descendants) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [psutil.Process(pid).cmdline() for pid in descendants if running(pid)]
        assert not left, f"left running after their owner was killed: {left}"
    finally:
        owner.kill()
        owner.wait()
        for pid in descendants:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_identity_gives_a_stable_peer_id(tiny_model_path, tmp_path):
    identity = tmp_path / "peer.key"
    peer_ids = []
    for attempt in range(2):
        with LocalSwarm(tmp_path / f"run{attempt}", env=PEER_ENV) as swarm:
            node = swarm.start_peer("0:4", model=str(tiny_model_path), extra_args=["--identity", str(identity)])
            peer_ids.append(node.maddrs[0].rsplit("/p2p/", 1)[1])
    assert identity.exists() and peer_ids[0] == peer_ids[1]
