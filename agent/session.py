"""One welcomed stream to the daemon: a reader, an event sender, a heartbeat sender and a
watchdog, until any of them ends it.

- the reader hands Runs and Cancels to the worker and Acks to the journal; any message at all
  proves the daemon alive;
- the sender replays every unacknowledged event (``Journal.rewind``), then follows live ones,
  coalescing whatever is ready into one ``EventBatch`` within the configured bounds;
- the watchdog drops a stream the daemon has been silent on for the heartbeat TTL, since
  grpclib's own keepalive would take hours to notice a dead peer.
"""

from __future__ import annotations

import logging
import time

import betterproto2
import trio

from agent.config import AgentConfig
from agent.journal import Journal
from agent.worker import Worker
from common.link import AgentLink
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)


class Session:
    """One welcomed stream: reader, event sender, heartbeat sender and watchdog, until any of
    them ends it."""

    def __init__(
        self,
        config: AgentConfig,
        journal: Journal,
        worker: Worker,
        link: AgentLink,
        welcome: pb.Welcome,
    ) -> None:
        self._config = config
        self._journal = journal
        self._worker = worker
        self._link = link
        self.heartbeat_interval_s = welcome.heartbeat_interval_ms / 1000 or (
            config.heartbeat_interval_s
        )
        self.heartbeat_ttl_s = welcome.heartbeat_ttl_ms / 1000 or config.heartbeat_ttl_s
        self._last_heard = trio.current_time()
        self._cadence_changed = trio.Event()  # wakes the heartbeat sender
        self._ttl_changed = trio.Event()  # wakes the watchdog
        self._reason = ""
        self._refused = False
        self._scope: trio.CancelScope | None = None

    async def run(self) -> tuple[str, bool]:
        """Returns why the session ended and whether the daemon refused this agent."""
        self._journal.rewind()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._read)
            nursery.start_soon(self._send_events)
            nursery.start_soon(self._send_heartbeats)
            nursery.start_soon(self._watch)
        return self._reason, self._refused

    def _end(self, reason: str, *, refused: bool = False) -> None:
        if not self._reason:
            self._reason = reason
            self._refused = refused
        assert self._scope is not None
        self._scope.cancel()

    async def _read(self) -> None:
        while True:
            try:
                message = await self._link.receive()
            except trio.EndOfChannel:
                self._end("the daemon closed the stream")
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._end(f"the stream broke: {exc}")
                return
            self._last_heard = trio.current_time()
            kind, value = betterproto2.which_one_of(message, "kind")
            if isinstance(value, pb.RunBatch):
                for run in value.runs:
                    self._worker.submit(run)
            elif isinstance(value, pb.CancelBatch):
                for command_host_id in value.command_host_ids:
                    self._worker.cancel(command_host_id)
            elif isinstance(value, pb.AckBatch):
                for ack in value.acks:
                    self._journal.ack(ack.command_host_id, ack.seq)
            elif isinstance(value, pb.Refusal):
                logger.error(
                    "host %s: the daemon refused this agent: %s: %s",
                    self._config.host_id,
                    value.code,
                    value.message,
                )
                self._end(f"refused ({value.code})", refused=True)
                return
            elif isinstance(value, pb.Heartbeat):
                self._adopt_cadence(value)
            else:
                logger.warning(
                    "host %s: ignoring an unexpected %s message",
                    self._config.host_id,
                    kind or "empty",
                )

    async def _send_events(self) -> None:
        config = self._config
        while True:
            batch = await self._journal.next_batch(
                max_events=config.event_batch_max_events, max_bytes=config.event_batch_max_bytes
            )
            if not await self._send(agent_message(events=pb.EventBatch(events=batch))):
                return

    def _adopt_cadence(self, heartbeat: pb.Heartbeat) -> None:
        """The daemon stretches (or shortens) the cadence as its fleet changes; a shorter
        interval must start now, not after the longer sleep already begun."""
        interval_s, ttl_s = heartbeat.interval_ms / 1000, heartbeat.ttl_ms / 1000
        if interval_s and ttl_s and (interval_s, ttl_s) != (self.heartbeat_interval_s,
                                                          self.heartbeat_ttl_s):  # fmt: skip
            self.heartbeat_interval_s, self.heartbeat_ttl_s = interval_s, ttl_s
            self._cadence_changed.set()
            self._ttl_changed.set()

    async def _send_heartbeats(self) -> None:
        last_sent = trio.current_time()
        while True:
            self._cadence_changed = trio.Event()
            with trio.move_on_at(last_sent + self.heartbeat_interval_s):
                await self._cadence_changed.wait()
                continue  # a new interval, counted from the last heartbeat sent
            if not await self._send(agent_message(heartbeat=pb.Heartbeat())):
                return
            last_sent = trio.current_time()

    async def _watch(self) -> None:
        while True:
            # Bytes of a message still arriving count as hearing from the daemon.
            heard = max(self._last_heard, self._link.last_bytes_at)
            deadline = heard + self.heartbeat_ttl_s
            if trio.current_time() >= deadline:
                self._end(f"nothing heard from the daemon for {self.heartbeat_ttl_s:.1f} s")
                return
            self._ttl_changed = trio.Event()
            with trio.move_on_at(deadline):
                await self._ttl_changed.wait()

    async def _send(self, message: pb.AgentMessage) -> bool:
        try:
            await self._link.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end(f"the stream broke: {exc}")
            return False
        return True


def agent_message(
    *,
    hello: pb.Hello | None = None,
    heartbeat: pb.Heartbeat | None = None,
    events: pb.EventBatch | None = None,
) -> pb.AgentMessage:
    """One of the ``kind`` oneof's messages, stamped with the agent's clock."""
    return pb.AgentMessage(
        sent_monotonic_ns=time.monotonic_ns(), hello=hello, heartbeat=heartbeat, events=events
    )
