"""The daemon-wide limit on executions running at once (``--max-running-executions``), shared
by every running task, first come first served.

A task's state machine asks for a slot when an execution's agent is connected; when none is free
it queues, and the slot is handed to the oldest waiter (by its task's inbox) as soon as one is
released. A slot is held from dispatch until the execution's end is recorded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol


class Waiter(Protocol):
    def wants_slot(self) -> bool:
        """Still waiting (not ended or cancelled meanwhile)."""
        ...

    def grant_slot(self) -> None:
        """The slot is now the waiter's: it must ``release`` it when done."""
        ...


@dataclass(frozen=True)
class SlotStatistics:
    total: int
    in_use: int
    waiting: int


class ExecutionSlots:
    def __init__(self, total: int) -> None:
        self._total = total
        self._free = total
        self._waiting: deque[Waiter] = deque()

    def take_or_wait(self, waiter: Waiter) -> bool:
        """True: a slot is taken for ``waiter`` now. False: it is queued for one."""
        while self._waiting and not self._waiting[0].wants_slot():
            self._waiting.popleft()
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return True
        self._waiting.append(waiter)
        return False

    def release(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if waiter.wants_slot():
                waiter.grant_slot()
                return
        self._free += 1

    def statistics(self) -> SlotStatistics:
        waiting = sum(1 for waiter in self._waiting if waiter.wants_slot())
        return SlotStatistics(self._total, self._total - self._free, waiting)
