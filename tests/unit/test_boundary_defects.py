"""Two boundaries: secret files (identity and swarm keys) are private from their first byte and refused
when others can read them; only the remote side's or the network's failures ban and retry a peer."""

from __future__ import annotations

import asyncio
import os
import stat

import pydantic
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, read_pbmsg_safe
from hivemind.proto import p2pd_pb2, runtime_pb2

from client import sequence
from client.routing import PeerSpan
from swarm import errors
from swarm.blocks import BlockInputs
from swarm.config import ClientConfig
from swarm.identity import Identity
from swarm.swarm_key import SwarmKey
from swarm.transport import translated_errors

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


# ---- B: which failures are the peer's -------------------------------------------------------------
async def _translate(failure) -> None:
    async with translated_errors("peer"):
        await failure()


class _Model(pydantic.BaseModel):
    count: int


@pytest.mark.parametrize("bug", [
    ValueError("a bug of ours"),
    TypeError("a bug of ours"),
    pytest.param(None, id="ValidationError"),
])
def test_our_own_bugs_are_not_peer_failures(bug):
    async def failure():
        if bug is None:
            _Model.model_validate({"count": "many"})
        raise bug

    with pytest.raises(type(bug) if bug is not None else pydantic.ValidationError) as raised:
        asyncio.run(_translate(failure))
    assert not isinstance(raised.value, errors.SwarmError)


@pytest.mark.parametrize("network_error", [
    ConnectionResetError("reset by peer"),
    asyncio.IncompleteReadError(b"", 4),
    P2PDaemonError("stream open failed"),
    BrokenPipeError(),
])
def test_network_failures_are_transient(network_error):
    async def failure():
        raise network_error

    with pytest.raises(errors.PeerUnavailableError) as raised:
        asyncio.run(_translate(failure))
    assert raised.value.transient


def _stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize("garbage, read", [
    (b"\x07", lambda reader: P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)),  # TypeError: unknown marker
    (P2P.MESSAGE_MARKER + (5).to_bytes(P2P.HEADER_LEN, "big") + b"\xff" * 5,  # protobuf DecodeError
     lambda reader: P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)),
    (b"\xff" * 12, lambda reader: read_pbmsg_safe(reader, p2pd_pb2.Response())),  # ValueError: varint overflows
], ids=["marker", "protobuf", "varint"])
def test_garbage_from_the_stream_is_the_peers_fault(garbage, read):
    """hivemind's stream readers raise ValueError or TypeError for bytes that are not a message: those
    are the remote side's, and stay transient."""

    async def failure():
        await read(_stream(garbage))

    with pytest.raises(errors.PeerMisbehavedError) as raised:
        asyncio.run(_translate(failure))
    assert raised.value.transient


def _sequence(spans: dict[str, tuple[int, int]], **config) -> sequence.RemoteSequence:
    """A RemoteSequence over these peers' spans, without a DHT (route() uses them as they are)."""
    view = sequence.RemoteSequence.__new__(sequence.RemoteSequence)
    view.config = ClientConfig(**config)
    view.dht_prefix, view.num_blocks, view.swarm_key, view.peer_id, view.p2p = "m", 4, None, "me", None
    view.spans = {peer_id: PeerSpan(peer_id, start, end) for peer_id, (start, end) in spans.items()}
    view.latency_s, view._bans, view._last_seen = {}, {}, {}
    view._updated_at = float("inf")  # never refresh from the DHT
    return view


