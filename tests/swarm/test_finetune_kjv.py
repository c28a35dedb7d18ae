"""A short LoRA fine-tune of the default model through the swarm (three peers, 10 blocks each) on
King James Bible verses lowers the perplexity of verses it never saw. The perplexity is measured
with plain transformers + peft on the saved adapter: the result is a standard peft adapter."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.tools.corpus import kjv_path
from swarm.models import resolve_model

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 40


def _mean_nll(model, tokenizer, texts: list[str]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS]
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.slow
def test_lora_finetune_lowers_heldout_perplexity(smollm2_swarm, tmp_path):
    verses = [json.loads(line)["text"] for line in kjv_path().read_text().splitlines()[:640]]  # Genesis 1-24
    train, heldout = verses[:600:3] + verses[1:600:3], verses[600:640]  # 400 verses; the next 40 held out
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in train))
    output = tmp_path / "adapter"
    command = [
        sys.executable, "-m", "client.finetune", "--data", str(data), "--mode", "lora", "--output", str(output),
        "--run-name", "kjv", "--initial-peers", *smollm2_swarm.initial_peers, "--model", "smollm2-135m",
        "--lora-r", "8", "--lora-alpha", "16", "--batch-size", "8", "--max-seq-length", str(MAX_TOKENS),
        "--learning-rate", "2e-3", "--epochs", "1", "--matchmaking-time", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=540, env=smollm2_swarm.env)
    assert result.returncode == 0, result.stderr[-3000:]

    folder = resolve_model("smollm2-135m").path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    before = _mean_nll(base, tokenizer, heldout)
    tuned = PeftModel.from_pretrained(base, output).eval()
    after = _mean_nll(tuned, tokenizer, heldout)
    print(f"held-out perplexity {math.exp(before):.2f} -> {math.exp(after):.2f}")
    assert math.exp(after) < 0.9 * math.exp(before), (before, after)
