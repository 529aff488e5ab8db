"""What changed in a task after a change sequence number: the reads behind the live stream.

The writer stamps every row it writes (task, command_host, output_chunk) with a change sequence
number that grows with each commit, and publishes a live event after the commit. A watcher that
subscribed first and then reads here from its last seen number misses nothing and can drop what
it sees twice by number (``daemon.api.sse``). Synchronous: run through ``Database.read``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from peewee import fn

from daemon.api.live import LiveEvent
from daemon.store import models, views
from daemon.store.models import CommandHost, OutputChunk, Task
from daemon.store.queries import EXECUTION_COLUMNS, progress_counts

# --- consistent snapshots (the live stream's catch-up reads) ----------------------------------


@contextlib.contextmanager
def consistent_reads() -> Iterator[None]:
    """One read transaction: every SELECT inside sees the same committed state (SQLite WAL: a
    deferred transaction's snapshot; PostgreSQL: REPEATABLE READ)."""
    with models.database_proxy.atomic():
        if models.is_postgres(models.database_proxy.obj):
            models.database_proxy.execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield


# --- the live stream's reads -----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    seq: int  # the newest change of the task the database holds
    task: dict[str, Any]  # views.task_event_view
    progress: dict[str, Any]


@dataclass(frozen=True)
class Changes:
    events: list[LiveEvent]  # ordered by seq
    complete: bool  # False: more changes follow events[-1]; read again from there
    task: dict[str, Any]  # views.task_event_view, as of this read
    progress: dict[str, Any] | None  # when complete


def _task_row(task_id: int) -> dict[str, Any] | None:
    return Task.select().where(Task.id == task_id).dicts().first()


def task_snapshot(task_id: int) -> Snapshot | None:
    """The task's state now and the sequence number it is current to."""
    with consistent_reads():
        row = _task_row(task_id)
        if row is None:
            return None
        newest_execution = (
            CommandHost.select(fn.MAX(CommandHost.change_seq))
            .where(CommandHost.task == task_id)
            .scalar()
        )
        newest_output = (
            OutputChunk.select(fn.MAX(OutputChunk.change_seq))
            .where(OutputChunk.task_id == task_id)
            .scalar()
        )
        seq = max(row["change_seq"], newest_execution or 0, newest_output or 0)
        return Snapshot(
            seq, views.task_event_view(row), views.progress_view(progress_counts(task_id))
        )


def changes_since(
    task_id: int, after_seq: int, limit: int, *, include_output: bool = True
) -> Changes | None:
    """What changed in a task after ``after_seq``, as the live events that described it:
    ``execution`` for each CommandHost row whose change_seq is greater (its current state),
    ``output`` for each output chunk, ``task`` for the task row; by seq, at most ``limit`` rows
    from each table, cut where a table may have more (``complete`` False). With ``complete`` the
    progress after these changes comes too. One consistent snapshot."""
    with consistent_reads():
        row = _task_row(task_id)
        if row is None:
            return None
        bound: int | None = None
        query = (
            CommandHost.select(*EXECUTION_COLUMNS, CommandHost.change_seq)
            .where(CommandHost.task == task_id, CommandHost.change_seq > after_seq)
            .order_by(CommandHost.change_seq)
            .limit(limit)
        )
        events = []
        for values in query.tuples():
            execution = dict(zip(views.EXECUTION_FIELDS, values, strict=False))
            events.append(
                LiveEvent(values[-1], task_id, "execution", views.execution_view(execution))
            )
        if len(events) == limit:
            bound = events[-1].seq
        if include_output:
            query = (
                OutputChunk.select(
                    OutputChunk.change_seq,
                    OutputChunk.command_host,
                    CommandHost.host_id,
                    OutputChunk.stream,
                    OutputChunk.offset,
                    OutputChunk.data,
                )  # fmt: skip
                .join(CommandHost, on=(OutputChunk.command_host == CommandHost.id))
                .where(OutputChunk.task_id == task_id, OutputChunk.change_seq > after_seq)
                .order_by(OutputChunk.change_seq)
                .limit(limit)
            )
            outputs = [
                LiveEvent(
                    seq,
                    task_id,
                    "output",
                    {
                        "execution_id": str(execution_id),
                        "host_id": host_id,
                        "stream": "stdout" if stream == 1 else "stderr",
                        "offset": offset,
                        "data": bytes(data),
                    },
                )  # fmt: skip
                for seq, execution_id, host_id, stream, offset, data in query.tuples()
            ]
            if len(outputs) == limit:
                bound = outputs[-1].seq if bound is None else min(bound, outputs[-1].seq)
            events.extend(outputs)
        task = views.task_event_view(row)
        if row["change_seq"] > after_seq:
            events.append(LiveEvent(row["change_seq"], task_id, "task", task))
        if bound is not None:
            events = [event for event in events if event.seq <= bound]
        events.sort(key=lambda event: event.seq)
        progress = None if bound is not None else views.progress_view(progress_counts(task_id))
        return Changes(events, bound is None, task, progress)
