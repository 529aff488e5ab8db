"""Hostile agent streams on the daemon side, over in-memory links with the real session layer,
the real writer and a real database (a SQLite file, and PostgreSQL when configured): every
refused stream gets its status (and a ``Refusal``) and ends, every refused event is counted,
logged and not acknowledged where that is the contract, and nothing changes.

How "no acknowledgement" is observed without waiting for nothing: after the hostile events the
agent sends one good event for a second execution of its own (the sentinel); the writer keeps
order, so once the sentinel's acknowledgement arrives every earlier event has been decided.
What needs the real gRPC transport (bytes that are not protobuf, a message over the size
limit): ``test_grpc_hostile.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import betterproto2
import pytest
import trio

from common.link import MemoryLink
from daemon.agents.grpc_bridge import StreamEnd
from daemon.states import ExecStatus, Reason
from daemon.store.models import CommandHost, Host, HostConnection
from daemon.store.task_records import create_task
from daemon.taskspec import CommandSpec, TaskSpec
from proto.dispatch import v1 as pb
from tests.daemon.test_session import TOKEN, Port, hello
from tests.hostile.catalogue import case, table_counts

pytestmark = pytest.mark.hostile


# ------------------------------------------------------------------------------------ helpers


def started(ch_id: int, seq: int) -> pb.Event:
    return pb.Event(command_host_id=ch_id, seq=seq, monotonic_ns=time.monotonic_ns(),
                    started=pb.Started(pid=4242))  # fmt: skip


def finished(ch_id: int, seq: int, exit_code: int = 0) -> pb.Event:
    done = pb.Finished(outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=exit_code,
                       duration_ns=10**6)  # fmt: skip
    return pb.Event(command_host_id=ch_id, seq=seq, monotonic_ns=time.monotonic_ns(),
                    finished=done)  # fmt: skip


def output(ch_id: int, seq: int, *, stream: int = 1, offset: int = 0,
           data: bytes = b"x") -> pb.Event:  # fmt: skip
    return pb.Event(command_host_id=ch_id, seq=seq, monotonic_ns=time.monotonic_ns(),
                    output=pb.Output(stream=stream, offset=offset, data=data))  # type: ignore[arg-type]  # fmt: skip


def batch(events: Sequence[pb.Event]) -> pb.AgentMessage:
    return pb.AgentMessage(sent_monotonic_ns=time.monotonic_ns(),
                           events=pb.EventBatch(events=list(events)))  # fmt: skip


@dataclass
class Agent:
    """One connected fake agent: its link, its credential, and a heartbeat that keeps the stream
    alive while a test takes its time."""

    host_id: str
    link: MemoryLink
    ended: trio.Event
    result: list[StreamEnd | None]
    credential: str
    received: list[pb.ServerMessage]

    async def send(self, message: pb.AgentMessage) -> None:
        await self.link.send(message)

    async def acks_until(self, ch_id: int, seq: int) -> dict[int, int]:
        """Every acknowledgement received until (command_host_id, seq) is acknowledged."""
        acks: dict[int, int] = {}
        with trio.fail_after(5):
            while acks.get(ch_id, 0) < seq:
                message = await self.link.receive()
                self.received.append(message)
                kind, value = betterproto2.which_one_of(message, "kind")
                if kind == "acks":
                    for ack in value.acks:
                        acks[ack.command_host_id] = max(acks.get(ack.command_host_id, 0), ack.seq)
        return acks

    async def wait_ended(self) -> StreamEnd | None:
        with trio.fail_after(5):
            await self.ended.wait()
        return self.result[0]


async def connect(port: Port, host_id: str, credential: str = TOKEN, *,
                  heartbeat: bool = True) -> Agent:  # fmt: skip
    link, ended, result = await port.connect(hello(host_id), credential)
    received: list[pb.ServerMessage] = []
    with trio.fail_after(5):
        while True:
            message = await link.receive()
            kind, value = betterproto2.which_one_of(message, "kind")
            if kind == "welcome":
                break
            assert kind == "heartbeat", (kind, value)
    agent = Agent(host_id, link, ended, result, value.credential or credential, received)

    async def beat() -> None:
        try:
            while not ended.is_set():
                await link.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
                await trio.sleep(0.1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    if heartbeat:
        port.nursery.start_soon(beat)
    return agent


@dataclass
class World:
    """Host h1 with two dispatched executions (``target`` and the ``sentinel``), host h2, and
    both agents connected."""

    port: Port
    h1: Agent
    h2: Agent
    target: int
    sentinel: int

    async def row(self, ch_id: int) -> dict[str, Any]:
        return await self.port.database.read(
            lambda: CommandHost.select().where(CommandHost.id == ch_id).dicts().get()
        )

    async def counts(self) -> dict[str, int]:
        return await self.port.database.read(table_counts)

    def refused(self) -> int:
        return self.port.writer.statistics().refused

    def duplicates(self) -> int:
        return self.port.writer.statistics().duplicates


@pytest.fixture
async def world(port: Port) -> World:
    h1 = await connect(port, "h1")
    h2 = await connect(port, "h2")
    spec = TaskSpec(
        name="t",
        commands=(CommandSpec(script="true", timeout_s=60),) * 2,
        target_hosts=("h1",),
    )  # fmt: skip
    await port.database.write(create_task, spec, start=False, idempotency_key=None, max_targets=5)
    ids = await port.database.read(
        lambda: [r.id for r in CommandHost.select().order_by(CommandHost.command_index)]
    )
    await port.writer.mark_dispatched(ids)
    with trio.fail_after(5):
        while (await port.database.read(CommandHost.get_by_id, ids[1])).status != "dispatched":  # noqa: ASYNC110
            await trio.sleep(0.01)
    return World(port, h1, h2, ids[0], ids[1])


async def refused_without_ack(world: World, agent: Agent, events: list[pb.Event], *,
                              refused: int, caplog: pytest.LogCaptureFixture,
                              log: str) -> dict[int, int]:  # fmt: skip
    """Send ``events`` then the sentinel; the events must be refused (counted and logged), none
    acknowledged, and nothing changed but the sentinel's row."""
    before_row, before_counts = await world.row(world.target), await world.counts()
    refused_before = world.refused()
    with caplog.at_level(logging.WARNING, logger="daemon.store.ledger"):
        await agent.send(batch(events))
        await world.h1.send(batch([started(world.sentinel, 1)]))
        acks = await world.h1.acks_until(world.sentinel, 1)
    assert world.refused() - refused_before == refused
    assert log in caplog.text, caplog.text
    assert world.target not in acks, acks
    assert await world.row(world.target) == before_row
    assert await world.counts() == before_counts
    return acks


