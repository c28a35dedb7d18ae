"""What a block costs in each number format: the memory 10 blocks of a model take in a peer's process
(resident set size grown by loading them, measured in a fresh process per format), next to the bytes
that format predicts (`peers.sizing.block_memory_bytes`, which `--blocks auto` counts), and one
block's decode speed.

    python benchmarks/quantized_memory.py [--model smollm2-135m] [--blocks 10] [--device cpu]

Prints one row per format and the ratio of measured to predicted bytes. The reference is float32
in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

FORMATS = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("float32", "nf4")]


def measure(model: str, blocks: int, dtype_name: str, quantization: str, device: str) -> dict:
    """In this process: RSS grown by loading `blocks` blocks, the bytes predicted, and decode steps/s of block 0."""
    import psutil
    import torch

    from peers import sizing
    from peers.sizing import trim_heap
    from swarm import models

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    source = models.resolve_model(model)
    config = models.load_config(source)
    dtype = getattr(torch, dtype_name)
    models.load_block(source, config, 0, dtype=dtype, device=device, quantization=quantization)  # warm up: kernels, allocator
    gc.collect()
    trim_heap()
    process = psutil.Process()
    before = process.memory_info().rss
    layers = [models.load_block(source, config, index, dtype=dtype, device=device, quantization=quantization) for index in range(blocks)]
    gc.collect()
    grown_untrimmed = process.memory_info().rss - before
    trim_heap()
    grown = process.memory_info().rss - before
    stack = sizing.load_probe_stack(source, config, device=device, dtype=dtype, quantization=quantization)
    steps_per_s = sizing.measure_decode_steps_per_s(stack, budget_s=2.0)
    del layers
    return {
        "format": dtype_name if quantization == "none" else f"{quantization}/{dtype_name}",
        "measured_bytes": grown,
        "untrimmed_bytes": grown_untrimmed,
        "predicted_bytes": blocks * sizing.block_memory_bytes(config, dtype, quantization),
        "decode_steps_per_s": steps_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("DTYPE", "QUANT"), help=argparse.SUPPRESS)  # a child measuring one format
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.blocks, *args.one, args.device)))
        return
    rows = []
    for dtype_name, quantization in FORMATS:
        command = [sys.executable, __file__, "--model", args.model, "--blocks", str(args.blocks), "--device", args.device,
                   "--one", dtype_name, quantization]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    reference = rows[0]
    print(f"{args.blocks} blocks of {args.model} on {args.device}: memory grown by loading them (RSS) vs what the format predicts")
    print(f"{'format':16} {'measured MiB':>12} {'before trim':>11} {'predicted MiB':>13} {'measured/predicted':>18} {'vs float32':>10} "
          f"{'decode steps/s':>14}")
    for row in rows:
        print(f"{row['format']:16} {row['measured_bytes'] / 2**20:12.1f} {row['untrimmed_bytes'] / 2**20:11.1f} "
              f"{row['predicted_bytes'] / 2**20:13.1f} "
              f"{row['measured_bytes'] / row['predicted_bytes']:18.2f} {row['measured_bytes'] / reference['measured_bytes']:10.2f} "
              f"{row['decode_steps_per_s']:14.0f}")


if __name__ == "__main__":
    main()
