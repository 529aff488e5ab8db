"""The benchmark's gRPC side, in plain asyncio (the bench's only asyncio/grpclib importer):

- ``SimAgent``s: many real protocol streams in one process, each one TCP connection speaking
  dispatch.v1 exactly as dispatch-agent does (hello, welcome with a credential, heartbeats, runs,
  event batches, acks, reconnects with jitter) but executing nothing: a run is answered at once
  with started, its output and finished, in one message. This is the load the daemon must carry
  at 10k hosts; the agents' own cost is measured separately with real agent processes.
- ``serve_skeleton``: the bare transport the benchmark compares the daemon against: a grpclib
  server with the same messages and no database, no bookkeeping, no HTTP, no trio.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import betterproto2
import grpclib.client
import grpclib.const
import grpclib.exceptions
import grpclib.server

from proto.dispatch import v1 as pb

ROUTE = "/dispatch.v1.AgentService/Connect"
STREAM = grpclib.const.Cardinality.STREAM_STREAM
_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    grpclib.exceptions.GRPCError,
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.ProtocolError,
    ConnectionError,
)


@dataclass
class SimStats:
    connects: int = 0
    refusals: int = 0
    disconnects: int = 0
    runs: int = 0
    acked_events: int = 0
    output_bytes: int = 0
    ack_lags_s: list[float] = field(default_factory=list)  # sent -> acknowledged, per batch


@dataclass
class SimSettings:
    host: str
    port: int
    token: str
    output_bytes: int = 3  # "hi\n"
    chunk_bytes: int = 65536
    heartbeat_s: float = 10.0
    reconnect_max_s: float = 5.0
    output_rate_bps: float = 0.0  # stdout per run paced at this rate; 0: all of it at once


class SimAgent:
    def __init__(self, host_id: str, labels: dict[str, str], settings: SimSettings,
                 stats: SimStats) -> None:  # fmt: skip
        self.host_id = host_id
        self.labels = labels
        self.settings = settings
        self.stats = stats
        self.credential = settings.token
        self.connected = asyncio.Event()
        self._sent_at: dict[tuple[int, int], float] = {}
        self._pacers: set[asyncio.Task[None]] = set()

    async def run_forever(self, first_delay_s: float) -> None:
        await asyncio.sleep(first_delay_s)
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except _ERRORS:
                pass
            self.connected.clear()
            self.stats.disconnects += 1
            attempt += 1
            ceiling = min(self.settings.reconnect_max_s, 0.05 * 2**attempt)
            await asyncio.sleep(random.uniform(0, ceiling))

    async def _session(self) -> None:
        channel = grpclib.client.Channel(self.settings.host, self.settings.port)
        try:
            async with channel.request(
                ROUTE, STREAM, pb.AgentMessage, pb.ServerMessage,
                metadata={"authorization": f"Bearer {self.credential}"},
            ) as stream:  # fmt: skip
                await stream.send_request()
                lock = asyncio.Lock()
                await self._send(stream, lock, hello=pb.Hello(
                    host_id=self.host_id, agent_version="bench", labels=self.labels,
                    hostname=self.host_id, max_parallel=8))  # fmt: skip
                first = await stream.recv_message()
                kind, value = betterproto2.which_one_of(first, "kind") if first else (None, None)
                if kind != "welcome":
                    self.stats.refusals += 1
                    return
                if value.credential:
                    self.credential = value.credential
                self.stats.connects += 1
                self.connected.set()
                # as dispatch-agent does: the daemon's interval, from the welcome and then from
                # each of its heartbeats (it stretches the cadence as the fleet grows)
                interval_s = value.heartbeat_interval_ms / 1000 or self.settings.heartbeat_s
                beat = asyncio.ensure_future(self._heartbeats(stream, lock, interval_s))
                try:
                    while (message := await stream.recv_message()) is not None:
                        kind, value = betterproto2.which_one_of(message, "kind")
                        wanted = value.interval_ms / 1000 if kind == "heartbeat" else 0
                        if wanted and wanted != interval_s:
                            beat.cancel()
                            interval_s = wanted
                            beat = asyncio.ensure_future(self._heartbeats(stream, lock, wanted))
                        await self._handle(stream, lock, message)
                finally:
                    beat.cancel()
                    for pacer in list(self._pacers):
                        pacer.cancel()
        finally:
            channel.close()

    async def _send(self, stream: grpclib.client.Stream, lock: asyncio.Lock,
                    **kind: object) -> None:  # fmt: skip
        message = pb.AgentMessage(sent_monotonic_ns=time.monotonic_ns(), **kind)  # type: ignore[arg-type]
        async with lock:
            await stream.send_message(message)

    async def _heartbeats(self, stream: grpclib.client.Stream, lock: asyncio.Lock,
                          interval_s: float) -> None:  # fmt: skip
        while True:
            await asyncio.sleep(interval_s)
            await self._send(stream, lock, heartbeat=pb.Heartbeat())

    async def _handle(self, stream: grpclib.client.Stream, lock: asyncio.Lock,
                      message: pb.ServerMessage) -> None:  # fmt: skip
        kind, value = betterproto2.which_one_of(message, "kind")
        if kind == "runs" and self.settings.output_rate_bps:
            for run in value.runs:
                pacer = asyncio.ensure_future(self._paced(stream, lock, self._answer(run)))
                self._pacers.add(pacer)
                pacer.add_done_callback(self._pacers.discard)
        elif kind == "runs":
            events: list[pb.Event] = []
            for run in value.runs:
                events += self._answer(run)
            now = time.monotonic()
            for event in events:
                self._sent_at[(event.command_host_id, event.seq)] = now
            for start in range(0, len(events), 256):
                await self._send(
                    stream, lock, events=pb.EventBatch(events=events[start : start + 256])
                )
        elif kind == "acks":
            now = time.monotonic()
            for ack in value.acks:
                sent = self._sent_at.pop((ack.command_host_id, ack.seq), None)
                if sent is not None:
                    self.stats.ack_lags_s.append(now - sent)
                    self.stats.acked_events += ack.seq
                for seq in range(1, ack.seq):
                    self._sent_at.pop((ack.command_host_id, seq), None)

    async def _paced(self, stream: grpclib.client.Stream, lock: asyncio.Lock,
                     events: list[pb.Event]) -> None:  # fmt: skip
        """A command that writes a chunk every chunk/rate seconds: started with the first chunk,
        finished with the last; the lag counts from each send."""
        interval_s = self.settings.chunk_bytes / self.settings.output_rate_bps
        groups = (
            [events[:2], *([e] for e in events[2:-2]), events[-2:]] if len(events) > 3 else [events]
        )
        for index, group in enumerate(groups):
            if index:
                await asyncio.sleep(interval_s)
            now = time.monotonic()
            for event in group:
                self._sent_at[(event.command_host_id, event.seq)] = now
            await self._send(stream, lock, events=pb.EventBatch(events=group))

    def _answer(self, run: pb.Run) -> list[pb.Event]:
        self.stats.runs += 1
        now = time.monotonic_ns()
        ch = run.command_host_id
        events = [pb.Event(command_host_id=ch, seq=1, monotonic_ns=now, started=pb.Started(pid=1))]
        payload = b"hi\n" if self.settings.output_bytes == 3 else b"x" * self.settings.chunk_bytes
        offset = 0
        while offset < self.settings.output_bytes:
            size = min(len(payload), self.settings.output_bytes - offset)
            events.append(pb.Event(command_host_id=ch, seq=len(events) + 1, monotonic_ns=now,
                                   output=pb.Output(stream=pb.OutputStream.STDOUT, offset=offset,
                                                    data=payload[:size])))  # fmt: skip
            offset += size
        self.stats.output_bytes += offset
        events.append(pb.Event(command_host_id=ch, seq=len(events) + 1, monotonic_ns=now,
                               finished=pb.Finished(outcome=pb.Outcome.EXITED, has_exit_code=True,
                                                    exit_code=0, stdout_bytes=offset,
                                                    duration_ns=1000)))  # fmt: skip
        return events


async def run_sim_agents(
    host_ids: list[str], labels: dict[str, str], settings: SimSettings, *, jitter_s: float,
    report: Callable[[SimStats, int], None], report_every_s: float = 1.0,
) -> None:  # fmt: skip
    """Run the simulated agents until cancelled; ``report(stats, connected_now)`` periodically."""
    stats = SimStats()
    agents = [SimAgent(h, labels, settings, stats) for h in host_ids]
    tasks = [asyncio.ensure_future(a.run_forever(random.uniform(0, jitter_s))) for a in agents]
    try:
        while True:
            await asyncio.sleep(report_every_s)
            report(stats, sum(a.connected.is_set() for a in agents))
    finally:
        for task in tasks:
            task.cancel()


def run_in_asyncio(main: Callable[[], object]) -> None:
    _raise_fd_limit()
    asyncio.run(main())  # type: ignore[arg-type]


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------------------------


@dataclass
class SkeletonResult:
    hosts: int
    elapsed_s: float
    cpu_s: float


class _Skeleton:
    """Accept agent streams; once ``expect`` are connected, send each one run and wait for every
    finished event (acknowledging batches as the product does)."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.streams: list[grpclib.server.Stream] = []
        self.all_connected = asyncio.Event()
        self.finished = 0
        self.all_finished = asyncio.Event()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {ROUTE: grpclib.const.Handler(self._connect, STREAM, pb.AgentMessage,
                                             pb.ServerMessage)}  # fmt: skip

    async def _connect(self, stream: grpclib.server.Stream) -> None:
        hello = await stream.recv_message()
        if hello is None:
            return
        await stream.send_message(
            pb.ServerMessage(
                welcome=pb.Welcome(
                    host_id=hello.hello.host_id,
                    heartbeat_interval_ms=10_000,
                    heartbeat_ttl_ms=30_000,
                )
            )
        )
        self.streams.append(stream)
        if len(self.streams) >= self.expect:
            self.all_connected.set()
        while (message := await stream.recv_message()) is not None:
            kind, value = betterproto2.which_one_of(message, "kind")
            if kind != "events":
                continue
            acks = {}
            for event in value.events:
                acks[event.command_host_id] = event.seq
                if betterproto2.which_one_of(event, "kind")[0] == "finished":
                    self.finished += 1
            await stream.send_message(
                pb.ServerMessage(
                    acks=pb.AckBatch(
                        acks=[pb.Ack(command_host_id=k, seq=v) for k, v in acks.items()]
                    )
                )
            )
            if self.finished >= self.expect:
                self.all_finished.set()


async def serve_skeleton(port: int, expect: int) -> SkeletonResult:
    skeleton = _Skeleton(expect)
    server = grpclib.server.Server([skeleton])
    await server.start("127.0.0.1", port, backlog=4096)
    try:
        await skeleton.all_connected.wait()
        await asyncio.sleep(1.0)  # let the connect storm settle, as the product's run does
        cpu_before, started = os.times(), time.monotonic()
        for index, stream in enumerate(skeleton.streams):
            run = pb.Run(
                command_host_id=index + 1,
                task_id=1,
                script="echo hi",
                timeout_ms=60_000,
                output_limit_bytes=1 << 20,
                kill_grace_ms=5000,
            )
            await stream.send_message(pb.ServerMessage(runs=pb.RunBatch(runs=[run])))
        await skeleton.all_finished.wait()
        elapsed = time.monotonic() - started
        cpu_after = os.times()
        cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        return SkeletonResult(hosts=expect, elapsed_s=elapsed, cpu_s=cpu)
    finally:
        server.close()
