"""LoRA on the blocks' projections, the way peft computes it: `y = W x + scaling * B (A x)`.

The trainer owns the LoRA weights and sends those of a peer's blocks with each training request;
the peer applies them while it runs its blocks (`applied`) and, in a backward, returns their
gradients. Weights of all blocks of one projection travel as one tensor: `lora_a.<projection>`
[blocks, r, in_features] and `lora_b.<projection>` [blocks, out_features, r]. LoRA dropout (training
only) zeroes the projection's input of the LoRA path like peft's `lora_dropout`, with masks drawn
from the request's seed, the block's index and the projection (`dropout_mask`): a backward, which
runs the forward again, draws the same masks. This module does no I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

from swarm.architecture import Architecture
from swarm.errors import ConfigError

# projection -> the submodule of a decoder layer that holds it (Llama, Mistral, Qwen2)
PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
MAX_RANK = 256
DIGEST_CHARS = 16  # hex digits of an adapter's sha256 that identify it: 64 bits, no accidental collision
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass(frozen=True)
class AdapterId:
    """A LoRA adapter as the swarm knows it: `name`, the name of the folder it was saved to, and
    `digest`, the first DIGEST_CHARS hex digits of the sha256 of its settings and weights
    (`adapter_digest`); None for a bare name a user gave, or one announced by a peer that predates digests."""

    name: str
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.name} (sha256 {self.digest})" if self.digest else self.name

    def matches(self, other: AdapterId) -> bool:
        """Same name, and the same digest unless one of them is unknown."""
        return self.name == other.name and (self.digest is None or other.digest is None or self.digest == other.digest)


@dataclasses.dataclass
class LoraWeights:
    """LoRA of some projections of a range of blocks: a[name] [blocks, r, in], b[name] [blocks, out, r]."""

    scaling: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    dropout: float = 0.0  # training only: the probability of zeroing an input of the LoRA path
    seed: int = 0  # of the dropout masks

    def for_blocks(self, start: int, end: int) -> LoraWeights:
        """The weights of blocks [start, end) of this range (indices relative to its first block)."""
        return dataclasses.replace(self, a={k: v[start:end] for k, v in self.a.items()}, b={k: v[start:end] for k, v in self.b.items()})

    def to(self, dtype: torch.dtype) -> LoraWeights:
        return dataclasses.replace(self, a={k: v.to(dtype) for k, v in self.a.items()}, b={k: v.to(dtype) for k, v in self.b.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Wire names -> tensors, in a fixed order."""
        named = {}
        for name in sorted(self.a):
            named[f"lora_a.{name}"] = self.a[name]
            named[f"lora_b.{name}"] = self.b[name]
        return named

    @classmethod
    def from_tensors(cls, scaling: float, tensors: dict[str, torch.Tensor]) -> LoraWeights | None:
        a = {key.removeprefix("lora_a."): value for key, value in tensors.items() if key.startswith("lora_a.")}
        b = {key.removeprefix("lora_b."): value for key, value in tensors.items() if key.startswith("lora_b.")}
        return cls(scaling, a, b) if a or b else None


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of PROJECTIONS that this model's decoder layers hold
    as a linear layer (Phi-3 fuses q, k and v into one; mixture-of-experts layers hold no gate_proj)."""
    layer = Architecture.of(config).layers[0]
    shapes = {}
    for name, parent in PROJECTIONS.items():
        module = getattr(getattr(layer, parent, None), name, None)
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def wire_names(projections) -> list[str]:
    return [f"lora_{part}.{name}" for name in sorted(projections) for part in ("a", "b")]


@contextlib.contextmanager
def applied(layers, lora: LoraWeights | None, first_block: int = 0) -> Iterator[None]:
    """Within the block, layers[i]'s projections add `scaling * B_i (A_i dropout(x))` to their outputs;
    layers[0] is block `first_block` of the model (the dropout masks depend on it)."""
    if lora is None:
        yield
        return
    handles = []
    try:
        for index, layer in enumerate(layers):
            for name in lora.a:
                module = getattr(getattr(layer, PROJECTIONS[name]), name)
                a, b = lora.a[name][index], lora.b[name][index]
                mask = functools.partial(dropout_mask, lora.seed, first_block + index, name, p=lora.dropout) if lora.dropout else None
                handles.append(module.register_forward_hook(_hook(a, b, lora.scaling, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def dropout_mask(seed: int, block: int, name: str, shape, *, p: float) -> torch.Tensor:
    """The inverted-dropout factors (0 or 1 / (1 - p)) for the LoRA input of one projection of one
    block, drawn on the CPU from (seed, block, projection): the same wherever and however often it
    is drawn."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + block * 97 + list(PROJECTIONS).index(name)) % 2**63)
    keep = torch.rand(tuple(shape), generator=generator) >= p
    return keep.to(torch.float32) / (1.0 - p)


