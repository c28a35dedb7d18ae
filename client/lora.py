"""LoRA weights owned by a trainer, for every block of a model, saved and loaded as a standard peft
adapter (`adapter_config.json` + `adapter_model.safetensors`).

The weights of one projection of all blocks are one parameter each: `a[name]` [blocks, r, in] and
`b[name]` [blocks, out, r]; a forward through the swarm sends each peer the slice of its blocks
(`swarm.lora`). Initialised like peft: A Kaiming-uniform, B zero. With `dropout` > 0, peers apply
LoRA dropout while this module is in training mode (`.train()`, the default; `.eval()` turns it
off), with masks drawn from a fresh seed per forward (or `dropout_seed`, if set).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from swarm.lora import LoraWeights, peft_key, projection_shapes, read_peft_adapter

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RemoteLoRA(torch.nn.Module):
    def __init__(self, config, *, r: int = 8, alpha: float = 16.0, target_modules=None, dropout: float = 0.0):
        """`target_modules`: projections among PROJECTIONS (default: every one this model's layers hold)."""
        super().__init__()
        shapes = projection_shapes(config)
        target_modules = [name for name in DEFAULT_TARGETS if name in shapes] if target_modules is None else target_modules
        unknown = set(target_modules) - set(shapes)
        if unknown or not target_modules:
            raise ValueError(f"LoRA targets of {config.model_type} must be among {sorted(shapes)}, got {sorted(target_modules)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.config, self.r, self.alpha, self.dropout = config, r, alpha, float(dropout)
        self.dropout_seed: int | None = None  # None: a new seed for every forward
        self.target_modules = sorted(target_modules)
        blocks = config.num_hidden_layers
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for name in self.target_modules:
            in_features, out_features = shapes[name]
            a = torch.empty(blocks, r, in_features)
            for block in range(blocks):
                torch.nn.init.kaiming_uniform_(a[block], a=math.sqrt(5))  # as peft's lora_A
            self.a[name] = torch.nn.Parameter(a)
            self.b[name] = torch.nn.Parameter(torch.zeros(blocks, out_features, r))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def weights(self) -> LoraWeights:
        weights = LoraWeights(self.scaling, dict(self.a.items()), dict(self.b.items()))
        if self.training and self.dropout:
            seed = self.dropout_seed if self.dropout_seed is not None else int(torch.randint(0, 2**62, ()).item())
            weights = dataclasses.replace(weights, dropout=self.dropout, seed=seed)
        return weights

    # ---- peft format ---------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name in self.target_modules:
            for block in range(self.config.num_hidden_layers):
                state[peft_key(block, name, "lora_A")] = self.a[name][block].detach().contiguous()
                state[peft_key(block, name, "lora_B")] = self.b[name][block].detach().contiguous()
        return state

    def save_pretrained(self, path: str | Path, base_model_name_or_path: str | None = None) -> None:
        from peft import LoraConfig

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        LoraConfig(
            r=self.r, lora_alpha=self.alpha, target_modules=self.target_modules, lora_dropout=self.dropout, bias="none",
            task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
        ).save_pretrained(path)
        save_file(self.peft_state_dict(), path / "adapter_model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path, config) -> "RemoteLoRA":
        """A peft LoRA adapter (safetensors only) for a model with this config."""
        settings, weights = read_peft_adapter(path, config)
        lora = cls(config, r=settings["r"], alpha=settings["alpha"], target_modules=settings["targets"], dropout=settings["dropout"])
        with torch.no_grad():
            for name in lora.target_modules:
                lora.a[name].copy_(weights.a[name])
                lora.b[name].copy_(weights.b[name])
        return lora
