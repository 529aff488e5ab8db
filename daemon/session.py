"""One agent's stream, from hello to goodbye.

``SessionManager.handle_stream`` is what the agent port calls for every new stream: it waits for
the hello, fixes the host's identity from the credential, the client certificate and the hello
(never from a later message; ``daemon.enrollment`` decides), records the connection, registers
the session, and serves it until the stream ends,
the agent falls silent past the heartbeat TTL, or a newer stream from the same host replaces it.
Whatever happens, the session is deregistered and the disconnect recorded (shielded, bounded).
A stream the daemon will not serve gets a ``Refusal`` (code and message), then ends with the
matching gRPC status; each refusal is logged and audited (``agent.refused``).

Outbound messages are coalesced: runs, cancels and acknowledgements wait in small per-session
structures and leave as one message of each kind per wake-up. They are bounded by what feeds
them (runs and cancels by the daemon-wide execution limit, acknowledgements by the executions in
flight on the host), so a slow agent costs memory proportional to its own work only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import betterproto2
import peewee
import trio

from common.link import Link, MalformedMessage, MessageTooLarge
from daemon import host_records
from daemon.audit import DENIED, AuditLog, AuditRecord
from daemon.database import Database
from daemon.enrollment import Admitted, Enrollment
from daemon.grpc_bridge import StreamEnd
from daemon.identity import HostIdentity, Refused
from daemon.liveness import Liveness
from daemon.registry import HostRevoked, Registry
from daemon.throttle import StreamLimits
from daemon.writer import Writer, first_cause
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_RUNS_PER_MESSAGE_BYTES = 1024 * 1024
_ACKS_PER_MESSAGE = 20_000
_REFUSAL_SEND_S = 2.0


class Session:
    def __init__(
        self,
        link: Link,
        identity: HostIdentity,
        hello: pb.Hello,
        *,
        writer: Writer,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float,
        limits: StreamLimits | None = None,
    ) -> None:
        self.host_id = identity.host_id
        self.identity = identity
        self.peer = link.peer
        self.known_ids = frozenset(hello.known_command_host_ids)
        self.close_reason: str | None = None
        self.protocol_error: Refused | None = None  # how the agent broke the protocol, if it did
        self.heard = False  # any message after the welcome
        self.last_seen_at = time.time()
        self._last_seen_clock = self._last_sent_clock = trio.current_time()
        self._heartbeat_due = False
        self._link = link
        self._writer = writer
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._throttle = limits.buckets() if limits is not None else None
        self._runs: list[pb.Run] = []
        self._cancels: list[int] = []
        self._acks: dict[int, int] = {}
        self._wakeup = trio.Event()
        self._scope = trio.CancelScope()

    # ------------------------------------------------------------------ for the dispatcher/writer

    def send_run_nowait(self, run: pb.Run) -> None:
        self._runs.append(run)
        self._wakeup.set()

    def send_cancel_nowait(self, ids: list[int]) -> None:
        self._cancels.extend(ids)
        self._wakeup.set()

    def ack_nowait(self, acks: Mapping[int, int]) -> None:
        for ch_id, seq in acks.items():
            if seq > self._acks.get(ch_id, 0):
                self._acks[ch_id] = seq
        self._wakeup.set()

    def throttled(self) -> int:
        """How often this stream had to wait for its rate limit."""
        return sum(bucket.waits for bucket in self._throttle) if self._throttle else 0

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self._scope.cancel()

    # ------------------------------------------------------------------ serving

    async def serve(self) -> None:
        """Until the stream ends or ``close`` is called."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._send_loop)

    async def _receive_loop(self) -> None:
        try:
            while True:
                message = await self._link.receive()
                if self._throttle is not None:  # read the next message later, never drop one
                    messages, size = self._throttle
                    await messages.take(1)
                    await size.take(getattr(self._link, "last_message_bytes", 0))
                self.heard = True
                self.last_seen_at = received_at = time.time()
                self._last_seen_clock = trio.current_time()
                kind, value = betterproto2.which_one_of(message, "kind")
                if kind == "events":
                    sent_ns = message.sent_monotonic_ns
                    timed = [
                        (e, received_at - _age_s(sent_ns, e.monotonic_ns)) for e in value.events
                    ]
                    await self._writer.record_events(self.host_id, self, timed)
                elif kind != "heartbeat":
                    message_kind = kind or "empty"
                    self._protocol_error(
                        Refused("invalid_argument", f"unexpected {message_kind} message")
                    )
                    return
        except trio.EndOfChannel:
            self.close("the agent ended the stream")
        except (MessageTooLarge, MalformedMessage) as exc:
            self._protocol_error(refusal_for(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(f"connection lost ({exc})")

    def _protocol_error(self, refused: Refused) -> None:
        self.protocol_error = refused
        self.close(f"protocol error: {refused.message}")

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()  # before taking: later additions wake us again
                messages = self._take_pending()
                if not messages and self._heartbeat_due:
                    messages = [pb.ServerMessage(heartbeat=pb.Heartbeat())]
                self._heartbeat_due = False
                for message in messages:
                    await self._link.send(message)
                if messages:
                    self._last_sent_clock = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(f"connection lost ({exc})")

    def _take_pending(self) -> list[pb.ServerMessage]:
        messages: list[pb.ServerMessage] = []
        runs, self._runs = self._runs, []
        batch: list[pb.Run] = []
        size = 0
        for run in runs:
            batch.append(run)
            size += len(run.script) + 256
            if size >= _RUNS_PER_MESSAGE_BYTES:
                messages.append(pb.ServerMessage(runs=pb.RunBatch(runs=batch)))
                batch, size = [], 0
        if batch:
            messages.append(pb.ServerMessage(runs=pb.RunBatch(runs=batch)))
        if self._cancels:
            cancels, self._cancels = self._cancels, []
            messages.append(pb.ServerMessage(cancels=pb.CancelBatch(command_host_ids=cancels)))
        if self._acks:
            acks = [pb.Ack(command_host_id=k, seq=v) for k, v in self._acks.items()]
            self._acks = {}
            for start in range(0, len(acks), _ACKS_PER_MESSAGE):
                chunk = acks[start : start + _ACKS_PER_MESSAGE]
                messages.append(pb.ServerMessage(acks=pb.AckBatch(acks=chunk)))
        return messages

    def check_liveness(self, now: float) -> None:
        """Called by the liveness ticker: close a silent stream, queue a heartbeat when due."""
        # Bytes of a message still arriving count as hearing from the agent.
        heard = max(self._last_seen_clock, getattr(self._link, "last_bytes_at", 0.0))
        if now - heard >= self._heartbeat_ttl_s:
            self.close(f"silent for {self._heartbeat_ttl_s:g} s (heartbeat TTL)")
        elif now - self._last_sent_clock >= self._heartbeat_interval_s:
            self._heartbeat_due = True
            self._wakeup.set()


def refusal_for(exc: MessageTooLarge | MalformedMessage) -> Refused:
    """How a stream that sent a message too large or malformed is refused."""
    if isinstance(exc, MessageTooLarge):
        return Refused("resource_exhausted", str(exc))
    return Refused("invalid_argument", str(exc))


def _age_s(sent_ns: int, event_ns: int) -> float:
    """How long before sending the agent saw the event, by its monotonic clock; a clock that
    went backwards (a replay from before a reboot) counts as no age at all."""
    if not isinstance(sent_ns, int) or not isinstance(event_ns, int):
        return 0.0  # malformed: the ledger refuses the event itself
    if not sent_ns or not event_ns or event_ns > sent_ns:
        return 0.0
    return (sent_ns - event_ns) / 1e9


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
        self, link: Link, credential: str | None, peer_names: frozenset[str] | None = None
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

    async def _refuse(self, link: Link, hello: pb.Hello | None, refused: Refused) -> StreamEnd:
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
        self, link: Link, admitted: Admitted, hello: pb.Hello, generation: int
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
                heartbeat_interval_ms=int(cadence.interval_s * 1000),
                heartbeat_ttl_ms=int(cadence.ttl_s * 1000),
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
                    was_current = self._registry.detach(session)
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
        """Heartbeats out and silent streams closed, for every session (``daemon.liveness``)."""
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