def test_a_failing_later_hop_of_backward_bans_only_its_own_peer(monkeypatch):
    """Backward over [0, 4): the first peer drawn serves 0:2, so the span is split; the peers of 2:4
    fail until the retries run out. The error is raised; the peer of 0:2, whose call went well, is not
    banned (it was, and the error became "no peer serves blocks 0:2")."""
    calls = []

    async def call_forward(p2p, peer_id, namespace, start, end, inputs, *args):
        calls.append(("forward", peer_id))
        return inputs.hidden_states + 1

    async def call_backward(p2p, peer_id, namespace, start, end, inputs, grad, *args):
        calls.append(("backward", peer_id))
        if start == 2:
            raise errors.PeerUnavailableError(f"peer {peer_id} is unreachable")
        return grad * 2, None, {}

    monkeypatch.setattr(sequence, "call_forward", call_forward)
    monkeypatch.setattr(sequence, "call_backward", call_backward)
    view = _sequence({"front": (0, 2), "back-1": (2, 4), "back-2": (2, 4)}, max_retries=1, route_wait_s=0.0)
    inputs = BlockInputs(torch.zeros(1, 3, 8))  # [batch, seq, hidden]
    with pytest.raises(errors.PeerUnavailableError):
        asyncio.run(view.backward([(0, 4, inputs)], torch.ones(1, 3, 8)))
    assert "front" not in view.banned() and len(view.banned() & {"back-1", "back-2"}) == 1  # the last failure is not retried
    assert sorted(calls) == [("backward", "back-1"), ("backward", "back-2"), ("forward", "front")]


def test_backward_around_a_failed_later_hop_bans_nobody_else(monkeypatch):
    """The same split, where one of the peers of 2:4 works: the gradient is right and only the failed peer is banned."""

    async def call_forward(p2p, peer_id, namespace, start, end, inputs, *args):
        return inputs.hidden_states + 1

    async def call_backward(p2p, peer_id, namespace, start, end, inputs, grad, *args):
        if peer_id == "broken":
            raise errors.PeerUnavailableError("unreachable")
        return grad * (start + 2), None, {}

    monkeypatch.setattr(sequence, "call_forward", call_forward)
    monkeypatch.setattr(sequence, "call_backward", call_backward)
    view = _sequence({"front": (0, 2), "broken": (2, 4), "working": (2, 4)}, max_retries=1, route_wait_s=0.0)
    view.latency_s = {"broken": 0.001, "working": 0.5}  # the broken one is drawn first
    grad, prompts, _ = asyncio.run(view.backward([(0, 4, BlockInputs(torch.zeros(1, 3, 8)))], torch.ones(1, 3, 8)))
    assert torch.equal(grad, torch.full((1, 3, 8), 8.0)) and prompts is None  # x4 over 2:4, x2 over 0:2
    assert view.banned() == {"broken"}


def test_reachability_verdicts_and_the_addresses_worth_dialing():
    from swarm.reachability import Reachability, dialable, tcp_endpoint, verdict

    assert verdict([None, ["/ip4/1.2.3.4/tcp/5"], []]) is Reachability.PUBLIC  # one checker got through
    assert verdict([[], None, []]) is Reachability.PRIVATE  # checkers answered, none got through
    assert verdict([None, None]) is Reachability.UNKNOWN and verdict([]) is Reachability.UNKNOWN
    assert tcp_endpoint("/ip4/10.77.0.2/tcp/31337/p2p/12D3KooWJFmV4AAKnn4o3k9txrvQz6kfrq9irftMu4wJDkASBKu1") == ("10.77.0.2", 31337)
    assert tcp_endpoint("/ip6/2001:db8::1/tcp/80") == ("2001:db8::1", 80)
    for never in ("/ip4/127.0.0.1/tcp/5", "/ip4/0.0.0.0/tcp/5", "/ip6/::1/tcp/5", "/ip4/1.2.3.4/udp/5/quic", "garbage", "",
                  "/ip4/1.2.3.4/tcp/5/p2p/12D3KooWJFmV4AAKnn4o3k9txrvQz6kfrq9irftMu4wJDkASBKu1/p2p-circuit"):
        assert tcp_endpoint(never) is None, never
    many = [f"/ip4/10.0.0.{index}/tcp/1" for index in range(10)]
    assert dialable(["/ip4/127.0.0.1/tcp/1", *many, many[0]]) == many[:4]
