"""Private swarms: a shared secret (`--swarm-key FILE`) without which nodes refuse each other.

Two gates, both keyed with HMAC-SHA256 of the secret:
- DHT records: every record a keyed node stores carries a MAC (`SwarmKeyValidator`), and keyed
  nodes refuse to store or return records without a valid one. Nodes without the key can neither
  announce in the swarm nor read its records (their values do not decode without stripping the MAC).
- RPCs: every request that opens a call to a peer carries a proof, the MAC of (caller's peer id,
  callee's peer id). libp2p channels authenticate both ids, so a proof works only for that caller
  and that callee; a peer refuses calls without it with a typed `access_denied` error.
A public swarm (no key) uses neither gate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from swarm.errors import AccessDeniedError, ConfigError
from swarm.secret_files import read_secret

MIN_SECRET_BYTES = 16
_MAC_MARKER = b"[swarm-mac:"
_MAC_BYTES = 32


@dataclasses.dataclass(frozen=True)
class SwarmKey:
    secret: bytes  # a digest of the file's contents, never the file itself

    @classmethod
    def load(cls, path: Path | str | None) -> "SwarmKey | None":
        """The key in `path`, or None (a public swarm) when no path is given. ConfigError if group or
        others may access the file: whoever can read it can join the swarm."""
        if path is None:
            return None
        content = read_secret(Path(path), "--swarm-key").strip()
        if len(content) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"--swarm-key {path}: a key needs at least {MIN_SECRET_BYTES} bytes of secret; "
                "make one with: (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > swarm.key)"
            )
        return cls(hashlib.sha256(b"swarm-key\0" + content).digest())

    def _mac(self, purpose: bytes, *parts: bytes) -> bytes:
        return hmac.new(self.secret, purpose + b"\0" + b"\0".join(parts), hashlib.sha256).digest()

    def proof(self, caller: str, callee: str) -> str:
        """What `caller` sends `callee` with each call to show it holds the key."""
        return self._mac(b"rpc", caller.encode(), callee.encode()).hex()

    def check(self, proof: str | None, caller: str, callee: str) -> None:
        if not isinstance(proof, str) or not hmac.compare_digest(proof, self.proof(caller, callee)):
            raise AccessDeniedError("this is a private swarm: the request carries no valid proof of its key")

    def validator(self) -> "SwarmKeyValidator":
        return SwarmKeyValidator(self)


def check_access(key: SwarmKey | None, proof: str | None, caller: str, callee: str | None) -> None:
    """Refuse a call to a keyed peer without a valid proof; a public peer takes every call."""
    if key is not None:
        key.check(proof, caller, callee or "")


def make_proof(key: SwarmKey | None, caller: str, callee: str) -> str | None:
    return None if key is None else key.proof(caller, callee)


class SwarmKeyValidator(RecordValidatorBase):
    """Appends a MAC to every record this node stores; accepts only records with a valid one."""

    def __init__(self, key: SwarmKey):
        self.key = key

    def _record_mac(self, record: DHTRecord) -> bytes:
        return self.key._mac(b"record", MSGPackSerializer.dumps(dataclasses.astuple(record)))

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + _MAC_MARKER + self._record_mac(record) + b"]"

    def validate(self, record: DHTRecord) -> bool:
        value = record.value
        suffix = len(_MAC_MARKER) + _MAC_BYTES + 1
        if len(value) < suffix or not value.endswith(b"]") or value[-suffix : -suffix + len(_MAC_MARKER)] != _MAC_MARKER:
            return False
        mac = value[-_MAC_BYTES - 1 : -1]
        return hmac.compare_digest(mac, self._record_mac(dataclasses.replace(record, value=value[:-suffix])))

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[: -(len(_MAC_MARKER) + _MAC_BYTES + 1)]

    @property
    def priority(self) -> int:
        return 20  # outermost: signed last, checked and stripped first (before the owners' RSA signatures)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmKeyValidator) and other.key == self.key
