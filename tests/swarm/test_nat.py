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
    from transformers import AutoModelForCausalLM

    with netns.EmulatedNetwork() as net, LocalSwarm(tmp_path, env={**PEER_ENV, "PYTHONPATH": str(REPO)}) as swarm:
        relay, second, east, west, spare = (net.add_public(name) for name in ("relay", "relay2", "east", "west", "spare"))
        router = net.add_router("router")
        home = net.add_home("home", router=router)
        user = net.add_home("user", router=net.add_router("router2")) if client_behind_nat else net.add_public("user")
        swarm.start_bootstrap(listen=listen(relay), prefix=relay.command([]))
        # a second node that relays: with fewer than 4 candidates, a node behind NAT waits 3 minutes before it reserves
        swarm.start_bootstrap(listen=listen(second), prefix=second.command([]))
        model = str(wide_model)
        swarm.start_peer("0:1", model=model, listen=listen(east), prefix=east.command([]))
        swarm.start_peer("3:4", model=model, listen=listen(west), prefix=west.command([]))
        at_home = swarm.start_peer("1:3", model=model, listen=listen(home), prefix=home.command([]))
        verdict = at_home.log_tail(20000)
        assert re.search(r"none of \d+ swarm nodes could dial us", verdict) and "reachable through a relay at" in verdict, verdict
        assert all("/p2p-circuit" in maddr for maddr in at_home.maddrs), at_home.maddrs

        client = subprocess.Popen(
            user.command([sys.executable, "-m", "tests.swarm.nat_client", "--model", model, "--initial-peers", *swarm.initial_peers,
                          "--listen", listen(user), "--prompt-tokens", str(PROMPT_TOKENS)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "client.log", "w"), text=True, cwd=REPO, env=swarm.env,
        )
        try:
            opened = time.monotonic()
            first = _phase(client, tmp_path)
            at_home_id = at_home.maddrs[0].rsplit("/p2p/", 1)[1]
            assert [hop[0] for hop in first["route"]][1] == at_home_id, first  # through the peer at home
            assert first["pushed"] == [False, True, True], first  # pushed into it and out of it
            if client_behind_nat:  # nobody can dial the other: everything between them goes through a relay
                assert all("/p2p-circuit" in maddr for maddr in first["connections"][at_home_id]), first["connections"]
                time.sleep(max(0.0, RELAYED_LONGER_THAN_S - (time.monotonic() - opened)))
            # else the peer at home dials the public client itself (libp2p's connection reversal): direct from then on
            second = _phase(client, tmp_path, go=True)  # the same streams, through the same connection
            assert second["route"] == first["route"]
            assert second["connections"][at_home_id] == first["connections"][at_home_id]

            spare_peer = swarm.start_peer("1:3", model=model, listen=listen(spare), prefix=spare.command([]))
            at_home.kill()
            third = _phase(client, tmp_path, go=True)
            spare_id = spare_peer.maddrs[0].rsplit("/p2p/", 1)[1]
            assert spare_id in [hop[0] for hop in third["route"]], third
            assert client.wait(timeout=60) == 0
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()

    reference = AutoModelForCausalLM.from_pretrained(wide_model, dtype=torch.float32).eval()
    prompt = torch.tensor([first["tokens"][:PROMPT_TOKENS]])
    expected = reference.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert third["tokens"] == expected[0].tolist()


def _phase(client: subprocess.Popen, folder: Path, go: bool = False) -> dict:
    if go:
        client.stdin.write("go\n")
        client.stdin.flush()
    line = client.stdout.readline()
    assert line, f"the client ended: {(folder / 'client.log').read_text()[-3000:]}"
    return json.loads(line)
