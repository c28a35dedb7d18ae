"""swarm.settings: every role's flags, environment variables and TOML keys come from its config model."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from swarm import errors, settings
from swarm.api.config import ApiConfig
from swarm.config import BootstrapConfig, ClientConfig, NetworkConfig, PeerConfig, PlanConfig
from swarm.dashboard.config import DashboardConfig
from client.finetune import TrainerConfig

ROLES = [PeerConfig, BootstrapConfig, ClientConfig, PlanConfig, ApiConfig, DashboardConfig, TrainerConfig]


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.__name__)
def test_every_role_maps_every_field_to_one_flag_with_help(role):
    found = settings.options(role)  # raises if two fields share a flag
    assert found and all(option.field.description for option in found), [o.flag for o in found if not o.field.description]
    parser = settings.build_parser(role, prog="x", description="y")
    assert {option.flag for option in found} <= set(parser._option_string_actions)
    assert "usage:" in parser.format_help()  # every help text formats


def test_sections_get_top_level_flags_and_nested_environment_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_API_CLIENT__NETWORK__HOST_MADDRS", "/ip4/127.0.0.1/tcp/7 /ip4/127.0.0.1/tcp/8")
    monkeypatch.setenv("SWARM_API_LANES", "3")
    config_file = tmp_path / "api.toml"
    config_file.write_text('port = 9000\nlanes = 5\n[client]\nmax_retries = 7\n[client.network]\nconnect_timeout_s = 3.5\n')
    config = settings.parse(
        ApiConfig, ["--config", str(config_file), "--initial-peers", "/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2", "--no-client-mode"],
        prog="x", description="y", env_prefix="SWARM_API_",
    )
    network = config.client.network
    assert network.initial_peers == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    assert network.host_maddrs == ["/ip4/127.0.0.1/tcp/7", "/ip4/127.0.0.1/tcp/8"]  # the environment, over the default
    assert (network.connect_timeout_s, network.client_mode) == (3.5, False)  # the file; the flag
    assert (config.port, config.lanes, config.client.max_retries) == (9000, 3, 7)  # the environment wins over the file


def test_errors_speak_in_flags():
    with pytest.raises(errors.ConfigError, match=r"^--output is required"):
        settings.parse(TrainerConfig, ["--data", "x", "--run-name", "r"], prog="x", description="y", env_prefix="SWARM_TEST_")
    with pytest.raises(errors.ConfigError, match=r"^--cache-wait \(cache_wait_s\): Input should be greater than or equal to 0"):
        settings.parse(PeerConfig, ["--cache-wait", "-1"], prog="x", description="y", env_prefix="SWARM_TEST_")


def test_an_unknown_environment_setting_is_refused(monkeypatch):
    monkeypatch.setenv("SWARM_PEER_CACHE_TOKEN", "5")  # a typo of CACHE_TOKENS
    with pytest.raises(errors.ConfigError, match="SWARM_PEER_CACHE_TOKENS"):
        settings.parse(PeerConfig, [], prog="x", description="y", env_prefix="SWARM_PEER_")


def test_two_fields_with_one_flag_are_refused():
    class Section(BaseModel):
        port: int = Field(1, description="a")

    class Clash(BaseModel):
        section: Section = Field(default_factory=Section)
        port_s: int = Field(2, description="b")

    with pytest.raises(TypeError, match="--port"):
        settings.options(Clash)


def test_client_config_takes_its_network_fields_flat_as_before():
    config = ClientConfig(initial_peers=["/ip4/127.0.0.1/tcp/1"], dht_client_mode=False, step_timeout_s=5)
    assert config.network.initial_peers == ["/ip4/127.0.0.1/tcp/1"] and config.network.client_mode is False
    assert config.network.host_maddrs == ["/ip4/127.0.0.1/tcp/0"]  # the client's default, not a peer's
    assert ClientConfig().network == NetworkConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    assert BootstrapConfig().network.new_swarm is True


@pytest.mark.parametrize(
    ("role", "client_mode", "section"),
    [
        (DashboardConfig, True, "network"), (PlanConfig, True, "network"), (ApiConfig, True, "client.network"),
        (TrainerConfig, False, "client.network"),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_setting_one_network_field_keeps_the_roles_other_network_defaults(role, client_mode, section):
    argv = ["--initial-peers", "/ip4/127.0.0.1/tcp/1"] + (["--data", "d", "--output", "o", "--run-name", "r"] if role is TrainerConfig else [])
    config = settings.parse(role, argv, prog="x", description="y", env_prefix="SWARM_TEST_")
    for part in section.split("."):
        config = getattr(config, part)
    assert config.host_maddrs == ["/ip4/127.0.0.1/tcp/0"] and config.client_mode is client_mode  # not a peer's 0.0.0.0
    assert config.initial_peers == ["/ip4/127.0.0.1/tcp/1"]
    assert ClientConfig(network={"initial_peers": ["/ip4/127.0.0.1/tcp/1"]}).network.client_mode is True
