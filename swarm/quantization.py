"""Quantized blocks: a block's linear layers as bitsandbytes' LLM.int8 (`int8`) or NF4 (`nf4`) layers,
made exactly as transformers makes them when it loads a model with the matching `BitsAndBytesConfig`
(`reference_config`), so a swarm of quantized peers computes what that model computes.

It also says what a format costs in bytes (`parameter_bytes`) and whether this machine can run it
(`check_quantization`). It does not read weights (swarm.models does) or choose a format (the peer's
configuration does). bitsandbytes is imported only where a format other than `none` is used.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import torch

from swarm.config import QUANTIZATION_NAMES
from swarm.errors import ConfigError

QUANTIZATIONS = QUANTIZATION_NAMES
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: transformers' default (llm_int8_threshold)
NF4_BLOCKSIZE = 64  # values per absmax in NF4: bitsandbytes' default, which transformers keeps
MIN_BITSANDBYTES = (0, 46)  # the first release that quantizes on CPU
EXACT_SCALES = "swarm_float32_absmax"  # a CPU NF4 layer's own scales, which bitsandbytes' inference kernel rounds


def reference_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """The transformers `BitsAndBytesConfig` whose model a swarm quantized with `quantization` equals
    (None for `none`): load it with `from_pretrained(..., quantization_config=..., dtype=compute_dtype)`."""
    from transformers import BitsAndBytesConfig

    check_name(quantization)
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def check_name(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"--quant {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")


def quantize_linears(module: torch.nn.Module, quantization: str, *, dtype: torch.dtype, device: str | torch.device) -> None:
    """Replace every plain `nn.Linear` inside `module` (weights loaded, on the CPU) by its bitsandbytes
    layer, quantized on `device`, in evaluation mode and frozen; `dtype` is the compute dtype of NF4
    layers (LLM.int8 computes in float16 whatever its input). Nothing happens for `none`."""
    check_name(quantization)
    if quantization == "none":
        return
    linears = [(name, child) for name, child in module.named_modules() if type(child) is torch.nn.Linear]
    for name, linear in linears:
        module.set_submodule(name, _quantized(linear, quantization, dtype, torch.device(device)))


def _quantized(linear: torch.nn.Linear, quantization: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One layer, as transformers' bitsandbytes integration builds it (`replace_with_bnb_linear`, then
    the weight made from the checkpoint tensor with the new module's own parameter settings)."""
    layer = _int8(linear, device) if quantization == "int8" else _nf4(linear, dtype, device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return layer.requires_grad_(False).eval()


def _int8(linear: torch.nn.Linear, device: torch.device) -> Any:
    import bitsandbytes as bnb

    with torch.device("meta"):
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD
        )
    settings = {name: value for name, value in layer.weight.__dict__.items() if name not in ("SCB", "module")}
    weight: Any = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, **settings)
    layer.weight = weight.to(device)
    return layer


def _nf4(linear: torch.nn.Linear, dtype: torch.dtype, device: torch.device) -> Any:
    import bitsandbytes as bnb

    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, linear.bias is not None, dtype, compress_statistics=False, quant_type="nf4",
            quant_storage=torch.uint8,
        )
    settings = {name: value for name, value in layer.weight.__dict__.items() if name != "module"}
    weight: Any = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, module=layer, **settings)
    weight = layer.weight = weight.to(device)
    if device.type == "cpu" and getattr(layer, "support_avx512bf16_for_cpu", False):
        setattr(layer, EXACT_SCALES, weight.quant_state.absmax.clone())  # see unpack_for_autograd
    return layer


def parameter_bytes(module: torch.nn.Module, quantization: str, dtype: torch.dtype) -> int:
    """Bytes of `module`'s parameters (it may live on meta) once its linear layers are quantized: int8
    stores a byte per weight and a float32 scale per output row; NF4 half a byte per weight and a
    float32 absmax per NF4_BLOCKSIZE weights. Everything else (norms, biases, experts held as plain
    tensors) stays in `dtype`."""
    check_name(quantization)
    total = 0
    quantized: set[int] = set()
    if quantization != "none":
        for child in module.modules():
            if not isinstance(child, torch.nn.Linear):
                continue
            weights = child.weight.numel()
            quantized.add(id(child.weight))
            if quantization == "int8":
                total += weights + 4 * child.out_features
            else:
                total += (weights + 1) // 2 + 4 * -(-weights // NF4_BLOCKSIZE)
    return total + sum(parameter.numel() * dtype.itemsize for parameter in module.parameters() if id(parameter) not in quantized)


@functools.cache
def check_quantization(quantization: str, device: str) -> None:
    """Raise ConfigError, before anything big is loaded, where this machine cannot run `quantization` on
    `device`: bitsandbytes missing or too old, or a tiny quantized layer failing there."""
    check_name(quantization)
    if quantization == "none":
        return
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"--quant {quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.46'") from None
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < MIN_BITSANDBYTES:
        raise ConfigError(f"--quant {quantization}: bitsandbytes {version} is too old (it quantizes on CPU from 0.46): "
                          "pip install -U bitsandbytes")
    probe = torch.nn.Linear(64, 64, bias=False)
    try:
        quantize_linears(probe_holder := torch.nn.Sequential(probe), quantization, dtype=torch.float32, device=device)
        probe_holder(torch.ones(1, 64, device=device))
    except Exception as exc:  # bitsandbytes raises many kinds (RuntimeError, NotImplementedError, its own) by backend
        raise ConfigError(
            f"--quant {quantization} does not run on {device} with bitsandbytes {version} ({type(exc).__name__}: {str(exc)[:200]}); "
            f"use --quant none or another --device"
        ) from exc


def unpack_for_autograd(module: torch.nn.Module) -> None:
    """Make `module`'s NF4 layers differentiable, with their exact weights. On a CPU with AVX512-BF16,
    bitsandbytes repacks an NF4 weight at its first forward without autograd, for an inference kernel
    5x faster at decoding that computes in bfloat16 and rounds the weight's scales (absmax) to bfloat16;
    that kernel has no backward. Before a forward that needs gradients, repacked weights go back to their
    plain layout (bitsandbytes' `Linear4bit.state_dict()` does that in place) and their float32 scales,
    kept at quantization (`_quantized`). The next inference forward repacks them."""
    for child in module.modules():
        weight: Any = getattr(child, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        child.state_dict()
        scales = getattr(child, EXACT_SCALES, None)
        if scales is not None:
            weight = child.weight
            weight.quant_state.absmax = scales.clone()
