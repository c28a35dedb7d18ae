"""Configuration models, one per role, and their mapping from TOML files and environment variables.

Command-line parsing lives in the entrypoints; they build these models. Nothing here starts anything.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.errors import ConfigError

LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of peers to join through")
    new_swarm: bool = Field(False, description="start a new swarm instead of joining one")
    host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], description="multiaddrs to listen on"
    )
    announce_maddrs: list[str] = Field(default_factory=list, description="multiaddrs others should dial, if not the listened ones")
    identity_path: Path | None = Field(None, description="private key file: a stable peer id across restarts")
    connect_timeout_s: float = Field(15.0, gt=0, description="seconds to wait when joining the swarm")
    swarm_key_path: Path | None = Field(None, description="shared secret of a private swarm (see swarm/swarm_key.py)")

    def is_loopback_only(self) -> bool:
        return all(_is_loopback_maddr(maddr) for maddr in self.host_maddrs)

    def require_peers_or_new_swarm(self) -> None:
        if not self.initial_peers and not self.new_swarm:
            raise ConfigError("give --initial-peers MULTIADDR (a peer of an existing swarm) or --new-swarm")


class PeerConfig(BaseModel):
    """Everything `python -m swarm.peer` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m", description="model name, Hugging Face id or local folder")
    dht_prefix: str | None = Field(None, description="DHT key prefix; default: derived from the model name")
    blocks: str = Field(
        "auto", description="blocks to serve: a range START:END (END exclusive), a count N placed where the swarm needs it, or auto"
    )
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="dtype of the blocks")
    cache_tokens: int = Field(16384, gt=0, description="KV-cache budget: tokens (batch x length) over all sessions")
    cache_gb: float | None = Field(
        None, gt=0, description="KV-cache budget in GiB over all sessions and blocks; replaces --cache-tokens when given"
    )
    max_sessions: int = Field(128, gt=0, description="inference sessions served at once; more wait, then get 'overloaded'")
    batch_steps: int = Field(
        32, gt=0, le=1024, description="decode steps of different sessions run as one batch, at most this many (1: no batching)"
    )
    max_length: int = Field(8192, gt=0, description="longest sequence a session may ask for, in tokens")
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
        default_factory=list, max_length=32, description="peft LoRA adapter folders to serve (safetensors); named by folder"
    )

    @model_validator(mode="after")
    def _check_record_ttl(self) -> "PeerConfig":
        if self.announce_period_s * self.record_ttl_periods > 6 * 3600:  # swarm.records.MAX_RECORD_TTL_S
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


class ClientConfig(BaseModel):
    """How a client finds and talks to peers."""

    model_config = ConfigDict(extra="forbid")

    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of peers to join through")
    dht_prefix: str | None = Field(None, description="DHT key prefix; default: derived from the model name")
    host_maddrs: list[str] = Field(default_factory=lambda: list(LOOPBACK_MADDRS), description="client's own listen addresses")
    swarm_key_path: Path | None = Field(None, description="shared secret of a private swarm (see swarm/swarm_key.py)")
    dht_client_mode: bool = Field(
        True, description="join the DHT as a client only; trainers that average gradients need False (others dial them)"
    )
    connect_timeout_s: float = Field(15.0, gt=0, description="seconds to join the swarm and open a stream")
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
    if text in ("auto", "eval"):
        return text
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


def env_overrides(prefix: str = "SWARM_") -> dict[str, Any]:
    """SWARM_MODEL=..., SWARM_DEVICE=... -> {"model": ..., "device": ...} (top-level scalar fields only)."""
    return {key[len(prefix):].lower(): value for key, value in os.environ.items() if key.startswith(prefix)}


def build_config(model_type: type[BaseModel], *layers: dict[str, Any]) -> BaseModel:
    """Merge layers (file, environment, command line; later wins) into one validated config."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    try:
        return model_type.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(item) for item in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(message if message.startswith("--") else f"invalid configuration {where}: {message}") from exc


def _is_loopback_maddr(maddr: str) -> bool:
    parts = maddr.strip("/").split("/")
    if len(parts) < 2 or parts[0] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[1]).is_loopback
    except ValueError:
        return False
