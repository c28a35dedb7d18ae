"""Whether others can dial a node: it asks a few swarm nodes to open a TCP connection to each address
it announces and to hear libp2p's greeting there (`rpc_dial_back`), and takes their verdict.

Every bootstrap node and peer answers such requests (`DialBackService`), a few at a time. A checker
dials with a plain socket, not through its libp2p daemon, which would reuse the connection the asker
just opened to it and so always succeed. It skips loopback addresses (they would reach the checker's
own machine). This module decides nothing about relays and restarts no node (`swarm.network` and
`peers.server` act on the verdict).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Annotated, Iterable

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr
from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

NAMESPACE = "swarm.reachability"
MULTISTREAM = b"/multistream/1.0.0\n"
GREETING = bytes([len(MULTISTREAM)]) + MULTISTREAM  # varint length, then the protocol id
MAX_ADDRESSES = 4  # per request: a node announces a handful
MAX_CONCURRENT_CHECKS = 2  # per checker: dialing for strangers must stay cheap
DIAL_TIMEOUT_S = 3.0
MAX_CHECKERS = 5
ASK_TIMEOUT_S = 10.0
Address = Annotated[str, Field(min_length=1, max_length=256)]


class Reachability(str, enum.Enum):
    PUBLIC = "public"  # at least one checker could dial at least one announced address
    PRIVATE = "private"  # checkers answered, and none could
    UNKNOWN = "unknown"  # nobody answered (a new swarm, or older nodes): nothing to go by


class DialBackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    maddrs: list[Address] = Field(max_length=MAX_ADDRESSES, description="the asker's announced multiaddrs, to dial")


class DialBackReply(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    reachable: list[Address] = Field(default_factory=list, max_length=MAX_ADDRESSES, description="those that answered")


def dialable(maddrs: Iterable[str]) -> list[str]:
    """The addresses another machine could dial with a plain TCP connection: /ip4 or /ip6 with /tcp, not
    loopback, not a relay circuit; at most MAX_ADDRESSES."""
    found = []
    for text in maddrs:
        host_port = tcp_endpoint(text)
        if host_port is not None and text not in found:
            found.append(text)
    return found[:MAX_ADDRESSES]


def tcp_endpoint(text: str) -> tuple[str, int] | None:
    """(host, port) of a direct TCP multiaddr that is not loopback or unspecified; None otherwise."""
    try:
        maddr = Multiaddr(text)
        protocols = [protocol.name for protocol in maddr.protocols()]
    except Exception:  # the multiaddr library raises several types for a malformed address
        return None
    if "p2p-circuit" in protocols or "tcp" not in protocols:
        return None
    for family in ("ip4", "ip6"):
        if family in protocols:
            host = maddr.value_for_protocol(family)
            if host in ("0.0.0.0", "::") or host.startswith("127.") or host == "::1":
                return None
            return host, int(maddr.value_for_protocol("tcp"))
    return None


def verdict(answers: Iterable[list[str] | None]) -> Reachability:
    """Each checker's answer (the addresses it reached; None: it did not answer) -> the verdict."""
    answered = [answer for answer in answers if answer is not None]
    if any(answered):
        return Reachability.PUBLIC
    return Reachability.PRIVATE if answered else Reachability.UNKNOWN


async def greets(host: str, port: int, timeout_s: float = DIAL_TIMEOUT_S) -> bool:
    """Whether a libp2p node answers a TCP connection to host:port with multistream-select's greeting."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(GREETING)
            await writer.drain()
            return await reader.readexactly(len(GREETING)) == GREETING
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()


class DialBackService(ServicerBase):
    """Answers `rpc_dial_back`: which of the asker's addresses greet us back (a few requests at a time)."""

    def __init__(self):
        self._checks = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

    async def rpc_dial_back(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        try:
            asked = DialBackRequest.model_validate_json(request.uid)
        except ValidationError:
            logger.warning("invalid dial-back request from %s", str(context.remote_id)[-8:])
            return runtime_pb2.ExpertInfo(serialized_info=DialBackReply().model_dump_json().encode())
        targets = [(maddr, endpoint) for maddr in asked.maddrs if (endpoint := tcp_endpoint(maddr)) is not None]
        async with self._checks:
            results = await asyncio.gather(*(greets(*endpoint) for _, endpoint in targets))
        reached = [maddr for (maddr, _), ok in zip(targets, results) if ok]
        logger.debug("dial-back for %s: %d of %d addresses answered", str(context.remote_id)[-8:], len(reached), len(targets))
        return runtime_pb2.ExpertInfo(serialized_info=DialBackReply(reachable=reached).model_dump_json().encode())


async def serve(p2p: P2P) -> None:
    """Answer other nodes' dial-back requests on this node."""
    await DialBackService().add_p2p_handlers(p2p, namespace=NAMESPACE)


async def ask(p2p: P2P, checker: str, maddrs: list[str], timeout_s: float = ASK_TIMEOUT_S) -> list[str] | None:
    """The addresses `checker` could dial (None: it did not answer, or answered nonsense)."""
    try:
        async with asyncio.timeout(timeout_s):
            stub = DialBackService.get_stub(p2p, PeerID.from_base58(checker), namespace=NAMESPACE)
            reply = await stub.rpc_dial_back(runtime_pb2.ExpertUID(uid=DialBackRequest(maddrs=maddrs).model_dump_json()))
        return [maddr for maddr in DialBackReply.model_validate_json(reply.serialized_info).reachable if maddr in maddrs]
    except Exception as exc:  # an older node without the service, a gone one, a timeout: no answer
        logger.debug("dial-back check by %s gave no answer: %s: %s", checker[-8:], type(exc).__name__, exc)
        return None


async def check(p2p: P2P, checkers: list[str], maddrs: list[str]) -> tuple[Reachability, list[str], int]:
    """Ask up to MAX_CHECKERS of `checkers` to dial `maddrs`: (verdict, addresses reached, checkers that answered)."""
    targets = dialable(maddrs)
    if not targets:
        return Reachability.PRIVATE, [], 0
    answers = await asyncio.gather(*(ask(p2p, checker, targets) for checker in checkers[:MAX_CHECKERS]))
    reached = sorted({maddr for answer in answers if answer for maddr in answer})
    return verdict(answers), reached, sum(answer is not None for answer in answers)
