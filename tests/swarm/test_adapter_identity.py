"""Adapters known by name and digest: an adapter given by the path it was saved to reaches exactly
the peers serving those weights, a bare name the one adapter served under it, two adapters saved
under one folder name never mix; and a peer serving a local folder announces no path of it."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hivemind.proto import runtime_pb2
from pydantic import BaseModel
from transformers import AutoConfig, AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.lora import RemoteLoRA
from client.routing import PeerSpan, adapter_spans, resolve_adapter, served_adapters
from swarm.coverage import SERVING_STATES, peer_spans
from peers.serving import Serving
from swarm import errors, messages, models, network
from swarm.config import ClientConfig, NetworkConfig, PeerConfig
from swarm.tools.local import LocalSwarm
from swarm.lora import DIGEST_CHARS, AdapterId, adapter_identity, adapter_ref, read_peft_adapter
from swarm.messages import ForwardRequest, OpenSession
from swarm.records import PROTOCOL_VERSION, PeerRecord, PeerState, parse_peer_records
from swarm.transport import decode_header, encode_frame
from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)

KWARGS = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
A, B = "0123456789abcdef", "fedcba9876543210"


def save_adapter(model_path: Path, folder: Path, seed: int) -> Path:
    """A peft LoRA adapter with random A and B (so it changes the output), saved by peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


