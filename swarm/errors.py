"""The one exception tree of swarm, and the wire error codes that map onto it.

It does not translate library exceptions itself: `swarm.transport` does that in one place.

    SwarmError
    ├── ConfigError                 bad user input: CLI flags, block ranges, options
    ├── ModelError
    │   ├── ModelNotFoundError      unknown name, missing folder, missing weights
    │   └── UnsupportedModelError   an architecture the blocks cannot run (see swarm.models)
    ├── RemoteError                 a peer could not do what we asked
    │   ├── PeerUnavailableError    transient: connection failed or dropped
    │   ├── PeerTimeoutError        transient: no answer in time
    │   ├── OverloadedError         transient: no cache or session slots left
    │   ├── PeerMisbehavedError     transient: the peer's reply was malformed or implausible
    │   ├── BlocksNotServedError    transient: the peer does not serve those blocks (any more: it moved)
    │   ├── ProtocolMismatchError   the peer speaks another protocol version
    │   ├── AccessDeniedError       a private swarm's peer refused us: no valid proof of its key
    │   ├── InvalidRequestError     the peer refused our request as malformed (a bug: no retry)
    │   └── CacheRollbackError      the session's cache cannot go back to that position (a sliding-window
    │                               layer dropped those tokens); the cache is as it was
    │   (a peer's own failure arrives with code "internal" as a plain, transient RemoteError)
    ├── RoutingError
    │   ├── MissingBlocksError      no online peer serves some blocks
    │   │   ├── AdapterNotServedError   ... with the LoRA adapter asked for (lists those served)
    │   │   └── FormatNotServedError    ... in a block format (quantization) the client accepts
    │   └── AmbiguousAdapterError   peers serve different adapters under the name asked for
    ├── SessionError
    │   ├── SessionLengthError      max_length of an inference session exceeded
    │   └── UnknownSessionError     the peer has no such session
    └── CollaborationError          the trainers of a run could not meet
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error swarm raises on purpose."""


class ConfigError(SwarmError, ValueError):
    """A configuration value or command-line flag is invalid."""


class ModelError(SwarmError):
    """A model cannot be resolved or loaded."""


class ModelNotFoundError(ModelError):
    """The model name, folder or weights do not exist."""


class UnsupportedModelError(ModelError):
    """The model's architecture is not one swarm can split into blocks."""


class RemoteError(SwarmError):
    """A peer failed to serve a request. `transient` errors are retried elsewhere."""

    code = "remote_error"
    transient = True


class PeerUnavailableError(RemoteError):
    code = "unavailable"


class PeerTimeoutError(RemoteError):
    code = "timeout"


class OverloadedError(RemoteError):
    code = "overloaded"


class PeerMisbehavedError(RemoteError):
    code = "bad_reply"


class BlocksNotServedError(RemoteError):
    code = "not_served"


class ProtocolMismatchError(RemoteError):
    code = "protocol_mismatch"
    transient = False


class AccessDeniedError(RemoteError):
    code = "access_denied"
    transient = False


class InvalidRequestError(RemoteError):
    code = "invalid_request"
    transient = False


class CacheRollbackError(RemoteError):
    """A step at an earlier position than the cache holds, which a layer cannot go back to: a
    sliding-window layer that has seen its window keeps only its last tokens. Raised before any layer
    is cropped, so the session's cache is unchanged; only a replay from the start can go back."""

    code = "cache_rollback"
    transient = False


class RoutingError(SwarmError):
    """No route through the swarm can be built."""


class MissingBlocksError(RoutingError):
    """Some blocks are served by no online peer."""

    def __init__(self, missing_blocks: list[int], model: str = ""):
        self.missing_blocks = list(missing_blocks)
        spans = _format_spans(self.missing_blocks)
        where = f" of {model}" if model else ""
        super().__init__(f"no online peer serves blocks {spans}{where}")


class AdapterNotServedError(MissingBlocksError):
    """Some blocks are served by no online peer with the LoRA adapter asked for."""

    def __init__(self, missing_blocks: list[int], adapter: str, served: list[str]):
        self.missing_blocks, self.adapter, self.served = list(missing_blocks), adapter, list(served)
        RoutingError.__init__(
            self,
            f"no online peer serves blocks {_format_spans(self.missing_blocks)} with adapter {adapter}; "
            f"adapters served: {', '.join(self.served) or 'none'}",
        )


class FormatNotServedError(MissingBlocksError):
    """Some blocks are served only in block formats (quantizations) the client does not accept."""

    def __init__(self, missing_blocks: list[int], accepted: list[str], served: list[str]):
        self.missing_blocks, self.accepted, self.served = list(missing_blocks), list(accepted), list(served)
        RoutingError.__init__(
            self,
            f"no online peer serves blocks {_format_spans(self.missing_blocks)} in a format this client accepts "
            f"({', '.join(self.accepted)}: ClientConfig.quantizations and dtypes); those blocks are served as "
            f"{', '.join(self.served) or 'nothing'}",
        )


class AmbiguousAdapterError(RoutingError):
    """Peers serve different adapters (different digests) under the name asked for."""

    def __init__(self, name: str, served: list[str]):
        self.name, self.served = name, list(served)
        super().__init__(
            f"adapter {name!r} is ambiguous: peers serve {', '.join(self.served)}; "
            "pass the path of the adapter's folder to pick one by its digest"
        )


class SessionError(SwarmError):
    """An inference session cannot continue."""

    code = "session_error"
    transient = False


class SessionLengthError(SessionError, ValueError):
    code = "session_length"


class UnknownSessionError(SessionError):
    code = "unknown_session"


class CollaborationError(SwarmError):
    """Fewer trainers than asked for joined a training run in time."""


# Errors a peer may send back, by wire code. Anything else arrives as a plain RemoteError.
WIRE_ERRORS: dict[str, type[SwarmError]] = {
    cls.code: cls
    for cls in (
        PeerUnavailableError,
        PeerTimeoutError,
        OverloadedError,
        BlocksNotServedError,
        ProtocolMismatchError,
        AccessDeniedError,
        InvalidRequestError,
        CacheRollbackError,
        SessionLengthError,
        UnknownSessionError,
    )
}


def error_from_wire(code: str, message: str) -> SwarmError:
    """The local exception for an error code a peer answered with."""
    return WIRE_ERRORS.get(code, RemoteError)(message)


def _format_spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6' (half-open ranges, as on the command line)."""
    spans: list[str] = []
    ordered = sorted(indices)
    for position, index in enumerate(ordered):
        if position == 0 or index != ordered[position - 1] + 1:
            start = index
        if position == len(ordered) - 1 or ordered[position + 1] != index + 1:
            spans.append(f"{start}:{index + 1}")
    return ", ".join(spans)
