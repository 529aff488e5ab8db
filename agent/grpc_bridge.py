"""The agent's end of the gRPC stream (with ``common/grpc_bridge.py``, the only agent module that
touches asyncio, grpclib or trio_asyncio).

``open_stream`` dials the daemon and yields a ``common.link.Link``: the rest of the agent never
sees an asyncio object or exception. The stream is driven by hand (``channel.request`` +
``send_request``), never through betterproto's generated bidi helper, which would hide an asyncio
task; it carries no deadline, since it is meant to stay open for as long as the agent runs.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVarTuple

import grpclib.client
import trio

from agent.config import split_server
from common.grpc_bridge import (
    CONNECT_CARDINALITY,
    CONNECT_ROUTE,
    StreamLink,
    aio,
    mapped_errors,
)
from proto.dispatch import v1 as pb

_CLOSE_TIMEOUT_S = 5.0


class _LinkClosed(Exception):
    """Handed to grpclib's ``Stream.__aexit__`` so it resets the stream instead of waiting for
    the daemon's trailers."""


@asynccontextmanager
async def open_stream(
    server: str,
    token: str | None,
    *,
    max_message_bytes: int,
    connect_timeout_s: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[StreamLink[pb.AgentMessage, pb.ServerMessage]]:
    """A stream to the daemon's ``Connect``, request headers sent; closed on exit. ``tls``
    (``common.tls.client_context``) connects over TLS, verifying the daemon; None, in plaintext.

    Failing to connect (refused, unreachable, a TLS handshake that fails, no answer within
    ``connect_timeout_s``) raises ``trio.BrokenResourceError``.
    """
    host, port = split_server(server)
    metadata = {"authorization": f"Bearer {token}"} if token else None
    with mapped_errors(f"connect to {server}"):
        channel: grpclib.client.Channel = await aio(_make_channel)(host, port, tls)
    try:
        with mapped_errors(f"connect to {server}"):
            stream = await aio(_enter_stream)(channel, metadata)
        try:
            try:
                with mapped_errors(f"connect to {server}"), trio.fail_after(connect_timeout_s):
                    await aio(stream.send_request)()
            except trio.TooSlowError:
                raise trio.BrokenResourceError(
                    f"connect to {server}: no connection within {connect_timeout_s:.1f} s"
                ) from None
            link = StreamLink(stream, peer=server, max_message_bytes=max_message_bytes)
            await aio(link.start)()
            try:
                yield link
            finally:
                with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                    await aio(link.stop)(drain_s=1.0)
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                await _quietly(aio(_exit_stream), stream)
    finally:
        with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            await _quietly(aio(_close_channel), channel)


Ts = TypeVarTuple("Ts")


async def _quietly(fn: Callable[[*Ts], Awaitable[None]], *args: *Ts) -> None:
    # Closing a stream that already broke fails the same way it broke; that was reported.
    try:
        with mapped_errors("close"):
            await fn(*args)
    except trio.BrokenResourceError:
        pass


# The functions below run inside the asyncio loop: grpclib objects are created there, never in
# trio context or at import time.


async def _make_channel(host: str, port: int, tls: ssl.SSLContext | None) -> grpclib.client.Channel:
    return grpclib.client.Channel(host, port, ssl=tls)


async def _enter_stream(
    channel: grpclib.client.Channel, metadata: dict[str, str] | None
) -> grpclib.client.Stream[pb.AgentMessage, pb.ServerMessage]:
    stream = channel.request(
        CONNECT_ROUTE, CONNECT_CARDINALITY, pb.AgentMessage, pb.ServerMessage, metadata=metadata
    )
    await stream.__aenter__()
    return stream


async def _exit_stream(stream: grpclib.client.Stream[pb.AgentMessage, pb.ServerMessage]) -> None:
    await stream.__aexit__(_LinkClosed, _LinkClosed(), None)


async def _close_channel(channel: grpclib.client.Channel) -> None:
    channel.close()
