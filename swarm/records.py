"""DHT keys and the typed record every peer announces for each block it serves.

Layout: one DHT key per block, `<dht_prefix>.<block_index>`; one subkey per peer (its base58 peer id
followed by its public key, which signs the record: see `swarm.identity`); the value is a `PeerRecord`
dumped to plain JSON types. A models index key lists every model announced.
This module only builds and validates records; it does no I/O (see `swarm.network`).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from typing import Annotated, Any, Mapping

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.identity import owned_name, owner_peer_id

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 3
MAX_RECORD_TTL_S = 6 * 3600.0  # records expiring later than this are hostile or broken (peers refresh far more often)
MAX_RECORD_BYTES = 16 * 1024  # a peer record is a few hundred bytes
MAX_SUBKEY_BYTES = 4096  # a peer id and an RSA public key
MODELS_KEY = "swarm.models"  # subkey: dht_prefix, value: ModelRecord
MAX_BLOCKS = 4096  # no supported model has more blocks than this


AdapterNameText = Annotated[str, Field(min_length=1, max_length=128)]
AdapterDigestText = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]  # swarm.lora.DIGEST_CHARS hex digits
PeerIdText = Annotated[str, Field(min_length=1, max_length=128)]
RoundTrip = Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)]
MAX_NEXT_PINGS = 32


class PeerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


class PeerRecord(BaseModel):
    """What a peer says about itself under every block key it serves."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    protocol_version: int = Field(ge=0, description="wire protocol version of the peer")
    state: PeerState
    model: str = Field(max_length=256, description="the model name the peer was started with")
    start_block: int = Field(ge=0, lt=MAX_BLOCKS, description="first block served")
    end_block: int = Field(gt=0, le=MAX_BLOCKS, description="one past the last block served")
    throughput: float = Field(ge=0, le=1e12, allow_inf_nan=False, description="tokens/s the peer can process")
    cache_tokens_left: int = Field(ge=0, le=2**40, description="KV-cache budget left, in tokens")
    dtype: str = Field(max_length=32, description="torch dtype of the blocks, e.g. float32")
    quantization: str = Field(
        "none", pattern=r"^[a-z0-9_]{1,16}$", description="how the blocks' weights are stored: none, int8 or nf4 (swarm.quantization)"
    )
    version: str = Field(max_length=64, description="swarm package version")
    public_name: str | None = Field(default=None, max_length=128, description="optional display name")
    adapters: tuple[AdapterNameText, ...] = Field(
        default=(), max_length=32, description="names of the LoRA adapters the peer serves"
    )
    adapter_digests: dict[AdapterNameText, AdapterDigestText] = Field(
        default_factory=dict, max_length=32,
        description="adapter name -> its digest (swarm.lora.adapter_digest); peers that predate digests send none",
    )
    next_pings: dict[PeerIdText, RoundTrip] = Field(
        default_factory=dict, max_length=MAX_NEXT_PINGS,
        description="peer id -> round trip in seconds from this peer to that one, for peers serving the block after ours",
    )
    load: float = Field(
        default=0.0, ge=0, le=1, allow_inf_nan=False, description="share of the last announce period spent computing, 0-1"
    )
    using_relay: bool = Field(default=False, description="others reach this peer only through a relay (/p2p-circuit)")

    @model_validator(mode="before")
    @classmethod
    def _adapters_from_list(cls, data: Any) -> Any:
        # strict mode refuses a JSON list for a tuple; records arrive as plain JSON values
        if isinstance(data, dict) and isinstance(data.get("adapters"), list):
            data = {**data, "adapters": tuple(data["adapters"])}
        return data

    @model_validator(mode="before")
    @classmethod
    def _enum_from_str(cls, data: Any) -> Any:
        # strict mode refuses a plain string for an Enum; records arrive as plain JSON values
        if isinstance(data, dict) and isinstance(data.get("state"), str):
            try:
                data = {**data, "state": PeerState(data["state"])}
            except ValueError:
                pass  # left to the field validator, which reports it
        return data

    @model_validator(mode="after")
    def _check_range(self) -> "PeerRecord":
        if self.end_block <= self.start_block:
            raise ValueError(f"empty block range {self.start_block}:{self.end_block}")
        return self

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def precision(self) -> str:
        """The blocks' number format in one word: the dtype (`float32`), or the quantization and the
        dtype it computes in (`nf4/bfloat16`)."""
        return self.dtype if self.quantization == "none" else f"{self.quantization}/{self.dtype}"


class ModelRecord(BaseModel):
    """Entry of the models index: which models the swarm serves, so viewers need no hard-coded list."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    model: str = Field(max_length=256)
    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    protocol_version: int = Field(ge=0)


class RecordShapeValidator(RecordValidatorBase):
    """Every node stores and returns only records shaped like ours: a bytes subkey (hivemind keeps a
    key's subkeys in one heap, and a str among bytes breaks it for everyone), a bounded value, and
    an expiration within MAX_RECORD_TTL_S. Whose record it is, and whether its value makes sense,
    is the readers' business (`parse_peer_records`)."""

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > MAX_RECORD_BYTES or len(record.subkey) > MAX_SUBKEY_BYTES + 16:
            return False
        if not record.expiration_time <= get_dht_time() + MAX_RECORD_TTL_S:
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # msgpack raises several types for garbage
            return False
        return isinstance(subkey, bytes) and 0 < len(subkey) <= MAX_SUBKEY_BYTES

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RecordShapeValidator)


def block_key(dht_prefix: str, block_index: int) -> str:
    return f"{dht_prefix}.{block_index}"


def block_keys(dht_prefix: str, start_block: int, end_block: int) -> list[str]:
    return [block_key(dht_prefix, index) for index in range(start_block, end_block)]


def parse_peer_records(raw: Mapping[Any, Any], *, where: str = "") -> dict[str, PeerRecord]:
    """Validate the subkey -> value mapping read from one block key; invalid entries are dropped
    with one warning each, never raised. A record counts only under a subkey its peer owns
    (`<peer id>[owner:<that peer's key>]`, signed: see `swarm.identity`)."""
    records = {}
    for subkey, value in raw.items():
        peer_id = owner_peer_id(subkey)
        if peer_id is None:
            logger.warning("ignoring a record under %s whose subkey names no peer as its owner", where or "a block key")
            continue
        try:
            records[peer_id] = PeerRecord.model_validate(value)
        except (ValidationError, TypeError, ValueError) as exc:
            summary = str(exc).splitlines()[0][:200]
            logger.warning("ignoring an invalid record from peer %s under %s: %s", peer_id[-8:], where, summary)
    return records


def parse_models(raw: Mapping[Any, Any]) -> dict[str, ModelRecord]:
    """DHT prefix -> ModelRecord from the models index, each entry owned by the peer that wrote it.
    Where peers disagree about a prefix, the record most of them announce wins."""
    votes: dict[str, Counter] = {}
    for subkey, value in raw.items():
        owned = owned_name(subkey)
        try:
            if owned is None or not 0 < len(owned[0]) <= 256:
                raise ValueError("the subkey names no owner")
            record = ModelRecord.model_validate(value)
        except (ValidationError, TypeError, ValueError) as exc:
            logger.warning("ignoring an invalid models index entry: %s", str(exc).splitlines()[0][:200])
            continue
        votes.setdefault(owned[0], Counter())[record] += 1
    return {prefix: counter.most_common(1)[0][0] for prefix, counter in votes.items()}

