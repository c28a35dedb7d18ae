"""Emulated networks (`swarm.tools.netns`): public hosts reach each other, a home host behind a NAT gets out
(seen as its router's public address) while nothing gets in, and closing leaves no namespace or process behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarm.tools import netns
from swarm.tools.netns import EmulatedNetwork, Host, NetnsError

pytestmark = pytest.mark.timeout(120)

reason = netns.unavailable_reason()
if reason is not None:
    pytest.skip(reason, allow_module_level=True)

# accepts one connection and prints the peer's address
LISTENER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
connection, peer = server.accept()
print(peer[0], flush=True)
"""
CONNECTOR = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()"


def listen(host: Host, port: int) -> subprocess.Popen:
    listener = subprocess.Popen(host.command([sys.executable, "-c", LISTENER, str(port)]), stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    return listener


def connects(host: Host, address: str, port: int) -> bool:
    connector = subprocess.run(host.command([sys.executable, "-c", CONNECTOR, address, str(port)]), capture_output=True, text=True, timeout=30)
    return connector.returncode == 0


def peer_address(listener: subprocess.Popen) -> str:
    assert listener.stdout is not None
    address = listener.stdout.readline().strip()
    listener.wait(timeout=10)
    return address


def ours(network: EmulatedNetwork) -> list[str]:
    return sorted(line.split()[0] for line in netns.run(["ip", "netns", "list"]).splitlines() if line.startswith(network.prefix))


def test_public_hosts_meet_a_home_host_gets_out_masqueraded_and_nothing_gets_in():
    network = EmulatedNetwork()
    try:
        a, b = network.add_public("a"), network.add_public("b")
        router = network.add_router("router")
        home, neighbour = network.add_home("home", router=router), network.add_home("neighbour", router=router)
        assert ours(network) == [network.prefix + name for name in ("a", "b", "home", "internet", "neighbour", "router")]

        listener = listen(b, 8000)
        assert connects(a, b.address, 8000)
        assert peer_address(listener) == a.address

        listener = listen(a, 8001)
        assert connects(home, a.address, 8001)
        assert peer_address(listener) == router.address  # masqueraded

        listener = listen(neighbour, 8002)
        assert connects(home, neighbour.address, 8002)  # within the home LAN
        assert peer_address(listener) == home.address

        stranded = listen(home, 8003)  # nothing forwards this port in; left running for close() to kill
        assert not connects(a, router.address, 8003)
        assert not connects(a, home.address, 8003)  # no route to a private address
        netns.run(["ip", "-n", a.namespace, "route", "add", str(netns.HOME_SUBNET), "via", router.address])
        assert not connects(a, home.address, 8003)  # a route through the router: it forwards nothing in
    finally:
        network.close()
    assert stranded.wait(timeout=10) != 0
    assert ours(network) == []


def test_close_removes_a_half_built_router_and_kills_what_runs_inside(monkeypatch):
    real_run = netns.run

    def failing_run(argv: list[str]) -> str:
        if "sysctl" in argv:
            raise NetnsError("injected failure")
        return real_run(argv)

    with EmulatedNetwork() as network:
        sleeper = subprocess.Popen(network.add_public("a").command(["sleep", "600"]))
        monkeypatch.setattr(netns, "run", failing_run)
        with pytest.raises(NetnsError, match="injected"):
            network.add_router("router")
        monkeypatch.setattr(netns, "run", real_run)
        assert network.prefix + "router" in ours(network)
    assert sleeper.wait(timeout=10) == -9
    assert ours(network) == []
