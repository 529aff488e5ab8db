"""The trio <-> asyncio seam both programs share (with ``daemon/agents/grpc_bridge.py`` and
``agent/grpc_bridge.py``, the only modules that import asyncio, grpclib or trio_asyncio).

grpclib is asyncio-only; it runs inside the trio program through trio-asyncio. Rules kept here:
- the asyncio loop is opened once, at the very top (``run``), so every trio task can reach it;
- every crossing is one call per message (never per field), because each hop costs a task;
- foreign exceptions never leak: a peer reset arrives as ``asyncio.CancelledError``, and it,
  ``StreamTerminatedError``, ``GRPCError``, ``ProtocolError`` and ``OSError`` all become
  ``trio.BrokenResourceError`` (httpx's ``map_httpcore_exceptions`` idea);
- grpclib has no maximum message size, so incoming frames are checked before they are buffered;
- h2 logs every frame it receives with ``repr(frame)`` built whether or not anyone logs, and a
  DATA frame's repr hex-encoded the whole payload to keep 20 characters of it: 6% of the daemon's
  time while ingesting output. ``_cheap_data_repr`` gives the same text from the first bytes.

The private grpclib and hyperframe internals used here are pinned (upper bounds in
``pyproject.toml``) and checked by name in ``tests/test_pinned_internals.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, TypeVarTuple, cast

import grpclib.const
import grpclib.encoding.proto
import grpclib.exceptions
import grpclib.protocol
import grpclib.stream
import h2.exceptions
import hyperframe.frame
import trio
import trio_asyncio

from common.link import (
    MalformedMessage,
    MessageTooLarge,
    ReceiveT,
    ReceiveT_co,
    SendT,
    SendT_contra,
)

T = TypeVar("T")
P = ParamSpec("P")
Ts = TypeVarTuple("Ts")

CONNECT_ROUTE = "/dispatch.v1.AgentService/Connect"
CONNECT_CARDINALITY = grpclib.const.Cardinality.STREAM_STREAM

_FOREIGN_ERRORS = (
    asyncio.CancelledError,
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.GRPCError,
    grpclib.exceptions.ProtocolError,
    h2.exceptions.H2Error,
    OSError,
    EOFError,
)


def run(async_fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    """Run a trio program with an asyncio loop available to the bridge modules."""
    hyperframe.frame._raw_data_repr = _cheap_data_repr
    # trio_asyncio has no type annotations: its functions return Any.
    return cast(T, trio_asyncio.run(async_fn, *args))


_HYPERFRAME_DATA_REPR = hyperframe.frame._raw_data_repr


def _cheap_data_repr(data: bytes | None) -> str:
    """hyperframe's ``_raw_data_repr``, text for text, reading 10 bytes instead of all."""
    if not data:
        return "None"
    shown = data[:10].hex()
    return "<hex:" + shown + ("..." if len(data) > 10 else "") + ">"


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Turn the foreign ways a stream can fail into ``trio.BrokenResourceError``."""
    try:
        yield
    except _FOREIGN_ERRORS as exc:
        raise trio.BrokenResourceError(f"{what}: {type(exc).__name__}: {exc}") from exc


def aio(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """This asyncio-flavored callable as a trio-flavored one."""
    return cast(Callable[P, Awaitable[T]], trio_asyncio.aio_as_trio(fn))


def trio_handler(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """This trio-flavored callable as an asyncio-flavored one (for grpclib's handlers)."""
    return cast(Callable[P, Awaitable[T]], trio_asyncio.trio_as_aio(fn))


class StrictProtoCodec(grpclib.encoding.proto.ProtoCodec):
    """betterproto2 decodes leniently (a field sent with another wire type comes out as a list,
    an unknown wire type as None) and raises assorted errors on truncated input; here a message
    that does not decode, or does not encode back, is a ``MalformedMessage``."""

    def __init__(self, *, round_trip: Callable[[Any], bool] | None = None) -> None:
        # Encoding back costs as much as decoding: a caller that checks the fields it uses itself
        # (the daemon's ledger checks every event it stores) can skip it for those messages.
        self._round_trip = round_trip

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            message = message_type.FromString(data)
            if self._round_trip is None or self._round_trip(message):
                bytes(message)
        except Exception as exc:  # whatever the codec raises: the bytes are not a message
            raise MalformedMessage(
                f"not a well-formed {message_type.__name__} ({type(exc).__name__}: {exc})"
            ) from None
        return message


class GrpcStream(Protocol[SendT_contra, ReceiveT_co]):
    """What a link uses of a grpclib stream: the client's ``grpclib.client.Stream[send,
    receive]`` or the server's ``grpclib.server.Stream[receive, send]``."""

    # The HTTP/2 stream under it, a grpclib internal: the size guard reads through it
    # (pinned, and checked in tests/test_pinned_internals.py).
    _stream: grpclib.protocol.Stream

    async def send_message(self, message: SendT_contra) -> None: ...

    async def recv_message(self) -> ReceiveT_co | None: ...


class StreamLink(Generic[SendT, ReceiveT]):
    """A trio-flavored ``common.link.Link`` over one grpclib stream (client or server side).

    Messages are pumped, not carried across the bridge one by one: an asyncio reader task hands
    each received message to a trio memory channel with ``send_nowait`` (trio-asyncio runs asyncio
    in the trio thread), and trio-side sends go into an asyncio queue drained by an asyncio writer
    task. A bridge hop happens only when a buffer is full (backpressure), so the per-message cost
    is grpclib's and the codec's alone. ``start()`` (asyncio-flavored) begins the pumps once the
    stream exists; ``stop()`` ends them. A failure of either pump is kept and raised, mapped to
    trio's vocabulary, by the next ``receive`` or ``send``.

    ``max_message_bytes`` is checked against the 5-byte gRPC message header before grpclib reads
    the body, since grpclib itself would buffer whatever length the peer declares.
    """

    def __init__(
        self,
        stream: GrpcStream[SendT, ReceiveT],
        *,
        peer: str,
        max_message_bytes: int,
        buffer_messages: int = 64,
    ) -> None:
        self._stream = stream
        self.peer = peer
        self._max_message_bytes = max_message_bytes
        self._inbox_send, self._inbox = trio.open_memory_channel[ReceiveT](buffer_messages)
        self._outbox: asyncio.Queue[SendT] = asyncio.Queue(buffer_messages)
        self._tasks: list[asyncio.Task[None]] = []
        # Kept apart: a peer that sent garbage can still be told why its stream ends.
        self._read_failure: trio.BrokenResourceError | None = None
        self._write_failure: trio.BrokenResourceError | None = None
        self._closed = False
        self.last_message_bytes = 0  # declared length of the last message received
        # trio.current_time() when the last bytes of any message arrived: a peer that is busy
        # sending one large message over a slow link is alive, though no message is complete.
        self.last_bytes_at = 0.0

    # ------------------------------------------------------------------ asyncio side

    async def start(self) -> None:
        """Asyncio-flavored. Begin pumping (a client stream: after ``send_request``)."""
        _install_size_guard(self._stream._stream, self._max_message_bytes, self)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]

    async def stop(self, *, drain_s: float = 0.0) -> None:
        """Asyncio-flavored. Give queued messages up to ``drain_s`` to leave, then end the pumps."""
        if drain_s > 0 and self._write_failure is None and self._tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox.join(), drain_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._inbox_send.close()

    async def _read(self) -> None:
        try:
            while (message := await self._stream.recv_message()) is not None:
                try:
                    self._inbox_send.send_nowait(message)
                except trio.WouldBlock:  # the trio side is behind: wait for it (backpressure)
                    await trio_handler(self._inbox_send.send)(message)
        except asyncio.CancelledError:  # stop(): a pump is only ever cancelled by its owner
            raise
        except (MessageTooLarge, MalformedMessage) as exc:
            self._read_failure = self._read_failure or exc
        except _FOREIGN_ERRORS as exc:  # the connection itself broke: both directions are gone
            broken = trio.BrokenResourceError(
                f"receive from {self.peer}: {type(exc).__name__}: {exc}"
            )
            self._read_failure = self._read_failure or broken
            self._write_failure = self._write_failure or broken
        finally:
            self._inbox_send.close()

    async def _write(self) -> None:
        try:
            while True:
                message = await self._outbox.get()
                try:
                    await self._stream.send_message(message)
                finally:
                    self._outbox.task_done()
        except asyncio.CancelledError:
            raise
        except _FOREIGN_ERRORS as exc:
            self._write_failure = self._write_failure or trio.BrokenResourceError(
                f"send to {self.peer}: {type(exc).__name__}: {exc}"
            )
            self._inbox_send.close()  # the reader may wait for ever on a stream that broke

    # ------------------------------------------------------------------ trio side

    async def send(self, message: SendT) -> None:
        if self._closed:
            raise trio.ClosedResourceError("link closed")
        _raise(self._write_failure)
        try:
            self._outbox.put_nowait(message)
            await trio.lowlevel.checkpoint()
        except asyncio.QueueFull:  # the peer reads slowly: wait for room (backpressure)
            with mapped_errors(f"send to {self.peer}"):
                await aio(self._outbox.put)(message)

    async def receive(self) -> ReceiveT:
        if self._closed:
            raise trio.ClosedResourceError("link closed")
        try:
            return await self._inbox.receive()
        except trio.EndOfChannel:
            _raise(self._read_failure or self._write_failure)
            raise

    async def aclose(self) -> None:
        self._closed = True


