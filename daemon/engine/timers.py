"""Every daemon-side timer of the executions a task runs, in one structure per running task.

Whose timer is whose (the agent keeps its own on its monotonic clock: the command's
``timeout_s``, then TERM, ``kill_grace_s`` and KILL; the daemon only backs it up):

- ``DELIVERY``: a target that is offline at dispatch is waited for ``delivery_timeout_s``
  (the task's), then recorded ``dispatch_failed`` / ``delivery_timeout``;
- ``BACKSTOP``: a dispatched execution whose agent stays connected but says nothing by
  timeout + ``kill_grace_s`` + ``report_margin_s`` (+ ``agent_grace_s`` when resumed after a
  daemon restart) gets a cancel (``timed_out`` is then recorded);
- ``GRACE``: an agent that left mid-run has ``agent_grace_s`` to come back and report, else
  ``failed`` / ``agent_lost`` (``daemon_restart`` when the daemon restarted meanwhile);
- ``KILL_CONFIRM``: after the daemon sent a cancel (user cancel or backstop), the agent has
  ``kill_grace_s`` + ``report_margin_s`` to confirm the kill, else the daemon records the end;
- ``RECORD``: a decision handed to the writer that is not committed within ``RECORD_WAIT_S``
  (a failing database) is logged and the task moves on.

An execution has at most one timer at a time; which one follows from where it stands
(``engine.task_run``). ``Deadlines`` is a heap with lazy removal: setting or clearing a timer is
O(log n), and a running task costs one ``move_on_at`` for all its hosts.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

RECORD_WAIT_S = 30.0

K = TypeVar("K", bound=Hashable)


class Timer(enum.Enum):
    DELIVERY = "delivery"
    BACKSTOP = "backstop"
    GRACE = "grace"
    KILL_CONFIRM = "kill_confirm"
    RECORD = "record"


class Deadlines(Generic[K]):
    """At most one deadline per key; ``pop_due`` hands out the keys whose time has come."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._current: dict[K, int] = {}
        self._counter = itertools.count()

    def set(self, key: K, at: float) -> None:
        """Set ``key``'s deadline to ``at``, replacing any earlier one."""
        stamp = next(self._counter)
        self._current[key] = stamp
        heapq.heappush(self._heap, (at, stamp, key))

    def clear(self, key: K) -> None:
        self._current.pop(key, None)

    def next_at(self) -> float:
        """The earliest live deadline, or +inf."""
        heap = self._heap
        while heap and self._current.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # cleared or replaced since
        return heap[0][0] if heap else math.inf

    def pop_due(self, now: float) -> list[K]:
        due: list[K] = []
        while self.next_at() <= now:
            _, _, key = heapq.heappop(self._heap)
            del self._current[key]
            due.append(key)
        return due

    def __len__(self) -> int:
        return len(self._current)
