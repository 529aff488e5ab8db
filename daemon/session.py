"""One agent's stream, from hello to goodbye.

``SessionManager.handle_stream`` is what the agent port calls for every new stream: it waits for
the hello, fixes the host's identity from the credential and the hello (never from a later
message), records the connection, registers the session, and serves it until the stream ends,
the agent falls silent past the heartbeat TTL, or a newer stream from the same host replaces it.
Whatever happens, the session is deregistered and the disconnect recorded (shielded, bounded).

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
import trio

from common.link import Link
from daemon import host_records
from daemon.database import Database
from daemon.grpc_bridge import StreamEnd
from daemon.identity import HostIdentity, Refused, SharedTokenAuthenticator
from daemon.registry import Registry
from daemon.writer import Writer
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_RUNS_PER_MESSAGE_BYTES = 1024 * 1024
_ACKS_PER_MESSAGE = 20_000


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
    ) -> None:
        self.host_id = identity.host_id
        self.identity = identity
        self.peer = link.peer
        self.known_ids = frozenset(hello.known_command_host_ids)
        self.close_reason: str | None = None
        self.last_seen_at = time.time()
        self._last_seen_clock = trio.current_time()
        self._link = link
        self._writer = writer
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_ttl_s = heartbeat_ttl_s
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
                nursery.start_soon(self._watchdog)

    async def _receive_loop(self) -> None:
        try:
            while True:
                message = await self._link.receive()
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
                    self.close(f"protocol error: unexpected {kind or 'empty'} message")
                    return
        except trio.EndOfChannel:
            self.close("the agent ended the stream")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(f"connection lost ({exc})")

    async def _send_loop(self) -> None:
        try:
            while True:
                with trio.move_on_after(self._heartbeat_interval_s):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()  # before taking: later additions wake us again
                messages = self._take_pending() or [pb.ServerMessage(heartbeat=pb.Heartbeat())]
                for message in messages:
                    await self._link.send(message)
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

    async def _watchdog(self) -> None:
        while True:
            deadline = self._last_seen_clock + self._heartbeat_ttl_s
            if trio.current_time() >= deadline:
                self.close(f"silent for {self._heartbeat_ttl_s:g} s (heartbeat TTL)")
                return
            await trio.sleep_until(deadline)


def _age_s(sent_ns: int, event_ns: int) -> float:
    """How long before sending the agent saw the event, by its monotonic clock; a clock that
    went backwards (a replay from before a reboot) counts as no age at all."""
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
        authenticator: SharedTokenAuthenticator,
        hello_timeout_s: float,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float,
        daemon_version: str,
    ) -> None:
        self._registry = registry
        self._writer = writer
        self._database = database
        self._authenticator = authenticator
        self._hello_timeout_s = hello_timeout_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._daemon_version = daemon_version

    async def handle_stream(self, link: Link, credential: str | None) -> StreamEnd | None:
        """Trio-flavored; serves one agent stream to its end."""
        try:
            with trio.fail_after(self._hello_timeout_s):
                first = await link.receive()
        except trio.TooSlowError:
            logger.info("stream from %s: no hello within %g s", link.peer, self._hello_timeout_s)
            return StreamEnd("invalid_argument", "no hello in time")
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        kind, hello = betterproto2.which_one_of(first, "kind")
        if kind != "hello":
            return StreamEnd("invalid_argument", "the first message must be a hello")
        try:
            identity = self._authenticator.authenticate(credential, hello)
        except Refused as refused:
            logger.warning("stream from %s refused: %s", link.peer, refused.message)
            return StreamEnd(refused.status, refused.message)
        return await self._serve(link, identity, hello)

    async def _serve(self, link: Link, identity: HostIdentity, hello: pb.Hello) -> StreamEnd | None:
        session = Session(
            link,
            identity,
            hello,
            writer=self._writer,
            heartbeat_interval_s=self._heartbeat_interval_s,
            heartbeat_ttl_s=self._heartbeat_ttl_s,
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
        try:
            welcome = pb.Welcome(
                host_id=host_id,
                heartbeat_interval_ms=int(self._heartbeat_interval_s * 1000),
                heartbeat_ttl_ms=int(self._heartbeat_ttl_s * 1000),
                daemon_version=self._daemon_version,
            )
            # Registered before the welcome: an agent that has its welcome is connected. What the
            # dispatcher queues meanwhile leaves after it (the send loop starts in serve()).
            await self._registry.attach(session)
            await link.send(pb.ServerMessage(welcome=welcome))
            await session.serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.close(f"connection lost ({exc})")
        finally:
            reason = session.close_reason or "the stream was closed"
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                was_current = self._registry.detach(session)
                logger.info("host %s disconnected: %s", host_id, reason)
                await self._database.write(
                    host_records.record_disconnect,
                    connection_id,
                    host_id,
                    at=time.time(),
                    reason=reason,
                    was_current=was_current,
                )
        return None

    async def serve_presence(
        self, *, interval_s: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Persist when each connected host was last heard from, in one statement per round."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            seen = [(s.last_seen_at, s.host_id) for s in self._registry.sessions()]  # type: ignore[attr-defined]
            if seen:
                await self._database.write(host_records.record_last_seen, seen)
