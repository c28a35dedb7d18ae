"""Secret files (identity and swarm keys) are private from their first byte and refused when others can read them."""

from __future__ import annotations

import os
import stat

import pytest

from swarm import errors
from swarm.identity import Identity
from swarm.swarm_key import SwarmKey

pytestmark = pytest.mark.timeout(60)

WATCHED_CALLS = ("open", "fsync", "close", "link", "rename", "replace", "chmod", "fchmod", "unlink")


# ---- A: secret files ----------------------------------------------------------------------------
@pytest.fixture
def no_umask():
    """Files are created with exactly the mode their creator asks for (umask 0 hides nothing)."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _watch_modes(monkeypatch, folder) -> list[tuple[str, str, int]]:
    """Record (call, file, mode) of every file in `folder` before and after every file-system call."""
    seen: list[tuple[str, str, int]] = []

    def snapshot(call: str) -> None:
        for entry in folder.iterdir():
            seen.append((call, entry.name, stat.S_IMODE(entry.lstat().st_mode)))

    def watched(call: str, real):
        def wrapper(*args, **kwargs):
            snapshot(f"before {call}")
            try:
                return real(*args, **kwargs)
            finally:
                snapshot(f"after {call}")
        return wrapper

    for call in WATCHED_CALLS:
        monkeypatch.setattr(os, call, watched(call, getattr(os, call)))
    return seen


def test_a_new_identity_file_is_never_readable_by_others(tmp_path, monkeypatch, no_umask):
    path = tmp_path / "peer.key"
    seen = _watch_modes(monkeypatch, tmp_path)
    identity = Identity.load(path)
    monkeypatch.undo()
    assert identity.created and [entry.name for entry in tmp_path.iterdir()] == ["peer.key"]  # no temporary file left
    assert any(name == "peer.key" for _, name, _ in seen), "the hooks never saw the key file"
    wider = [(call, name, oct(mode)) for call, name, mode in seen if mode & 0o077]
    assert not wider, f"a secret file was readable by others for a while: {wider}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).peer_id == identity.peer_id


def test_a_failed_write_leaves_no_key_behind(tmp_path, monkeypatch):
    """A crash (here: a full disk) mid-write leaves no half-written key where the next start would read it."""

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(errors.ConfigError, match="cannot write"):
        Identity.load(tmp_path / "peer.key")
    assert list(tmp_path.iterdir()) == []


def test_two_processes_creating_one_identity_use_the_same_key(tmp_path, monkeypatch):
    """Another process creates the file between our write and our move into place: ours must not
    replace theirs (they may be running with it already); we use theirs."""
    path = tmp_path / "peer.key"
    real_link, theirs = os.link, []

    def link_after_them(source, destination, **kwargs):
        if not theirs:
            theirs.append(None)
            theirs[0] = Identity.load(path)  # the other process wins the race
        return real_link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", link_after_them)
    ours = Identity.load(path)
    assert theirs[0].created and not ours.created
    assert ours.peer_id == theirs[0].peer_id == Identity.load(path).peer_id
    assert [entry.name for entry in tmp_path.iterdir()] == ["peer.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620], ids=oct)
def test_secret_files_others_may_access_are_refused(tmp_path, mode):
    identity_path = tmp_path / "peer.key"
    peer_id = Identity.load(identity_path).peer_id
    swarm_key_path = tmp_path / "swarm.key"
    swarm_key_path.write_text("a9" * 32)
    for path, load in ((identity_path, Identity.load), (swarm_key_path, SwarmKey.load)):
        path.chmod(mode)
        with pytest.raises(errors.ConfigError, match="group or others may access") as refused:
            load(path)
        assert str(path) in str(refused.value) and f"chmod 600 {path}" in str(refused.value)
        path.chmod(0o600)
    assert Identity.load(identity_path).peer_id == peer_id and SwarmKey.load(swarm_key_path) is not None
    identity_path.chmod(0o400)  # as earlier versions wrote it
    assert Identity.load(identity_path).peer_id == peer_id


def test_a_garbage_identity_file_is_a_config_error(tmp_path):
    path = tmp_path / "peer.key"
    path.write_bytes(b"\xff\xff\xff not a key")
    path.chmod(0o600)
    with pytest.raises(errors.ConfigError, match="not a readable hivemind identity"):
        Identity.load(path)
