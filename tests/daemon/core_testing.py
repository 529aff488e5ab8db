"""The daemon's core wired as ``daemon.server`` wires it, for tests that drive it directly: the
writer with acknowledgements flowing back to the agents' sinks, and the engine (dispatcher and
scheduler) reading the writer's commits and the registry's presence, over any record (the
database's, or ``memory_store``'s)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from daemon.agents.acks import serve_acks
from daemon.agents.registry import Registry
from daemon.engine.dispatcher import Dispatcher
from daemon.engine.executions import ExecutionLimits
from daemon.engine.fleet import Presence
from daemon.engine.records import TaskRecords
from daemon.engine.scheduler import Scheduler
from daemon.engine.tasks import TaskService
from daemon.store.database import Database
from daemon.store.writer import Writer, open_writer

WRITER_SETTINGS: dict[str, Any] = {
    "max_output_bytes": 1000,
    "queue_items": 1000,
    "batch_events": 500,
    "batch_age_s": 0.005,
    "close_timeout_s": 5,
}


@asynccontextmanager
async def acknowledging(writer: Writer) -> AsyncIterator[Writer]:
    """``writer`` with its acknowledgements reaching the agents' sinks."""
    acks = writer.feed.subscribe("acks")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_acks, acks)
        yield writer
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_acking_writer(database: Database, **settings: Any) -> AsyncIterator[Writer]:
    async with (
        open_writer(database, **{**WRITER_SETTINGS, **settings}) as writer,
        acknowledging(writer),
    ):
        yield writer


@dataclass
class Engine:
    registry: Registry
    dispatcher: Dispatcher
    scheduler: Scheduler
    writer: Writer

    def task_service(self, database: Database, *, max_targets: int = 100) -> TaskService:
        return TaskService(
            database=database,
            writer=self.writer,
            scheduler=self.scheduler,
            dispatcher=self.dispatcher,
            max_targets=max_targets,
        )


@asynccontextmanager
async def open_engine(
    writer: Writer,
    records: TaskRecords,
    *,
    max_running_executions: int,
    limits: ExecutionLimits,
    max_running_tasks: int = 4,
) -> AsyncIterator[Engine]:
    """The engine over ``writer`` until the block ends (a daemon shutdown: work stays in flight)."""
    presence_send, presence_receive = trio.open_memory_channel[Presence](100)
    registry = Registry(presence=presence_send)
    dispatcher = Dispatcher(
        writer=writer,
        records=records,
        fleet=registry,
        max_running_executions=max_running_executions,
        limits=limits,
    )
    scheduler = Scheduler(dispatcher, records, max_running_tasks=max_running_tasks)
    commits = writer.feed.subscribe(f"engine-{id(dispatcher)}")
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve, commits, presence_receive)
        await nursery.start(scheduler.serve)
        yield Engine(registry, dispatcher, scheduler, writer)
        nursery.cancel_scope.cancel()