def _hook(a: torch.Tensor, b: torch.Tensor, scaling: float, mask=None):
    def hook(module, args, output):
        x = args[0].to(a.dtype)
        if mask is not None:
            x = x * mask(x.shape).to(x.device, x.dtype)
        return output + (x @ a.T @ b.T).to(output.dtype) * scaling
    return hook


def peft_key(block: int, name: str, part: str) -> str:
    """The key of a LoRA weight in a peft adapter of a causal LM: part is lora_A or lora_B."""
    return f"base_model.model.model.layers.{block}.{PROJECTIONS[name]}.{name}.{part}.weight"


def adapter_ref(adapter: AdapterId | str | Path | None) -> AdapterId | None:
    """What a user passes as `adapter=` -> an AdapterId: a path (one with a folder separator, starting
    with . or ~, or an adapter folder that exists here) is read for its name and digest; anything else
    is a bare name, resolved against what peers announce (`client.routing.resolve_adapter`)."""
    if adapter is None or isinstance(adapter, AdapterId):
        return adapter
    text = str(adapter)
    path = Path(text).expanduser()
    looks_like_path = isinstance(adapter, Path) or "/" in text or text.startswith((".", "~"))
    if looks_like_path or (path / ADAPTER_FILES[0]).is_file():
        return adapter_identity(path)
    if not text or len(text) > 128:
        raise ConfigError(f"adapter name {text!r}: 1 to 128 characters (a peer announces its adapter folder's name)")
    return AdapterId(text)


def adapter_identity(path: str | Path) -> AdapterId:
    """The name (the folder's) and digest of the peft adapter saved in folder `path`."""
    settings, state = _read_folder(Path(path).expanduser())
    return AdapterId(adapter_name(path), adapter_digest(settings, state))


def adapter_name(path: str | Path) -> str:
    """The name an adapter saved in folder `path` is served under: the folder's name."""
    return Path(path).expanduser().resolve().name


def adapter_digest(settings: dict, state: dict[str, torch.Tensor]) -> str:
    """The first DIGEST_CHARS hex digits of the sha256 of what an adapter computes: its rank, alpha
    and targets, then every tensor (name, dtype, shape, bytes) in name order. Independent of how the
    file was written (tensor order, metadata), so peft's and our own `save_pretrained` agree."""
    digest = hashlib.sha256()
    targets, alpha = settings.get("target_modules") or [], settings.get("lora_alpha")
    shape = {
        "r": settings.get("r"),
        "alpha": float(alpha) if isinstance(alpha, (int, float)) else alpha,  # peft writes 16, RemoteLoRA 16.0
        "targets": targets if isinstance(targets, str) else sorted(map(str, targets)),
    }
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:DIGEST_CHARS]


def _read_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of adapter_model.safetensors (nothing unpickled)."""
    from safetensors.torch import load_file

    try:
        settings = json.loads((path / ADAPTER_FILES[0]).read_text())
        state = load_file(path / ADAPTER_FILES[1])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"adapter {path}: needs {' and '.join(ADAPTER_FILES)} ({exc})") from exc
    if not isinstance(settings, dict):
        raise ConfigError(f"adapter {path}: {ADAPTER_FILES[0]} holds no settings")
    return settings, state


def read_peft_adapter(path: str | Path, config) -> tuple[dict, LoraWeights]:
    """(r, alpha, targets, digest) and the weights of every block of a peft LoRA adapter folder
    (adapter_config.json + adapter_model.safetensors; plain LoRA only, nothing unpickled)."""
    path = Path(path)
    settings, state = _read_folder(path)
    targets = settings.get("target_modules") or []
    shapes = projection_shapes(config)
    if isinstance(targets, str) or not set(targets) <= set(shapes) or settings.get("peft_type") != "LORA":
        raise ConfigError(f"adapter {path}: a LoRA adapter of projections among {sorted(shapes)} is needed, got {targets}")
    if settings.get("use_rslora") or settings.get("bias", "none") != "none":
        raise ConfigError(f"adapter {path}: only plain LoRA is supported (no rslora or bias)")
    r, alpha = int(settings["r"]), float(settings["lora_alpha"])
    blocks = config.num_hidden_layers
    a, b = {}, {}
    try:
        for name in sorted(targets):
            a[name] = torch.stack([state[peft_key(block, name, "lora_A")] for block in range(blocks)])
            b[name] = torch.stack([state[peft_key(block, name, "lora_B")] for block in range(blocks)])
            if list(a[name].shape) != [blocks, r, shapes[name][0]] or list(b[name].shape) != [blocks, shapes[name][1], r]:
                raise ValueError(f"{name}: shapes {list(a[name].shape)}, {list(b[name].shape)} do not fit this model")
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"adapter {path} does not fit this model: {exc}") from exc
    dropout = float(settings.get("lora_dropout") or 0.0)  # a training setting: serving applies none
    summary = {"r": r, "alpha": alpha, "targets": sorted(targets), "dropout": dropout, "digest": adapter_digest(settings, state)}
    return summary, LoraWeights(alpha / r, a, b)
