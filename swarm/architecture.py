"""What a model family is made of, taken from transformers' own classes: the whole model built once
with its parameters on meta (its "skeleton"), and from it each decoder layer, the rotary module, the
final norm, the embeddings and the head; the attention kind of each layer; the few things a model's
forward does outside its modules (`CLIENT_EXTRAS`); and how checkpoint tensor names map onto module
names (transformers' own conversion mapping, which fuses the per-expert tensors of mixture-of-experts
checkpoints).

One mechanism serves every family whose decoder layers take the shared interface (hidden_states,
attention_mask, position_ids, past_key_values, position_embeddings). It reads no weights
(swarm.models does) and runs nothing (swarm.blocks does).
"""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any, Callable, Iterable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from swarm.errors import UnsupportedModelError

# Families checked against transformers through peers (tests/swarm/test_families.py) or, for the rest,
# split into stages locally (tests/unit/test_families.py): the same tokens, logits equal.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
    "olmo3", "granite", "granitemoe", "cohere", "starcoder2", "smollm3", "glm",
)
ATTENTION_KINDS = ("full_attention", "sliding_attention")
_BUILDING = threading.Lock()
_BUILT: dict[str, "Architecture"] = {}  # config values -> its architecture (a skeleton costs up to a second)
LAYER_ARGUMENTS = {"hidden_states", "attention_mask", "position_ids", "past_key_values", "position_embeddings"}