# ------------------------------------------------------------------------------- the cases


@case(
    "stream.forged_host_id",
    given="h2 sends Started and Finished for h1's execution",
    answer="both refused and logged ('is not its own'), not acknowledged, h1's row unchanged",
)
async def test_events_for_another_hosts_execution(world: World, caplog) -> None:
    events = [started(world.target, 1), finished(world.target, 2)]
    log = f"host h2 reported execution {world.target}, which is not its own"
    await refused_without_ack(world, world.h2, events, refused=2, caplog=caplog, log=log)
    assert (await world.row(world.target))["status"] == "dispatched"


@case(
    "stream.unknown_execution",
    given="Started for execution 987654321, which does not exist",
    answer="refused and logged ('does not exist'), not acknowledged",
)
async def test_events_for_an_unknown_execution(world: World, caplog) -> None:
    await refused_without_ack(world, world.h1, [started(987_654_321, 1)], refused=1, caplog=caplog,
                              log="reported execution 987654321, which does not exist")  # fmt: skip


@case(
    "stream.gap_in_seq",
    given="seq 1 (Started) then seq 3 (Finished): seq 2 never sent",
    answer="seq 3 refused unacknowledged (the agent replays); the execution stays running",
)
async def test_a_gap_is_refused(world: World, caplog) -> None:
    await world.h1.send(batch([started(world.target, 1)]))
    assert (await world.h1.acks_until(world.target, 1))[world.target] == 1
    log = "event seq 3 refused (stored up to 1"
    events = [finished(world.target, 3)]
    acks = await refused_without_ack(world, world.h1, events, refused=1, caplog=caplog, log=log)
    row = await world.row(world.target)
    assert (row["status"], row["last_seq"], row["exit_code"]) == ("running", 1, None)
    assert world.target not in acks


