"""Helpers for the agent's tests: process checks, a recording RunReport, a fake Runner, a fake
daemon speaking the protocol over ``common.link.memory_link_pair``, and a real grpclib server
whose handler the test drives from trio (needs the ``aio_loop`` fixture)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import betterproto2
import grpclib.const
import grpclib.server
import trio

from agent import cgroups as cg
from agent.process_group import ProcessInfo
from agent.runner import Stop
from common.grpc_bridge import CONNECT_CARDINALITY, CONNECT_ROUTE, StreamLink, aio, trio_handler
from common.link import Link, MemoryLink, memory_link_pair
from proto.dispatch import v1 as pb


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


async def wait_until(predicate: Callable[[], object], interval_s: float = 0.01) -> None:
    """Poll ``predicate``: for state the code under test offers no event for."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(interval_s)


async def wait_dead(pids: list[int], timeout_s: float = 2.0) -> list[int]:
    """The pids still alive after ``timeout_s`` (init may take a moment to reap orphans)."""
    with trio.move_on_after(timeout_s):
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110 (no event for process exit)
            await trio.sleep(0.02)
    return [pid for pid in pids if alive(pid)]


# ---------------------------------------------------------------------------------------------


class RecordingReport:
    """A ``RunReport`` that keeps what a runner tells it."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.process: ProcessInfo | None = None
        self.outputs: list[tuple[pb.OutputStream, int, bytes]] = []
        self.changed = trio.Event()

    async def started(self, pid: int, process: ProcessInfo | None) -> None:
        self.pid = pid
        self.process = process
        self._changed()

    async def output(self, stream: pb.OutputStream, offset: int, data: bytes) -> None:
        self.outputs.append((stream, offset, data))
        self._changed()

    def data(self, stream: pb.OutputStream) -> bytes:
        chunks = [(offset, data) for s, offset, data in self.outputs if s == stream]
        expected = 0
        for offset, data in chunks:
            assert offset == expected, f"gap or overlap at {offset}, expected {expected}"
            expected += len(data)
        return b"".join(data for _, data in chunks)

    async def wait_for(self, predicate: Callable[[RecordingReport], bool]) -> None:
        while not predicate(self):
            self.changed = trio.Event()
            await self.changed.wait()

    def _changed(self) -> None:
        self.changed.set()


class FakeRunner:
    """A ``Runner`` that never forks: it reports a start and one line, then waits until
    ``release`` (or a stop), and counts how many run at once."""

    def __init__(self, *, hold: bool = False) -> None:
        self.calls: list[int] = []
        self.running = 0
        self.max_running = 0
        self.stops: dict[int, Stop] = {}
        self._hold = hold
        self._release = trio.Event()

    def release(self) -> None:
        self._release.set()

    async def __call__(self, run: pb.Run, report: Any, stop: Stop) -> pb.Finished:
        self.calls.append(run.command_host_id)
        self.stops[run.command_host_id] = stop
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await report.started(4242, None)
            await report.output(pb.OutputStream.STDOUT, 0, f"ran {run.script}\n".encode())
            if self._hold:
                with stop.cancels():
                    await self._release.wait()
            if stop.requested:
                return pb.Finished(outcome=stop.outcome, error=f"{stop.reason}; fake")
            return pb.Finished(
                outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=0, stdout_bytes=9
            )
        finally:
            self.running -= 1


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DaemonSide:
    """The daemon's end of one agent stream, with the Hello already read."""

    link: MemoryLink
    hello: pb.Hello
    heartbeats: int = 0

    async def welcome(self, *, interval_ms: int = 1000, ttl_ms: int = 5000) -> None:
        await self.link.send(
            pb.ServerMessage(
                welcome=pb.Welcome(
                    host_id=self.hello.host_id,
                    heartbeat_interval_ms=interval_ms,
                    heartbeat_ttl_ms=ttl_ms,
                    daemon_version="test",
                )
            )
        )

    async def run(self, *runs: pb.Run) -> None:
        await self.link.send(pb.ServerMessage(runs=pb.RunBatch(runs=list(runs))))

    async def cancel(self, *ids: int) -> None:
        await self.link.send(pb.ServerMessage(cancels=pb.CancelBatch(command_host_ids=list(ids))))

    async def ack(self, command_host_id: int, seq: int) -> None:
        acks = [pb.Ack(command_host_id=command_host_id, seq=seq)]
        await self.link.send(pb.ServerMessage(acks=pb.AckBatch(acks=acks)))

    async def receive(self) -> pb.AgentMessage:
        message = await self.link.receive()
        assert message.sent_monotonic_ns > 0
        return message

    async def events(self, count: int) -> list[pb.Event]:
        """The next ``count`` events, counting heartbeats on the way."""
        events: list[pb.Event] = []
        while len(events) < count:
            message = await self.receive()
            kind, value = betterproto2.which_one_of(message, "kind")
            if kind == "heartbeat":
                self.heartbeats += 1
            else:
                assert kind == "events", kind
                events.extend(value.events)
        assert len(events) == count, events
        return events

    async def events_until_finished(self, command_host_id: int) -> list[pb.Event]:
        events: list[pb.Event] = []
        while not any(e.finished and e.command_host_id == command_host_id for e in events):
            events.extend(await self.events(1))
        return events

    async def close(self) -> None:
        await self.link.aclose()


