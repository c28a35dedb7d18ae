"""swarm.hw and peers.sizing: the machine profile, its TOML, block sizes, and the cached throughput a peer announces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import torch
from transformers import LlamaConfig

from peers import sizing
from swarm import hw, models
from swarm.errors import ConfigError

pytestmark = pytest.mark.timeout(120)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def tiny(tiny_model_path):
    source = models.resolve_model(str(tiny_model_path))
    return source, models.load_config(source)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def measurements(monkeypatch) -> list[float]:
    """Every decode measurement block_throughput makes, in order (the real one runs)."""
    results: list[float] = []
    real = sizing.measure_decode_steps_per_s

    def counting(stack, **kwargs):
        results.append(real(stack, **kwargs))
        return results[-1]

    monkeypatch.setattr(sizing, "measure_decode_steps_per_s", counting)
    return results


def test_profile_has_every_section():
    profile = hw.machine_profile("cpu")
    assert profile["cpu"]["logical_cores"] >= 1
    assert profile["memory"]["total_bytes"] >= profile["memory"]["available_bytes"] > 0
    assert profile["torch"]["version"] == torch.__version__
    assert profile["torch"]["default_device"] in ("cpu", "cuda")
    assert profile["dtypes"]["device"] == "cpu" and profile["dtypes"]["float32"] is True
    assert set(sizing.DTYPE_NAMES) <= set(profile["dtypes"])
    assert isinstance(profile["gpus"], list)
    assert "cpu" in hw.format_profile(profile)


def test_emit_writes_toml_that_reads_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hw, "setup_logging", lambda verbose: None)  # it needs a real stderr, pytest's has none
    path = tmp_path / "profile.toml"
    assert hw.main(["--device", "cpu", "--emit", str(path)]) == 0
    profile = tomllib.loads(path.read_text())
    assert set(profile) >= {"cpu", "memory", "torch", "gpus", "dtypes"}
    assert "block" not in profile
    assert "memory" in capsys.readouterr().out


def test_cli_times_a_block_and_emits_it(tiny_model_path, tmp_path):
    path = tmp_path / "profile.toml"
    result = subprocess.run(
        [sys.executable, "-m", "swarm.hw", "--model", str(tiny_model_path), "--device", "cpu", "--emit", str(path)],
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SWARM_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    block = tomllib.loads(path.read_text())["block"]
    assert block["decode_steps_per_s"] > 0 and block["forward_tokens_per_s"] > 0
    assert block["dtype"] == "float32" and block["kv_bytes_per_token"] == 2 * 2 * 16 * 4
    assert "steps/s" in result.stdout


def test_cli_refuses_a_missing_device(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(hw, "setup_logging", lambda verbose: None)
    assert hw.main(["--device", "cuda"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_memory_bytes_equals_a_loaded_block(tiny, dtype):
    source, config = tiny
    layer = models.load_block(source, config, 0, dtype=dtype, device="cpu")
    loaded_bytes = sum(parameter.numel() * parameter.element_size() for parameter in layer.parameters())
    assert sizing.block_memory_bytes(config, dtype) == loaded_bytes


def test_kv_bytes_per_token_follows_the_config():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert sizing.kv_bytes_per_token(config, torch.float32) == 2 * 2 * 16 * 4
    assert sizing.kv_bytes_per_token(config, torch.float16) == 2 * 2 * 16 * 2
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    assert sizing.kv_bytes_per_token(config, torch.bfloat16) == 2 * 1 * 32 * 2


def test_free_memory_bytes_on_cpu_and_bad_devices():
    assert sizing.free_memory_bytes("cpu") > 0
    with pytest.raises(ConfigError, match="not a torch device"):
        sizing.free_memory_bytes("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            sizing.free_memory_bytes("cuda")


def test_auto_measures_once_then_reads_the_cache(tiny, cache_dir, measurements):
    source, config = tiny
    first = sizing.block_throughput(source, config, device="cpu", dtype=torch.float32)
    second = sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, mode="auto")
    assert len(measurements) == 1 and first == second == measurements[0] > 0
    entries = json.loads((cache_dir / sizing.THROUGHPUT_FILE).read_text())["entries"]
    assert [entry["tokens_per_s"] for entry in entries.values()] == [first]
    assert not list(cache_dir.glob("*.tmp"))


def test_cache_entries_are_per_dtype_and_quantization_key(tiny, cache_dir, measurements):
    source, config = tiny
    sizing.block_throughput(source, config, device="cpu", dtype=torch.float32)
    sizing.block_throughput(source, config, device="cpu", dtype=torch.bfloat16)
    assert len(measurements) == 2
    keys = list(json.loads((cache_dir / sizing.THROUGHPUT_FILE).read_text())["entries"])
    assert len(keys) == 2 and all("quantization=none" in key and torch.__version__ in key for key in keys)


def test_eval_measures_again_and_overwrites(tiny, cache_dir, measurements):
    source, config = tiny
    sizing.block_throughput(source, config, device="cpu", dtype=torch.float32)
    again = sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, mode="eval")
    assert len(measurements) == 2 and again == measurements[1]
    entries = json.loads((cache_dir / sizing.THROUGHPUT_FILE).read_text())["entries"]
    assert [entry["tokens_per_s"] for entry in entries.values()] == [again]
    assert sizing.block_throughput(source, config, device="cpu", dtype=torch.float32) == again


def test_a_number_is_returned_as_is(tiny, cache_dir, measurements):
    source, config = tiny
    assert sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, mode="123.5") == 123.5
    assert sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, mode="0") == 0.0
    assert measurements == [] and not cache_dir.exists()


@pytest.mark.parametrize("mode", ["fast", "", "-1", "nan", "inf", "Auto"])
def test_a_bad_mode_is_a_config_error(tiny, cache_dir, mode):
    source, config = tiny
    with pytest.raises(ConfigError, match="'auto'"):
        sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, mode=mode)


def test_an_unknown_quantization_is_a_config_error(tiny, cache_dir):
    source, config = tiny
    with pytest.raises(ConfigError, match="--quant 'nf3'"):
        sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, quantization="nf3")


def test_a_quantized_block_is_measured_and_cached_under_its_own_key(tiny, cache_dir, measurements):
    source, config = tiny
    for quantization in ("none", "nf4", "int8", "nf4"):
        sizing.block_throughput(source, config, device="cpu", dtype=torch.float32, quantization=quantization)
    assert len(measurements) == 3
    keys = json.loads((cache_dir / sizing.THROUGHPUT_FILE).read_text())["entries"]
    assert sorted(key.split("quantization=")[1].split()[0] for key in keys) == ["int8", "nf4", "none"]


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_block_bytes_are_predicted(tiny, quantization):
    """The bytes a format predicts equal what a loaded block holds: its integer weights, their scales
    (int8: one float32 per row; nf4: one float32 absmax per 64 weights) and the rest in float32."""
    source, config = tiny
    layer = models.load_block(source, config, 0, dtype=torch.float32, device="cpu", quantization=quantization)
    loaded = sum(parameter.numel() * parameter.element_size() for parameter in layer.parameters())
    for module in layer.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "SCB", None) is not None:
            loaded += weight.SCB.numel() * weight.SCB.element_size()
        if getattr(weight, "quant_state", None) is not None:
            loaded += weight.quant_state.absmax.numel() * weight.quant_state.absmax.element_size()
    assert sizing.block_memory_bytes(config, torch.float32, quantization) == loaded
    assert loaded < sizing.block_memory_bytes(config, torch.float32) / (3 if quantization == "int8" else 5)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"entries": []}', '{"version": 1}'])
def test_an_unreadable_cache_is_measured_over(tiny, cache_dir, measurements, caplog, text):
    source, config = tiny
    cache_dir.mkdir()
    (cache_dir / sizing.THROUGHPUT_FILE).write_text(text)
    value = sizing.block_throughput(source, config, device="cpu", dtype=torch.float32)
    assert measurements == [value] and "unreadable throughput cache" in caplog.text
    assert json.loads((cache_dir / sizing.THROUGHPUT_FILE).read_text())["version"] == 1


def test_damaged_cache_entries_are_measured_over(tiny, cache_dir, measurements):
    source, config = tiny
    key = sizing.throughput_key(source, device="cpu", dtype=torch.float32, quantization="none")
    for bad in ["fast", -1.0, True, None]:
        cache_dir.mkdir(exist_ok=True)
        (cache_dir / sizing.THROUGHPUT_FILE).write_text(json.dumps({"version": 1, "entries": {key: {"tokens_per_s": bad}}}))
        assert sizing.block_throughput(source, config, device="cpu", dtype=torch.float32) == measurements[-1]
    assert len(measurements) == 4


@needs_cuda
def test_gpus_are_profiled():
    profile = hw.machine_profile("cuda")
    assert profile["gpus"] and all(gpu["total_bytes"] >= gpu["free_bytes"] > 0 for gpu in profile["gpus"])
    assert profile["dtypes"]["float32"] and profile["dtypes"]["float16"]
    assert 0 < sizing.free_memory_bytes("cuda") <= profile["gpus"][0]["total_bytes"]


@needs_cuda
def test_block_throughput_on_cuda(tiny, cache_dir, measurements):
    source, config = tiny
    value = sizing.block_throughput(source, config, device="cuda", dtype=torch.bfloat16)
    assert measurements == [value] and value > 0
    assert sizing.block_throughput(source, config, device="cuda:0", dtype=torch.bfloat16) == value
