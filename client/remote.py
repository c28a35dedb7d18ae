"""Client stubs for one peer: call_info, call_forward, and one open inference stream per hop.

Each call translates library errors (via `swarm.transport.translated_errors`) and raises the typed
error a peer answered with. Choosing peers and retrying belong to `client.sequence`.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import errors, protocol
from swarm.blocks import BlockInputs
from swarm.lora import AdapterId
from swarm.messages import (
    PEER_REPLY, BackwardRequest, ForwardRequest, InferenceStep, OpenSession, PeerInfo, PushFailed, Result, SessionOpened,
    SlotStep,
)
from swarm.transport import FrameReader, decode_header, encode_frame, frame_tensors, raise_if_error, translated_errors

Request = runtime_pb2.ExpertRequest
LIVENESS_PERIOD_S = 1.0  # a step slower than this makes the client check that its peer is still there
LIVENESS_PING_TIMEOUT_S = 3.0
PUSH_GRACE_S = 3.0  # a pushed step not answered by then is sent by the client too (a copy runs once): the previous
# hop may have died silently after promising the push, and a dead machine sends no FIN to notice it by


def _input_tensors(inputs: BlockInputs, dtype: torch.dtype | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """The named tensors of a request; the hidden states in `dtype`, the peer's own (it would convert
    them on arrival anyway: sending them converted costs fewer bytes and gives the same result)."""
    return frame_tensors({
        "hidden_states": _in_dtype(inputs.hidden_states, dtype), "position_ids": inputs.position_ids,
        "attention_mask": inputs.attention_mask, "prompts": inputs.prompts,
        **(inputs.lora.tensors() if inputs.lora is not None else {}),
    })


def _in_dtype(hidden_states: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return hidden_states if dtype is None else hidden_states.to(dtype)


def _lora_options(inputs: BlockInputs) -> dict:
    lora = inputs.lora
    if lora is None:
        return {}
    return {"lora_scaling": lora.scaling, **({"lora_dropout": lora.dropout, "lora_seed": lora.seed} if lora.dropout else {})}


def _adapter_options(adapter: AdapterId | None) -> dict:
    """A served adapter, named in a request: its name and, when known, its digest (which the peer checks)."""
    return {} if adapter is None else {"adapter": adapter.name, "adapter_digest": adapter.digest}


async def call_info(p2p: P2P, peer_id: str, namespace: str, timeout_s: float, auth: str | None = None) -> PeerInfo:
    async with translated_errors(peer_id[-8:]), asyncio.timeout(timeout_s):  # hivemind's own timeout misses a frozen peer
        reply = await protocol.stub(p2p, PeerID.from_base58(peer_id), namespace).rpc_info(
            runtime_pb2.ExpertUID(uid=auth or ""), timeout=timeout_s
        )
        try:
            return PeerInfo.model_validate_json(reply.serialized_info)
        except ValueError as exc:
            try:
                raise_if_error(PEER_REPLY.validate_json(reply.serialized_info))  # a refusal, e.g. access_denied
            except ValueError:
                pass
            raise errors.ProtocolMismatchError(f"peer {peer_id[-8:]} sent an unreadable info reply") from exc


async def call_forward(
    p2p: P2P, peer_id: str, namespace: str, start: int, end: int, inputs: BlockInputs, timeout_s: float,
    auth: str | None = None, adapter: AdapterId | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The peer's blocks [start, end) on `inputs`, the hidden states sent in `dtype` (the peer's)."""
    names, tensors = _input_tensors(inputs, dtype)
    header = ForwardRequest(
        start_block=start, end_block=end, tensor_names=names, **_lora_options(inputs), **_adapter_options(adapter), auth=auth
    )

    async def requests() -> AsyncIterator[Request]:
        for message in encode_frame(header, tensors, Request):
            yield message

    async with translated_errors(peer_id[-8:]), asyncio.timeout(timeout_s):
        replies = await protocol.stub(p2p, PeerID.from_base58(peer_id), namespace).rpc_forward(requests())
        (hidden_states,), _ = await _read_result(FrameReader(replies).read, peer_id, {"hidden_states": inputs.hidden_states.shape})
        return hidden_states


