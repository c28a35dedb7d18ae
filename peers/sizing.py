"""How big and how fast a model's blocks are on this peer: bytes of a block's weights and of its KV
cache per token, free device memory, the dtype to run in, and the throughput a peer announces
(decode steps/s of one block), measured once per (model, device, dtype, quantization, torch) and
cached in `swarm_cache_dir()/throughput.json`.

Sizes come from layers built on meta (no weights read). Nothing here picks blocks (`peers.placement`
does) or prints a profile (`python -m swarm.hw` does); the numbers are estimates for announcing, not
a benchmark (see benchmarks/).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from transformers import PretrainedConfig

from swarm import models, quantization as quantizations
from swarm.architecture import Architecture
from swarm.blocks import BlockInputs, BlockStack
from swarm.config import DTYPE_NAMES, parse_throughput
from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

THROUGHPUT_FILE = "throughput.json"
CONTEXT_TOKENS = 32  # decode steps continue a context this long
FORWARD_TOKENS = 512  # a forward without cache runs this many tokens (capped by max_position_embeddings)


@dataclass
class BlockMeasurement:
    model: str
    device: str
    dtype: str
    quantization: str
    parameter_bytes: int
    kv_bytes_per_token: int
    context_tokens: int
    decode_steps_per_s: float  # one token through one block, KV cache of context_tokens+ tokens
    forward_tokens: int
    forward_tokens_per_s: float  # a forward of forward_tokens tokens, no cache


# ---- sizes ---------------------------------------------------------------------------------
def block_memory_bytes(config: PretrainedConfig, dtype: torch.dtype, quantization: str = "none") -> int:
    """Parameter bytes of one decoder block in `dtype` and `quantization`, from a layer built on meta
    (no weights read)."""
    return quantizations.parameter_bytes(Architecture.of(config).new_layer(0), quantization, dtype)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to one block's cache."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return 2 * num_kv_heads * head_dim * dtype.itemsize


def free_memory_bytes(device: str) -> int:
    """Memory free for new tensors: available RAM on CPU, free GPU memory on CUDA."""
    torch_device = check_device(device)
    if torch_device.type == "cpu":
        return psutil.virtual_memory().available
    if torch_device.type == "cuda":
        return torch.cuda.mem_get_info(torch_device)[0]
    raise ConfigError(f"device {device!r}: free memory is known only for cpu and cuda devices")


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. glibc keeps freed blocks for reuse, and loading
    quantized blocks frees the float weights each was made from in pieces it does not reuse well:
    measured on 10 NF4 blocks of the default model, 188 MiB resident before, 22 MiB after
    (benchmarks/quantized_memory.py). A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_device(device: str) -> torch.device:
    """A usable torch device, or ConfigError saying why not."""
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    return torch_device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' = float32 on CPU, bfloat16 elsewhere; else the named dtype. Raises ConfigError for a
    dtype `device` cannot compute in."""
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {name!r}: choose auto, {', '.join(DTYPE_NAMES)}")
    dtype = getattr(torch, name)
    if not dtype_works(dtype, device):
        working = [other for other in DTYPE_NAMES if dtype_works(getattr(torch, other), device)]
        raise ConfigError(f"--dtype {name}: {device} cannot compute in it (a test matmul failed); it can in {', '.join(working) or 'none'}")
    return dtype


def dtype_works(dtype: torch.dtype, device: str) -> bool:
    """Whether a tiny matmul in `dtype` on `device` runs and gives the right answer."""
    try:
        ones = torch.ones(8, 8, dtype=dtype, device=device)
        return float((ones @ ones).sum().item()) == 512.0
    except (RuntimeError, TypeError):
        return False


# ---- timing one block ----------------------------------------------------------------------
def load_probe_stack(
    source: models.ModelSource, config: PretrainedConfig, *, device: str, dtype: torch.dtype, quantization: str = "none"
) -> BlockStack:
    """Block 0 with its real weights (quantized as asked), as a one-block stack."""
    layer = models.load_block(source, config, 0, dtype=dtype, device=device, quantization=quantization)
    return BlockStack(config, [layer], 0, models.load_rotary(config, device=device))


def measure_decode_steps_per_s(
    stack: BlockStack, *, context_tokens: int = CONTEXT_TOKENS, warmup_steps: int = 5, max_steps: int = 100,
    budget_s: float = 1.0,
) -> float:
    """One-token steps per second after a prefill, from the median step time."""
    hidden_size = stack.config.hidden_size
    inputs = _random_hidden_states(1 + warmup_steps + max_steps, 1, hidden_size)  # [steps, 1, hidden]
    cache = stack.new_cache()
    stack(BlockInputs(_random_hidden_states(1, context_tokens, hidden_size)), cache)  # prefill
    step_times_s = _time_calls(
        lambda step: stack(BlockInputs(inputs[step : step + 1]), cache), stack.device, warmup_steps, max_steps, budget_s
    )
    return 1.0 / statistics.median(step_times_s)