class FakeDaemon:
    """Hands the agent memory links (its ``connect``) and the test their daemon ends."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[MemoryLink](16)
        self.connects = 0
        self.refuse = False

    def connect(self) -> contextlib.AbstractAsyncContextManager[Link]:
        return self._open()

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[Link]:
        self.connects += 1
        if self.refuse:
            raise trio.BrokenResourceError("connection refused")
        agent_end, daemon_end = memory_link_pair()
        await self._send.send(daemon_end)
        try:
            yield agent_end
        finally:
            await agent_end.aclose()

    async def accept(self) -> DaemonSide:
        link = await self._receive.receive()
        message = await link.receive()
        assert message.hello is not None, message
        return DaemonSide(link, message.hello)


def run_message(command_host_id: int, script: str = "true", **fields: Any) -> pb.Run:
    return pb.Run(command_host_id=command_host_id, task_id=1, script=script, **fields)


# ---------------------------------------------------------------------------------------------


@dataclass
class Accepted:
    link: StreamLink
    metadata: dict[str, str]
    transport: Any  # the server side of the TCP connection (asyncio)
    done: trio.Event = field(default_factory=trio.Event)


class DaemonStub:
    """A grpclib server whose every Connect stream is handed to the test as an ``Accepted``."""

    def __init__(self) -> None:
        self._send, self.accepted = trio.open_memory_channel[Accepted](8)
        self.server: grpclib.server.Server | None = None
        self.port = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            CONNECT_ROUTE: grpclib.const.Handler(
                trio_handler(self._handle), CONNECT_CARDINALITY, pb.AgentMessage, pb.ServerMessage
            )
        }

    async def _handle(self, stream: Any) -> None:
        link = StreamLink(stream, peer="agent", max_message_bytes=1 << 20)
        await aio(link.start)()
        accepted = Accepted(link, dict(stream.metadata), stream._stream._transport)
        try:
            await self._send.send(accepted)
            await accepted.done.wait()  # the stream lives until the test ends it
        finally:
            with trio.CancelScope(shield=True):
                await aio(link.stop)(drain_s=1.0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        with trio.move_on_after(5):
            await aio(self.server.wait_closed)()


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[DaemonStub]:
    service = DaemonStub()

    async def start() -> grpclib.server.Server:
        server = grpclib.server.Server([service])
        await server.start("127.0.0.1", 0)
        return server

    service.server = await aio(start)()
    service.port = service.server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield service
    finally:
        with trio.CancelScope(shield=True):
            await service.close()


def remove_cgroup_tree(path: Path) -> None:
    """Kill whatever is left under ``path`` and remove its cgroups, deepest first."""
    if not path.exists():
        return
    for directory, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        group = cg.CommandCgroup(Path(directory))
        group.kill()
        for _ in range(200):  # up to 2 s for the kernel to let them go
            if not group.populated():
                break
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            os.rmdir(directory)
