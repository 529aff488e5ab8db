"""The trio <-> asyncio seam both programs share (with ``daemon/grpc_bridge.py`` and
``agent/grpc_bridge.py``, the only modules that import asyncio, grpclib or trio_asyncio).

grpclib is asyncio-only; it runs inside the trio program through trio-asyncio. Rules kept here:
- the asyncio loop is opened once, at the very top (``run``), so every trio task can reach it;
- every crossing is one call per message (never per field), because each hop costs a task;
- foreign exceptions never leak: a peer reset arrives as ``asyncio.CancelledError``, and it,
  ``StreamTerminatedError``, ``GRPCError``, ``ProtocolError`` and ``OSError`` all become
  ``trio.BrokenResourceError`` (httpx's ``map_httpcore_exceptions`` idea);
- grpclib has no maximum message size, so incoming frames are checked before they are buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpclib.const
import grpclib.encoding.proto
import grpclib.exceptions
import grpclib.stream
import h2.exceptions
import trio
import trio_asyncio

from common.link import MalformedMessage, MessageTooLarge

T = TypeVar("T")

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


def run(async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a trio program with an asyncio loop available to the bridge modules."""
    return trio_asyncio.run(async_fn, *args)


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Turn the foreign ways a stream can fail into ``trio.BrokenResourceError``."""
    try:
        yield
    except _FOREIGN_ERRORS as exc:
        raise trio.BrokenResourceError(f"{what}: {type(exc).__name__}: {exc}") from exc


def aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """This asyncio-flavored callable as a trio-flavored one."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


def trio_handler(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """This trio-flavored callable as an asyncio-flavored one (for grpclib's handlers)."""
    return trio_asyncio.trio_as_aio(fn)  # type: ignore[no-any-return]


class StrictProtoCodec(grpclib.encoding.proto.ProtoCodec):
    """betterproto2 decodes leniently (a field sent with another wire type comes out as a list,
    an unknown wire type as None) and raises assorted errors on truncated input; here a message
    that does not decode, or does not encode back, is a ``MalformedMessage``."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            message = message_type.FromString(data)
            bytes(message)
        except Exception as exc:  # whatever the codec raises: the bytes are not a message
            raise MalformedMessage(
                f"not a well-formed {message_type.__name__} ({type(exc).__name__}: {exc})"
            ) from None
        return message


class StreamLink:
    """A trio-flavored ``common.link.Link`` over one grpclib stream (client or server side).

    ``max_message_bytes`` is checked against the 5-byte gRPC message header before grpclib reads
    the body, since grpclib itself would buffer whatever length the peer declares.
    """

    def __init__(self, stream: Any, *, peer: str, max_message_bytes: int) -> None:
        self._stream = stream
        self.peer = peer
        self._max_message_bytes = max_message_bytes
        self._send_lock = trio.Lock()
        self._closed = False
        self._guarded = False
        self.last_message_bytes = 0  # declared length of the last message received
        # trio.current_time() when the last bytes of any message arrived: a peer that is busy
        # sending one large message over a slow link is alive, though no message is complete.
        self.last_bytes_at = 0.0

    async def send(self, message: Any) -> None:
        if self._closed:
            raise trio.ClosedResourceError("link closed")
        async with self._send_lock:
            with mapped_errors(f"send to {self.peer}"):
                await aio(self._stream.send_message)(message)

    async def receive(self) -> Any:
        if self._closed:
            raise trio.ClosedResourceError("link closed")
        if not self._guarded:  # a client stream has its HTTP/2 stream only once the request is sent
            _install_size_guard(self._stream, self._max_message_bytes, self)
            self._guarded = True
        with mapped_errors(f"receive from {self.peer}"):
            message = await aio(self._stream.recv_message)()
        if message is None:
            raise trio.EndOfChannel
        return message

    async def send_end(self) -> None:
        """Half-close: tell the peer no more messages follow (client side)."""
        async with self._send_lock:
            with mapped_errors(f"end stream to {self.peer}"):
                await aio(self._stream.end)()

    async def aclose(self) -> None:
        self._closed = True


def _install_size_guard(stream: Any, max_message_bytes: int, link: StreamLink) -> None:
    """Refuse a message whose declared length is over the limit, before its body is buffered.

    grpclib's ``recv_message`` reads every message as ``recv_data(5)`` (flag and big-endian
    length) followed by ``recv_data(length)``; the guard follows that framing on the HTTP/2 stream
    (so a 5-byte body is never mistaken for a header) and checks each declared length.
    """
    inner = stream._stream  # grpclib.protocol.Stream, the HTTP/2 layer both sides read through
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

    inner.recv_data = guarded_recv_data
    original_add = inner.buffer.add

    def noting_add(data: bytes, ack_size: int) -> None:
        link.last_bytes_at = trio.current_time()
        original_add(data, ack_size)

    inner.buffer.add = noting_add
