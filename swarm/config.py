"""Configuration models of the roles every node shares: the network section, a peer, a bootstrap node,
a client, and the `swarm.plan` reader (the applications' own live in their packages: `swarm.api.config`,
`swarm.dashboard.config`, `client.finetune`).

Every field has a description with its unit. Flags, environment variables and TOML files are mapped
onto these models in one place (`swarm.settings`); nothing here parses a command line or starts anything.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.errors import ConfigError

Config = TypeVar("Config", bound=BaseModel)
DEFAULT_MODEL = "smollm2-135m"  # the embedded model (swarm.models finds it offline)
LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]
DEFAULT_MAX_LENGTH = 8192  # tokens: the longest sequence a peer serves unless told otherwise


QuantizationName = Literal["none", "int8", "nf4"]  # swarm.quantization.QUANTIZATIONS
DtypeName = Literal["float32", "float16", "bfloat16"]
QUANTIZATION_NAMES: tuple[QuantizationName, ...] = ("none", "int8", "nf4")
DTYPE_NAMES: tuple[DtypeName, ...] = ("float32", "float16", "bfloat16")


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_peers: list[str] = Field(
        default_factory=list, description="multiaddrs of peers to join through", json_schema_extra={"metavar": "MULTIADDR"}
    )
    new_swarm: bool = Field(False, description="start a new swarm instead of joining one")
    host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], description="multiaddrs to listen on", json_schema_extra={"metavar": "MULTIADDR"}
    )
    announce_maddrs: list[str] = Field(
        default_factory=list, description="multiaddrs others should dial, if not the listened ones", json_schema_extra={"metavar": "MULTIADDR"}
    )
    identity_path: Path | None = Field(None, description="private key file: a stable peer id across restarts (created if missing)")
    connect_timeout_s: float = Field(15.0, gt=0, description="seconds to wait when joining the swarm")
    swarm_key_path: Path | None = Field(
        None, description="file with the shared secret of a private swarm: nodes without it are refused (see swarm/swarm_key.py)"
    )
    client_mode: bool = Field(False, description="join the DHT as a client only: reads and writes records, but others cannot dial it")
    reachability: Literal["auto", "public", "private"] = Field(
        "auto",
        description="peers: auto (at start, ask swarm nodes to dial us back; if none can, serve through a relay), public "
        "(others can dial us: no check), private (serve through a relay)",
    )
    relay: bool = Field(
        True,
        description="dial through relays, and carry connections to peers behind NAT once other nodes find this one "
        "dialable (off: neither; loopback-only nodes never use relays)",
    )
    relays: list[str] = Field(
        default_factory=list,
        description="relays a peer behind NAT may use (default: its initial peers)", json_schema_extra={"metavar": "MULTIADDR"},
    )
    relay_wait_s: float = Field(60.0, gt=0, description="seconds a peer behind NAT waits for a relay to take it")

    def is_loopback_only(self) -> bool:
        return all(_is_loopback_maddr(maddr) for maddr in self.host_maddrs)

    def trusted_relays(self) -> list[str]:
        """The relays a peer behind NAT asks to carry its connections."""
        return list(self.relays or self.initial_peers)

    def require_initial_peers(self) -> None:
        """For the roles that only join a swarm (clients, the API, the dashboard, swarm.plan, trainers)."""
        if not self.initial_peers:
            raise ValueError("--initial-peers: give the multiaddr of at least one node of the swarm")

    def require_peers_or_new_swarm(self) -> None:
        if not self.initial_peers and not self.new_swarm:
            raise ConfigError("give --initial-peers MULTIADDR (a peer of an existing swarm) or --new-swarm")


def client_network() -> NetworkConfig:
    """The network section of a node that only reads the swarm and calls peers: loopback, client mode."""
    return NetworkConfig(host_maddrs=list(LOOPBACK_MADDRS), client_mode=True)


class PeerConfig(BaseModel):
    """Everything `python -m swarm.peer` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="model name, Hugging Face id or local folder")
    dht_prefix: str | None = Field(None, description="DHT key prefix; default: derived from the model name")
    blocks: str = Field(
        "auto", description="blocks to serve: a range START:END (END exclusive), a count N placed where the swarm needs it, or auto"
    )
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    dtype: Literal["auto"] | DtypeName = Field(
        "auto", description="dtype of the blocks and of the activations they compute (auto: float32 on CPU, bfloat16 on GPU)"
    )
    quant: QuantizationName = Field(
        "none",
        description="quantize the blocks' linear layers with bitsandbytes as transformers' BitsAndBytesConfig does: int8 "
        "(LLM.int8, about 2x smaller than float16) or nf4 (4-bit NormalFloat, about 4x smaller); none keeps --dtype",
    )
    cache_tokens: int = Field(16384, gt=0, description="KV-cache budget: tokens (batch x length) over all sessions")
    cache_gb: float | None = Field(
        None, gt=0, description="KV-cache budget in GiB over all sessions and blocks; replaces --cache-tokens when given"
    )
    max_sessions: int = Field(128, gt=0, description="inference sessions served at once; more wait, then get 'overloaded'")
    batch_steps: int = Field(
        32, gt=0, le=1024, description="decode steps of different sessions run as one batch, at most this many (1: no batching)"
    )
    max_length: int = Field(DEFAULT_MAX_LENGTH, gt=0, description="longest sequence a session may ask for, in tokens")
    max_batch_size: int = Field(64, gt=0, description="largest batch a request may carry")
    public_name: str | None = Field(None, max_length=128, description="name shown to others")
    throughput: str = Field(
        "auto", description="tokens/s through one block to announce: auto (measured once, cached), eval (re-measure), or a number"
    )
    max_memory_gb: float | None = Field(
        None, gt=0, description="memory --blocks auto may use for blocks and KV cache; default: what the device has free"
    )
    rebalance_period_s: float = Field(300.0, gt=0, description="mean seconds between checks whether to move (jittered)")
    gap_check_period_s: float = Field(
        5.0, gt=0,
        description="mean seconds between reads of which blocks are served (jittered +-50%): a gap is covered at once "
        "by one redundant peer, not left to the rebalance checks",
    )
    balance_threshold: float = Field(
        0.1, ge=0,
        description="move only for a clear gain: the weakest block rises by this fraction (or, in an unbalanced swarm, "
        "the weakest block the move touches by this fraction of the peer's throughput); see swarm/balance.py",
    )
    join_jitter_s: float = Field(5.0, ge=0, description="random wait before choosing blocks, so peers starting together spread out")
    handoff_grace_s: float = Field(30.0, ge=0, description="after a move, sessions on the old blocks may go on this long")
    shutdown_grace_s: float = Field(5.0, ge=0, description="on SIGINT/SIGTERM, wait this long for running steps to finish")
    announce_period_s: float = Field(10.0, gt=0, description="seconds between DHT announcements")
    record_ttl_periods: float = Field(3.0, ge=1, description="records expire this many announce periods after a refresh")
    session_idle_timeout_s: float = Field(300.0, gt=0, description="free a session's cache after this long without a step")
    cache_wait_s: float = Field(10.0, ge=0, description="how long a new session waits for cache before 'overloaded'")
    num_threads: int | None = Field(None, gt=0, description="torch threads for compute; default: torch's choice")
    adapters: list[str] = Field(
        default_factory=list, max_length=32, description="peft LoRA adapter folders to serve (safetensors); named by folder",
        json_schema_extra={"metavar": "DIR"},
    )
    verbose: bool = Field(False, description="log every RPC (DEBUG)")

    @model_validator(mode="after")
    def _check_record_ttl(self) -> "PeerConfig":
        from swarm.records import MAX_RECORD_TTL_S  # here: swarm.records loads hivemind and torch, config must stay light

        if self.announce_period_s * self.record_ttl_periods > MAX_RECORD_TTL_S:
            raise ValueError("--announce-period: records would live over 6 hours, which other nodes ignore as absurd")
        return self

    @field_validator("blocks", mode="before")
    @classmethod
    def _check_blocks(cls, value: Any) -> str:
        value = str(value)  # a TOML file may say blocks = 8
        parse_blocks(value)
        return value

    @field_validator("throughput", mode="before")
    @classmethod
    def _check_throughput(cls, value: Any) -> str:
        value = str(value)
        parse_throughput(value)
        return value

    def blocks_spec(self) -> tuple[int, int] | int | Literal["auto"]:
        return parse_blocks(self.blocks)


