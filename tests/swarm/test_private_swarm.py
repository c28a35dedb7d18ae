"""Private swarms: with --swarm-key, peers and clients talk only to holders of the same key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.remote import call_info
from swarm import errors, network
from swarm.config import ClientConfig
from swarm.tools.local import LocalSwarm
from swarm.loop_thread import run_coroutine
from swarm.records import parse_peer_records
from swarm.swarm_key import SwarmKey

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    (folder / "ours.key").write_text("a9" * 32 + "\n")
    (folder / "theirs.key").write_text("5c" * 32 + "\n")
    for key in folder.iterdir():
        key.chmod(0o600)  # a secret others can read is refused
    return folder / "ours.key", folder / "theirs.key"


@pytest.fixture(scope="module")
def private_swarm(tiny_model_path, keys, tmp_path_factory):
    ours, theirs = keys
    with LocalSwarm(tmp_path_factory.mktemp("private"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap(["--swarm-key", str(ours)])
        args = ["--announce-period", "1", "--swarm-key", str(ours)]
        for blocks in ("0:2", "2:4"):
            swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=args, wait=False)
        # an outsider with another key serves every block: nobody with our key may route through it
        swarm.start_peer("0:4", model=str(tiny_model_path), extra_args=["--announce-period", "1", "--swarm-key", str(theirs)], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        yield swarm


def _client(tiny_model_path, swarm, key_path, **config):
    config = ClientConfig(swarm_key_path=key_path, **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers, client_config=config)


def test_key_holders_generate_exactly_through_their_own_peers(private_swarm, tiny_model_path, keys):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    model = _client(tiny_model_path, private_swarm, keys[0])
    try:
        with model.inference_session(max_length=32) as session:
            assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))
            route = {peer for peer, _, _ in session.route}
        raw = network.fetch_block_records(model.sequence.dht, tiny_model_path.name, 4)
        seen = {peer for entry in raw for peer in parse_peer_records(entry)}
    finally:
        model.close()
    ours = {node.maddrs[0].rsplit("/", 1)[-1] for node in private_swarm.nodes[1:3]}
    assert route <= ours and seen == ours  # the outsider's records never reached us


@pytest.mark.parametrize("key", [None, "theirs"])
def test_outsiders_find_nothing_and_are_refused(private_swarm, tiny_model_path, keys, key):
    key_path = keys[1] if key == "theirs" else None
    model = _client(tiny_model_path, private_swarm, key_path, route_wait_s=2.0)
    try:
        raw = network.fetch_block_records(model.sequence.dht, tiny_model_path.name, 4)
        insiders = {node.maddrs[0].rsplit("/", 1)[-1] for node in private_swarm.nodes[1:3]}
        assert not insiders & {peer for entry in raw for peer in parse_peer_records(entry)}
        for peer_id in insiders:  # even knowing a peer's id, a call is refused
            with pytest.raises(errors.AccessDeniedError):
                run_coroutine(
                    call_info(model.sequence.p2p, peer_id, tiny_model_path.name, 5.0, model.sequence.proof(peer_id))
                )
        if key is None:  # the keyless client sees no peers at all; the other key's sees only its own
            with pytest.raises(errors.MissingBlocksError):
                model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    finally:
        model.close()
    for node in private_swarm.nodes:
        assert node.process.poll() is None, node.log_tail()


def test_plan_needs_the_key(private_swarm, tiny_model_path, keys):
    command = [sys.executable, "-m", "swarm.plan", "--initial-peers", *private_swarm.initial_peers, "--model", tiny_model_path.name]
    with_key = subprocess.run([*command, "--swarm-key", str(keys[0])], capture_output=True, text=True, timeout=120, env=private_swarm.env)
    assert with_key.returncode == 0 and "2 peers" in with_key.stdout, with_key.stdout + with_key.stderr[-2000:]
    without = subprocess.run(command, capture_output=True, text=True, timeout=120, env=private_swarm.env)
    assert without.returncode != 0 and "no model is announced" in without.stderr


def test_swarm_key_file_is_checked(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("tiny")
    short.chmod(0o600)
    with pytest.raises(errors.ConfigError, match="at least 16 bytes"):
        SwarmKey.load(short)
    with pytest.raises(errors.ConfigError, match="cannot read"):
        SwarmKey.load(tmp_path / "missing.key")
    ok = tmp_path / "ok.key"
    ok.write_text("x" * 40)
    ok.chmod(0o600)
    key = SwarmKey.load(ok)
    assert key.proof("a", "b") != key.proof("b", "a") and len(key.proof("a", "b")) == 64
    with pytest.raises(errors.AccessDeniedError):
        key.check(key.proof("a", "b"), "a", "c")
