"""Emulated networks of Linux network namespaces for tests: public hosts and home LANs behind NAT routers; no delay, loss or IPv6.

An `EmulatedNetwork` creates an "internet" namespace holding a bridge (the switch, 11.77.0.0/24), public
hosts joined to it by veth pairs, and routers: a namespace with one leg on the internet (a public
address) and a home bridge behind it, which masquerades what its home hosts send out and forwards
nothing in (a plain NAT: no port forwarding, no UPnP, no hairpinning). Like real homes, every home LAN
uses 192.168.77.0/24. Callers run programs in a host with `host.command(argv)`. `close()` kills what
still runs in its namespaces and deletes them. It does NOT emulate delay, loss or bandwidth (see
`swarm.tools.delay`), DNS or IPv6, and links nothing to the machine's real interfaces: veth pairs are
created directly between its own namespaces. It needs root, `ip` and `iptables` (`unavailable_reason()`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# a public range, as libp2p sees it: it never offers relayed addresses, nor decides by AutoNAT that a node is
# behind NAT, on private ranges such as 10/8 (measured). Nothing leaves the namespaces, which link to nothing else.
INTERNET_SUBNET = ipaddress.IPv4Network("11.77.0.0/24")
HOME_SUBNET = ipaddress.IPv4Network("192.168.77.0/24")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
COMMAND_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """A command that builds or removes the emulated network failed; the message has the command and its stderr."""


def run(argv: list[str]) -> str:
    """Runs one command, returns its stdout; raises NetnsError with the command and its stderr if it fails."""
    try:
        completed = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed with exit status {exc.returncode}: {exc.stderr.strip()}") from exc
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from exc
    return completed.stdout


def in_namespace(namespace: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


@dataclass(frozen=True)
class Host:
    """One machine of the emulated network: its namespace and its IPv4 address (a router's is its public one)."""

    name: str
    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host (`ip netns exec` execs it, so a Popen's pid is the program's own)."""
        return in_namespace(self.namespace, argv)


class EmulatedNetwork:
    """Namespaces for an internet switch, public hosts, NAT routers and home hosts; a context manager that removes them all."""

    def __init__(self) -> None:
        self.prefix = f"swarm-{secrets.token_hex(3)}-"
        self.internet = self.prefix + "internet"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []  # every namespace created so far, in order
        self._public_addresses = INTERNET_SUBNET.hosts()
        self._home_addresses: dict[str, Iterator[ipaddress.IPv4Address]] = {}  # router namespace -> its LAN's address iterator
        self._ports = 0  # veth ends on a bridge are named port0, port1, ... (unique within this network)
        try:
            self._add_namespace(self.internet)
            self._ip(self.internet, "link", "add", "switch", "type", "bridge", "forward_delay", "0")
            self._ip(self.internet, "link", "set", "switch", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> EmulatedNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_public(self, name: str) -> Host:
        """A host on the internet switch with a public address of its own."""
        namespace = self._new_host_namespace(name)
        address = str(next(self._public_addresses))
        self._join(namespace, self.internet, bridge="switch", interface="eth0", address=f"{address}/{INTERNET_SUBNET.prefixlen}")
        return self._remember(Host(name, namespace, address))

    def add_router(self, name: str) -> Host:
        """A home router: a public address on the switch (`wan0`) and a home LAN bridge (`lan`, 192.168.77.1)
        behind it; it masquerades what goes out and forwards in only replies to connections from inside."""
        namespace = self._new_host_namespace(name)
        address = str(next(self._public_addresses))
        self._join(namespace, self.internet, bridge="switch", interface="wan0", address=f"{address}/{INTERNET_SUBNET.prefixlen}")
        lan_addresses = HOME_SUBNET.hosts()
        gateway = str(next(lan_addresses))
        self._ip(namespace, "link", "add", "lan", "type", "bridge", "forward_delay", "0")
        self._ip(namespace, "address", "add", f"{gateway}/{HOME_SUBNET.prefixlen}", "dev", "lan")
        self._ip(namespace, "link", "set", "lan", "up")
        run(in_namespace(namespace, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        iptables = in_namespace(namespace, ["iptables", "-w"])
        run([*iptables, "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"])
        run([*iptables, "-P", "FORWARD", "DROP"])
        run([*iptables, "-A", "FORWARD", "-i", "lan", "-o", "wan0", "-j", "ACCEPT"])
        # where br_netfilter is loaded (it is here), frames between two home hosts pass FORWARD too
        run([*iptables, "-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT"])
        run([*iptables, "-A", "FORWARD", "-i", "wan0", "-o", "lan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        self._home_addresses[namespace] = lan_addresses
        return self._remember(Host(name, namespace, address))

    def add_home(self, name: str, router: Host) -> Host:
        """A host with a private address on `router`'s home LAN, whose default route goes through the router."""
        if router.namespace not in self._home_addresses:
            raise ValueError(f"{router.name!r} is not a router of this network")
        namespace = self._new_host_namespace(name)
        address = str(next(self._home_addresses[router.namespace]))
        self._join(namespace, router.namespace, bridge="lan", interface="eth0", address=f"{address}/{HOME_SUBNET.prefixlen}")
        self._ip(namespace, "route", "add", "default", "via", str(HOME_SUBNET[1]))
        return self._remember(Host(name, namespace, address))

    def close(self) -> None:
        """Kills whatever still runs in our namespaces and deletes them (and with them their veths and bridges).

        Goes on past failures and raises the first one at the end, so that a partial network is still removed."""
        errors: list[NetnsError] = []
        for namespace in reversed(self.namespaces):
            try:
                kill_processes(namespace)
                run(["ip", "netns", "delete", namespace])
            except NetnsError as exc:
                errors.append(exc)
        self.namespaces.clear()
        self.hosts.clear()
        if errors:
            raise errors[0]

    def _new_host_namespace(self, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name) or name == "internet" or name in self.hosts:
            raise ValueError(f"host name {name!r} is taken or not of the form {NAME_PATTERN.pattern}")
        namespace = self.prefix + name
        self._add_namespace(namespace)
        return namespace

    def _add_namespace(self, namespace: str) -> None:
        run(["ip", "netns", "add", namespace])
        self.namespaces.append(namespace)
        self._ip(namespace, "link", "set", "lo", "up")

    def _join(self, namespace: str, bridge_namespace: str, *, bridge: str, interface: str, address: str) -> None:
        """A veth pair from `interface` in `namespace` to a port of `bridge` in `bridge_namespace`, never touching ours."""
        port = f"port{self._ports}"
        self._ports += 1
        self._ip(namespace, "link", "add", interface, "type", "veth", "peer", "name", port, "netns", bridge_namespace)
        self._ip(bridge_namespace, "link", "set", port, "master", bridge)
        self._ip(bridge_namespace, "link", "set", port, "up")
        self._ip(namespace, "address", "add", address, "dev", interface)
        self._ip(namespace, "link", "set", interface, "up")

    def _remember(self, host: Host) -> Host:
        self.hosts[host.name] = host
        logger.debug("emulated host %s at %s in namespace %s", host.name, host.address, host.namespace)
        return host

    @staticmethod
    def _ip(namespace: str, *argv: str) -> None:
        run(["ip", "-n", namespace, *argv])


def kill_processes(namespace: str, timeout_s: float = 5.0) -> None:
    """SIGKILLs every process inside `namespace` and waits (up to `timeout_s`) until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := [int(pid) for pid in run(["ip", "netns", "pids", namespace]).split()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} in namespace {namespace} survived SIGKILL for {timeout_s} s")
        time.sleep(0.05)


def unavailable_reason() -> str | None:
    """None when emulated networks work here (root, `ip`, `iptables`, a probe namespace with a NAT table), else why not."""
    if os.geteuid() != 0:
        return "emulated networks need root (network namespaces)"
    for tool in ("ip", "iptables", "sysctl"):
        if shutil.which(tool) is None:
            return f"emulated networks need `{tool}` (Debian packages iproute2, iptables, procps)"
    probe = f"swarm-probe-{secrets.token_hex(3)}"
    try:
        run(["ip", "netns", "add", probe])
        try:
            run(in_namespace(probe, ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE"]))
        finally:
            run(["ip", "netns", "delete", probe])
    except NetnsError as exc:
        return f"emulated networks do not work here: {exc}".splitlines()[0]
    return None
