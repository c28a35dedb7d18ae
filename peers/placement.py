"""How many blocks a peer takes and where: reads the swarm from the DHT and asks `swarm.balance`.

The decisions themselves are pure functions (`swarm.balance`); this module gathers their inputs:
the swarm's records, the device's free memory and the model's per-block sizes (`peers.sizing`).
"""

from __future__ import annotations

import asyncio
import logging

import torch

from peers import sizing
from swarm import coverage, network
from swarm.errors import ConfigError
from swarm.records import parse_peer_records

logger = logging.getLogger(__name__)

GiB = 2**30
RUNTIME_RESERVE_BYTES = GiB // 4  # torch, the DHT process and p2pd, beyond the blocks and their cache


async def read_swarm(dht, dht_prefix: str, num_blocks: int) -> dict[str, coverage.Span]:
    """Every joining or online peer's span, from validated DHT records (invalid ones are skipped)."""
    raw = await asyncio.get_running_loop().run_in_executor(None, network.fetch_block_records, dht, dht_prefix, num_blocks)
    records = [parse_peer_records(entry, where=f"{dht_prefix}.{index}") for index, entry in enumerate(raw)]
    return coverage.peer_spans(records)


def auto_block_count(
    model_config, *, dtype: torch.dtype, device: str, cache_tokens: int, max_length: int, max_memory_gb: float | None,
    cache_gb: float | None = None, quantization: str = "none",
) -> tuple[int, str]:
    """As many blocks as fit in the memory budget with their KV cache, and the explanation.

    The cache is `cache_tokens` tokens for every block, or `cache_gb` GiB over all blocks when given."""
    num_blocks = model_config.num_hidden_layers
    weights = sizing.block_memory_bytes(model_config, dtype, quantization)
    cache = sizing.kv_bytes_per_token(model_config, dtype) * cache_tokens if cache_gb is None else 0
    fixed_cache = int(cache_gb * GiB) if cache_gb is not None else 0
    # a long prefill holds a few [max_length, hidden] buffers and one row of attention scores per head
    activations = 8 * max_length * model_config.hidden_size * torch.finfo(dtype).bits // 8
    if max_memory_gb is not None:
        budget, source = int(max_memory_gb * GiB), f"--max-memory-gb {max_memory_gb:g}"
    else:
        budget, source = sizing.free_memory_bytes(device), f"{sizing.free_memory_bytes(device) / GiB:.1f} GiB free on {device}"
    usable = budget - activations - RUNTIME_RESERVE_BYTES - fixed_cache
    count = min(num_blocks, max(0, usable // (weights + cache)))
    cache_text = (
        f"{cache / 2**20:.1f} MiB of KV cache for {cache_tokens} tokens" if cache_gb is None
        else f"a share of the {cache_gb:g} GiB KV cache (--cache-gb)"
    )
    explanation = (
        f"{count} of {num_blocks} blocks fit: each needs {weights / 2**20:.1f} MiB of weights "
        f"({'not quantized' if quantization == 'none' else quantization}) + {cache_text}; "
        f"budget {source}, minus {(activations + RUNTIME_RESERVE_BYTES) / GiB:.2f} GiB "
        f"reserved for activations and the runtime"
    )
    if count < 1:
        lower = "--cache-tokens" if cache_gb is None else "--cache-gb"
        raise ConfigError(f"not enough memory for one block: {explanation} (lower {lower} or raise --max-memory-gb)")
    return int(count), explanation


def describe_choice(throughputs: list[float], start: int, length: int) -> str:
    window = throughputs[start : start + length]
    missing = sum(value <= 0 for value in window)
    return (
        f"blocks {start}:{start + length} are where the swarm is weakest "
        f"({missing} of them unserved, weakest {min(window):.3g} tokens/s, swarm weakest {min(throughputs):.3g})"
    )
