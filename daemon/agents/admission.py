"""Admitting agent streams, from hello to goodbye.

``SessionManager.handle_stream`` is what the agent port calls for every new stream: it waits for
the hello, fixes the host's identity from the credential, the client certificate and the hello
(never from a later message; ``agents.enrollment`` decides), records the connection, registers
the ``Session`` and serves it to its end. Whatever happens, the session is deregistered and the
disconnect recorded (shielded, bounded). A stream the daemon will not serve gets a ``Refusal``
(code and message), then ends with the matching gRPC status; each refusal is logged and audited
(``agent.refused``). Also here: the liveness ticker and the last-seen writer over all sessions.
"""

from __future__ import annotations

import logging
import time

import betterproto2
import peewee
import trio

from common.link import DaemonLink, MalformedMessage, MessageTooLarge
from daemon.agents.enrollment import Admitted, Enrollment
from daemon.agents.grpc_bridge import StreamEnd
from daemon.agents.identity import Refused
from daemon.agents.liveness import Liveness
from daemon.agents.registry import HostRevoked, Registry
from daemon.agents.session import Session, refusal_for
from daemon.agents.throttle import StreamLimits
from daemon.ops.audit import DENIED, AuditLog, AuditRecord
from daemon.store import host_records
from daemon.store.database import Database
from daemon.store.writer import Writer, first_cause
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_REFUSAL_SEND_S = 2.0


