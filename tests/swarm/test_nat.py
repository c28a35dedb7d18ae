"""A peer at home behind a NAT router serves through a relay, inside emulated networks of namespaces
(swarm.tools.netns; nothing is linked to the machine's real interfaces).

The internet: a bootstrap node that relays, two public peers and a client. At home, behind a router
that masquerades and lets nothing in: a peer serving the middle blocks. The peer at home finds that
nobody can dial it, serves through the relay, and says so in its record; the client generates through
it with pushes into and out of it, exactly as transformers does; then the peer at home is killed and
the session fails over to a public peer. With a public client, the peer at home dials the client
itself once the relay brought them together (libp2p's connection reversal). With a client behind a
NAT of its own, everything between the two goes through the relay: the session moves 1.2 MiB through
it and lasts over 3 minutes, past go-libp2p's default limits on a relayed connection (128 KiB, 2 min).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swarm.tools import netns
from swarm.tools.local import LocalSwarm
from tests.conftest import PEER_ENV, make_tiny_llama

REASON = netns.unavailable_reason()
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
REPO = Path(__file__).resolve().parents[2]
RELAYED_LONGER_THAN_S = 185.0  # go-libp2p's default relay limits cut a circuit after 2 minutes or 128 KiB
PROMPT_TOKENS = 600


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """Hidden size 512: the peer at home answers a 600-token prefill with 1.2 MiB of hidden states."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "wide-llama", hidden_size=512, max_position_embeddings=1024)


def listen(host) -> str:
    return f"/ip4/{host.address}/tcp/0"


@pytest.mark.parametrize("client_behind_nat", [False, True], ids=["public-client", "client-behind-nat"])
def test_a_peer_behind_nat_serves_through_a_relay_and_fails_over(wide_model, tmp_path, client_behind_nat):
    with netns.EmulatedNetwork() as net, LocalSwarm(tmp_path, env={**PEER_ENV, "PYTHONPATH": str(REPO)}) as swarm:
        at_home, user = _swarm_with_a_peer_at_home(net, swarm, str(wide_model), client_behind_nat)
        at_home_id = _peer_id(at_home)
        client = _start_client(swarm, user, str(wide_model), tmp_path)
        try:
            opened = time.monotonic()
            first = _phase(client, tmp_path)
            assert [hop[0] for hop in first["route"]][1] == at_home_id, first  # through the peer at home
            assert first["pushed"] == [False, True, True], first  # pushed into it and out of it
            if client_behind_nat:  # nobody can dial the other: everything between them goes through a relay
                assert all("/p2p-circuit" in maddr for maddr in first["connections"][at_home_id]), first["connections"]
                time.sleep(max(0.0, RELAYED_LONGER_THAN_S - (time.monotonic() - opened)))
            # else the peer at home dials the public client itself (libp2p's connection reversal): direct from then on
            second = _phase(client, tmp_path, go=True)  # the same streams, through the same connection
            assert second["route"] == first["route"]
            assert second["connections"][at_home_id] == first["connections"][at_home_id]

            spare_host = net.add_public("spare")
            spare = swarm.start_peer("1:3", model=str(wide_model), listen=listen(spare_host), prefix=spare_host.command([]))
            at_home.kill()
            third = _phase(client, tmp_path, go=True)
            assert _peer_id(spare) in [hop[0] for hop in third["route"]], third
            assert client.wait(timeout=60) == 0
        finally:
            _stop(client)
    assert third["tokens"] == _reference(wide_model, first["tokens"][:PROMPT_TOKENS])


def test_a_relay_that_dies_mid_session_is_failed_over(wide_model, tmp_path):
    """Client and peer both behind NAT: the relay between them is killed mid-session (with spare peers
    for every block it might have served, and for the peer at home); the session goes on, exactly."""
    with netns.EmulatedNetwork() as net, LocalSwarm(tmp_path, env={**PEER_ENV, "PYTHONPATH": str(REPO)}) as swarm:
        at_home, user = _swarm_with_a_peer_at_home(net, swarm, str(wide_model), client_behind_nat=True)
        client = _start_client(swarm, user, str(wide_model), tmp_path, phases=2)
        try:
            first = _phase(client, tmp_path)
            circuit = next(maddr for maddr in first["connections"][_peer_id(at_home)] if "/p2p-circuit" in maddr)
            relay_id = circuit.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]
            (relay,) = [node for node in swarm.nodes if any(maddr.endswith(f"/p2p/{relay_id}") for maddr in node.maddrs)]
            for blocks in ("0:1", "1:3", "3:4"):  # somewhere to go, whatever the relay was
                host = net.add_public(f"spare{blocks[0]}")
                swarm.start_peer(blocks, model=str(wide_model), listen=listen(host), prefix=host.command([]))
            relay.kill()
            second = _phase(client, tmp_path, go=True)
            assert client.wait(timeout=60) == 0
        finally:
            _stop(client)
    assert second["tokens"] == _reference(wide_model, first["tokens"][:PROMPT_TOKENS], new_tokens=8)