class BootstrapConfig(BaseModel):
    """Everything `python -m swarm.dht` (a bootstrap node: DHT only, no blocks) needs."""

    model_config = ConfigDict(extra="forbid")

    network: NetworkConfig = Field(default_factory=NetworkConfig)

    @model_validator(mode="after")
    def _found_a_swarm_without_peers(self) -> "BootstrapConfig":
        if not self.network.initial_peers:
            self.network.new_swarm = True
        return self


class PlanConfig(BaseModel):
    """Everything `python -m swarm.plan` (a read of the swarm's coverage, and where a new peer would go) needs."""

    model_config = ConfigDict(extra="forbid")

    network: NetworkConfig = Field(default_factory=client_network)
    model: str | None = Field(None, description="model name or DHT prefix; default: the only model the swarm announces")
    blocks: int | None = Field(None, gt=0, description="blocks the new peer would host; default: a quarter of the model")
    throughput: float = Field(1.0, ge=0, description="the new peer's tokens/s through one block")

    @model_validator(mode="after")
    def _needs_peers(self) -> "PlanConfig":
        self.network.require_initial_peers()
        return self


# ClientConfig's network fields, accepted flat as well (ClientConfig(initial_peers=[...]), as before sections)
_CLIENT_NETWORK_KEYS = {"initial_peers": "initial_peers", "host_maddrs": "host_maddrs", "swarm_key_path": "swarm_key_path",
                        "connect_timeout_s": "connect_timeout_s", "dht_client_mode": "client_mode"}