async def call_backward(
    p2p: P2P, peer_id: str, namespace: str, start: int, end: int, inputs: BlockInputs, grad_outputs: torch.Tensor,
    timeout_s: float, auth: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The gradients of the hidden states entering blocks [start, end), of their deep prompts (None
    without them) and of their LoRA weights (by wire name), given the gradient of the hidden states leaving."""
    names, tensors = _input_tensors(inputs)
    header = BackwardRequest(
        start_block=start, end_block=end, tensor_names=[*names, "grad_outputs"], **_lora_options(inputs), auth=auth
    )

    async def requests() -> AsyncIterator[Request]:
        for message in encode_frame(header, [*tensors, grad_outputs], Request):
            yield message

    async with translated_errors(peer_id[-8:]), asyncio.timeout(timeout_s):
        replies = await protocol.stub(p2p, PeerID.from_base58(peer_id), namespace).rpc_backward(requests())
        expected = {"grad_inputs": inputs.hidden_states.shape}
        if inputs.prompts is not None:
            expected["grad_prompts"] = inputs.prompts.shape
        if inputs.lora is not None:
            expected.update({f"grad_{name}": tensor.shape for name, tensor in inputs.lora.tensors().items()})
        grads, _ = await _read_result(FrameReader(replies).read, peer_id, expected)
        named = dict(zip(expected, grads))
        grad_lora = {name.removeprefix("grad_"): grad for name, grad in named.items() if name.startswith("grad_lora_")}
        return named["grad_inputs"], named.get("grad_prompts"), grad_lora


async def _read_result(
    read: Callable[[], Awaitable], peer_id: str, expected: dict[str, torch.Size], step_id: int | None = None
) -> tuple[list[torch.Tensor], Result]:
    """The tensors a peer answered with (`expected`: their names and shapes, in order), checked (a
    malformed reply bans the peer, never crashes us), and the result's header (whether the peer pushed
    them to the next hop, its compute time). Replies to earlier steps are skipped: they answer steps
    pushed to this peer that the client re-ran after a failover; so are notices of failed pushes (a
    current one is read by `SpanStream.push_failed` while the next hop is awaited)."""
    while True:
        try:
            frame = await read()
            if frame is None:
                raise errors.PeerUnavailableError(f"peer {peer_id[-8:]} closed the stream without answering")
            header = decode_header(PEER_REPLY, frame[0])
        except errors.InvalidRequestError as exc:  # FrameReader speaks of requests; here the peer is at fault
            raise errors.PeerMisbehavedError(f"peer {peer_id[-8:]} sent a malformed reply: {exc}") from exc
        if isinstance(header, PushFailed):
            continue
        stale = getattr(header, "step_id", None)
        if step_id is None or stale is None or stale >= step_id:
            break
    raise_if_error(header)
    if not isinstance(header, Result) or header.tensor_names != list(expected) or len(frame[1]) != len(expected):
        raise errors.PeerMisbehavedError(f"peer {peer_id[-8:]} answered with an unexpected {header.type!r}")
    if header.step_id != step_id:
        raise errors.PeerMisbehavedError(f"peer {peer_id[-8:]} answered step {header.step_id}, expected {step_id}")
    for tensor, (name, shape) in zip(frame[1], expected.items()):
        if tensor.shape != shape or not tensor.is_floating_point():
            raise errors.PeerMisbehavedError(
                f"peer {peer_id[-8:]} returned {name} {tensor.dtype} {list(tensor.shape)}, expected {list(shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise errors.PeerMisbehavedError(f"peer {peer_id[-8:]} returned NaN or infinite {name}")
    return frame[1], header


class SpanStream:
    """One inference stream to one peer for blocks [start, end): open, step, close."""

    def __init__(
        self, p2p: P2P, peer_id: str, namespace: str, start: int, end: int, timeout_s: float, auth: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.p2p, self.peer_id, self.namespace = p2p, peer_id, namespace
        self.dtype = dtype  # the peer's: hidden states are sent in it
        self.auth = auth  # proof of a private swarm's key, for this peer
        self.start, self.end = start, end
        self.timeout_s = timeout_s
        self.push_from: str | None = None  # the previous hop, allowed to push steps into this one
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self._reader: FrameReader | None = None
        self._next_frame: asyncio.Future | None = None  # a read in progress, which no one has consumed yet
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(
        self, session_id: str, max_length: int, batch_size: int, push_from: str | None = None, adapter: AdapterId | None = None,
        slots: int | None = None,
    ) -> None:
        """Open the session (`slots`: a batched session of that many sequences, see `step_slots`)."""
        header = OpenSession(
            session_id=session_id, start_block=self.start, end_block=self.end, max_length=max_length,
            batch_size=batch_size, slots=slots, push_from=push_from, **_adapter_options(adapter), auth=self.auth,
        )
        self.push_from = push_from
        self._loop = asyncio.get_running_loop()
        self._send(header, [])
        async with translated_errors(self.peer_id[-8:]), asyncio.timeout(self.timeout_s):
            replies = await protocol.stub(self.p2p, PeerID.from_base58(self.peer_id), self.namespace).rpc_inference(
                self._requests()
            )
            self._reader = FrameReader(replies)
            frame = await self._read_frame()
            if frame is None:
                raise errors.PeerUnavailableError(f"peer {self.peer_id[-8:]} closed the session at once")
            reply = decode_header(PEER_REPLY, frame[0])
            raise_if_error(reply)
            if not isinstance(reply, SessionOpened):
                raise errors.PeerMisbehavedError(f"peer {self.peer_id[-8:]} did not open the session")

    async def step(
        self, inputs: BlockInputs, position: int, step_id: int, push_to: list[str] = (), *,
        pushed_by: "SpanStream | None" = None,
    ) -> tuple[torch.Tensor, Result]:
        """Send a step and read its result (hidden states, and the header: whether this peer pushed it
        on to the next hop, its compute time). `push_to`: the following hops, to which this peer sends
        its output directly. With `pushed_by`, the previous hop pushed the step here: it is sent only if
        that hop says its push failed, or its stream breaks."""

        def send() -> None:
            names, tensors = _input_tensors(inputs, self.dtype)
            self._send(InferenceStep(position=position, step_id=step_id, push_to=list(push_to), tensor_names=names), tensors)

        if pushed_by is None:
            send()
        async with translated_errors(self.peer_id[-8:]):
            (hidden_states,), header = await self._await_reply(
                _read_result(self._read_frame, self.peer_id, {"hidden_states": inputs.hidden_states.shape}, step_id),
                None if pushed_by is None else (pushed_by.push_failed(step_id), send),
            )
            return hidden_states, header

    async def push_failed(self, step_id: int) -> None:
        """Returns when this peer says that its push of step `step_id` did not arrive, or its stream
        broke; never otherwise (cancel it). Any other frame stays for this stream's next read."""
        while True:
            try:
                frame = await asyncio.shield(self._frame_task())
                header = decode_header(PEER_REPLY, frame[0]) if frame is not None else None
            except Exception:
                return  # broken: whether the push left is unknown, so the step is sent (a copy runs once)
            if header is None:
                return  # the stream ended, likewise
            if not isinstance(header, PushFailed) or header.step_id > step_id:
                await asyncio.Future()  # the next step's reply: leave it
            self._next_frame = None  # consumed
            if header.step_id == step_id:
                return

    def _frame_task(self) -> asyncio.Future:
        if self._next_frame is None:
            self._next_frame = asyncio.ensure_future(self._reader.read())
        return self._next_frame

    async def _read_frame(self):
        """The stream's next frame (a read cancelled half-way goes on, for the next caller)."""
        task = self._frame_task()
        frame = await asyncio.shield(task)  # a broken stream raises here, and again at the next read
        if self._next_frame is task:
            self._next_frame = None
        return frame

    async def step_slots(self, header: SlotStep, hidden_states: torch.Tensor | None) -> torch.Tensor | None:
        """One step of a batched session: `hidden_states` [1, tokens, hidden] (None: no rows);
        returns this peer's output, shaped like it."""
        header = header.model_copy(update={"tensor_names": [] if hidden_states is None else ["hidden_states"]})
        self._send(header, [] if hidden_states is None else [_in_dtype(hidden_states, self.dtype)])
        expected = {} if hidden_states is None else {"hidden_states": hidden_states.shape}
        async with translated_errors(self.peer_id[-8:]):
            outputs, _ = await self._await_reply(_read_result(self._read_frame, self.peer_id, expected, header.step_id))
            return outputs[0] if outputs else None

    async def _await_reply(self, reading, push: tuple[Awaitable, Callable[[], None]] | None = None):
        """The reply, within the step timeout. While it is late, ping the peer every LIVENESS_PERIOD_S:
        a read from a peer that died mid-step can wait forever (nothing is written to notice the broken
        connection), so a dead or frozen peer is found within seconds, not after the whole timeout.
        `push`: (what returns if the push of this step to this peer failed, what sends it instead)."""
        task = asyncio.ensure_future(reading)
        watch = asyncio.ensure_future(push[0]) if push is not None else None
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise errors.PeerTimeoutError(f"peer {self.peer_id[-8:]} did not answer within {self.timeout_s:g} s")
                waiting = {task} if watch is None else {task, watch}
                await asyncio.wait(waiting, timeout=min(LIVENESS_PERIOD_S, remaining), return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                if watch is not None and (watch.done() or loop.time() - started > PUSH_GRACE_S):
                    watch.cancel()
                    watch = None
                    push[1]()  # the previous hop's push failed, or it went silent: send the step ourselves
                    continue
                await call_info(self.p2p, self.peer_id, self.namespace, LIVENESS_PING_TIMEOUT_S, self.auth)
        finally:
            task.cancel()
            if watch is not None:
                watch.cancel()

    def close(self) -> None:
        """End the stream (from any thread): the peer frees the session's cache at once."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, None)
        if self._next_frame is not None:
            self._loop.call_soon_threadsafe(self._next_frame.cancel)

    def _send(self, header, tensors) -> None:
        for message in encode_frame(header, tensors, Request):
            self._outbox.put_nowait(message)

    async def _requests(self) -> AsyncIterator[Request]:
        while (message := await self._outbox.get()) is not None:
            yield message
