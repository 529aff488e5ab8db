"""What wakes a running task, and what one wake-up hands out.

``Inbox`` collects what happened since the task last looked (committed transitions of its
executions, agents arriving and leaving, a daemon-wide slot handed over, the user's cancel)
without ever blocking the sender. ``Outbox`` collects what the task decided, for
``TaskRun._hand_out`` to give the writer and the agents together, in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from daemon.engine.fleet import AgentSession
from daemon.states import ExecStatus, Reason
from proto.dispatch import v1 as pb

if TYPE_CHECKING:
    from daemon.engine.flight import Flight


@dataclass(frozen=True, slots=True)
class Transition:
    execution_id: int
    status: ExecStatus


@dataclass(frozen=True, slots=True)
class AgentArrived:
    session: AgentSession


@dataclass(frozen=True, slots=True)
class AgentLeft:
    host_id: str


@dataclass(frozen=True, slots=True)
class SlotGranted:
    flight: Flight


@dataclass(frozen=True, slots=True)
class CancelRequested:
    pass


Message = Transition | AgentArrived | AgentLeft | SlotGranted | CancelRequested


class Inbox:
    """Never blocks the sender; bounded by the work in flight (each execution yields a few
    transitions, each agent an arrival or a departure)."""

    def __init__(self) -> None:
        self._items: list[Message] = []
        self._ready = trio.Event()

    def put(self, message: Message) -> None:
        self._items.append(message)
        self._ready.set()

    def put_all(self, messages: Sequence[Message]) -> None:
        if messages:
            self._items.extend(messages)
            self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()

    def take(self) -> list[Message]:
        items, self._items = self._items, []
        self._ready = trio.Event()
        return items


@dataclass
class Outbox:
    settles: dict[tuple[ExecStatus, Reason, str], list[int]] = field(default_factory=dict)
    cancel_notes: dict[Reason, list[int]] = field(default_factory=dict)
    cancels: list[tuple[AgentSession, int]] = field(default_factory=list)
    dispatches: list[tuple[AgentSession, pb.Run]] = field(default_factory=list)
    resends: list[tuple[AgentSession, pb.Run]] = field(default_factory=list)

    def settle(self, ids: Sequence[int], status: ExecStatus, reason: Reason, message: str) -> None:
        if ids:
            self.settles.setdefault((status, reason, message), []).extend(ids)

    def take(self) -> Outbox:
        """What was decided so far; this outbox starts empty again."""
        taken = dataclasses.replace(self)
        for each in dataclasses.fields(self):
            setattr(self, each.name, each.default_factory())  # type: ignore[misc]
        return taken