@case(
    "stream.out_of_order_seq",
    given="seq 2 (Finished) arrives before seq 1 (Started)",
    answer="seq 2 refused unacknowledged; seq 1 then accepted: nothing skipped",
)
async def test_out_of_order_events(world: World, caplog) -> None:
    await refused_without_ack(world, world.h1, [finished(world.target, 2)], refused=1,
                              caplog=caplog, log="event seq 2 refused (stored up to 0")  # fmt: skip
    await world.h1.send(batch([started(world.target, 1)]))
    assert (await world.h1.acks_until(world.target, 1))[world.target] == 1
    row = await world.row(world.target)
    assert (row["status"], row["last_seq"]) == ("running", 1)


@case(
    "stream.replayed_seq",
    given="seq 1 Started, then seq 1 again carrying a Finished exit 0",
    answer="the replay is a duplicate: ignored, acknowledged up to 1, the execution stays running",
)
async def test_a_replay_with_other_content_is_ignored(world: World) -> None:
    await world.h1.send(batch([started(world.target, 1)]))
    await world.h1.acks_until(world.target, 1)
    before_row, duplicates = await world.row(world.target), world.duplicates()
    await world.h1.send(batch([finished(world.target, 1)]))
    acks = await world.h1.acks_until(world.target, 1)
    assert acks[world.target] == 1
    assert world.duplicates() - duplicates == 1
    assert await world.row(world.target) == before_row
    assert before_row["status"] == "running"


@case(
    "stream.seq_zero",
    given="an event with seq 0 (sequences start at 1)",
    answer="ignored as already held, nothing acknowledged, nothing changed",
)
async def test_seq_zero(world: World) -> None:
    before_row, counts, duplicates = (
        await world.row(world.target),
        await world.counts(),
        world.duplicates(),
    )
    await world.h1.send(batch([finished(world.target, 0), started(world.sentinel, 1)]))
    acks = await world.h1.acks_until(world.sentinel, 1)
    assert world.target not in acks
    assert world.duplicates() - duplicates == 1
    assert await world.row(world.target) == before_row
    assert await world.counts() == counts


@case(
    "stream.result_for_terminal_execution",
    given="Started + Finished exit 0 for an execution already settled failed/agent_lost",
    answer="acknowledged (so the agent's journal drains) but the recorded outcome stays",
)
async def test_a_result_for_an_execution_already_over(world: World) -> None:
    await world.port.writer.settle([world.target], ExecStatus.FAILED, Reason.AGENT_LOST, "lost")
    with trio.fail_after(5):
        while (await world.row(world.target))["status"] != "failed":  # noqa: ASYNC110
            await trio.sleep(0.01)
    before = await world.row(world.target)
    await world.h1.send(batch([started(world.target, 1), finished(world.target, 2)]))
    acks = await world.h1.acks_until(world.target, 2)
    assert acks[world.target] == 2
    after = await world.row(world.target)
    assert {k: v for k, v in after.items() if k != "last_seq"} == {
        k: v for k, v in before.items() if k != "last_seq"
    }
    assert (after["status"], after["reason"], after["exit_code"], after["started_at"]) == (
        "failed", "agent_lost", None, None,
    )  # fmt: skip


