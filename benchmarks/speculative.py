"""Speculative decoding over slow links: plain vs prompt-lookup vs draft-model decoding through 3 peers
of the default model, every node behind a relay that delays each message by D ms one way
(`swarm.tools.delay`, as benchmarks/wan.py).

For each D in --delays (default 0, 25, 50 ms) it starts a bootstrap node and 3 peers (10 blocks each)
behind relays and generates greedily, with the chat template, for three kinds of prompt: code to edit
(the answer copies most of the prompt), a summary of a given text, and open chat. Each mode runs on
each prompt --repeats times; it prints the median tokens/s (generated tokens over the whole
generate() call, prompt included), the ratio to plain decoding of the same prompt at the same delay,
the acceptance rate, the mean tokens per trip through the chain, and whether the tokens equal plain
decoding's. The draft models are the default model's own first --draft-layers layers, run locally
(all 30: the model itself, whose every proposal is right, an upper bound of what a draft can give).

    .venv/bin/python benchmarks/speculative.py [--delays 0 25 50] [--repeats 3] [--new-tokens 96] [--lookup 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.cli import limit_openmp_spinning

limit_openmp_spinning()

import torch  # noqa: E402

from benchmarks.wan import MODEL, SPLITS, start_swarm  # noqa: E402

CODE = '''def average_rating(reviews):
    """Return the mean star rating of the reviews that have one."""
    total = 0
    count = 0
    for review in reviews:
        if review.get("stars") is not None:
            total += review["stars"]
            count += 1
    if count == 0:
        return None
    return total / count
'''
TEXT = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Supporters said the "
    "lanes had made the street safer for cyclists and children walking to school, and that shops near the "
    "lanes reported more customers on weekends. Opponents said the lanes had removed forty parking spaces "
    "and that delivery trucks now blocked traffic in the mornings. After two hours of debate, the council "
    "voted five to two to keep the lanes and to add a loading zone for delivery trucks near the market."
)
PROMPTS = {
    "code": f"Rename the variable `count` to `rated` in this Python function. Reply with the whole function.\n\n```python\n{CODE}```",
    "summary": f"Summarize this news story in three sentences, using its own words where you can.\n\n{TEXT}",
    "chat": "What are some good ways to spend a rainy weekend at home?",
}


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def load_draft(layers: int):
    """The default model's own first `layers` layers, its final norm and head: a local draft."""
    from transformers import AutoModelForCausalLM

    from swarm.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(MODEL).path, num_hidden_layers=layers, dtype=torch.float32).eval()


def measure(model, input_ids: torch.Tensor, new_tokens: int, repeats: int, **speculation) -> dict:
    """Median tokens/s of `repeats` greedy generations, with their speculation counts and tokens."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, **speculation)
        seconds = time.perf_counter() - started
        generated = output.shape[1] - input_ids.shape[1]
        stats = model.speculation_stats if speculation else None
        runs.append(dict(
            tokens_s=generated / seconds, tokens=output[0, input_ids.shape[1] :].tolist(),
            acceptance=stats.acceptance_rate if stats else 0.0,
            per_trip=stats.tokens_per_round if stats else generated / max(generated, 1),
        ))
    runs.sort(key=lambda run: run["tokens_s"])
    return runs[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 25, 50], help="one-way delays per link, ms")
    parser.add_argument("--repeats", type=int, default=3, help="generations per mode and prompt (the median is printed)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens: the longest proposal")
    parser.add_argument("--draft-layers", type=int, nargs="*", default=[8, 30],
                        help="layers of the default model in each local draft (none: no draft runs)")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--peer-threads", type=int, default=1, help="torch threads per peer")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)

    from transformers import AutoTokenizer

    from client import AutoDistributedModelForCausalLM
    from swarm.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL).path)
    prompts = {name: chat_ids(tokenizer, PROMPTS[name]) for name in args.prompts}
    modes = {"plain": {}, "lookup": dict(prompt_lookup_num_tokens=args.lookup)}
    for layers in args.draft_layers:
        modes[f"draft{layers}"] = dict(assistant_model=load_draft(layers))
    print(f"model {MODEL}, 3 peers {', '.join(SPLITS)}, greedy, up to {args.new_tokens} new tokens, median of {args.repeats}; "
          f"lookup: up to {args.lookup} tokens; draftN: the model's first N layers, local", flush=True)
    header = f"{'delay ms':>8} {'prompt':>8} {'mode':>8} {'tokens/s':>9} {'vs plain':>9} {'accepted':>9} {'tokens/trip':>12}"
    print(f"{header} {'same tokens':>12}", flush=True)
    for delay in args.delays:
        folder = Path(tempfile.mkdtemp(prefix=f"swarm-bench-speculative-{delay:g}-"))
        swarm = start_swarm(folder, delay, args.peer_threads, None)
        model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=swarm.initial_peers)
        try:
            model.generate(prompts[args.prompts[0]], max_new_tokens=2, do_sample=False)  # warm-up: routes, pings, streams
            for name, input_ids in prompts.items():
                plain = None
                for mode, speculation in modes.items():
                    result = measure(model, input_ids, args.new_tokens, args.repeats, **speculation)
                    plain = plain or result
                    print(f"{delay:>8g} {name:>8} {mode:>8} {result['tokens_s']:>9.2f} {result['tokens_s'] / plain['tokens_s']:>8.2f}x "
                          f"{result['acceptance']:>9.2f} {result['per_trip']:>12.2f} {str(result['tokens'] == plain['tokens']):>12}", flush=True)
        finally:
            model.close()
            swarm.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
