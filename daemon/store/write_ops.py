"""What producers ask the writer to do: the vocabulary of changes to executions and tasks.

Agent sessions send ``AgentEvents``; the dispatcher ``MarkDispatched``, ``Settle`` and
``NoteCancel``; the task use cases and the dispatcher ``TaskChange``. The ledger decides what
each changes; the writer applies them in the order they were queued.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from daemon.states import ExecStatus, Reason, TaskStatus
from proto.dispatch import v1 as pb


class AckSink(Protocol):
    """Where acknowledgements for an agent's events go (its session)."""

    def ack_nowait(self, acks: Mapping[int, int]) -> None: ...


@dataclass(frozen=True, slots=True)
class AgentEvents:
    host_id: str
    sink: AckSink
    events: Sequence[tuple[pb.Event, float]]  # each event with its time on the daemon's clock


@dataclass(frozen=True, slots=True)
class MarkDispatched:
    ids: Sequence[int]
    at: float


@dataclass(frozen=True, slots=True)
class Settle:
    """End executions without the agent's word (offline, lost, skipped, cancelled unconfirmed)."""

    ids: Sequence[int]
    status: ExecStatus
    reason: Reason
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class NoteCancel:
    """A cancel was sent for these executions; the agent's CANCELLED report means ``reason``."""

    ids: Sequence[int]
    reason: Reason


@dataclass(eq=False)
class TaskChange:
    """Set task fields, moving it to ``to`` if its status is in ``allowed_from``; the caller
    waits on ``done`` and reads ``applied``."""

    task_id: int
    to: TaskStatus | None
    allowed_from: frozenset[TaskStatus]
    fields: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    applied: bool = False


Op = AgentEvents | MarkDispatched | Settle | NoteCancel | TaskChange


def op_weight(op: Op) -> int:
    if isinstance(op, AgentEvents):
        return len(op.events)
    if isinstance(op, MarkDispatched | Settle | NoteCancel):
        return len(op.ids)
    return 1