def _softcap(logits: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    cap = config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


# What a model's forward does outside its modules, by the config attribute that turns it on (applied
# where the attribute is set and not None): to the embeddings entering block 0, or to the logits.
# Gemma's sqrt(hidden_size) embedding scale lives inside its embedding module: nothing to do for it.
CLIENT_EXTRAS: tuple[tuple[str, str, Callable[[torch.Tensor, PretrainedConfig], torch.Tensor]], ...] = (
    ("embedding_multiplier", "embeddings", lambda hidden_states, config: hidden_states * config.embedding_multiplier),  # granite
    ("logits_scaling", "logits", lambda logits, config: logits / config.logits_scaling),  # granite
    ("logit_scale", "logits", lambda logits, config: logits * config.logit_scale),  # cohere
    ("final_logit_softcapping", "logits", _softcap),  # gemma2, gemma3
)


def check_supported(config: PretrainedConfig) -> None:
    """Raise UnsupportedModelError, naming the supported families, before anything is built."""
    model_type = config.model_type
    problem = None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        problem = "transformers has no causal LM class for it"
    elif getattr(config, "is_encoder_decoder", False) or config.get_text_config(decoder=True) is not config:
        problem = "it is not a plain decoder-only model (an encoder-decoder or a multimodal wrapper)"
    elif model_type not in SUPPORTED_MODEL_TYPES:
        problem = "its family has not been checked against transformers yet"
    if problem:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: {problem}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


class Architecture:
    """One model's pieces, on meta: `config` is the skeleton's (the attention kernel resolved as
    from_pretrained resolves it: sdpa, or eager where a family has no sdpa, e.g. Gemma 2)."""

    def __init__(self, config: PretrainedConfig):
        from accelerate import init_empty_weights

        check_supported(config)
        config = copy.deepcopy(config)
        config._attn_implementation = None  # let from_config choose, as from_pretrained would
        # parameters on meta; buffers real: no checkpoint holds rotary inv_freq or Gemma's embedding scale
        with init_empty_weights(include_buffers=False):
            self.skeleton = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        self.config = self.skeleton.config
        self.decoder = self.skeleton.get_decoder()
        layers, rotary = getattr(self.decoder, "layers", None), getattr(self.decoder, "rotary_emb", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) != self.config.num_hidden_layers or rotary is None:
            raise UnsupportedModelError(f"{config.model_type}: its decoder has no list of layers or no rotary embedding")
        self.layers: torch.nn.ModuleList = layers
        self.rotary: torch.nn.Module = rotary
        parameters = inspect.signature(type(layers[0]).forward).parameters.values()
        accepted = {parameter.name for parameter in parameters}
        if LAYER_ARGUMENTS - accepted and not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
            raise UnsupportedModelError(f"{config.model_type}: its decoder layers do not take {sorted(LAYER_ARGUMENTS - accepted)}")
        self.kinds = [attention_type(self.config, index) for index in range(self.config.num_hidden_layers)]
        unknown = set(self.kinds) - set(ATTENTION_KINDS)
        if unknown:
            raise UnsupportedModelError(f"{config.model_type}: attention kinds {sorted(unknown)} are not supported")
        # Gemma 3, OLMo 3: one rotary embedding per attention kind, rotary(x, position_ids, layer_type)
        self.rotary_per_kind = "layer_type" in inspect.signature(type(self.rotary).forward).parameters
        self.module_names = {module: name for name, module in self.skeleton.named_modules()}
        self.extras = [(where, apply) for name, where, apply in CLIENT_EXTRAS if getattr(self.config, name, None) is not None]

    @classmethod
    def of(cls, config: PretrainedConfig) -> "Architecture":
        """The architecture of `config`, built once per distinct config (by its values)."""
        key = config.to_json_string(use_diff=False)
        with _BUILDING:  # accelerate's init_empty_weights changes how every module registers parameters while it runs
            if key not in _BUILT:
                if len(_BUILT) >= 8:
                    _BUILT.pop(next(iter(_BUILT)))
                _BUILT[key] = cls(config)
            return _BUILT[key]

    def new_layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index`, on meta, a module of its own (the skeleton keeps none of its weights)."""
        return copy.deepcopy(self.layers[index])

    def prefix(self, module: torch.nn.Module) -> str:
        """The name under which `module` (a piece of the skeleton) keeps its tensors, e.g. 'model.layers.3.'."""
        return self.module_names[module] + "."

    def new_rotary(self, device: str | torch.device) -> torch.nn.Module:
        return copy.deepcopy(self.rotary).to(device)

    def position_embeddings(self, rotary: torch.nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                            kinds: Iterable[str]) -> dict[str, Any]:
        """Attention kind -> the (cos, sin) its layers take, as the model's own forward computes them."""
        if not self.rotary_per_kind:
            shared = rotary(hidden_states, position_ids=position_ids)
            return {kind: shared for kind in kinds}
        return {kind: rotary(hidden_states, position_ids, layer_type=kind) for kind in set(kinds)}

    def embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The embedding module's output -> what enters block 0."""
        for where, apply in self.extras:
            if where == "embeddings":
                hidden_states = apply(hidden_states, self.config)
        return hidden_states

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output -> the model's logits."""
        for where, apply in self.extras:
            if where == "logits":
                logits = apply(logits, self.config)
        return logits


def attention_type(config: PretrainedConfig, block_index: int) -> str:
    """'full_attention' or 'sliding_attention' (or a kind this project does not run), as the model's own
    forward chooses for this layer: from `layer_types`, else sliding everywhere when the config sets
    a window (Mistral, Mixtral, Phi-3, Starcoder2)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[block_index]
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    return "full_attention"


class CheckpointNames:
    """Checkpoint tensor names -> the skeleton's names, by the conversion mapping transformers'
    from_pretrained applies (per-expert tensors of Mixtral or Qwen3-MoE checkpoints are fused into one
    tensor per layer; legacy names renamed). Uses `transformers.conversion_mapping` and
    `transformers.core_model_loading`, modules without a leading underscore that peft uses too."""

    def __init__(self, architecture: Architecture, checkpoint_names: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.architecture = architecture
        transforms = get_model_conversion_mapping(architecture.skeleton)
        renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
        self._converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
        self._by_pattern = {pattern: converter for converter in self._converters for pattern in converter.source_patterns}
        meta_state = architecture.skeleton.state_dict()  # names and shapes only
        prefix = architecture.skeleton.base_model_prefix
        self.target = {  # checkpoint name -> (skeleton name, the converter's source pattern or None)
            name: rename_source_key(name, renamings, self._converters, prefix, meta_state) for name in checkpoint_names
        }

    def names_under(self, prefix: str) -> list[str]:
        """The checkpoint names whose tensors end up under `prefix` (e.g. 'model.layers.3.')."""
        return [name for name, (target, _) in self.target.items() if target.startswith(prefix)]

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> the skeleton's tensors, fused where the mapping says so."""
        from transformers.core_model_loading import dot_natural_key

        converted: dict[str, torch.Tensor] = {}
        pending: dict[str, Any] = {}
        for name in sorted(tensors, key=dot_natural_key):  # experts in numeric order: 2 before 10
            target, pattern = self.target[name]
            if pattern is None:
                converted[target] = tensors[name]
                continue
            converter = pending.setdefault(target, copy.deepcopy(self._by_pattern[pattern]))
            converter.add_tensor(target, name, pattern, tensors[name])
        skeleton = self.architecture.skeleton
        for target, converter in pending.items():
            for key, value in converter.convert(target, model=skeleton, config=skeleton.config).items():
                converted[key] = value[0] if isinstance(value, list) else value
        return converted
