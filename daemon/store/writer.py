"""The batch writer: every change to executions and tasks, in one order, one transaction a batch.

Producers (agent sessions, the dispatcher, the task use cases) put ``ledger`` ops into a bounded
channel and wait when it is full, which slows agents through gRPC flow control instead of growing
memory (their journals hold what is not yet acknowledged). A batch closes when it reaches
``batch_events`` changes or its first change is ``batch_age_s`` old. After a batch committed, and
only then: agents get their acknowledgements, watchers their live events, the dispatcher the new
states, and callers of ``change_task`` their answer. A database that fails transiently (locked,
disk full, connection lost) is retried with backoff while producers wait; nothing is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import peewee
import trio

from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store import flush
from daemon.store.database import Database
from daemon.store.ledger import Execution, Ledger
from daemon.store.live import LiveEvent, LiveHub
from daemon.store.views import execution_view, progress_view, task_event_view
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

TransitionObserver = Callable[[Sequence[Execution]], None]
StatusListener = Callable[[Sequence[tuple[int, ExecStatus, str | None]]], None]

_TRANSIENT = (peewee.OperationalError, peewee.InterfaceError)
_OUTPUT_STREAMS = {1: "stdout", 2: "stderr"}


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
        database: Database,
        ledger: Ledger,
        live: LiveHub,
        *,
        queue_items: int,
        batch_events: int,
        batch_age_s: float,
    ) -> None:
        self._database = database
        self._ledger = ledger
        self._live = live
        self._batch_events = batch_events
        self._batch_age_s = batch_age_s
        self._send, self._receive = trio.open_memory_channel[Op](queue_items)
        self._listeners: list[StatusListener] = []
        self._transition_observers: list[TransitionObserver] = []
        self._batches = self._ops = self._events = self._duplicates = self._refused = 0
        self._rows_changed = self._output_rows = self._failures = 0
        self._last_batch_size = 0
        self._last_flush_s = 0.0
        # Shielded for the writer's whole life: a daemon shutting down must not cancel the
        # writing of what is already queued; only ``kill()`` (past the close deadline) stops it.
        self._scope = trio.CancelScope(shield=True)
        self._stopped = trio.Event()

    def add_listener(self, listener: StatusListener) -> None:
        """``listener`` gets (execution id, new status, reason) for every durable transition."""
        self._listeners.append(listener)

    def observe_transitions(self, observer: TransitionObserver) -> None:
        """``observer`` gets the committed record of every execution whose status changed in a
        batch (for metrics: durations, dispatch latency). It must not block."""
        self._transition_observers.append(observer)

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
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                result = await self._database.write(
                    flush.flush,
                    self._database.db,
                    self._ledger,
                    batch,
                    set(self._live.watched_tasks()),
                )
                break
            except _TRANSIENT as exc:
                self._failures += 1
                logger.error(
                    "writing a batch of %d changes failed (%s); retrying in %.1f s",
                    len(batch),
                    first_cause(exc),
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._last_flush_s = time.perf_counter() - started
        self._account(batch, result)
        self._fan_out(result)

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

    def _fan_out(self, result: flush.FlushResult) -> None:
        plan = result.plan
        self._ledger.commit(plan)
        for (change, _), applied in zip(plan.task_changes, result.task_applied, strict=True):
            change.applied = applied
            change.done.set()
        for sink, acks in plan.acks.items():
            sink.ack_nowait(acks)
        if plan.status_changes:
            for listener in self._listeners:
                listener(plan.status_changes)
            if self._transition_observers:
                moved = [plan.changed[ch_id] for ch_id, _, _ in plan.status_changes]
                for observer in self._transition_observers:
                    observer(moved)
        self._publish(result)

    def _publish(self, result: flush.FlushResult) -> None:
        plan, live = result.plan, self._live
        changed_ids = {ch_id for ch_id, _, _ in plan.status_changes}
        for ch_id in changed_ids:
            ex = plan.changed[ch_id]
            if live.watched(ex.task_id):
                live.publish(
                    LiveEvent(ex.change_seq, ex.task_id, "execution", execution_view(ex.view_row()))
                )
        for ch_id, task_id, stream, offset, _size, data, seq in plan.output_rows:
            if live.watched(task_id):
                host_id = plan.changed[ch_id].host_id
                live.publish(LiveEvent(seq, task_id, "output", {
                    "execution_id": str(ch_id), "host_id": host_id,
                    "stream": _OUTPUT_STREAMS[stream], "offset": offset, "data": data,
                }))  # fmt: skip
        for (change, seq), applied in zip(plan.task_changes, result.task_applied, strict=True):
            row = result.task_rows.get(change.task_id)
            if applied and row is not None and live.watched(change.task_id):
                live.publish(LiveEvent(seq, change.task_id, "task", task_event_view(row)))
        for task_id, counts in result.progress.items():
            live.publish(LiveEvent(plan.next_seq - 1, task_id, "progress", progress_view(counts)))

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


def first_cause(exc: BaseException) -> BaseException:
    """SQLite ends the transaction itself on some errors (a full disk, an I/O error); peewee's
    rollback then fails with "no transaction is active" and hides the real error: find it."""
    while "no transaction is active" in str(exc) and exc.__context__ is not None:
        exc = exc.__context__
    return exc


@contextlib.asynccontextmanager
async def open_writer(
    database: Database,
    live: LiveHub,
    *,
    max_output_bytes: int,
    queue_items: int,
    batch_events: int,
    batch_age_s: float,
    close_timeout_s: float,
) -> AsyncIterator[Writer]:
    """The writer for the daemon's lifetime; on exit it writes everything queued before."""
    next_seq = await database.read(flush.max_change_seq, database.db) + 1
    ledger = Ledger(max_output_bytes=max_output_bytes, next_seq=next_seq)
    writer = Writer(
        database,
        ledger,
        live,
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
                    await writer._stopped.wait()
            if waited.cancelled_caught:
                logger.error(
                    "the writer did not finish within %.1f s; what it had not written "
                    "is still in the agents' journals and is replayed",
                    close_timeout_s,
                )
                writer.kill()
