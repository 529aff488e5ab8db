"""Agent streams on the daemon side, over in-memory links (the gRPC bridge is covered by the
agent's real-grpclib tests and tests/e2e): identity at hello, refusals, replacement, liveness,
acknowledgement after durable writes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import betterproto2
import pytest
import trio

from common.link import MemoryLink, memory_link_pair
from daemon.agents.admission import SessionManager
from daemon.agents.enrollment import Enrollment
from daemon.agents.grpc_bridge import StreamEnd
from daemon.agents.registry import Registry
from daemon.store import models
from daemon.store.database import Database
from daemon.store.models import CommandHost, Host, HostConnection
from daemon.store.task_records import create_task
from daemon.store.writer import Writer
from daemon.taskspec import CommandSpec, TaskSpec
from proto.dispatch import v1 as pb
from tests.daemon.core_testing import open_acking_writer

TOKEN = "session-token-0123456789"


@dataclass
class Port:
    """The daemon side of the agent port, minus gRPC."""

    manager: SessionManager
    registry: Registry
    writer: Writer
    database: Database
    nursery: trio.Nursery

    async def connect(
        self, hello: pb.Hello | None, credential: str | None = TOKEN
    ) -> tuple[MemoryLink, trio.Event, list[StreamEnd | None]]:
        agent_end, daemon_end = memory_link_pair()
        ended = trio.Event()
        result: list[StreamEnd | None] = []

        async def serve() -> None:
            result.append(await self.manager.handle_stream(daemon_end, credential))
            await daemon_end.aclose()
            ended.set()

        self.nursery.start_soon(serve)
        if hello is not None:
            await agent_end.send(
                pb.AgentMessage(sent_monotonic_ns=time.monotonic_ns(), hello=hello)
            )
        return agent_end, ended, result


@pytest.fixture
async def port(
    db_url: str, nursery: trio.Nursery, request: pytest.FixtureRequest
) -> AsyncIterator[Port]:
    max_heartbeats_per_s = getattr(request, "param", 100.0)
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    database = Database(db, read_threads=2)
    async with open_acking_writer(database, queue_items=100, batch_events=100) as writer:
        registry = Registry()
        manager = SessionManager(
            registry=registry, writer=writer, database=database,
            authenticator=Enrollment(database, enrolment_token=TOKEN, auto_approve=True),
            hello_timeout_s=0.5,
            heartbeat_interval_s=0.1, heartbeat_ttl_s=0.6, daemon_version="test",
            max_heartbeats_per_s=max_heartbeats_per_s,
        )  # fmt: skip
        async with trio.open_nursery() as inner:
            await inner.start(manager.serve_liveness)
            yield Port(manager, registry, writer, database, inner)
            inner.cancel_scope.cancel()
    db.close_all()


def hello(host_id: str = "h1", **extra: object) -> pb.Hello:
    return pb.Hello(host_id=host_id, agent_version="9.9", hostname="box", **extra)  # type: ignore[arg-type]


async def next_kind(link: MemoryLink, kind: str) -> object:
    """The next message of ``kind``, skipping heartbeats."""
    with trio.fail_after(5):
        while True:
            message = await link.receive()
            found, value = betterproto2.which_one_of(message, "kind")
            if found == kind:
                return value
            assert found == "heartbeat", found


async def test_hello_fixes_the_identity_and_records_the_connection(port: Port) -> None:
    link, _, _ = await port.connect(hello(labels={"role": "web"}))
    welcome = await next_kind(link, "welcome")
    assert (welcome.host_id, welcome.heartbeat_interval_ms, welcome.heartbeat_ttl_ms) == (
        "h1",
        100,
        600,
    )
    assert port.registry.is_connected("h1")
    host = await port.database.read(Host.get_by_id, "h1")
    assert (host.status, host.labels, host.agent_version, host.hostname) == (
        "online",
        '{"role": "web"}',
        "9.9",
        "box",
    )


@pytest.mark.parametrize(
    ("credential", "first", "status"),
    [
        ("wrong-token-0123456789", hello(), "unauthenticated"),
        (None, hello(), "unauthenticated"),
        (TOKEN, hello(host_id="../etc/passwd"), "invalid_argument"),
        (TOKEN, hello(host_id=""), "invalid_argument"),
        (TOKEN, hello(labels={"bad key!": "x"}), "invalid_argument"),
    ],
)
async def test_refused_streams_leave_no_trace(
    port: Port, credential: str | None, first: pb.Hello, status: str
) -> None:
    _, ended, result = await port.connect(first, credential)
    with trio.fail_after(5):
        await ended.wait()
    assert result[0] is not None and result[0].status == status
    assert port.registry.statistics().connected == 0
    assert await port.database.read(lambda: Host.select().count()) == 0


async def test_a_stream_that_never_says_hello_is_closed(port: Port) -> None:
    _, ended, result = await port.connect(None)
    with trio.fail_after(5):
        await ended.wait()
    assert result == [StreamEnd("invalid_argument", "no hello in time")]


async def test_a_first_message_that_is_not_a_hello_is_refused(port: Port) -> None:
    link, ended, result = await port.connect(None)
    await link.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
    with trio.fail_after(5):
        await ended.wait()
    assert result[0] == StreamEnd("invalid_argument", "the first message must be a hello")


async def test_a_second_stream_for_the_host_replaces_the_first(port: Port) -> None:
    first, first_ended, _ = await port.connect(hello())
    welcome = await next_kind(first, "welcome")
    second, _, _ = await port.connect(hello(), welcome.credential)  # its own credential now
    await next_kind(second, "welcome")
    with trio.fail_after(5):
        await first_ended.wait()
    assert port.registry.is_connected("h1") and port.registry.statistics().replaced == 1
    host = await port.database.read(Host.get_by_id, "h1")
    assert host.status == "online"  # the older stream's end does not take the host offline
    reasons = await port.database.read(
        lambda: [c.close_reason for c in HostConnection.select().order_by(HostConnection.id)]
    )
    assert reasons == ["replaced by a newer connection from the same host", None]


async def test_a_silent_agent_is_dropped_after_the_heartbeat_ttl(port: Port) -> None:
    link, ended, _ = await port.connect(hello())
    await next_kind(link, "welcome")
    began = trio.current_time()
    with trio.fail_after(5):
        await ended.wait()
    assert trio.current_time() - began >= 0.5
    assert not port.registry.is_connected("h1")
    host = await port.database.read(Host.get_by_id, "h1")
    connection = await port.database.read(lambda: HostConnection.select().first())
    assert host.status == "offline" and "heartbeat TTL" in connection.close_reason


async def test_heartbeats_keep_a_stream_open(port: Port) -> None:
    link, ended, _ = await port.connect(hello())
    await next_kind(link, "welcome")
    for _ in range(10):
        await trio.sleep(0.1)
        await link.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
    assert not ended.is_set() and port.registry.is_connected("h1")


@pytest.mark.parametrize("port", [10.0], indirect=True)  # the fleet may beat 10 times a second
async def test_the_daemons_heartbeats_tell_the_first_agents_the_cadence_of_a_grown_fleet(
    port: Port,
) -> None:
    links: list[MemoryLink] = []

    async def keep_alive(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:  # agents beating at 0.1 s, as their welcome said
            task_status.started(scope)
            while True:
                for link in links:
                    await link.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
                await trio.sleep(0.1)

    first, first_ended, _ = await port.connect(hello("h0"))
    welcome = await next_kind(first, "welcome")
    assert (welcome.heartbeat_interval_ms, welcome.heartbeat_ttl_ms) == (100, 600)
    links.append(first)
    beating = await port.nursery.start(keep_alive)
    welcomes = []
    for index in range(1, 5):
        link, _, _ = await port.connect(hello(f"h{index}"))
        welcomes.append(await next_kind(link, "welcome"))
        links.append(link)
    # each joined a fleet of `index` others: 0.2, 0.3, 0.4, 0.5 s between beats
    assert [w.heartbeat_interval_ms for w in welcomes] == [200, 300, 400, 500]
    # five streams at 10 beats a second: 0.5 s. The first learns it from a heartbeat, maybe in
    # steps as the fleet grew, each more than a quarter apart; the last within a quarter of it.
    announced = []
    with trio.fail_after(5):
        while not announced or announced[-1].interval_ms < 400:
            beat = await first.receive()
            assert beat.heartbeat is not None
            if beat.heartbeat.interval_ms != 100:
                announced.append(beat.heartbeat)
    assert all(b.ttl_ms == 6 * b.interval_ms for b in announced)
    assert announced[-1].interval_ms in (400, 500)
    # and the longer TTL applies to it: silent for 1 s (past the old 0.6 s), it stays
    links.remove(first)
    await trio.sleep(1.0)
    assert not first_ended.is_set() and port.registry.is_connected("h0")
    beating.cancel()


async def test_events_are_acknowledged_once_durable(port: Port) -> None:
    link, _, _ = await port.connect(hello())
    await next_kind(link, "welcome")
    spec = TaskSpec(
        name="t", commands=(CommandSpec(script="true", timeout_s=5),), target_hosts=("h1",)
    )
    await port.database.write(create_task, spec, start=False, idempotency_key=None,
                              max_targets=5)  # fmt: skip
    ch_id = (await port.database.read(lambda: CommandHost.select().first())).id
    await port.writer.mark_dispatched([ch_id])
    now = time.monotonic_ns()
    await link.send(pb.AgentMessage(sent_monotonic_ns=now, events=pb.EventBatch(events=[
        pb.Event(command_host_id=ch_id, seq=1, monotonic_ns=now - 2_000_000_000,
                 started=pb.Started(pid=5)),
        pb.Event(command_host_id=ch_id, seq=2, monotonic_ns=now, finished=pb.Finished(
            outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=0, duration_ns=2 * 10**9)),
    ])))  # fmt: skip
    acks = await next_kind(link, "acks")
    assert [(a.command_host_id, a.seq) for a in acks.acks] == [(ch_id, 2)]
    row = await port.database.read(CommandHost.get_by_id, ch_id)
    assert row.status == "succeeded"
    # Times are the daemon's: the start is placed 2 s before the finish by the agent's own clock.
    assert row.finished_at - row.started_at == pytest.approx(2.0, abs=0.05)