# ---- the digest ------------------------------------------------------------------------------------
def test_same_weights_same_digest_different_weights_different_digest(tiny_model_path, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    lora = RemoteLoRA(config, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    with torch.no_grad():
        lora.b["q_proj"].normal_()
    lora.save_pretrained(tmp_path / "one" / "my-adapter")
    lora.save_pretrained(tmp_path / "two" / "my-adapter")
    first, second = adapter_identity(tmp_path / "one" / "my-adapter"), adapter_identity(tmp_path / "two" / "my-adapter")
    assert first == second and first.name == "my-adapter" and len(first.digest) == DIGEST_CHARS
    assert read_peft_adapter(tmp_path / "one" / "my-adapter", config)[0]["digest"] == first.digest  # what a peer announces

    with torch.no_grad():
        lora.b["q_proj"][0, 0, 0] += 1e-3  # one weight differs
    lora.save_pretrained(tmp_path / "three" / "my-adapter")
    third = adapter_identity(tmp_path / "three" / "my-adapter")
    assert third.name == first.name and third.digest != first.digest


def test_the_digest_does_not_depend_on_who_wrote_the_file(tiny_model_path, tmp_path):
    from peft import PeftModel

    ours = save_adapter(tiny_model_path, tmp_path / "peft" / "adapter", seed=3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    PeftModel.from_pretrained(base, ours).save_pretrained(tmp_path / "again" / "adapter")  # rewritten by peft
    config = AutoConfig.from_pretrained(tiny_model_path)
    RemoteLoRA.from_pretrained(ours, config).save_pretrained(tmp_path / "remote" / "adapter")  # by RemoteLoRA (alpha 8.0)
    digests = {adapter_identity(tmp_path / where / "adapter").digest for where in ("peft", "again", "remote")}
    assert len(digests) == 1


def test_a_path_is_read_and_a_bare_name_is_a_name(tiny_model_path, tmp_path, monkeypatch):
    folder = save_adapter(tiny_model_path, tmp_path / "my-adapter", seed=1)
    identity = adapter_identity(folder)
    assert adapter_ref(str(folder)) == adapter_ref(folder) == identity
    assert adapter_ref(str(folder) + "/") == identity
    assert adapter_ref("my-adapter") == AdapterId("my-adapter")  # not in the working directory: a name
    monkeypatch.chdir(tmp_path)
    assert adapter_ref("my-adapter") == identity  # an adapter folder right here, as peft would read it
    assert adapter_ref("./my-adapter") == identity
    assert adapter_ref(identity) is identity and adapter_ref(None) is None
    with pytest.raises(errors.ConfigError, match="adapter_config.json"):
        adapter_ref(str(tmp_path / "no-such-adapter"))


# ---- routing by name and digest ------------------------------------------------------------------
def spans(**adapters_by_peer) -> dict[str, PeerSpan]:
    return {peer: PeerSpan(peer, 0, 4, adapters=tuple(adapters)) for peer, adapters in adapters_by_peer.items()}


def test_routing_takes_only_the_peers_serving_that_digest():
    swarm = spans(good=[AdapterId("my-adapter", A)], decoy=[AdapterId("my-adapter", B)], plain=[])
    assert set(adapter_spans(swarm, AdapterId("my-adapter", A), 0, 4)) == {"good"}
    assert set(adapter_spans(swarm, AdapterId("my-adapter", B), 0, 4)) == {"decoy"}
    assert set(adapter_spans(swarm, None, 0, 4)) == {"good", "decoy", "plain"}


def test_a_bare_name_takes_the_one_adapter_served_under_it():
    swarm = spans(good=[AdapterId("my-adapter", A)], legacy=[AdapterId("my-adapter")], plain=[])
    assert resolve_adapter(swarm, AdapterId("my-adapter")) == AdapterId("my-adapter", A)
    assert set(adapter_spans(swarm, AdapterId("my-adapter"), 0, 4)) == {"good"}  # a peer without a digest may serve other weights
    only_legacy = spans(legacy=[AdapterId("my-adapter")], plain=[])
    assert set(adapter_spans(only_legacy, AdapterId("my-adapter"), 0, 4)) == {"legacy"}  # peers that predate digests


def test_a_bare_name_served_with_two_digests_is_ambiguous():
    swarm = spans(good=[AdapterId("my-adapter", A)], decoy=[AdapterId("my-adapter", B)])
    with pytest.raises(errors.AmbiguousAdapterError) as caught:
        adapter_spans(swarm, AdapterId("my-adapter"), 0, 4)
    assert A in str(caught.value) and B in str(caught.value) and "path" in str(caught.value)


def test_an_adapter_nobody_serves_names_those_served():
    swarm = spans(good=[AdapterId("my-adapter", A)], other=[AdapterId("other", B)], plain=[])
    with pytest.raises(errors.AdapterNotServedError) as caught:
        adapter_spans(swarm, AdapterId("my-adapter", B), 0, 4)
    message = str(caught.value)
    assert f"adapter my-adapter (sha256 {B})" in message and "blocks 0:4" in message
    assert f"adapters served: my-adapter (sha256 {A}), other (sha256 {B})" in message
    assert isinstance(caught.value, errors.MissingBlocksError)  # route() waits for it like for any missing block
    with pytest.raises(errors.AdapterNotServedError, match="adapters served: none"):
        adapter_spans(spans(plain=[]), AdapterId("nobody"), 0, 4)
    partial = {"half": PeerSpan("half", 0, 2, adapters=(AdapterId("my-adapter", A),))}
    with pytest.raises(errors.AdapterNotServedError, match="blocks 2:4"):
        adapter_spans(partial, AdapterId("my-adapter", A), 0, 4)
    assert served_adapters(swarm) == [AdapterId("my-adapter", A), AdapterId("other", B)]


# ---- records and messages stay compatible --------------------------------------------------------
def record(**overrides) -> dict:
    value = dict(
        protocol_version=PROTOCOL_VERSION, state="online", model="m", start_block=0, end_block=4, throughput=1.0,
        cache_tokens_left=100, dtype="float32", version="0.1.0", adapters=["my-adapter", "old"],
    )
    return {**value, **overrides}


def test_records_carry_digests_and_old_records_still_parse():
    new = PeerRecord.model_validate(record(adapter_digests={"my-adapter": A}))
    (span,) = peer_spans([{"peer": new}] * 4, SERVING_STATES).values()
    assert span.adapters == (AdapterId("my-adapter", A), AdapterId("old"))
    old = PeerRecord.model_validate(record())  # a peer that predates digests
    assert old.adapter_digests == {} and PeerRecord.model_validate(record(some_future_field=1)).adapters == ("my-adapter", "old")
    assert PeerRecord.model_validate(new.to_wire()) == new
    with pytest.raises(ValueError):
        PeerRecord.model_validate(record(adapter_digests={"my-adapter": "not hex"}))


def test_a_request_without_a_digest_is_what_an_older_peer_accepts():
    # every field that may be None defaults to None, so leaving None fields off the wire loses nothing
    classes = [value for value in vars(messages).values() if isinstance(value, type) and issubclass(value, BaseModel)]
    assert ForwardRequest in classes and OpenSession in classes
    for message in classes:
        for name, field in message.model_fields.items():
            if type(None) in typing.get_args(field.annotation):
                assert not field.is_required() and field.default is None, (message.__name__, name)
    header = ForwardRequest(start_block=0, end_block=2, adapter="my-adapter")
    (frame,) = encode_frame(header, [], runtime_pb2.ExpertRequest)
    assert "adapter_digest" not in json.loads(frame.metadata)  # no field an older peer would refuse
    assert decode_header(messages.PEER_REQUEST, frame.metadata) == header
    with_digest = ForwardRequest(start_block=0, end_block=2, adapter="my-adapter", adapter_digest=A)
    (frame,) = encode_frame(with_digest, [], runtime_pb2.ExpertRequest)
    assert decode_header(messages.PEER_REQUEST, frame.metadata) == with_digest


def test_a_peer_serves_only_the_adapter_a_request_names():
    weights = SimpleNamespace(for_blocks=lambda start, end: ("weights", start, end))
    servicer = SimpleNamespace(adapters={AdapterId("my-adapter", A): weights}, _adapter_spans={})
    check = Serving.adapter_weights
    assert check(servicer, OpenSession(session_id="s", start_block=0, end_block=2, max_length=8, batch_size=1), (0, 2)) is None
    named = ForwardRequest(start_block=0, end_block=2, adapter="my-adapter")  # an older client: the name alone
    assert check(servicer, named, (0, 2)) == ("weights", 0, 2)
    exact = ForwardRequest(start_block=0, end_block=2, adapter="my-adapter", adapter_digest=A)
    assert check(servicer, exact, (0, 2)) == ("weights", 0, 2)
    other = ForwardRequest(start_block=0, end_block=2, adapter="my-adapter", adapter_digest=B)
    with pytest.raises(errors.BlocksNotServedError, match=f"my-adapter \\(sha256 {B}\\) is not served here.*{A}"):
        check(servicer, other, (0, 2))


# ---- defect 8a: the model's public name ----------------------------------------------------------
def test_a_local_model_is_announced_by_name_and_digest_not_path(tiny_model_path, tmp_path):
    from tests.conftest import make_tiny_llama

    source = models.resolve_model(str(tiny_model_path))
    name = models.announced_name(source)
    folder, digest = name.split("@")
    assert folder == tiny_model_path.name and len(digest) == 16 and "/" not in name
    assert str(tiny_model_path.parent) not in name and source.dht_prefix == tiny_model_path.name  # the DHT prefix is unchanged
    same_name = make_tiny_llama(tmp_path / tiny_model_path.name, hidden_size=32)  # another model, one folder name
    assert models.announced_name(models.resolve_model(str(same_name))) != name
    hub = models.ModelSource("owner/model", tmp_path, "owner/model", "owner-model")
    assert models.announced_name(hub) == "owner/model"


def test_a_peer_record_holds_no_path(tiny_model_path, tmp_path):
    from peers.server import Peer

    config = PeerConfig(
        model=str(tiny_model_path), blocks="0:2",
        network=NetworkConfig(new_swarm=True, identity_path=tmp_path / "identity.key"),
    )
    peer = Peer(config)
    try:
        record = peer._record(PeerState.ONLINE, 0, 2)
        assert str(tiny_model_path) not in json.dumps(record.to_wire()) and "/" not in record.model
        assert peer._info(0, 2).model == record.model
    finally:
        peer.executor.shutdown()


# ---- through a swarm -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(tiny_model_path, tmp_path_factory) -> tuple[Path, Path]:
    """Two different adapters saved under the same folder name."""
    root = tmp_path_factory.mktemp("same-name")
    return (
        save_adapter(tiny_model_path, root / "my-adapter", seed=11),
        save_adapter(tiny_model_path, root / "elsewhere" / "my-adapter", seed=12),
    )


@pytest.fixture(scope="module")
def swarm(tiny_model_path, two_adapters, tmp_path_factory):
    good, decoy = two_adapters
    with LocalSwarm(tmp_path_factory.mktemp("identity-swarm"), env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        nodes = [
            swarm.start_peer("0:4", model=str(tiny_model_path), extra_args=["--announce-period", "1", "--adapters", str(good)], wait=False),
            swarm.start_peer("0:4", model=str(tiny_model_path), extra_args=["--announce-period", "1", "--adapters", str(decoy)], wait=False),
        ]
        for node in nodes:
            swarm.wait_ready(node)
        yield swarm


def peft_generate(tiny_model_path, folder, input_ids):
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), folder).eval()
    return tuned.generate(input_ids=input_ids, **KWARGS)


def test_an_adapter_given_by_its_path_equals_peft(swarm, tiny_model_path, two_adapters):
    good, decoy = two_adapters
    input_ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    expected = {folder: peft_generate(tiny_model_path, folder, input_ids) for folder in two_adapters}
    assert not torch.equal(expected[good], expected[decoy])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_model_path), initial_peers=swarm.initial_peers, adapter=str(good),
        client_config=ClientConfig(route_wait_s=5.0),
    )
    try:
        for folder in (good, decoy):
            with model.inference_session(max_length=32, adapter=str(folder)) as session:
                assert torch.equal(model.generate(input_ids, **KWARGS), expected[folder])
                (peer_id, _, _), = session.route
            assert model.sequence.spans[peer_id].adapters == (adapter_identity(folder),)  # only that very adapter
        assert torch.equal(model.generate(input_ids, **KWARGS), expected[good])  # the model's adapter, a path
        with pytest.raises(errors.AmbiguousAdapterError, match="my-adapter"):
            model.generate(input_ids, adapter="my-adapter", **KWARGS)
        with pytest.raises(errors.AdapterNotServedError, match="adapters served: my-adapter \\(sha256 [0-9a-f]{16}\\), my-adapter"):
            model.generate(input_ids, adapter="nobody-serves-this", **KWARGS)
        raw = network.fetch_block_records(model.sequence.dht, tiny_model_path.name, 4)
        announced = {record.model for entry in raw for record in parse_peer_records(entry).values()}
        assert announced == {models.announced_name(models.resolve_model(str(tiny_model_path)))}
    finally:
        model.close()
