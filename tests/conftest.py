"""Shared fixtures: tiny random models saved to disk, and local swarms of subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from swarm.tools.local import LocalSwarm


def stop_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM a process started with start_new_session=True and its whole group; SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

TINY_BLOCKS = 4
# peers announce a given throughput instead of measuring it (and caching it in the user's cache folder)
PEER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SWARM_PEER_THROUGHPUT": "1"}


def make_tiny_llama(
    path: Path, *, hidden_size: int = 64, max_position_embeddings: int = 512, seed: int = 0, num_layers: int = TINY_BLOCKS
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_swarm(tiny_model_path, tmp_path_factory):
    """A bootstrap node and two peers serving blocks 0:2 and 2:4 of the tiny model."""
    with LocalSwarm(tmp_path_factory.mktemp("tiny-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:2", "2:4"):
            swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--announce-period", "2"])
        yield swarm


@pytest.fixture(scope="session")
def smollm2_swarm(tmp_path_factory):
    """A bootstrap node and three peers serving the default model, 10 blocks each."""
    from swarm.models import resolve_model

    resolve_model("smollm2-135m")  # convert once, before three peers race for it
    with LocalSwarm(tmp_path_factory.mktemp("smollm2-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_peer(blocks, model="smollm2-135m", wait=False)
        for node in swarm.nodes[1:]:
            swarm.wait_ready(node)
        yield swarm


# A test module that asks for `reference` or `model` without defining its own gets these: plain
# transformers on the tiny model, and a client of the tiny swarm.
@pytest.fixture(scope="module")
def reference(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tiny_swarm, tiny_model_path):
    from client import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=tiny_swarm.initial_peers)
    yield model
    model.close()


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test by the folder it lives in: `unit` (tests/unit: no sockets, seconds) or `swarm`
    (tests/swarm: subprocess nodes on 127.0.0.1). `make test-unit` runs the unit tests that are not `slow`."""
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in ("unit", "swarm"):
            item.add_marker(folder)
