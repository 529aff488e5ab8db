"""What one committed batch changed, handed to everyone who reacts to it.

The writer commits a batch, then publishes one ``Committed`` value: the executions whose status
moved, every execution record the batch changed, the output rows it stored, the task rows it
changed and the acknowledgements the agents are owed. It never calls anybody back: whoever reacts
(the engine, the agent sessions' acknowledgements, the live event views, metrics) reads these
values from its own subscription, in its own task, in commit order.

A subscription is a bounded channel and nothing is dropped: a subscriber that falls behind makes
the writer wait, which slows the agents through gRPC flow control (their journals hold what is
not yet acknowledged). So a subscriber must only do quick work per value, or hand slow work to a
task of its own; the live views, which may not slow anybody, keep their own lossy buffers
(``daemon.api.live``).

The execution records in a value are the ledger's committed records: the ledger copies a record
before it changes it again, so they are never mutated after the commit and readers may keep them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from daemon.states import ExecStatus
from daemon.store.ledger import Execution
from daemon.store.write_ops import AckSink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutputRow:
    execution_id: int
    task_id: int
    stream: int  # 1 stdout, 2 stderr
    offset: int
    data: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class TaskRowChange:
    task_id: int
    seq: int
    row: Mapping[str, Any]  # id, status, started_at, finished_at, error, cancel_requested


@dataclass(frozen=True)
class Committed:
    first_seq: int
    last_seq: int  # the newest change sequence number the batch wrote
    committed_at: float  # time.time() right after the commit
    # (execution id, new status, reason), in the order they happened; an execution that moved
    # twice in one batch comes twice
    transitions: Sequence[tuple[int, ExecStatus, str | None]]
    executions: Mapping[int, Execution]  # every record the batch changed, as committed
    output: Sequence[OutputRow]
    tasks: Sequence[TaskRowChange]  # task changes that applied
    acks: Mapping[AckSink, Mapping[int, int]] = field(default_factory=dict)

    def touched_tasks(self) -> set[int]:
        touched = {ex.task_id for ex in self.executions.values()}
        touched.update(change.task_id for change in self.tasks)
        return touched


class CommitFeed:
    """The committed values, for every subscriber, in commit order."""

    def __init__(self) -> None:
        self._subscribers: dict[str, trio.MemorySendChannel[Committed]] = {}

    def subscribe(self, name: str, *, buffer: int = 64) -> trio.MemoryReceiveChannel[Committed]:
        """A bounded subscription; closing its receive side ends it."""
        if name in self._subscribers:
            raise ValueError(f"{name!r} is already subscribed")
        send, receive = trio.open_memory_channel[Committed](buffer)
        self._subscribers[name] = send
        return receive

    async def publish(self, committed: Committed) -> None:
        for name, send in list(self._subscribers.items()):
            try:
                try:
                    send.send_nowait(committed)  # the usual case: no scheduling round
                except trio.WouldBlock:
                    await send.send(committed)  # a subscriber behind: the writer waits for it
            except trio.BrokenResourceError:
                self._drop(name)

    def _drop(self, name: str) -> None:
        logger.debug("commit subscriber %s left", name)
        self._subscribers.pop(name).close()

    def close(self) -> None:
        """No more values: every subscriber's iteration ends."""
        for send in self._subscribers.values():
            send.close()
        self._subscribers.clear()