class SessionManager:
    def __init__(
        self,
        *,
        registry: Registry,
        writer: Writer,
        database: Database,
        authenticator: Enrollment,
        hello_timeout_s: float,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float,
        stream_limits: StreamLimits | None = None,
        max_heartbeats_per_s: float = 100.0,
        daemon_version: str,
        audit: AuditLog | None = None,
    ) -> None:
        self._registry = registry
        self._writer = writer
        self._database = database
        self._authenticator = authenticator
        self._audit = audit
        self._hello_timeout_s = hello_timeout_s
        self._liveness = Liveness(interval_s=heartbeat_interval_s, ttl_s=heartbeat_ttl_s,
                                  max_heartbeats_per_s=max_heartbeats_per_s)  # fmt: skip
        self._stream_limits = stream_limits
        self._daemon_version = daemon_version

    async def handle_stream(
        self, link: DaemonLink, credential: str | None, peer_names: frozenset[str] | None = None
    ) -> StreamEnd | None:
        """Trio-flavored; serves one agent stream to its end. ``peer_names``: what the verified
        client certificate names (mutual TLS), None without one."""
        try:
            with trio.fail_after(self._hello_timeout_s):
                first = await link.receive()
        except trio.TooSlowError:
            logger.info("stream from %s: no hello within %g s", link.peer, self._hello_timeout_s)
            return await self._refuse(link, None, Refused("invalid_argument", "no hello in time"))
        except (MessageTooLarge, MalformedMessage) as exc:
            return await self._refuse(link, None, refusal_for(exc))
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        kind, hello = betterproto2.which_one_of(first, "kind")
        if kind != "hello":
            refused = Refused("invalid_argument", "the first message must be a hello")
            return await self._refuse(link, None, refused)
        generation = self._registry.generation(hello.host_id)
        try:
            admitted = await self._authenticator.admit(
                credential, hello, peer_names=peer_names, address=link.peer
            )
        except Refused as refused:
            return await self._refuse(link, hello, refused)
        except peewee.DatabaseError as exc:  # the agent tries again later; nothing was decided
            logger.error("stream from %s: cannot check its identity: %s", link.peer, exc)
            return StreamEnd("unavailable", "the daemon cannot reach its database; try again")
        return await self._serve(link, admitted, hello, generation)

    async def _refuse(
        self, link: DaemonLink, hello: pb.Hello | None, refused: Refused
    ) -> StreamEnd:
        """Tell the agent why (bounded), log and audit it; the stream then ends with the gRPC
        status of the refusal."""
        host_id = hello.host_id[:253] if hello is not None else ""
        logger.warning(
            "stream from %s (host %r) refused: %s: %s",
            link.peer,
            host_id or "?",
            refused.code,
            refused.message,
        )
        if self._audit is not None:  # recorded before the agent hears it (and hangs up)
            await self._audit.record(
                AuditRecord(
                    actor=f"agent:{host_id}" if host_id else "unknown", action="agent.refused",
                    outcome=DENIED, target=host_id or None, address=link.peer,
                    details={"code": refused.code, "reason": refused.message},
                )
            )  # fmt: skip
        with trio.move_on_after(_REFUSAL_SEND_S):
            try:
                refusal = pb.Refusal(code=refused.code, message=refused.message)
                await link.send(pb.ServerMessage(refusal=refusal))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return StreamEnd(refused.status, refused.message)

    async def _serve(
        self, link: DaemonLink, admitted: Admitted, hello: pb.Hello, generation: int
    ) -> StreamEnd | None:
        identity = admitted.identity
        cadence = self._liveness.cadence(self._registry.statistics().connected)
        session = Session(
            link,
            identity,
            hello,
            writer=self._writer,
            heartbeat_interval_s=cadence.interval_s,
            heartbeat_ttl_s=cadence.ttl_s,
            limits=self._stream_limits,
        )
        host_id = identity.host_id
        connection_id = await self._database.write(
            host_records.record_connect,
            host_id,
            hostname=identity.hostname,
            labels=identity.labels,
            agent_version=identity.agent_version,
            address=link.peer,
            at=session.last_seen_at,
        )
        logger.info(
            "host %s connected from %s (agent %s, holding %d executions)",
            host_id,
            link.peer,
            identity.agent_version,
            len(session.known_ids),
        )
        attached = False
        refused: Refused | None = None
        try:
            welcome = pb.Welcome(
                host_id=host_id,
                heartbeat_interval_ms=round(cadence.interval_s * 1000),
                heartbeat_ttl_ms=round(cadence.ttl_s * 1000),
                daemon_version=self._daemon_version,
                credential=admitted.credential or "",
            )
            # Registered before the welcome: an agent that has its welcome is connected. What the
            # dispatcher queues meanwhile leaves after it (the send loop starts in serve()).
            await self._registry.attach(session, generation=generation)
            attached = True
            await link.send(pb.ServerMessage(welcome=welcome))
            await session.serve()
        except HostRevoked:
            refused = Refused("revoked", f"host {host_id} was revoked by an administrator")
            session.close("the host was revoked")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.close(f"connection lost ({exc})")
        finally:
            reason = session.close_reason or "the stream was closed"
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                if attached:
                    was_current = await self._registry.detach(session)
                else:  # never registered: offline unless another stream holds the host
                    was_current = not self._registry.is_connected(host_id)
                logger.info("host %s disconnected: %s", host_id, reason)
                await self._database.write(
                    host_records.record_disconnect,
                    connection_id,
                    host_id,
                    at=time.time(),
                    reason=reason,
                    was_current=was_current,
                )
            if admitted.credential:  # did the credential it carried reach the agent?
                self._authenticator.stream_ended(host_id, admitted.credential, heard=session.heard)
        refused = refused or session.protocol_error
        if refused is not None:
            return await self._refuse(link, hello, refused)
        return None

    async def serve_liveness(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Heartbeats out and silent streams closed, for every session (``agents.liveness``)."""
        await self._liveness.serve(self._registry.sessions, task_status=task_status)  # type: ignore[arg-type]

    async def serve_presence(
        self, *, interval_s: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Persist when each connected host was last heard from, in one statement per round."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            seen = [(s.last_seen_at, s.host_id) for s in self._registry.sessions()]  # type: ignore[attr-defined]
            if not seen:
                continue
            try:
                await self._database.write(host_records.record_last_seen, seen)
            except peewee.DatabaseError as exc:  # a hint for people, not a record: next round
                logger.warning("could not record when %d hosts were last seen: %s", len(seen),
                               first_cause(exc))  # fmt: skip