def measure_forward_tokens_per_s(
    stack: BlockStack, *, num_tokens: int = FORWARD_TOKENS, warmup_runs: int = 1, max_runs: int = 5,
    budget_s: float = 1.5,
) -> float:
    """Tokens per second of a forward over `num_tokens` tokens without cache, from the median run time."""
    hidden_states = _random_hidden_states(1, num_tokens, stack.config.hidden_size)  # [1, seq, hidden]
    run_times_s = _time_calls(lambda run: stack(BlockInputs(hidden_states)), stack.device, warmup_runs, max_runs, budget_s)
    return num_tokens / statistics.median(run_times_s)


def measure_block(
    source: models.ModelSource, config: PretrainedConfig, *, device: str, dtype: torch.dtype, quantization: str = "none"
) -> BlockMeasurement:
    """Both timings of block 0, and its sizes."""
    stack = load_probe_stack(source, config, device=device, dtype=dtype, quantization=quantization)
    forward_tokens = min(FORWARD_TOKENS, getattr(config, "max_position_embeddings", None) or FORWARD_TOKENS)
    return BlockMeasurement(
        model=source.name,
        device=device,
        dtype=_dtype_name(dtype),
        quantization=quantization,
        parameter_bytes=block_memory_bytes(config, dtype, quantization),
        kv_bytes_per_token=kv_bytes_per_token(config, dtype),
        context_tokens=CONTEXT_TOKENS,
        decode_steps_per_s=measure_decode_steps_per_s(stack),
        forward_tokens=forward_tokens,
        forward_tokens_per_s=measure_forward_tokens_per_s(stack, num_tokens=forward_tokens),
    )


def _time_calls(call: Callable[[int], Any], device: torch.device, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Seconds of each timed call (after `warmup` untimed ones); stops early once `budget_s` is spent."""
    for index in range(warmup):
        call(index)
    times_s: list[float] = []
    for index in range(warmup, warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        call(index)
        _synchronize(device)
        times_s.append(time.perf_counter() - start)
        if sum(times_s) >= budget_s:
            break
    return times_s


def _random_hidden_states(batch: int, seq: int, hidden_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, seq, hidden_size, generator=generator)  # [batch, seq, hidden]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the throughput a peer announces, cached -----------------------------------------------
def block_throughput(
    source: models.ModelSource, config: PretrainedConfig, *, device: str, dtype: torch.dtype,
    quantization: str = "none", mode: str = "auto",
) -> float:
    """Decode steps/s of one block (tokens/s through it), to announce.

    `mode`: "auto" (the cached value, else measure and cache), "eval" (measure and overwrite the
    cache), or a number such as "123.5" (returned as is)."""
    given = parse_throughput(mode)
    if isinstance(given, float):
        logger.info("block throughput %.1f tokens/s (given)", given)
        return given
    quantizations.check_name(quantization)
    check_device(device)
    key = throughput_key(source, device=device, dtype=dtype, quantization=quantization)
    path = models.swarm_cache_dir() / THROUGHPUT_FILE
    cached = _read_entries(path).get(key) if given == "auto" else None
    if cached is not None:
        logger.info("block throughput %.1f tokens/s (cached in %s)", cached["tokens_per_s"], path)
        return float(cached["tokens_per_s"])
    stack = load_probe_stack(source, config, device=device, dtype=dtype, quantization=quantization)
    tokens_per_s = measure_decode_steps_per_s(stack)
    _store_entry(path, key, {"tokens_per_s": tokens_per_s, "measured_at": _utc_now()})
    logger.info("block throughput %.1f tokens/s (measured on %s %s, quantization %s, cached in %s)", tokens_per_s, device,
                _dtype_name(dtype), quantization, path)
    return tokens_per_s


def throughput_key(source: models.ModelSource, *, device: str, dtype: torch.dtype, quantization: str) -> str:
    """What a measurement depends on: model, device (and its hardware and threads), dtype, quantization, torch."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
        device, hardware = f"cuda:{index}", torch.cuda.get_device_name(index)
    else:
        hardware = f"{cpu_model_name()}, {torch.get_num_threads()} threads"
    model = source.repo_id or str(source.path)
    return (f"model={model} device={device} ({hardware}) dtype={_dtype_name(dtype)} "
            f"quantization={quantization} torch={torch.__version__}")


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The cache's entries; a damaged file counts as empty (one WARNING), damaged entries are dropped."""
    try:
        entries = json.loads(path.read_text())["entries"]
        entries = dict(entries.items())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.warning("ignoring unreadable throughput cache %s (%s: %s)", path, type(exc).__name__, exc)
        return {}
    return {key: entry for key, entry in entries.items() if isinstance(entry, dict) and _is_rate(entry.get("tokens_per_s"))}


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _store_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Read, merge and replace the file atomically, under a lock: peers measuring at once lose nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = {**_read_entries(path), key: entry}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as file:
            try:
                json.dump({"version": 1, "entries": entries}, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            except BaseException:
                os.unlink(file.name)
                raise
        os.replace(file.name, path)  # readers see the old file or the new one, never half of one




def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()