def _raise(failure: trio.BrokenResourceError | None) -> None:
    if failure is not None:
        raise type(failure)(*failure.args)


def _install_size_guard(
    inner: grpclib.protocol.Stream, max_message_bytes: int, link: StreamLink[SendT, ReceiveT]
) -> None:
    """Refuse a message whose declared length is over the limit, before its body is buffered.

    grpclib's ``recv_message`` reads every message as ``recv_data(5)`` (flag and big-endian
    length) followed by ``recv_data(length)``; the guard follows that framing on the HTTP/2 stream
    (so a 5-byte body is never mistaken for a header) and checks each declared length.
    ``inner`` is that HTTP/2 stream (``grpclib.protocol.Stream``), the layer both sides read
    through.
    """
    original_recv_data = inner.recv_data
    expecting_header = True

    async def guarded_recv_data(size: int) -> bytes:
        nonlocal expecting_header
        data: bytes = await original_recv_data(size)
        if not expecting_header:
            expecting_header = True
            return data
        if len(data) == 5:
            expecting_header = False
            (length,) = struct.unpack(">I", data[1:])
            link.last_message_bytes = length
            if length > max_message_bytes:
                raise MessageTooLarge(
                    f"message of {length} bytes is over the limit of {max_message_bytes}"
                )
        return data

    inner.recv_data = guarded_recv_data  # type: ignore[method-assign]  # replaced on purpose
    original_add = inner.buffer.add

    def noting_add(data: bytes, ack_size: int) -> None:
        link.last_bytes_at = trio.current_time()
        original_add(data, ack_size)

    inner.buffer.add = noting_add  # type: ignore[method-assign]  # replaced on purpose
