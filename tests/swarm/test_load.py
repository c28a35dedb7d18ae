"""Load: 16 clients generate at once for a bounded time through two peers; no request fails, every
output is exact, and the peers' KV cache and memory come back to where they started."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.remote import call_info
from swarm import network
from swarm.tools.local import LocalSwarm
from swarm.loop_thread import run_coroutine
from swarm.records import parse_peer_records

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(400)

CLIENTS = 16
LOAD_SECONDS = 20.0
PROMPTS = 8
NEW_TOKENS = 12
CACHE_TOKENS = 4096


def _cache_left(dht, prefix: str) -> dict[str, int]:
    """cache_tokens_left each online peer announces, by peer id."""
    left = {}
    for entry in network.fetch_block_records(dht, prefix, 4):
        for peer_id, record in parse_peer_records(entry).items():
            left[peer_id] = record.cache_tokens_left
    return left


def _rss(node) -> int:
    return psutil.Process(node.pid).memory_info().rss


@pytest.mark.slow
def test_sixteen_concurrent_sessions(tiny_model_path, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(16)
    prompts = [torch.randint(3, 128, (1, 4 + index), generator=generator) for index in range(PROMPTS)]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = [reference.generate(prompt, **kwargs) for prompt in prompts]
    peer_args = ["--announce-period", "1", "--cache-tokens", str(CACHE_TOKENS), "--max-sessions", "32"]

    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=peer_args, wait=False) for blocks in ("0:2", "2:4")]
        for node in peers:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        dht, prefix = model.sequence.dht, tiny_model_path.name
        try:
            assert torch.equal(model.generate(prompts[0], **kwargs), expected[0])  # warm: first sessions, first allocations
            time.sleep(2.5)
            idle_cache = _cache_left(dht, prefix)
            assert sorted(idle_cache.values()) == [CACHE_TOKENS, CACHE_TOKENS]
            rss_before = [_rss(node) for node in peers]

            done, failures, mismatches = [0] * CLIENTS, [], []
            stop_at = time.monotonic() + LOAD_SECONDS

            def client(index: int) -> None:
                turn = index
                while time.monotonic() < stop_at:
                    prompt_index = turn % PROMPTS
                    try:
                        output = model.generate(prompts[prompt_index], **kwargs)
                    except Exception as exc:  # counted, never raised in a thread
                        failures.append(repr(exc))
                        continue
                    if not torch.equal(output, expected[prompt_index]):
                        mismatches.append(prompt_index)
                    done[index] += 1
                    turn += 1

            threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
            for thread in threads:
                thread.start()
            lowest = dict(idle_cache)
            while any(thread.is_alive() for thread in threads):
                for peer_id, left in _cache_left(dht, prefix).items():
                    lowest[peer_id] = min(lowest.get(peer_id, left), left)
                time.sleep(0.5)
            for thread in threads:
                thread.join()

            assert not failures, failures[:5]
            assert not mismatches
            assert all(count > 0 for count in done), done
            assert min(lowest.values()) < CACHE_TOKENS  # the sessions really ran side by side
            time.sleep(2.5)  # two announce periods: the records show the cache as it is now
            assert _cache_left(dht, prefix) == idle_cache
            growth = [_rss(node) - before for node, before in zip(peers, rss_before)]
            assert max(growth) < 64 * 2**20, growth
            infos = [
                run_coroutine(call_info(model.sequence.p2p, peer_id, prefix, 10.0))
                for peer_id in _cache_left(dht, prefix)
            ]
            batched = [(info.batched_steps, info.decode_steps) for info in infos]
            assert all(steps > 0 for steps, _ in batched), batched  # decode steps of several sessions ran as one forward
            print(f"requests {sum(done)} ({done}), lowest cache left {lowest}, peer RSS growth MiB {[g / 2**20 for g in growth]}, "
                  f"batched / decode steps per peer {batched}")
        finally:
            model.close()
