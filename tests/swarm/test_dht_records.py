"""Hostile DHT records: a node that writes garbage, impersonates peers or tries to overwrite their
records changes nothing a client, a joining peer or `swarm.plan` sees, and crashes none of them."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm import network
from swarm.config import LOOPBACK_MADDRS
from swarm.identity import Identity, owner_peer_id
from swarm.tools.local import LocalSwarm
from swarm.records import MODELS_KEY, PROTOCOL_VERSION, block_key, parse_peer_records

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)


def record(start: int, end: int, **overrides) -> dict:
    value = dict(
        protocol_version=PROTOCOL_VERSION, state="online", model="tiny", start_block=start, end_block=end,
        throughput=1e6, cache_tokens_left=100, dtype="float32", version="0.1.0", public_name="mallory",
    )
    value.update(overrides)
    return value


HOSTILE_VALUES = [
    record(0, 4, throughput=math.nan),
    record(0, 4, throughput=math.inf),
    record(0, 4, throughput=-1.0),
    record(3, 1),
    record(0, 10**12),
    record(0, 4, state="sleeping"),
    record(0, 4, public_name="x" * 2000),
    record(0, 4, start_block="zero"),
    [1, 2, 3],
    "a string",
    b"\x00\xff" * 500,
    None,
    {"nested": {"deep": [1] * 1000}},
]


def _store(dht, *args, **kwargs) -> None:
    with contextlib.suppress(TypeError):  # the unvalidating node's own heap of subkeys breaks on a str among bytes
        dht.store(*args, **kwargs)


@pytest.fixture(scope="module")
def swarm(tiny_model_path, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("hostile"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:2", "2:4"):
            swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--announce-period", "1"], wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        yield swarm


def _prefix(tiny_model_path) -> str:
    return tiny_model_path.name


def test_hostile_records_change_nothing(swarm, tiny_model_path, tmp_path):
    prefix = _prefix(tiny_model_path)
    mallory = Identity.load(tmp_path / "mallory.key")
    attacker = network.start_dht(
        initial_peers=swarm.initial_peers, host_maddrs=LOOPBACK_MADDRS, identity=mallory, loopback_only=True
    )
    # a node with none of our validators: it signs nothing and stores anything locally, but every
    # other node refuses what it sends, and readers refuse what it returns
    unsigned = hivemind.DHT(
        initial_peers=swarm.initial_peers, host_maddrs=LOOPBACK_MADDRS, start=True,
        auto_nat=False, nat_port_map=False, use_relay=False, use_auto_relay=False,
    )
    try:
        honest = network.fetch_block_records(attacker, prefix, 4)
        victim_subkey = next(subkey for subkey in honest[0] if owner_peer_id(subkey))
        victim = owner_peer_id(victim_subkey)
        # garbage under mallory's own, properly signed subkey: each value a different kind of broken
        for value in HOSTILE_VALUES:
            assert attacker.store(block_key(prefix, 0), value, get_dht_time() + 30, subkey=mallory.subkey(mallory.peer_id))
            stored = network.fetch_block_records(attacker, prefix, 1)[0]
            assert len(stored) == len(honest[0]) + 1
            assert sorted(parse_peer_records(stored)) == sorted(parse_peer_records(honest[0]))
        now = get_dht_time()
        for block in range(4):
            key = block_key(prefix, block)
            assert attacker.store(key, record(0, 4), now + 30, subkey=mallory.subkey(victim))  # victim's id, mallory's key
            # what validating nodes refuse to store or to read back: absurd expirations, plain subkeys (a str
            # among bytes subkeys breaks hivemind's heap of them), no subkey, unsigned changes (oversized
            # values: see test_units; a large message breaks the pipe to our own hivemind DHT process)
            # (store() says True when the unvalidating node took it: the reads below are what counts)
            attacker.store(key, record(0, 4), now + 10 * 365 * 86400, subkey=mallory.subkey(mallory.peer_id))
            for raw_store in (attacker, unsigned):
                _store(raw_store, key, record(0, 4), now + 30, subkey=victim)
                _store(raw_store, key, record(0, 4), now + 30)
            _store(unsigned, key, record(0, 4, public_name="forged"), now + 60, subkey=victim_subkey)
        attacker.store(MODELS_KEY, {"model": "tiny", "num_blocks": 10**9}, now + 30, subkey=prefix)
        attacker.store(MODELS_KEY, "junk", now + 30, subkey=mallory.subkey(prefix))

        # read by an honest node: the attacker's own cache may now hold a plain subkey among bytes ones,
        # which breaks its own lookups (hivemind compares them when two expire at the same time)
        reader = network.start_dht(initial_peers=swarm.initial_peers, host_maddrs=LOOPBACK_MADDRS, loopback_only=True)
        try:
            after = network.fetch_block_records(reader, prefix, 4)
        finally:
            network.stop_dht(reader)
        assert sum(len(entry) for entry in after) > sum(len(entry) for entry in honest)  # the garbage is stored
        parsed = [parse_peer_records(entry) for entry in after]
        assert [sorted(entry) for entry in parsed] == [sorted(parse_peer_records(entry)) for entry in honest]
        assert all(record.public_name != "forged" and record.start_block in (0, 2) for entry in parsed for record in entry.values())
        assert mallory.peer_id not in {peer for entry in parsed for peer in entry}
        assert victim in parsed[0]

        # a client routes around all of it and generates exactly
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
        input_ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))
        kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        try:
            assert torch.equal(model.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))
        finally:
            model.close()

        # swarm.plan reads the same swarm, healthy, with two peers
        plan = subprocess.run(
            [sys.executable, "-m", "swarm.plan", "--initial-peers", *swarm.initial_peers, "--model", prefix],
            capture_output=True, text=True, timeout=120, env=swarm.env,
        )
        assert plan.returncode == 0, plan.stderr[-2000:]
        assert "healthy" in plan.stdout and "2 peers" in plan.stdout, plan.stdout

        # a peer joining with --blocks auto reads the hostile swarm and starts serving
        joiner = swarm.start_peer("2", model=str(tiny_model_path), extra_args=["--join-jitter", "0"])
        assert joiner.process.poll() is None
    finally:
        network.stop_dht(attacker)
        network.stop_dht(unsigned)
    for node in swarm.nodes[1:]:
        assert node.process.poll() is None, node.log_tail()
