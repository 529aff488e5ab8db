"""The writer and its ledger against a real SQLite file: order, dedup, caps, one winner."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store import models
from daemon.store.database import Database
from daemon.store.models import CommandHost, OutputChunk, Task
from daemon.store.task_records import create_task
from daemon.store.writer import Writer, open_writer
from daemon.taskspec import CommandSpec, TaskSpec
from proto.dispatch import v1 as pb
from tests.daemon.core_testing import open_acking_writer

LIMIT = 1000  # max_output_bytes: 500 head + 500 tail per stream


@dataclass(eq=False)
class RecordingSink:
    acks: dict[int, int] = field(default_factory=dict)

    def ack_nowait(self, acks: dict[int, int]) -> None:
        for ch_id, seq in acks.items():
            self.acks[ch_id] = max(self.acks.get(ch_id, 0), seq)


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    with db.connection_context():
        models.Host.insert_many(
            [{"id": h, "first_seen_at": 0.0, "labels": "{}"} for h in ("h1", "h2")]
        ).execute()
    yield Database(db, read_threads=2)
    db.close_all()


@pytest.fixture
async def writer(database: Database) -> AsyncIterator[Writer]:
    async with open_acking_writer(
        database, max_output_bytes=LIMIT, queue_items=100, batch_events=50, batch_age_s=0.01,
    ) as w:
        yield w


async def new_task(database: Database, hosts: tuple[str, ...] = ("h1", "h2")) -> dict[str, int]:
    spec = TaskSpec(
        name="t", commands=(CommandSpec(script="true", timeout_s=5),), target_hosts=hosts
    )
    task_id, _ = await database.write(create_task, spec, start=True, idempotency_key=None,
                                      max_targets=10)  # fmt: skip
    rows = await database.read(
        lambda: list(CommandHost.select().where(CommandHost.task == task_id))
    )
    return {row.host_id: row.id for row in rows}


async def row(database: Database, ch_id: int) -> CommandHost:
    return await database.read(CommandHost.get_by_id, ch_id)


def event(ch_id: int, seq: int, **kind: object) -> tuple[pb.Event, float]:
    return pb.Event(command_host_id=ch_id, seq=seq, monotonic_ns=1, **kind), time.time()


def out(ch_id: int, seq: int, offset: int, data: bytes, stream: int = 1) -> tuple[pb.Event, float]:
    return event(ch_id, seq, output=pb.Output(stream=pb.OutputStream(stream), offset=offset,
                                              data=data))  # fmt: skip


def finished(ch_id: int, seq: int, code: int = 0, stdout: int = 0) -> tuple[pb.Event, float]:
    return event(ch_id, seq, finished=pb.Finished(
        outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=code, stdout_bytes=stdout,
        duration_ns=2_500_000_000,
    ))  # fmt: skip


async def settle_writes(writer: Writer) -> None:
    """Wait until everything queued so far is written (a task change is a barrier) and its
    subscribers (the acknowledgements) have read it."""
    await writer.change_task(0, None, frozenset())
    await trio.testing.wait_all_tasks_blocked()


async def stored(database: Database, ch_id: int, stream: int = 1) -> list[tuple[int, bytes]]:
    rows = await database.read(lambda: list(
        OutputChunk.select(OutputChunk.offset, OutputChunk.data)
        .where((OutputChunk.command_host == ch_id) & (OutputChunk.stream == stream))
        .order_by(OutputChunk.offset).tuples()
    ))  # fmt: skip
    return [(offset, bytes(data)) for offset, data in rows]


async def test_a_whole_execution_is_recorded_and_acknowledged_after_commit(
    database: Database, writer: Writer
) -> None:
    ids = await new_task(database)
    sink = RecordingSink()
    ch = ids["h1"]
    await writer.mark_dispatched([ch])
    await writer.record_events("h1", sink, [
        event(ch, 1, started=pb.Started(pid=42)), out(ch, 2, 0, b"hello "),
        out(ch, 3, 6, b"world\n"), finished(ch, 4, code=0, stdout=12),
    ])  # fmt: skip
    await settle_writes(writer)
    record = await row(database, ch)
    assert (record.status, record.reason, record.exit_code, record.signal) == (
        "succeeded",
        "exit_zero",
        0,
        None,
    )
    assert record.pid == 42 and record.last_seq == 4 and record.duration_s == 2.5
    assert record.started_at is not None and record.finished_at >= record.started_at
    assert (record.stdout_bytes, record.output_truncated) == (12, False)
    assert record.output_digest is not None
    assert await stored(database, ch) == [(0, b"hello "), (6, b"world\n")]
    assert sink.acks == {ch: 4}


async def test_duplicates_are_acknowledged_but_not_applied_and_gaps_are_refused(
    database: Database, writer: Writer
) -> None:
    ch = (await new_task(database))["h1"]
    sink = RecordingSink()
    await writer.mark_dispatched([ch])
    await writer.record_events(
        "h1", sink, [event(ch, 1, started=pb.Started(pid=1)), out(ch, 2, 0, b"abc")]
    )
    await writer.record_events(
        "h1",
        sink,
        [
            out(ch, 2, 0, b"abc"),  # replayed after a reconnect
            out(ch, 4, 3, b"gap"),
        ],
    )  # seq 3 never arrived
    await settle_writes(writer)
    assert await stored(database, ch) == [(0, b"abc")]
    assert sink.acks == {ch: 2}
    assert (await row(database, ch)).last_seq == 2
    stats = writer.statistics()
    assert (stats.duplicates, stats.refused) == (1, 1)


async def test_events_for_another_hosts_execution_change_nothing(
    database: Database, writer: Writer
) -> None:
    ids = await new_task(database)
    sink = RecordingSink()
    await writer.mark_dispatched([ids["h1"]])
    await writer.record_events(
        "h2",
        sink,
        [
            event(ids["h1"], 1, started=pb.Started(pid=1)),
            event(999_999, 1, started=pb.Started(pid=1)),
        ],
    )
    await settle_writes(writer)
    assert (await row(database, ids["h1"])).status == "dispatched"
    assert sink.acks == {}
    assert writer.statistics().refused == 2


async def test_events_for_an_execution_never_dispatched_are_refused(
    database: Database, writer: Writer
) -> None:
    ch = (await new_task(database))["h1"]
    sink = RecordingSink()
    await writer.record_events("h1", sink, [event(ch, 1, started=pb.Started(pid=1))])
    await settle_writes(writer)
    assert (await row(database, ch)).status == "pending"
    assert sink.acks == {}


async def test_output_keeps_the_head_and_the_tail_and_counts_what_was_dropped(
    database: Database, writer: Writer
) -> None:
    ch = (await new_task(database))["h1"]
    sink = RecordingSink()
    data = bytes(range(256)) * 12  # 3072 bytes in 100-byte chunks (the last one 72)
    events = [event(ch, 1, started=pb.Started(pid=1))]
    for index, offset in enumerate(range(0, len(data), 100)):
        events.append(out(ch, index + 2, offset, data[offset : offset + 100]))
    events.append(finished(ch, len(events) + 1, stdout=len(data)))
    await writer.mark_dispatched([ch])
    await writer.record_events("h1", sink, events)
    await settle_writes(writer)
    chunks = await stored(database, ch)
    head = b"".join(d for o, d in chunks if o < LIMIT // 2)
    tail_rows = [(o, d) for o, d in chunks if o >= LIMIT // 2]
    assert head == data[:500]
    tail = b"".join(d for _, d in tail_rows)
    # Whole rows are pruned: the kept tail covers at least the last 500 bytes, at most one row more.
    assert data.endswith(tail) and 500 <= len(tail) < 600
    assert tail_rows[0][0] == len(data) - len(tail)
    record = await row(database, ch)
    assert (record.stdout_bytes, record.output_truncated, record.status) == (
        3072,
        True,
        "succeeded",
    )


async def test_overlapping_and_skipping_output_is_stored_once(
    database: Database, writer: Writer
) -> None:
    ch = (await new_task(database))["h1"]
    await writer.mark_dispatched([ch])
    await writer.record_events("h1", RecordingSink(), [
        event(ch, 1, started=pb.Started(pid=1)),
        out(ch, 2, 0, b"0123456789"),
        out(ch, 3, 5, b"56789ABCDE"),  # overlaps: only ABCDE is new
        out(ch, 4, 40, b"xyz"),  # the agent skipped 15..40 (live limit passed)
        finished(ch, 5, stdout=43),
    ])  # fmt: skip
    await settle_writes(writer)
    assert await stored(database, ch) == [(0, b"0123456789"), (10, b"ABCDE"), (40, b"xyz")]
    assert (await row(database, ch)).output_truncated is True


async def test_a_terminal_state_never_changes_again(database: Database, writer: Writer) -> None:
    ch = (await new_task(database))["h1"]
    await writer.mark_dispatched([ch])
    await writer.settle([ch], ExecStatus.FAILED, Reason.AGENT_LOST, "gone")
    await writer.record_events("h1", RecordingSink(), [
        event(ch, 1, started=pb.Started(pid=1)), finished(ch, 2, code=0)])  # fmt: skip
    await writer.settle([ch], ExecStatus.CANCELLED, Reason.USER_CANCEL, "late")
    await settle_writes(writer)
    record = await row(database, ch)
    assert (record.status, record.reason, record.error, record.exit_code) == (
        "failed",
        "agent_lost",
        "gone",
        None,
    )


async def test_cancel_reason_decides_what_a_cancelled_report_means(
    database: Database, writer: Writer
) -> None:
    ids = await new_task(database)
    for host, reason in (("h1", Reason.TIMEOUT), ("h2", Reason.USER_CANCEL)):
        ch = ids[host]
        await writer.mark_dispatched([ch])
        await writer.note_cancel([ch], reason)
        await writer.record_events(host, RecordingSink(), [
            event(ch, 1, started=pb.Started(pid=1)),
            event(ch, 2, finished=pb.Finished(outcome=pb.Outcome.CANCELLED, signal=15)),
        ])  # fmt: skip
    await settle_writes(writer)
    first, second = await row(database, ids["h1"]), await row(database, ids["h2"])
    assert (first.status, first.reason, first.signal) == ("timed_out", "timeout", 15)
    assert (second.status, second.reason, second.exit_code) == ("cancelled", "user_cancel", None)


async def test_task_changes_are_conditional(database: Database, writer: Writer) -> None:
    await new_task(database)
    task_id = (await database.read(lambda: Task.select().first())).id
    assert await writer.change_task(
        task_id, TaskStatus.RUNNING, frozenset({TaskStatus.QUEUED}), started_at=1.0
    )
    assert not await writer.change_task(
        task_id, TaskStatus.RUNNING, frozenset({TaskStatus.QUEUED}), started_at=2.0
    )
    task = await database.read(Task.get_by_id, task_id)
    assert (task.status, task.started_at) == ("running", 1.0)
    assert task.change_seq > 0


async def test_subscribers_read_durable_transitions(database: Database, writer: Writer) -> None:
    ch = (await new_task(database))["h1"]
    commits = writer.feed.subscribe("test")
    await writer.mark_dispatched([ch])
    await writer.record_events("h1", RecordingSink(), [
        event(ch, 1, started=pb.Started(pid=1)), finished(ch, 2, code=3)])  # fmt: skip
    await settle_writes(writer)
    heard: list[tuple[int, ExecStatus, str | None]] = []
    while True:
        try:
            committed = commits.receive_nowait()
        except trio.WouldBlock:
            break
        heard.extend(committed.transitions)
        assert all(committed.executions[i].change_seq <= committed.last_seq for i, _, _ in heard)
    assert heard == [
        (ch, ExecStatus.DISPATCHED, None),
        (ch, ExecStatus.RUNNING, None),
        (ch, ExecStatus.FAILED, Reason.EXIT_NONZERO),
    ]


async def test_many_events_share_few_transactions(database: Database, writer: Writer) -> None:
    ids = await new_task(database, hosts=("h1", "h2"))
    sink = RecordingSink()
    await writer.mark_dispatched(list(ids.values()))
    async with trio.open_nursery() as nursery:
        for host, ch in ids.items():

            async def report(host: str = host, ch: int = ch) -> None:
                for seq in range(2, 102):
                    await writer.record_events(host, sink, [out(ch, seq, seq * 10, b"x" * 10)])

            await writer.record_events(host, sink, [event(ch, 1, started=pb.Started(pid=1))])
            nursery.start_soon(report)
    await settle_writes(writer)
    stats = writer.statistics()
    assert stats.events == 202
    assert stats.batches < 202 / 5
    assert sink.acks == {ids["h1"]: 101, ids["h2"]: 101}


async def test_restart_resumes_dedup_from_the_database(database: Database) -> None:
    ch = (await new_task(database))["h1"]
    sink = RecordingSink()
    settings = dict(
        max_output_bytes=LIMIT,
        queue_items=100,
        batch_events=50,
        batch_age_s=0.01,
        close_timeout_s=5,
    )
    async with open_writer(database, **settings) as first:
        await first.mark_dispatched([ch])
        await first.record_events(
            "h1", sink, [event(ch, 1, started=pb.Started(pid=1)), out(ch, 2, 0, b"before ")]
        )
    async with open_writer(database, **settings) as second:
        await second.record_events(
            "h1",
            sink,
            [out(ch, 2, 0, b"before "), out(ch, 3, 7, b"after"), finished(ch, 4, stdout=12)],
        )
        await settle_writes(second)
    assert await stored(database, ch) == [(0, b"before "), (7, b"after")]
    record = await row(database, ch)
    assert (record.status, record.stdout_bytes, record.last_seq) == ("succeeded", 12, 4)
    assert record.output_digest is not None


async def test_a_chunk_across_the_heads_end_is_split_so_the_head_is_exact(
    database: Database, writer: Writer
) -> None:
    ch = (await new_task(database))["h1"]
    data = bytes(range(256)) * 8  # 2048 bytes in two 1024-byte chunks
    await writer.mark_dispatched([ch])
    await writer.record_events("h1", RecordingSink(), [
        event(ch, 1, started=pb.Started(pid=1)), out(ch, 2, 0, data[:1024]),
        out(ch, 3, 1024, data[1024:]), finished(ch, 4, stdout=len(data)),
    ])  # fmt: skip
    await settle_writes(writer)
    assert await stored(database, ch) == [(0, data[:500]), (1024, data[1024:])]
    record = await row(database, ch)
    assert (record.stdout_bytes, record.output_truncated) == (2048, True)
