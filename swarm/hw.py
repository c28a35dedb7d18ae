"""`python -m swarm.hw`: this machine's hardware profile, and the measured speed of one model block.

The profile: CPU cores, RAM, GPUs and their memory, torch version, the default device and the dtypes
a tiny matmul works in there. With `--model`, block 0 of that model is loaded (its real weights only)
and timed: one-token decode steps with a KV cache, and a long forward without one. `--emit FILE`
writes it all as TOML.

The sizes and the timing are the peers' own (`peers.sizing`, which also caches the throughput a peer
announces); this module only gathers the profile and prints it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w
import torch

from peers.sizing import (
    DTYPE_NAMES,
    check_device,
    cpu_model_name,
    dtype_works,
    measure_block,
    resolve_dtype,
)
from swarm import models
from swarm.quantization import QUANTIZATIONS, check_quantization
from swarm.cli import fail, setup_logging
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


@dataclass
class CpuInfo:
    model: str  # "" where the OS does not tell
    logical_cores: int
    physical_cores: int  # 0 where psutil cannot tell


@dataclass
class MemoryInfo:
    total_bytes: int
    available_bytes: int


@dataclass
class GpuInfo:
    index: int
    name: str
    capability: str  # "8.0"
    total_bytes: int
    free_bytes: int


@dataclass
class TorchInfo:
    version: str
    cuda_version: str  # "" for a CPU build
    default_device: str  # "cuda" where a GPU is usable, else "cpu"
    num_threads: int


# ---- the machine ---------------------------------------------------------------------------
def cpu_info() -> CpuInfo:
    return CpuInfo(
        model=cpu_model_name(),
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False) or 0,
    )


def memory_info() -> MemoryInfo:
    memory = psutil.virtual_memory()
    return MemoryInfo(total_bytes=memory.total, available_bytes=memory.available)


def gpu_info() -> list[GpuInfo]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        free_bytes, total_bytes = torch.cuda.mem_get_info(index)
        gpus.append(GpuInfo(index, properties.name, f"{properties.major}.{properties.minor}", total_bytes, free_bytes))
    return gpus


def torch_info() -> TorchInfo:
    return TorchInfo(
        version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        default_device="cuda" if torch.cuda.is_available() else "cpu",
        num_threads=torch.get_num_threads(),
    )


def working_dtypes(device: str) -> dict[str, bool]:
    """dtype name -> whether a tiny matmul on `device` works and gives the right answer."""
    return {name: dtype_works(getattr(torch, name), device) for name in DTYPE_NAMES}


def machine_profile(device: str | None = None) -> dict[str, Any]:
    """The whole profile as plain data (TOML-ready); dtypes are tried on `device` (default: the default device)."""
    torch_section = torch_info()
    device = device or torch_section.default_device
    return {
        "cpu": asdict(cpu_info()),
        "memory": asdict(memory_info()),
        "torch": asdict(torch_section),
        "gpus": [asdict(gpu) for gpu in gpu_info()],
        "dtypes": {"device": device, **working_dtypes(device)},
    }


# ---- the command line ----------------------------------------------------------------------
def format_profile(profile: dict[str, Any]) -> str:
    cpu, memory, torch_section, dtypes = profile["cpu"], profile["memory"], profile["torch"], profile["dtypes"]
    gpus = ", ".join(f"cuda:{gpu['index']} {gpu['name']} (sm {gpu['capability']}, {_gib(gpu['free_bytes'])} free "
                     f"of {_gib(gpu['total_bytes'])})" for gpu in profile["gpus"]) or "none"
    working = ", ".join(f"{name} {'ok' if dtypes[name] else 'fails'}" for name in DTYPE_NAMES)
    lines = [
        f"cpu      {cpu['model'] or 'unknown model'}: {cpu['logical_cores']} logical / "
        f"{cpu['physical_cores'] or '?'} physical cores",
        f"memory   {_gib(memory['total_bytes'])} total, {_gib(memory['available_bytes'])} available",
        f"gpus     {gpus}",
        f"torch    {torch_section['version']} (CUDA {torch_section['cuda_version'] or 'none'}), default device "
        f"{torch_section['default_device']}, {torch_section['num_threads']} threads",
        f"dtypes   on {dtypes['device']}: {working}",
    ]
    if "block" in profile:
        block = profile["block"]
        lines += [
            f"block    0 of {block['model']} on {block['device']} {block['dtype']}"
            + (f", quantized {block['quantization']}" if block.get("quantization", "none") != "none" else ""),
            f"  parameters  {block['parameter_bytes']} bytes ({block['parameter_bytes'] / 2**20:.1f} MiB)",
            f"  kv cache    {block['kv_bytes_per_token']} bytes per token",
            f"  decode      {block['decode_steps_per_s']:.1f} steps/s (one token after {block['context_tokens']}, "
            "median step)",
            f"  forward     {block['forward_tokens_per_s']:.0f} tokens/s ({block['forward_tokens']} tokens, no cache)",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swarm.hw", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="?", const=models.DEFAULT_MODEL,
                        help=f"also time block 0 of this model: name, Hugging Face id or folder "
                             f"(--model alone: {models.DEFAULT_MODEL})")
    parser.add_argument("--device", help="torch device to probe, e.g. cpu, cuda, cuda:1 (default: cuda if usable, else cpu)")
    parser.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help="dtype of the timed block (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--quant", choices=list(QUANTIZATIONS), default="none",
                        help="quantization of the timed block (bitsandbytes int8 or nf4; none: --dtype as is)")
    parser.add_argument("--emit", type=Path, metavar="FILE", help="also write the profile as TOML to FILE")
    parser.add_argument("--verbose", action="store_true", help="DEBUG logging")
    return parser.parse_args(argv)


def collect(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device or torch_info().default_device
    check_device(device)
    profile = machine_profile(device)
    if args.model:
        source = models.resolve_model(args.model)
        config = models.load_config(source)
        logger.info("timing block 0 of %s on %s", source.name, device)
        check_quantization(args.quant, device)
        profile["block"] = asdict(measure_block(
            source, config, device=device, dtype=resolve_dtype(args.dtype, device), quantization=args.quant
        ))
    return profile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        profile = collect(args)
    except SwarmError as exc:
        return fail(str(exc))
    print(format_profile(profile), flush=True)
    if args.emit:
        try:
            args.emit.write_text(tomli_w.dumps(profile))
        except OSError as exc:
            return fail(f"cannot write {args.emit}: {exc}")
    return 0


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"



if __name__ == "__main__":
    sys.exit(main())
