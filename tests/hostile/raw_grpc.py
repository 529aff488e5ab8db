"""A hostile agent over real gRPC: grpclib on its own asyncio loop in a worker thread (so the
trio test and the daemon's code stay apart), with a codec that sends whatever bytes it is given
as a message, and scripted conversations that report how the daemon answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import betterproto2
import grpclib.client
import grpclib.const
import grpclib.encoding.proto
import grpclib.exceptions
import trio

from proto.dispatch import v1 as pb

ROUTE = "/dispatch.v1.AgentService/Connect"
T = TypeVar("T")


class RawCodec(grpclib.encoding.proto.ProtoCodec):
    """Bytes go out as they are (the gRPC framing around them is still right)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes | bytearray):
            return bytes(message)
        return super().encode(message, message_type)


@dataclass
class Answer:
    """What the daemon sent back and how the stream ended."""

    messages: list[pb.ServerMessage] = field(default_factory=list)
    status: str | None = None  # "ok", "invalid_argument", ... (None: still open)
    detail: str | None = None

    def kinds(self) -> list[str]:
        return [betterproto2.which_one_of(m, "kind")[0] for m in self.messages]

    def refusals(self) -> list[str]:
        return [m.refusal.code for m in self.messages if m.refusal is not None]

    def first(self, kind: str) -> Any:
        for message in self.messages:
            found, value = betterproto2.which_one_of(message, "kind")
            if found == kind:
                return value
        raise AssertionError(f"no {kind} in {self.kinds()}")


class Conversation:
    """One Connect stream, driven from asyncio."""

    def __init__(self, stream: Any, answer: Answer) -> None:
        self.stream = stream
        self.answer = answer

    async def send(self, message: pb.AgentMessage | bytes, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self.stream.send_message(message), timeout_s)

    async def end(self) -> None:
        """Half-close: this side sends nothing more (the daemon may have closed it first)."""
        if not self.stream._end_done:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.stream.end(), 5)

    async def receive(self, timeout_s: float = 5.0) -> pb.ServerMessage | None:
        """The next message (None: the stream ended; ``answer.status`` says how)."""
        try:
            message = await asyncio.wait_for(self.stream.recv_message(), timeout_s)
        except grpclib.exceptions.GRPCError as error:
            self._ended(error)
            return None
        if message is None:
            await self.end()
            try:
                await asyncio.wait_for(self.stream.recv_trailing_metadata(), timeout_s)
                self.answer.status = "ok"
            except grpclib.exceptions.GRPCError as error:
                self._ended(error)
            return None
        self.answer.messages.append(message)
        return message

    async def until(self, kind: str, timeout_s: float = 10.0) -> Any:
        """Messages until one of ``kind`` (heartbeats and others are kept in the answer)."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.receive(timeout_s)
                if message is None:
                    raise AssertionError(f"stream ended ({self.answer.status}) before a {kind}")
                found, value = betterproto2.which_one_of(message, "kind")
                if found == kind:
                    return value

    async def until_end(self, timeout_s: float = 10.0) -> Answer:
        async with asyncio.timeout(timeout_s):
            while await self.receive(timeout_s) is not None:
                pass
        return self.answer

    async def quiet_for(self, seconds: float) -> list[str]:
        """The kinds of what arrives within ``seconds`` (the stream staying open)."""
        kinds: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(self.stream.recv_message(), left)
            except TimeoutError:
                break
            if message is None:
                break
            self.answer.messages.append(message)
            kinds.append(betterproto2.which_one_of(message, "kind")[0])
        return kinds

    def _ended(self, error: grpclib.exceptions.GRPCError) -> None:
        self.answer.status = error.status.name.lower()
        self.answer.detail = error.message


class _Closed(Exception):
    """Handed to the stream's ``__aexit__``: reset it rather than wait for the daemon."""


@contextlib.asynccontextmanager
async def connect(port: int, token: str | None) -> AsyncIterator[Conversation]:
    channel = grpclib.client.Channel("127.0.0.1", port, codec=RawCodec())
    metadata = {"authorization": f"Bearer {token}"} if token is not None else None
    try:
        stream = channel.request(ROUTE, grpclib.const.Cardinality.STREAM_STREAM,
                                 pb.AgentMessage, pb.ServerMessage, metadata=metadata)  # fmt: skip
        await stream.__aenter__()
        try:
            await stream.send_request()
            yield Conversation(stream, Answer())
        finally:
            with contextlib.suppress(Exception):
                await stream.__aexit__(_Closed, _Closed(), None)
    finally:
        channel.close()


def hello(host_id: str, **extra: Any) -> pb.AgentMessage:
    fields = {"agent_version": "hostile", "hostname": "box", **extra, "host_id": host_id}
    return pb.AgentMessage(hello=pb.Hello(**fields))


async def in_asyncio(scenario: Callable[[], Awaitable[T]], timeout_s: float = 60) -> T:
    """Run an asyncio ``scenario`` on its own loop in a worker thread, from trio."""
    with trio.fail_after(timeout_s):
        return await trio.to_thread.run_sync(
            lambda: asyncio.run(scenario()), abandon_on_cancel=True
        )