@case(
    "stream.unknown_output_stream",
    given="Output with stream = 7 (no such OutputStream)",
    answer="the seq is consumed and acknowledged, the bytes are not stored, a warning is logged",
)
async def test_output_for_an_unknown_stream(world: World, caplog) -> None:
    await world.h1.send(batch([started(world.target, 1)]))
    await world.h1.acks_until(world.target, 1)
    counts = await world.counts()
    with caplog.at_level(logging.WARNING, logger="daemon.store.ledger"):
        await world.h1.send(batch([output(world.target, 2, stream=7, data=b"hidden")]))
        await world.h1.acks_until(world.target, 2)
    assert "output for unknown stream 7 ignored" in caplog.text
    row = await world.row(world.target)
    assert (row["stdout_bytes"], row["stderr_bytes"], row["status"]) == (0, 0, "running")
    assert await world.counts() == counts


@case(
    "stream.absurd_offset",
    given="Output at offset 2**64 - 5 (beyond any column)",
    answer="refused and logged, not acknowledged; the daemon keeps running",
)
async def test_an_absurd_output_offset(world: World, caplog) -> None:
    await world.h1.send(batch([started(world.target, 1)]))
    await world.h1.acks_until(world.target, 1)
    await refused_without_ack(world, world.h1, [output(world.target, 2, offset=2**64 - 5)],
                              refused=1, caplog=caplog, log="refused")  # fmt: skip


@case(
    "stream.absurd_execution_id",
    given="Started for execution 2**64 - 1",
    answer="refused and logged; the daemon keeps running",
)
async def test_an_absurd_execution_id(world: World, caplog) -> None:
    await refused_without_ack(world, world.h1, [started(2**64 - 1, 1)], refused=1, caplog=caplog,
                              log="18446744073709551615")  # fmt: skip


@case(
    "stream.list_typed_execution_id",
    given="an Event whose command_host_id was sent with wire type 2 (decodes as [5, 6])",
    answer="refused and logged, not acknowledged, nothing written; the daemon keeps running",
)
async def test_a_wrongly_typed_field(world: World, caplog) -> None:
    event = bytes(started(0, 1))
    bad_event = b"\x0a\x02\x05\x06" + event  # field 1 as a length-delimited (packed) value
    bad_batch = b"\x0a" + bytes([len(bad_event)]) + bad_event
    message = pb.AgentMessage.parse(b"\x22" + bytes([len(bad_batch)]) + bad_batch)
    events = list(message.events.events)
    assert events[0].command_host_id == [5, 6]  # what the decoder hands over
    await refused_without_ack(world, world.h1, events, refused=1, caplog=caplog, log="refused")


# --------------------------------------------------------------------- hello and protocol


async def refused_stream(port: Port, first: pb.AgentMessage | None, *, credential: str = TOKEN,
                         status: str, message: str | None = None) -> None:  # fmt: skip
    """The stream opened with ``first`` ends with ``status``, after a Refusal with the same
    code; no host, connection or execution row appears."""
    counts = await port.database.read(table_counts)
    link, ended, result = await port.connect(None, credential)
    if first is not None:
        await link.send(first)
    with trio.fail_after(5):
        await ended.wait()
    end = result[0]
    assert end is not None and end.status == status, end
    if message is not None:
        assert end.message == message, end
    refusals = []
    with trio.fail_after(5):
        while True:
            try:
                sent = await link.receive()
            except trio.EndOfChannel:
                break
            refusals.append(sent.refusal)
    assert [r.code for r in refusals if r is not None] == [status], refusals
    assert await port.database.read(table_counts) == counts
    assert not port.registry.is_connected("h1")


@case(
    "stream.events_before_hello",
    given="an EventBatch as the first message",
    answer="Refusal(invalid_argument) + status invalid_argument, stream closed, no rows",
)
async def test_events_before_hello(port: Port) -> None:
    await refused_stream(port, batch([started(1, 1)]), status="invalid_argument",
                         message="the first message must be a hello")  # fmt: skip