def _swarm_with_a_peer_at_home(net, swarm: LocalSwarm, model: str, client_behind_nat: bool):
    """Two relaying bootstrap nodes and public peers on 0:1 and 3:4, a peer at home on 1:3 behind a
    router; the client's host, public or behind a router of its own. Returns (the peer at home, the client's host)."""
    relay, second, east, west = (net.add_public(name) for name in ("relay", "relay2", "east", "west"))
    home = net.add_home("home", router=net.add_router("router"))
    user = net.add_home("user", router=net.add_router("router2")) if client_behind_nat else net.add_public("user")
    swarm.start_bootstrap(listen=listen(relay), prefix=relay.command([]))
    # a second node that relays: with fewer than 4 candidates, a node behind NAT waits 3 minutes before it reserves
    swarm.start_bootstrap(listen=listen(second), prefix=second.command([]))
    swarm.start_peer("0:1", model=model, listen=listen(east), prefix=east.command([]))
    swarm.start_peer("3:4", model=model, listen=listen(west), prefix=west.command([]))
    # libp2p's autorelay may wait out a 3-minute boot delay if it sees fewer than 4 relays (measured: 15 s here)
    at_home = swarm.start_peer("1:3", model=model, listen=listen(home), prefix=home.command([]), extra_args=["--relay-wait", "240"])
    verdict = at_home.log_tail(20000)
    assert re.search(r"none of \d+ swarm nodes could dial us", verdict) and "reachable through a relay at" in verdict, verdict
    assert all("/p2p-circuit" in maddr for maddr in at_home.maddrs), at_home.maddrs
    return at_home, user


def _start_client(swarm: LocalSwarm, user, model: str, folder: Path, phases: int = 3) -> subprocess.Popen:
    """tests/swarm/nat_client.py in the client's host: `phases` phases of 4 tokens after the prompt."""
    return subprocess.Popen(
        user.command([sys.executable, "-m", "tests.swarm.nat_client", "--model", model, "--initial-peers", *swarm.initial_peers,
                      "--listen", listen(user), "--prompt-tokens", str(PROMPT_TOKENS), "--tokens-per-phase", *["4"] * phases]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(folder / "client.log", "w"), text=True, cwd=REPO, env=swarm.env,
    )


def _stop(client: subprocess.Popen) -> None:
    if client.poll() is None:
        client.kill()
        client.wait()


def _peer_id(node) -> str:
    return node.maddrs[0].rsplit("/p2p/", 1)[1]


def _reference(model_path: Path, prompt: list[int], new_tokens: int = 12) -> list[int]:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return reference.generate(torch.tensor([prompt]), **kwargs)[0].tolist()


def _phase(client: subprocess.Popen, folder: Path, go: bool = False) -> dict:
    if go:
        client.stdin.write("go\n")
        client.stdin.flush()
    line = client.stdout.readline()
    assert line, f"the client ended: {(folder / 'client.log').read_text()[-3000:]}"
    return json.loads(line)


def test_a_peer_nobody_can_dial_and_no_relay_takes_says_what_to_do_and_exits(wide_model, tmp_path):
    """No node of this swarm relays (--no-relay): the peer at home finds that nobody can dial it, waits
    --relay-wait for a relay, then stops with one line saying what to do, without serving."""
    with netns.EmulatedNetwork() as net, LocalSwarm(tmp_path, env={**PEER_ENV, "PYTHONPATH": str(REPO)}) as swarm:
        relay = net.add_public("relay")
        home = net.add_home("home", router=net.add_router("router"))
        swarm.start_bootstrap(["--no-relay"], listen=listen(relay), prefix=relay.command([]))
        at_home = swarm.start_peer("0:4", model=str(wide_model), listen=listen(home), prefix=home.command([]), wait=False,
                                   extra_args=["--relay-wait", "5"])
        assert at_home.process.wait(timeout=120) == 2
        log = at_home.log_tail(20000)
        assert re.search(r"none of \d+ swarm nodes could dial us", log), log
        assert "swarm: error: this peer cannot be reached" in log and "--announce-maddrs" in log, log
        time.sleep(0.5)  # the last stdout lines reach the .out file
        assert "swarm: ready" not in at_home.log_path.with_suffix(".out").read_text()
