"""Configuration models: block ranges, throughput, and a peer's layered settings."""

from __future__ import annotations

import pytest

from swarm import errors
from swarm.config import PeerConfig, parse_blocks, parse_throughput

pytestmark = pytest.mark.timeout(60)


# ---- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["0", "-2", "half", "5:3", "-1:4", "a:b", "3:3"])
def test_bad_block_ranges_get_clear_errors(text):
    with pytest.raises(errors.ConfigError, match="--blocks"):
        parse_blocks(text)


def test_blocks_take_a_range_a_count_or_auto():
    assert [parse_blocks(text) for text in ("0:4", "8", "auto")] == [(0, 4), 8, "auto"]
    assert PeerConfig().blocks_spec() == "auto"
    assert PeerConfig(blocks=3).blocks_spec() == 3  # a TOML file may give a number
    assert [parse_throughput(text) for text in ("auto", "eval", "12.5")] == ["auto", "eval", 12.5]
    for text in ("fast", "-1", "inf", "nan"):
        with pytest.raises(errors.ConfigError, match="--throughput"):
            parse_throughput(text)


def test_peer_config_requires_peers_or_new_swarm():
    config = PeerConfig(blocks="0:4")
    assert config.blocks_spec() == (0, 4)
    with pytest.raises(errors.ConfigError, match="--initial-peers"):
        config.network.require_peers_or_new_swarm()


def test_peer_config_layers_file_environment_and_flags(tmp_path, monkeypatch):
    from swarm.peer import parse

    config_file = tmp_path / "peer.toml"
    config_file.write_text('blocks = "0:10"\npublic_name = "from-file"\ncache_tokens = 100\n[network]\nnew_swarm = true\n')
    monkeypatch.setenv("SWARM_PEER_PUBLIC_NAME", "from-env")
    config = parse(["--config", str(config_file), "--cache-tokens", "7"])
    assert (config.blocks, config.public_name, config.cache_tokens, config.network.new_swarm) == ("0:10", "from-env", 7, True)
    with pytest.raises(errors.ConfigError, match="cache_tokens"):
        parse(["--config", str(config_file), "--cache-tokens", "-1"])

