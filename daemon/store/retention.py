"""Retention: history older than ``--retention-days`` is deleted, a little at a time.

What goes: finished tasks (``completed``, ``failed``, ``cancelled``) whose ``finished_at`` is
older than the cutoff, with their commands, executions and stored output; audit events older
than the cutoff; host connection records that ended before it. Hosts, API tokens and unfinished
tasks are never touched, whatever their age.

Every deletion is a short transaction through ``Database.write`` (the writer's own lane, so it
waits its turn behind the batch writer and never runs beside it): a task's output and executions
go ``rows`` at a time (ten times ``--retention-batch-tasks``), then up to
``--retention-batch-tasks`` tasks at once (their commands follow by the foreign keys' cascade,
on SQLite and PostgreSQL alike), with ``--retention-pause-s`` between two transactions so the
writer and the API are never starved. A task's rows are deleted children first, so a pass cut
short (shutdown, a database error) leaves only consistent, still-old rows for the next one.
A finished task never changes again, so what a pass picked stays deletable.

A database error ends the pass (logged); the next one starts ``--retention-interval-s`` later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import peewee
import trio

from daemon.states import TASK_TERMINAL
from daemon.store.database import Database
from daemon.store.models import (
    AuditEvent,
    CommandHost,
    HostConnection,
    OutputChunk,
    Task,
    database_proxy,
)

logger = logging.getLogger(__name__)

DAY_S = 86400.0
_FINISHED = [status.value for status in TASK_TERMINAL]


@dataclass
class Pruned:
    """Rows deleted, by kind."""

    tasks: int = 0
    executions: int = 0
    output_chunks: int = 0
    audit_events: int = 0
    host_connections: int = 0

    def add(self, other: Pruned) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class RetentionStatistics:
    days: float
    passes: int
    failures: int
    last_pass_s: float  # how long the last pass took
    deleted: Pruned  # since the daemon started


# ---------------------------------------------------------------- synchronous (worker thread)


def old_task_ids(cutoff: float, limit: int) -> list[int]:
    """Up to ``limit`` finished tasks that finished before ``cutoff``, oldest ids first."""
    query = (
        Task.select(Task.id)
        .where(Task.finished_at < cutoff, Task.status.in_(_FINISHED))
        .order_by(Task.id)
        .limit(limit)
    )
    return [row.id for row in query]


def delete_some(model: type[peewee.Model], condition: peewee.Expression, limit: int) -> int:
    """Delete at most ``limit`` rows of ``model`` matching ``condition``, in one transaction."""
    with database_proxy.atomic():
        chosen = model.select(model.id).where(condition).limit(limit)
        return int(model.delete().where(model.id.in_(chosen)).execute())


def delete_tasks(ids: Sequence[int]) -> int:
    """The task rows (their commands follow by cascade), still only if finished."""
    with database_proxy.atomic():
        query = Task.delete().where(Task.id.in_(list(ids)), Task.status.in_(_FINISHED))
        return int(query.execute())


# ---------------------------------------------------------------- the service


class Retention:
    def __init__(
        self,
        database: Database,
        *,
        days: float,
        interval_s: float,
        batch_tasks: int,
        pause_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        self._days = days
        self._interval_s = interval_s
        self._batch_tasks = batch_tasks
        self._rows = batch_tasks * 10
        self._pause_s = pause_s
        self._clock = clock
        self._passes = self._failures = 0
        self._last_pass_s = 0.0
        self._deleted = Pruned()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prune every ``interval_s``, from start-up on; returns at once when retention is off."""
        task_status.started()
        if self._days <= 0:
            logger.info("retention is off: history is kept forever (--retention-days 0)")
            return
        logger.info(
            "retention: history older than %g days is deleted, every %g s",
            self._days,
            self._interval_s,
        )
        while True:
            try:
                await self.prune(self._clock() - self._days * DAY_S)
            except peewee.DatabaseError as exc:
                self._failures += 1
                logger.error("retention pass stopped by a database error: %s", exc)
            await trio.sleep(self._interval_s)

    async def prune(self, cutoff: float) -> Pruned:
        """One pass: delete everything older than ``cutoff`` (epoch seconds), batch by batch."""
        started = time.perf_counter()
        pruned = Pruned()
        try:
            while ids := await self._database.read(old_task_ids, cutoff, self._batch_tasks):
                in_tasks = list(ids)
                pruned.output_chunks += await self._drain(
                    OutputChunk, OutputChunk.task_id.in_(in_tasks)
                )
                pruned.executions += await self._drain(CommandHost, CommandHost.task.in_(in_tasks))
                pruned.tasks += await self._database.write(delete_tasks, in_tasks)
                logger.debug("retention: tasks %s to %s deleted", in_tasks[0], in_tasks[-1])
                await trio.sleep(self._pause_s)
            pruned.audit_events += await self._drain(AuditEvent, AuditEvent.at < cutoff)
            pruned.host_connections += await self._drain(
                HostConnection, HostConnection.disconnected_at < cutoff
            )
        finally:
            self._passes += 1
            self._last_pass_s = time.perf_counter() - started
            self._deleted.add(pruned)
            if pruned:
                logger.info(
                    "retention: deleted %d tasks, %d executions, %d output chunks, %d audit "
                    "events and %d host connection records older than %s (%.1f s)",
                    pruned.tasks, pruned.executions, pruned.output_chunks, pruned.audit_events,
                    pruned.host_connections, time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                           time.gmtime(cutoff)),
                    self._last_pass_s,
                )  # fmt: skip
        return pruned

    async def _drain(self, model: type[peewee.Model], condition: peewee.Expression) -> int:
        """Delete every row matching ``condition``, ``rows`` per transaction, pausing between."""
        total = 0
        while deleted := await self._database.write(delete_some, model, condition, self._rows):
            total += deleted
            await trio.sleep(self._pause_s)
            if deleted < self._rows:
                break
        return total

    def statistics(self) -> RetentionStatistics:
        deleted = Pruned()
        deleted.add(self._deleted)
        return RetentionStatistics(
            days=self._days,
            passes=self._passes,
            failures=self._failures,
            last_pass_s=self._last_pass_s,
            deleted=deleted,
        )
