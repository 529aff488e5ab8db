"""Live events for watchers of a task (the SSE stream and anything else that follows progress).

The writer publishes an event after the change it describes is durable, so a watcher never sees
something the database does not hold. Each event carries the change sequence number of what it
describes (the SSE event id): a watcher that falls behind or reconnects reads the database from
its last id and then follows live again (``Subscription.lagged``), so a slow watcher costs a
bounded buffer, never unbounded memory and never a stalled writer.

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

logger = logging.getLogger(__name__)


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

    def statistics(self) -> LiveHubStatistics:
        return LiveHubStatistics(
            subscriptions=sum(len(s) for s in self._by_task.values()),
            tasks_watched=len(self._by_task),
            published=self._published,
            lagged=self._lagged,
        )