@case(
    "stream.empty_first_message",
    given="an empty AgentMessage (no kind) as the first message",
    answer="Refusal(invalid_argument) + status invalid_argument, stream closed, no rows",
)
async def test_an_empty_first_message(port: Port) -> None:
    await refused_stream(port, pb.AgentMessage(), status="invalid_argument",
                         message="the first message must be a hello")  # fmt: skip


@case(
    "stream.too_many_labels",
    given="a hello with 65 labels (at most 64)",
    answer="Refusal(invalid_argument) + status invalid_argument, no host row",
)
async def test_too_many_labels(port: Port) -> None:
    labels = {f"k{i}": "v" for i in range(65)}
    first = pb.AgentMessage(hello=hello("h1", labels=labels))
    await refused_stream(port, first, status="invalid_argument", message="at most 64 labels")


@case(
    "stream.host_id_nul",
    given="a hello with host_id 'h1\\x00'",
    answer="Refusal(invalid_argument) + status invalid_argument, no host row",
)
async def test_a_host_id_with_nul(port: Port) -> None:
    await refused_stream(port, pb.AgentMessage(hello=hello("h1\x00")), status="invalid_argument")


@case(
    "stream.label_value_nul",
    given="a hello with labels {'role': 'web\\x00'}",
    answer="Refusal(invalid_argument) + status invalid_argument, no host row",
)
async def test_a_label_value_with_nul(port: Port) -> None:
    first = pb.AgentMessage(hello=hello("h1", labels={"role": "web\x00"}))
    await refused_stream(port, first, status="invalid_argument")


@case(
    "stream.host_id_dot_dot",
    given="a hello with host_id '..'",
    answer="Refusal(invalid_argument) + status invalid_argument, no host row",
)
async def test_a_host_id_of_dots(port: Port) -> None:
    await refused_stream(port, pb.AgentMessage(hello=hello("..")), status="invalid_argument")


@case(
    "stream.second_hello",
    given="a second Hello (as host h2) on h1's open stream",
    answer="the stream is closed as a protocol error; the identity stays h1; no h2 row",
)
async def test_a_second_hello_closes_the_stream(world: World) -> None:
    counts = await world.counts()
    await world.h1.send(pb.AgentMessage(hello=hello("h3")))
    await world.h1.wait_ended()
    reason = await world.port.database.read(
        lambda: HostConnection.select().where(HostConnection.host_id == "h1")
        .order_by(HostConnection.id.desc()).first().close_reason
    )  # fmt: skip
    assert reason == "protocol error: unexpected hello message"
    assert await world.port.database.read(lambda: Host.get_or_none(Host.id == "h3")) is None
    assert await world.counts() == counts
    assert not world.port.registry.is_connected("h1")
    assert world.port.registry.is_connected("h2")


@case(
    "stream.empty_message_after_hello",
    given="an empty AgentMessage on an open stream",
    answer="the stream is closed as a protocol error ('unexpected empty message')",
)
async def test_an_empty_message_closes_the_stream(world: World) -> None:
    await world.h2.send(pb.AgentMessage())
    await world.h2.wait_ended()
    reason = await world.port.database.read(
        lambda: HostConnection.select().where(HostConnection.host_id == "h2")
        .order_by(HostConnection.id.desc()).first().close_reason
    )  # fmt: skip
    assert reason == "protocol error: unexpected empty message"
    assert (await world.row(world.target))["status"] == "dispatched"


@case(
    "stream.protocol_error_status",
    given="a second Hello on an open stream",
    answer="the stream ends with status invalid_argument after a Refusal(invalid_argument)",
)
async def test_a_protocol_error_ends_with_a_status(world: World) -> None:
    await world.h1.send(pb.AgentMessage(hello=hello("h1")))
    end = await world.h1.wait_ended()
    assert end is not None and end.status == "invalid_argument"
