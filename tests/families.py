"""Tiny random models of every supported decoder-only family, made from their config classes (offline):
hidden 64 and every size a multiple of 64 (bitsandbytes' CPU NF4 kernel needs that), 4 layers, a
sliding window of 4 tokens where the family has windows, and weights drawn wider than the default
initialisation so that norms, routers and soft-capping matter."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WINDOW = 4
BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
MOE = dict(num_experts_per_tok=2)
GRANITE = dict(embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2)

# model_type -> (config class, what differs from BASE)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, layer_types=MIXED, sliding_window=WINDOW, use_sliding_window=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, moe_intermediate_size=32, **MOE)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, sliding_window=WINDOW, **MOE)),
    "gemma": ("GemmaConfig", dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=WINDOW, layer_types=MIXED, tie_word_embeddings=True,
                                             final_logit_softcapping=30.0)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, partial_rotary_factor=0.5)),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", dict(sliding_window=WINDOW, layer_types=MIXED)),
    "granite": ("GraniteConfig", GRANITE),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, **GRANITE, **MOE)),
    "cohere": ("CohereConfig", dict(logit_scale=0.5, tie_word_embeddings=True)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW)),
    "smollm3": ("SmolLM3Config", dict(use_sliding_window=True, sliding_window=WINDOW, no_rope_layer_interval=2)),
    "glm": ("GlmConfig", dict(head_dim=16, partial_rotary_factor=0.5)),
}


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    class_name, extra = FAMILIES[model_type]
    return getattr(transformers, class_name)(**{**BASE, **extra})


def make_tiny_model(model_type: str, path: Path, *, seed: int = 0, **save_kwargs) -> Path:
    """Save a tiny random `model_type` model into `path` (safetensors; `save_kwargs` go to save_pretrained)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3 if parameter.dim() == 1 else 0.15)
    model.save_pretrained(path, **save_kwargs)
    return path