class ClientConfig(BaseModel):
    """How a client finds and talks to peers."""

    model_config = ConfigDict(extra="forbid")

    network: NetworkConfig = Field(
        default_factory=client_network,
        description="how the client joins the DHT (client mode on loopback by default; trainers that average gradients "
        "need client_mode false, since other trainers dial them)",
    )
    dht_prefix: str | None = Field(None, description="DHT key prefix; default: derived from the model name")
    step_timeout_s: float = Field(120.0, gt=0, description="seconds to wait for one forward or inference step")
    max_retries: int = Field(
        3, ge=0, description="transient failures a request survives at least (more within route_wait_s; see client/retries.py)"
    )
    route_wait_s: float = Field(
        30.0, ge=0, description="how long to wait for every block to be served, and to keep re-routing after failures"
    )
    ping_timeout_s: float = Field(2.0, gt=0, description="latency probe timeout per peer")
    max_batch_tokens: int = Field(
        4096, gt=0, description="training: tokens per forward/backward request; a longer batch goes as pieces in parallel"
    )
    push_steps: bool | Literal["auto"] = Field(
        "auto",
        description="let each peer of a session send its output straight to the next one instead of through the client: "
        "True, False, or auto (push to a peer whose measured round trip is at least push_min_rtt_s: a push saves one "
        "network traversal per hop but costs more messages, a loss where traversals are as cheap as on loopback)",
    )
    push_min_rtt_s: float = Field(0.005, ge=0, description="push_steps=auto: the round trip, in seconds, from which pushes pay")
    quantizations: list[QuantizationName] = Field(
        default_factory=lambda: list(QUANTIZATION_NAMES), min_length=1,
        description="block formats this client accepts: peers that store their blocks otherwise are never used "
        "(e.g. ['none']: unquantized blocks only, whatever their dtype)",
    )
    dtypes: list[DtypeName] = Field(
        default_factory=lambda: list(DTYPE_NAMES), min_length=1,
        description="dtypes of peers' blocks this client accepts (the client converts hidden states at its edge, so "
        "peers of different dtypes can share a route)",
    )
    prefer_quantization: QuantizationName | None = Field(
        None,
        description="route through peers of this block format where possible: a peer of another format counts as "
        "client.routing.OTHER_FORMAT_SLOWDOWN times slower",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_network_fields(cls, values: Any) -> Any:
        """ClientConfig(initial_peers=..., host_maddrs=...) keeps working: flat keys go to the network section;
        a network section given as a dict goes over the client's defaults (loopback, client mode)."""
        if not isinstance(values, dict):
            return values
        section = values.get("network")
        if not set(values) & set(_CLIENT_NETWORK_KEYS) and not isinstance(section, dict):
            return values  # a whole NetworkConfig, or none (the default): as it is
        values = dict(values)
        if isinstance(section, NetworkConfig):
            section = section.model_dump()
        else:
            section = {**client_network().model_dump(), **(section or {})}
        for key, target in _CLIENT_NETWORK_KEYS.items():
            if key in values:
                section[target] = values.pop(key)
        values["network"] = section
        return values


def parse_blocks(text: str) -> tuple[int, int] | int | Literal["auto"]:
    """'10:20' -> (10, 20); '8' -> 8 blocks placed automatically; 'auto' -> as many as fit, placed automatically."""
    text = text.strip()
    if text == "auto":
        return "auto"
    start_text, sep, end_text = text.partition(":")
    if not sep:
        try:
            count = int(text)
        except ValueError:
            raise ConfigError(f"--blocks {text!r}: give a range START:END (e.g. 0:10), a count N (e.g. 8) or 'auto'") from None
        if count <= 0:
            raise ConfigError(f"--blocks {text!r}: the count must be positive")
        return count
    try:
        start, end = int(start_text), int(end_text)
    except ValueError as exc:
        raise ConfigError(f"--blocks {text!r}: START and END must be integers, e.g. 0:10") from exc
    if start < 0 or end <= start:
        raise ConfigError(f"--blocks {text!r}: need 0 <= START < END")
    return start, end


def parse_throughput(text: str) -> Literal["auto", "eval"] | float:
    """'auto' (measured once, then cached), 'eval' (measured again) or a number of tokens/s >= 0."""
    if text == "auto":
        return "auto"
    if text == "eval":
        return "eval"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ConfigError(
            f"--throughput {text!r}: give 'auto' (measure once, then cached), 'eval' (measure again) "
            "or a number of tokens/s >= 0 such as 12.5"
        )
    return value


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def build_config(model_type: type[Config], *layers: dict[str, Any]) -> Config:
    """Merge layers (file, environment, command line; later wins) into one validated config. The layers
    go over the role's own section defaults (a client's network section: loopback, client mode), so that
    setting one field of a section keeps the others as the role has them, not as the section's class has."""
    merged = section_defaults(model_type)
    for layer in layers:
        merged = _merged(merged, layer)
    try:
        return model_type.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(item) for item in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(message if message.startswith("--") else f"invalid configuration {where}: {message}") from exc


def section_defaults(model_type: type[BaseModel]) -> dict[str, Any]:
    """{section: its default, as plain data} for every field of `model_type` that is a section with a
    default (nested sections included), e.g. {"network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], ...}}."""
    defaults: dict[str, Any] = {}
    for name, field in model_type.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and not field.is_required():
            defaults[name] = field.get_default(call_default_factory=True).model_dump()
    return defaults


def _merged(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` over `base`, section by section (nested dicts merge; anything else replaces)."""
    merged = dict(base)
    for key, value in layer.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _is_loopback_maddr(maddr: str) -> bool:
    parts = maddr.strip("/").split("/")
    if len(parts) < 2 or parts[0] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[1]).is_loopback
    except ValueError:
        return False
