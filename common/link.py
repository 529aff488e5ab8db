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
from typing import Generic, Protocol, TypeAlias, TypeVar

import trio

from proto.dispatch import v1 as pb

SendT_contra = TypeVar("SendT_contra", contravariant=True)
ReceiveT_co = TypeVar("ReceiveT_co", covariant=True)
SendT = TypeVar("SendT")
ReceiveT = TypeVar("ReceiveT")


class MessageTooLarge(trio.BrokenResourceError):
    """The peer announced a message over the configured maximum; the stream is closed."""


class MalformedMessage(trio.BrokenResourceError):
    """The peer sent bytes that are not a well-formed message of the stream's type."""


class Link(Protocol[SendT_contra, ReceiveT_co]):
    """One end of a stream that sends ``SendT_contra`` and receives ``ReceiveT_co`` messages."""

    peer: str

    @property
    def last_bytes_at(self) -> float:
        """``trio.current_time()`` when bytes of any message last arrived, a message still
        arriving included: a peer sending one large message over a slow link is alive."""
        ...

    @property
    def last_message_bytes(self) -> int:
        """The encoded size of the last message received (0 where nothing is encoded)."""
        ...

    async def send(self, message: SendT_contra) -> None: ...

    async def receive(self) -> ReceiveT_co: ...

    async def aclose(self) -> None: ...


AgentLink: TypeAlias = Link[pb.AgentMessage, pb.ServerMessage]
"""The agent's end of its stream to the daemon."""

DaemonLink: TypeAlias = Link[pb.ServerMessage, pb.AgentMessage]
"""The daemon's end of one agent's stream."""


class MemoryLink(Generic[SendT, ReceiveT]):
    """One end of an in-memory link; see ``memory_link_pair``."""

    # Messages cross whole and unencoded: none is ever part-way, none has a size on the wire.
    last_bytes_at = -math.inf
    last_message_bytes = 0

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[SendT],
        receive_channel: trio.MemoryReceiveChannel[ReceiveT],
        peer: str,
    ) -> None:
        self._send_channel = send_channel
        self._receive_channel = receive_channel
        self.peer = peer

    async def send(self, message: SendT) -> None:
        await self._send_channel.send(message)

    async def receive(self) -> ReceiveT:
        return await self._receive_channel.receive()

    async def aclose(self) -> None:
        await self._send_channel.aclose()
        await self._receive_channel.aclose()


def memory_link_pair(
    buffer: int | float = math.inf,
) -> tuple[MemoryLink[SendT, ReceiveT], MemoryLink[ReceiveT, SendT]]:
    """Two connected ``MemoryLink`` ends: what one sends, the other receives. The message types
    come from the caller's annotation, e.g. ``agent_end: MemoryLink[pb.AgentMessage,
    pb.ServerMessage]``."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[SendT](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[ReceiveT](buffer)
    return (
        MemoryLink(a_to_b_send, b_to_a_receive, peer="memory:b"),
        MemoryLink(b_to_a_send, a_to_b_receive, peer="memory:a"),
    )
