"""Live events for watchers of a task (the SSE stream and anything else that follows progress).

``LiveHub.serve`` reads the writer's committed values (``store.commits``) and turns what they
changed in watched tasks into events, so a watcher never sees something the database does not
hold; tasks nobody watches cost a set lookup per commit. Each event carries the change sequence
number of what it describes (the SSE event id): a watcher that falls behind or reconnects reads
the database from its last id and then follows live again (``Subscription.lagged``), so a slow
watcher costs a bounded buffer, never unbounded memory and never a stalled writer.

Kinds and their ``data``:
- ``execution``: ``views.execution_view`` of a CommandHost that changed;
- ``output``: ``{"execution_id", "host_id", "stream": "stdout"|"stderr", "offset", "data": bytes}``;
- ``task``: ``{"id", "status", "started_at", "finished_at", "error"}``;
- ``progress``: ``views.progress_view`` of the task after a batch of changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from daemon.store import queries
from daemon.store.commits import Committed
from daemon.store.database import Database
from daemon.store.views import execution_view, progress_view, task_event_view

logger = logging.getLogger(__name__)

_OUTPUT_STREAMS = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True, slots=True)
class LiveEvent:
    seq: int
    task_id: int
    kind: str
    data: dict[str, Any]


@dataclass(eq=False)
class Subscription:
    task_id: int
    receive: trio.MemoryReceiveChannel[LiveEvent]
    _send: trio.MemorySendChannel[LiveEvent] = field(repr=False)
    lagged: bool = False


@dataclass(frozen=True)
class LiveHubStatistics:
    subscriptions: int
    tasks_watched: int
    published: int
    lagged: int


class LiveHub:
    def __init__(self, *, buffer_events: int) -> None:
        self._buffer_events = buffer_events
        self._by_task: dict[int, set[Subscription]] = {}
        self._published = 0
        self._lagged = 0

    def watched(self, task_id: int) -> bool:
        return task_id in self._by_task

    def watched_tasks(self) -> list[int]:
        return list(self._by_task)

    def publish(self, event: LiveEvent) -> None:
        """Hand ``event`` to every watcher of its task without waiting; a watcher whose buffer is
        full is marked lagged and cut off (it catches up from the database)."""
        subscribers = self._by_task.get(event.task_id)
        if not subscribers:
            return
        self._published += 1
        for subscription in list(subscribers):
            try:
                subscription._send.send_nowait(event)
            except trio.WouldBlock:
                self._lagged += 1
                subscription.lagged = True
                subscription._send.close()
                self._drop(subscription)
                logger.info(
                    "task %s: a live watcher fell %d events behind; it resyncs from the database",
                    event.task_id,
                    self._buffer_events,
                )
            except trio.BrokenResourceError:
                self._drop(subscription)

    @contextlib.contextmanager
    def subscribe(self, task_id: int) -> Iterator[Subscription]:
        send, receive = trio.open_memory_channel[LiveEvent](self._buffer_events)
        subscription = Subscription(task_id=task_id, receive=receive, _send=send)
        self._by_task.setdefault(task_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            self._drop(subscription)
            send.close()
            receive.close()

    def _drop(self, subscription: Subscription) -> None:
        subscribers = self._by_task.get(subscription.task_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._by_task[subscription.task_id]

    async def serve(
        self,
        commits: trio.MemoryReceiveChannel[Committed],
        database: Database,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish what each commit changed in watched tasks, then their progress (read after
        the commit, so it is at least as new as the events before it)."""
        task_status.started()
        async with commits:
            async for committed in commits:
                if not self._by_task:
                    continue
                self._publish_commit(committed)
                watched = sorted(committed.touched_tasks() & self._by_task.keys())
                if watched:
                    progress = await database.read(_progress_of, watched)
                    for task_id, counts in progress.items():
                        event = LiveEvent(
                            committed.last_seq, task_id, "progress", progress_view(counts)
                        )
                        self.publish(event)

    def _publish_commit(self, committed: Committed) -> None:
        for ch_id in dict.fromkeys(ch_id for ch_id, _, _ in committed.transitions):
            ex = committed.executions[ch_id]
            if ex.task_id in self._by_task:
                view = execution_view(ex.view_row())
                self.publish(LiveEvent(ex.change_seq, ex.task_id, "execution", view))
        for row in committed.output:
            if row.task_id in self._by_task:
                data = {
                    "execution_id": str(row.execution_id),
                    "host_id": committed.executions[row.execution_id].host_id,
                    "stream": _OUTPUT_STREAMS[row.stream],
                    "offset": row.offset,
                    "data": row.data,
                }
                self.publish(LiveEvent(row.seq, row.task_id, "output", data))
        for change in committed.tasks:
            if change.task_id in self._by_task:
                view = task_event_view(dict(change.row))
                self.publish(LiveEvent(change.seq, change.task_id, "task", view))

    def statistics(self) -> LiveHubStatistics:
        return LiveHubStatistics(
            subscriptions=sum(len(s) for s in self._by_task.values()),
            tasks_watched=len(self._by_task),
            published=self._published,
            lagged=self._lagged,
        )


def _progress_of(task_ids: list[int]) -> dict[int, dict[str, int]]:
    return {task_id: queries.progress_counts(task_id) for task_id in task_ids}
