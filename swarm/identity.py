"""A node's identity: the RSA key behind its peer id, which also signs the node's DHT records.

A hivemind peer id is the hash of an RSA public key. A peer names that key in the subkey of every
record it stores (`<peer id>[owner:<public key>]`) and signs the record with it, so hivemind's
`RSASignatureValidator`, which every swarm node runs, refuses any change to that subkey not signed
by its owner; and a reader accepts a record only if the named key is the one behind the peer id
(`owner_peer_id`). Nobody can write or overwrite records in another peer's name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import ConfigError
from swarm.secret_files import read_secret, write_new_secret

_OWNED_SUBKEY = re.compile(rb"(.{1,256}?)\[owner:(.{1,2048}?)\]", re.DOTALL)


@dataclasses.dataclass
class Identity:
    """The key of one node, and the file its p2p daemon reads it from (None: the daemon makes its own)."""

    key: RSAPrivateKey
    path: Path | None
    created: bool = False  # we wrote `path` just now: no other node can be using it
    _temporary_dir: Path | None = None

    @classmethod
    def load(cls, path: Path | None) -> "Identity":
        """The identity in `path` (created there if missing, readable by its owner only), or a fresh
        one in a temporary file. ConfigError if group or others may access the file."""
        if path is None:
            directory = Path(tempfile.mkdtemp(prefix="swarm-identity-"))
            identity = cls.load(directory / "identity.key")
            identity._temporary_dir = directory
            return identity
        path = Path(path)
        if not path.exists():
            key = RSAPrivateKey()
            protobuf = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
            if write_new_secret(path, protobuf.SerializeToString(), "--identity"):
                return cls(key, path, created=True)
            # another process created `path` meanwhile: use its key, as if it had been there before
        content = read_secret(path, "--identity")
        try:
            protobuf = crypto_pb2.PrivateKey.FromString(content)
            if protobuf.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError("not an RSA key")
            key = RSAPrivateKey.__new__(RSAPrivateKey)
            key.__setstate__({"_private_key": protobuf.data})  # rebuilds the key from its DER bytes (no unpickling)
        except (DecodeError, ValueError, TypeError) as exc:
            raise ConfigError(f"--identity {path}: not a readable hivemind identity file ({exc})") from exc
        return cls(key, path)

    @classmethod
    def anonymous(cls) -> "Identity":
        """For nodes that write no records (clients, bootstrap nodes): the process-wide key, no file."""
        return cls(RSAPrivateKey.process_wide(), None)

    @functools.cached_property
    def validator(self) -> RSASignatureValidator:
        return RSASignatureValidator(self.key)

    @property
    def peer_id(self) -> str:
        return _peer_id_of(self.key.get_public_key().to_bytes())

    def subkey(self, name: str) -> bytes:
        """The subkey under which this node owns a record: `name[owner:<public key>]`."""
        return name.encode() + self.validator.local_public_key

    def forget_file(self) -> None:
        """Delete a temporary identity file once the daemon has read it."""
        if self._temporary_dir is not None:
            shutil.rmtree(self._temporary_dir, ignore_errors=True)
            self._temporary_dir = None


def owned_name(subkey: object) -> tuple[str, str] | None:
    """(name, owner's peer id) of a subkey `name[owner:<key>]`, or None if it has no valid owner."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNED_SUBKEY.fullmatch(subkey)
    if match is None:
        return None
    try:
        return match[1].decode(), _peer_id_of(match[2])
    except ValueError:
        return None


def owner_peer_id(subkey: object) -> str | None:
    """The peer id a block record's subkey names, if the key it names is that peer's own; else None."""
    owned = owned_name(subkey)
    if owned is None or owned[0] != owned[1]:
        return None
    return owned[0]


@functools.lru_cache(maxsize=65536)
def _peer_id_of(ssh_public_key: bytes) -> str:
    """The libp2p peer id of an RSA public key in OpenSSH form (ValueError if it is not one)."""
    try:
        public_key = serialization.load_ssh_public_key(ssh_public_key)
    except Exception as exc:  # cryptography raises several types for garbage
        raise ValueError(f"not an OpenSSH public key: {exc}") from exc
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()
