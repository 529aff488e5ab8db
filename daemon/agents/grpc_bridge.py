"""The agent port: a grpclib server inside the trio daemon (the daemon's only asyncio importer,
with ``common/grpc_bridge.py``).

Each agent stream becomes one call of a trio-flavored ``handle_stream(link, credential,
peer_names)``; the servicer here is a one-line asyncio shim around it. ``peer_names`` are the
names the verified client certificate speaks for (mutual TLS; ``common.tls.peer_names``), None
without one: the trio side binds the hello's host id to them. grpclib logs and swallows handler
exceptions, so the trio side records its own outcomes (``agents.session``); what it returns here
is only how the gRPC stream ends.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpclib.const
import grpclib.exceptions
import grpclib.server
import trio

from common.grpc_bridge import (
    CONNECT_CARDINALITY,
    CONNECT_ROUTE,
    StreamLink,
    StrictProtoCodec,
    aio,
    trio_handler,
)
from common.link import DaemonLink
from common.tls import peer_names
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamEnd:
    """How the daemon ends an agent stream: ``None`` is OK; otherwise a gRPC status."""

    status: str  # "unauthenticated", "invalid_argument", "resource_exhausted", "unavailable"
    message: str


_STATUS = {
    "unauthenticated": grpclib.const.Status.UNAUTHENTICATED,
    "permission_denied": grpclib.const.Status.PERMISSION_DENIED,
    "invalid_argument": grpclib.const.Status.INVALID_ARGUMENT,
    "resource_exhausted": grpclib.const.Status.RESOURCE_EXHAUSTED,
    "unavailable": grpclib.const.Status.UNAVAILABLE,
}

_DRAIN_S = 2.0
StreamHandler = Callable[
    [DaemonLink, str | None, frozenset[str] | None], Awaitable[StreamEnd | None]
]


class _AgentService:
    """A grpclib servable: grpclib needs only ``__mapping__`` (no generated server base, which
    would make importing the messages import grpclib)."""

    def __init__(self, handle_stream: StreamHandler, max_message_bytes: int) -> None:
        self._handle_stream = trio_handler(handle_stream)
        self._max_message_bytes = max_message_bytes

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        # The raw stream, not betterproto's async-generator API: the daemon pushes commands
        # whenever it decides to, not in reply to each agent message.
        return {
            CONNECT_ROUTE: grpclib.const.Handler(
                self._connect, CONNECT_CARDINALITY, pb.AgentMessage, pb.ServerMessage
            )
        }

    async def _connect(self, stream: grpclib.server.Stream) -> None:  # asyncio-flavored
        address = stream.peer.addr()
        peer = f"{address[0]}:{address[1]}" if address else "unknown"
        credential = _bearer(stream.metadata)
        names = peer_names(stream.peer.cert())
        link = StreamLink(stream, peer=peer, max_message_bytes=self._max_message_bytes)
        await link.start()
        try:
            end = await self._handle_stream(link, credential, names)
        finally:
            # What the session queued last (a refusal, acknowledgements) leaves before the end.
            await link.stop(drain_s=_DRAIN_S)
        if end is not None:
            raise grpclib.exceptions.GRPCError(_STATUS[end.status], end.message)


def _bearer(metadata: object) -> str | None:
    value = metadata.get("authorization") if hasattr(metadata, "get") else None
    if isinstance(value, str) and value.lower().startswith("bearer "):
        return value[7:].strip()
    return None


async def serve_grpc(
    handle_stream: StreamHandler,
    *,
    host: str,
    port: int,
    backlog: int,
    max_message_bytes: int,
    close_timeout_s: float,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Trio-flavored. Serve the agent port until cancelled; reports the bound address.
    ``tls`` (``common.tls.server_context``) serves it over TLS; None, in plaintext."""
    server = grpclib.server.Server(
        [_AgentService(handle_stream, max_message_bytes)],
        # Event batches (nearly all traffic) are checked field by field by the ledger
        # (daemon.store.agent_events.malformed); everything else is checked by encoding it back.
        codec=StrictProtoCodec(round_trip=lambda message: message.events is None),
    )
    await aio(server.start)(host, port, backlog=backlog, reuse_address=True, ssl=tls)
    sockets = server._server.sockets if server._server is not None else []
    bound = sockets[0].getsockname()[:2] if sockets else (host, port)
    mode = "plaintext" if tls is None else "TLS"
    if tls is not None and tls.verify_mode == ssl.CERT_REQUIRED:
        mode = "mutual TLS"
    logger.info("agent port listening on %s:%s (%s)", bound[0], bound[1], mode)
    try:
        task_status.started((bound[0], bound[1]))
        await trio.sleep_forever()
    finally:
        server.close()  # cancels every stream handler: their trio sessions unwind and record
        with trio.CancelScope(shield=True), trio.move_on_after(close_timeout_s) as waited:
            await aio(server.wait_closed)()
        if waited.cancelled_caught:
            logger.warning(
                "agent port: streams still open after %.1f s; closing anyway", close_timeout_s
            )
