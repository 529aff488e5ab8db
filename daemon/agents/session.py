"""One welcomed agent stream: its messages in to the ledger, runs, cancels, acknowledgements and
heartbeats out, until the stream ends, the agent falls silent past the heartbeat TTL, or a newer
stream from the same host replaces it (``agents.admission`` admits streams and ends sessions).

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

from common.link import DaemonLink, MalformedMessage, MessageTooLarge
from daemon.agents.identity import HostIdentity, Refused
from daemon.agents.liveness import Cadence, differs
from daemon.agents.throttle import StreamLimits
from daemon.store.writer import Writer
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_RUNS_PER_MESSAGE_BYTES = 1024 * 1024
_ACKS_PER_MESSAGE = 20_000


class Session:
    def __init__(
        self,
        link: DaemonLink,
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
        self._cadence_since = 0.0
        self._link = link
        self._writer = writer
        self._cadence = Cadence(heartbeat_interval_s, heartbeat_ttl_s)
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
                    await size.take(self._link.last_message_bytes)
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
                    messages = [pb.ServerMessage(heartbeat=pb.Heartbeat(
                        interval_ms=round(self._cadence.interval_s * 1000),
                        ttl_ms=round(self._cadence.ttl_s * 1000)))]  # fmt: skip
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

    def check_liveness(self, now: float, fleet: Cadence) -> None:
        """Called by the liveness ticker: close a silent stream, queue a heartbeat when due (or
        when the fleet's cadence has moved: the heartbeat tells the agent)."""
        # Bytes of a message still arriving count as hearing from the agent; silence is counted
        # from a cadence change at the earliest, as the agent may have beaten at the old one.
        heard = max(self._last_seen_clock, self._link.last_bytes_at, self._cadence_since)
        if now - heard >= self._cadence.ttl_s:
            self.close(f"silent for {self._cadence.ttl_s:g} s (heartbeat TTL)")
        elif differs(self._cadence, fleet):
            self._cadence, self._cadence_since = fleet, now
            self._heartbeat_due = True
            self._wakeup.set()
        elif now - self._last_sent_clock >= self._cadence.interval_s:
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
