"""Files that hold secrets (a node's identity key, a private swarm's key): written readable by their
owner only from their first byte, and refused when group or others can read or change them.

It does not know what a secret means: `swarm.identity` and `swarm.swarm_key` parse the bytes.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from swarm.errors import ConfigError

PRIVATE_MODE = 0o600


def write_new_secret(path: Path, content: bytes, flag: str) -> bool:
    """Write `content` to `path` if no file is there; False if one already is (another process won).

    The bytes go to a temporary file beside `path`, created with mode 0600 (O_EXCL: never someone
    else's file), which is then linked into place: a crash mid-write leaves no half-written secret at
    `path`, and of two processes creating `path` at once, one writes it and the other sees it exists."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_MODE)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write it ({exc})") from exc
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)  # unlike a rename, never replaces a file that appeared meanwhile
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write it ({exc})") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return True


def read_secret(path: Path, flag: str) -> bytes:
    """The bytes of a secret file; ConfigError if it cannot be read or group or others may access it."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode  # of the file we read, not of whatever `path` names later
            if os.name == "posix" and mode & 0o077:
                raise ConfigError(
                    f"{flag} {path}: group or others may access this secret (mode {stat.filemode(mode)}); "
                    f"make it private with: chmod 600 {path}"
                )
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc})") from exc
