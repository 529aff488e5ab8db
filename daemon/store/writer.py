"""The batch writer: every change to executions and tasks, in one order, one transaction a batch.

Producers (agent sessions, the engine, the task use cases) put ``write_ops`` into a bounded
channel and wait when it is full, which slows agents through gRPC flow control instead of growing
memory (their journals hold what is not yet acknowledged). A batch closes when it reaches
``batch_events`` changes or its first change is ``batch_age_s`` old. The batch is planned by the
ledger and written by the injected ``flush`` (the database's in a worker thread, or an in-memory
one in tests). After it committed, and only then, the writer publishes one ``Committed`` value on
its feed (``store.commits``): whoever reacts reads it there, in its own task. Callers of
``change_task`` get their answer. A database that fails transiently (locked, disk full,
connection lost) is retried with backoff while producers wait; nothing is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import peewee
import trio

from common.retry import Backoff
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store import flush
from daemon.store.commits import CommitFeed, Committed, OutputRow, TaskRowChange
from daemon.store.database import Database
from daemon.store.ledger import Ledger
from daemon.store.write_ops import (
    AckSink,
    AgentEvents,
    MarkDispatched,
    NoteCancel,
    Op,
    Settle,
    TaskChange,
    op_weight,
)
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

# Writes one planned batch in one transaction; the ledger plans inside it (executions it does not
# hold are loaded in the same transaction).
Flush = Callable[[Ledger, Sequence[Op]], Awaitable[flush.FlushResult]]

_TRANSIENT = (peewee.OperationalError, peewee.InterfaceError)


@dataclass(frozen=True)
class WriterStatistics:
    queued: int
    batches: int
    ops: int
    events: int
    duplicates: int
    refused: int
    rows_changed: int
    output_rows: int
    failures: int
    last_batch_size: int
    last_flush_s: float
    active_executions: int


class Writer:
    def __init__(
        self,
        flush_batch: Flush,
        ledger: Ledger,
        *,
        queue_items: int,
        batch_events: int,
        batch_age_s: float,
    ) -> None:
        self._flush = flush_batch
        self._ledger = ledger
        self.feed = CommitFeed()
        self._batch_events = batch_events
        self._batch_age_s = batch_age_s
        self._send, self._receive = trio.open_memory_channel[Op](queue_items)
        self._batches = self._ops = self._events = self._duplicates = self._refused = 0
        self._rows_changed = self._output_rows = self._failures = 0
        self._last_batch_size = 0
        self._last_flush_s = 0.0
        # Shielded for the writer's whole life: a daemon shutting down must not cancel the
        # writing of what is already queued; only ``kill()`` (past the close deadline) stops it.
        self._scope = trio.CancelScope(shield=True)
        self._stopped = trio.Event()

    # ------------------------------------------------------------------ producers

    async def record_events(
        self, host_id: str, sink: AckSink, events: Sequence[tuple[pb.Event, float]]
    ) -> None:
        await self._send.send(AgentEvents(host_id, sink, events))

    async def mark_dispatched(self, ids: Sequence[int]) -> None:
        await self._send.send(MarkDispatched(ids, time.time()))

    async def settle(
        self, ids: Sequence[int], status: ExecStatus, reason: Reason, error: str
    ) -> None:
        if ids:
            await self._send.send(Settle(ids, status, reason, error, time.time()))

    async def note_cancel(self, ids: Sequence[int], reason: Reason) -> None:
        await self._send.send(NoteCancel(ids, reason))

    async def change_task(
        self,
        task_id: int,
        to: TaskStatus | None,
        allowed_from: frozenset[TaskStatus],
        **fields: Any,
    ) -> bool:
        """Apply a task transition in order with everything else; True if it applied."""
        change = TaskChange(task_id, to, allowed_from, fields)
        await self._send.send(change)
        await change.done.wait()
        return change.applied

    # ------------------------------------------------------------------ the loop

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            with self._scope:
                async with self._receive:
                    while True:
                        batch = await self._collect()
                        if not batch:
                            return  # the channel closed and everything before it is written
                        await self._write(batch)
        finally:
            self.feed.close()
            self._stopped.set()

    def kill(self) -> None:
        self._scope.shield = False
        self._scope.cancel()

    async def _collect(self) -> list[Op]:
        try:
            first = await self._receive.receive()
        except trio.EndOfChannel:
            return []
        batch, weight = [first], op_weight(first)
        deadline = trio.current_time() + self._batch_age_s
        with trio.move_on_at(deadline):
            while weight < self._batch_events:
                try:
                    op = await self._receive.receive()
                except trio.EndOfChannel:
                    break
                batch.append(op)
                weight += op_weight(op)
        return batch

    async def _write(self, batch: list[Op]) -> None:
        backoff = Backoff(0.05, 5.0)
        while True:
            started = time.perf_counter()
            try:
                result = await self._flush(self._ledger, batch)
                break
            except _TRANSIENT as exc:
                self._failures += 1
                delay = backoff.next_delay()
                logger.error(
                    "writing a batch of %d changes failed (%s); retrying in %.2f s",
                    len(batch),
                    first_cause(exc),
                    delay,
                )
                await trio.sleep(delay)
        self._last_flush_s = time.perf_counter() - started
        self._account(batch, result)
        await self._publish(result)

    def _account(self, batch: list[Op], result: flush.FlushResult) -> None:
        plan = result.plan
        self._batches += 1
        self._ops += len(batch)
        self._events += sum(len(op.events) for op in batch if isinstance(op, AgentEvents))
        self._duplicates += plan.duplicates
        self._refused += plan.refused
        self._rows_changed += len(plan.changed)
        self._output_rows += len(plan.output_rows)
        self._last_batch_size = sum(op_weight(op) for op in batch)

    async def _publish(self, result: flush.FlushResult) -> None:
        plan = result.plan
        self._ledger.commit(plan)
        applied_tasks = []
        for (change, seq), applied in zip(plan.task_changes, result.task_applied, strict=True):
            change.applied = applied
            change.done.set()
            row = result.task_rows.get(change.task_id)
            if applied and row is not None:
                applied_tasks.append(TaskRowChange(change.task_id, seq, row))
        output = [
            OutputRow(ch_id, task_id, stream, offset, data, seq)
            for ch_id, task_id, stream, offset, _size, data, seq in plan.output_rows
        ]
        await self.feed.publish(
            Committed(
                first_seq=plan.first_seq,
                last_seq=plan.next_seq - 1,
                committed_at=time.time(),
                transitions=plan.status_changes,
                executions=plan.changed,
                output=output,
                tasks=applied_tasks,
                acks=plan.acks,
            )
        )

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            queued=self._receive.statistics().current_buffer_used,
            batches=self._batches,
            ops=self._ops,
            events=self._events,
            duplicates=self._duplicates,
            refused=self._refused,
            rows_changed=self._rows_changed,
            output_rows=self._output_rows,
            failures=self._failures,
            last_batch_size=self._last_batch_size,
            last_flush_s=self._last_flush_s,
            active_executions=self._ledger.active_count(),
        )

    async def aclose(self) -> None:
        await self._send.aclose()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def first_cause(exc: BaseException) -> BaseException:
    """SQLite ends the transaction itself on some errors (a full disk, an I/O error); peewee's
    rollback then fails with "no transaction is active" and hides the real error: find it."""
    while "no transaction is active" in str(exc) and exc.__context__ is not None:
        exc = exc.__context__
    return exc


def database_flush(database: Database) -> Flush:
    """The real ``Flush``: one transaction on ``database``, in a writer thread."""
    return functools.partial(database.write, flush.flush, database.db)


@contextlib.asynccontextmanager
async def open_writer(
    database: Database,
    *,
    max_output_bytes: int,
    queue_items: int,
    batch_events: int,
    batch_age_s: float,
    close_timeout_s: float,
) -> AsyncIterator[Writer]:
    """The writer over ``database`` for the daemon's lifetime; on exit it writes everything
    queued before."""
    next_seq = await database.read(flush.max_change_seq, database.db) + 1
    async with run_writer(
        database_flush(database),
        Ledger(max_output_bytes=max_output_bytes, next_seq=next_seq),
        queue_items=queue_items,
        batch_events=batch_events,
        batch_age_s=batch_age_s,
        close_timeout_s=close_timeout_s,
    ) as writer:
        yield writer


@contextlib.asynccontextmanager
async def run_writer(
    flush_batch: Flush,
    ledger: Ledger,
    *,
    queue_items: int,
    batch_events: int,
    batch_age_s: float,
    close_timeout_s: float,
) -> AsyncIterator[Writer]:
    """A writer serving for the block's lifetime over any ``flush_batch``; on exit it writes
    everything queued before, within ``close_timeout_s``."""
    writer = Writer(
        flush_batch,
        ledger,
        queue_items=queue_items,
        batch_events=batch_events,
        batch_age_s=batch_age_s,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        try:
            yield writer
        finally:
            with trio.CancelScope(shield=True):
                await writer.aclose()
                with trio.move_on_after(close_timeout_s) as waited:
                    await writer.wait_stopped()
            if waited.cancelled_caught:
                logger.error(
                    "the writer did not finish within %.1f s; what it had not written "
                    "is still in the agents' journals and is replayed",
                    close_timeout_s,
                )
                writer.kill()
