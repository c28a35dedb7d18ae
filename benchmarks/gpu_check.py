"""The GPU path, checked in one run: for float16, bfloat16, int8 and nf4, a swarm of three peers with
`--device cuda` serves the model, its greedy tokens are compared with transformers loaded the same way
on the same GPU, and decode tokens/s, prefill time and each peer's GPU memory are printed.

    python benchmarks/gpu_check.py [--model smollm2-135m] [--new-tokens 64] [--prompt-tokens 256]

Needs a CUDA device (it says so and exits 2 without one; `--device cpu` dry-runs the script itself);
installs nothing; about 1-2 minutes per format with the default model. Peer memory is GPU memory per
peer process (nvidia-smi). The client's embeddings and head run on the CPU, in the same dtype.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = [("float16", "none"), ("bfloat16", "none"), ("float16", "int8"), ("bfloat16", "nf4")]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. "


def gpu_memory_by_pid() -> dict[int, int]:
    """Process id -> bytes of GPU memory it holds (nvidia-smi; empty where it is missing)."""
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in output.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        usage[int(pid)] = int(used) * 2**20
    return usage


def group_memory(node, usage: dict[int, int] | None) -> int:
    """Bytes held by a node's process group (the peer and its children): GPU memory from `usage`, or
    resident memory where `usage` is None (a dry run on the CPU)."""
    import psutil

    try:
        root = psutil.Process(node.pid)
        processes = [root, *root.children(recursive=True)]
        if usage is None:
            return sum(process.memory_info().rss for process in processes)
    except psutil.NoSuchProcess:
        return 0
    return sum(usage.get(process.pid, 0) for process in processes)


def check_format(model_name: str, dtype_name: str, quant: str, args, log_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client import AutoDistributedModelForCausalLM
    from swarm import quantization
    from swarm.config import ClientConfig
    from swarm.tools.local import LocalSwarm

    dtype = getattr(torch, dtype_name)
    peer_args = ["--device", args.device, "--dtype", dtype_name, "--quant", quant, "--throughput", "1"]
    with LocalSwarm(log_dir / f"{quant}-{dtype_name}", startup_timeout_s=300) as swarm:
        swarm.start_bootstrap()
        third = -(-args.num_blocks // 3)
        spans = [f"{start}:{min(start + third, args.num_blocks)}" for start in range(0, args.num_blocks, third)]
        nodes = [swarm.start_peer(span, model=model_name, extra_args=peer_args, wait=False) for span in spans]
        for node in nodes:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_name, initial_peers=swarm.initial_peers, torch_dtype=dtype, client_config=ClientConfig(dtypes=[dtype_name]),
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            text = (PROMPT * 64)[: args.prompt_tokens * 4]
            input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
            greedy = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            model.generate(input_ids[:, :8], max_new_tokens=2)  # warm-up: kernels, connections
            started = time.perf_counter()
            model.generate(input_ids, max_new_tokens=1)
            prefill_s = time.perf_counter() - started
            started = time.perf_counter()
            ours = model.generate(input_ids, **greedy)
            total_s = time.perf_counter() - started
            memory = gpu_memory_by_pid() if args.device.startswith("cuda") else None
            peer_memory = [group_memory(node, memory) for node in nodes]
        finally:
            model.close()
    reference = AutoModelForCausalLM.from_pretrained(
        model.name_or_path, dtype=dtype, quantization_config=quantization.reference_config(quant, dtype), device_map=args.device
    ).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids.to(args.device), **greedy).cpu()
    del reference
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    new_ours, new_expected = ours[0, input_ids.shape[1]:], expected[0, input_ids.shape[1]:]
    same = (new_ours == new_expected).long()
    first_difference = int(same.argmin()) if not bool(same.all()) else None
    return {
        "format": dtype_name if quant == "none" else f"{quant}/{dtype_name}",
        "tokens_equal": first_difference is None,
        "first_difference": first_difference,
        "prefill_s": prefill_s,
        "decode_tokens_per_s": (args.new_tokens - 1) / max(total_s - prefill_s, 1e-9),
        "peer_memory_mib": [round(value / 2**20) for value in peer_memory],
        "sample": tokenizer.decode(new_ours[:24]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--formats", nargs="*", default=[f"{quant}/{dtype}" for dtype, quant in FORMATS],
                        help="which of the formats to check, as QUANT/DTYPE (default: all four)")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a dry run of this script")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing checked", file=sys.stderr)
        return 2
    from swarm import models

    args.num_blocks = models.load_config(models.resolve_model(args.model)).num_hidden_layers
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"{args.model} ({args.num_blocks} blocks) over 3 peers on {where}, torch {torch.__version__}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} greedy tokens", flush=True)
    print(f"{'format':16} {'tokens = transformers':22} {'prefill s':>9} {'decode tok/s':>12} {'peer memory MiB':>20}  sample", flush=True)
    failures = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        for dtype_name, quant in FORMATS:
            if f"{quant}/{dtype_name}" not in args.formats:
                continue
            try:
                row = check_format(args.model, dtype_name, quant, args, Path(folder))
            except Exception as exc:  # one format failing must not hide the others' figures
                failures += 1
                print(f"{quant}/{dtype_name:10} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            equal = "yes" if row["tokens_equal"] else f"no (from token {row['first_difference']})"
            print(f"{row['format']:16} {equal:22} {row['prefill_s']:9.3f} {row['decode_tokens_per_s']:12.1f} "
                  f"{str(row['peer_memory_mib']):>20}  {row['sample']!r}", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
