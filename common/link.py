"""The seam between the programs' trio code and a gRPC stream.

A ``Link`` is one bidirectional message stream in trio's vocabulary. ``grpc_bridge`` gives the real
one over grpclib; ``memory_link_pair`` gives two connected ends for tests that need no network:

- ``receive()`` returns the next message, raises ``trio.EndOfChannel`` when the peer ended the
  stream cleanly and ``trio.BrokenResourceError`` when it broke;
- ``send(msg)`` raises ``trio.BrokenResourceError`` when the stream is broken and
  ``trio.ClosedResourceError`` after ``aclose()``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import trio


class MessageTooLarge(trio.BrokenResourceError):
    """The peer announced a message over the configured maximum; the stream is closed."""


class MalformedMessage(trio.BrokenResourceError):
    """The peer sent bytes that are not a well-formed message of the stream's type."""


class Link(Protocol):
    peer: str

    async def send(self, message: Any) -> None: ...

    async def receive(self) -> Any: ...

    async def aclose(self) -> None: ...


class MemoryLink:
    """One end of an in-memory link; see ``memory_link_pair``."""

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[Any],
        receive_channel: trio.MemoryReceiveChannel[Any],
        peer: str,
    ) -> None:
        self._send_channel = send_channel
        self._receive_channel = receive_channel
        self.peer = peer

    async def send(self, message: Any) -> None:
        await self._send_channel.send(message)

    async def receive(self) -> Any:
        return await self._receive_channel.receive()

    async def aclose(self) -> None:
        await self._send_channel.aclose()
        await self._receive_channel.aclose()


def memory_link_pair(buffer: int | float = math.inf) -> tuple[MemoryLink, MemoryLink]:
    """Two connected ``MemoryLink`` ends: what one sends, the other receives."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[Any](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[Any](buffer)
    return (
        MemoryLink(a_to_b_send, b_to_a_receive, peer="memory:b"),
        MemoryLink(b_to_a_send, a_to_b_receive, peer="memory:a"),
    )
