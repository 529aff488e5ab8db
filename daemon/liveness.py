"""Liveness of agent streams: heartbeats out, silence noticed, at a rate that scales with the
fleet.

One ticker walks every connected session about once a second: a session that has sent nothing
for its heartbeat interval gets a heartbeat queued, one that has heard nothing for its TTL is
closed. No session keeps a timer of its own, so thousands of idle streams cost a loop over a
list, not thousands of deadlines and tasks.

Each stream's cadence is fixed when it opens and told to the agent in its Welcome: the configured
interval and TTL, stretched (as Nomad stretches its heartbeat TTLs) so that the whole fleet sends
at most ``max_heartbeats_per_s`` heartbeats each way: a 10,000-host fleet at 100 per second beats
every 100 s. Silence is then noticed within TTL plus one tick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio


@dataclass(frozen=True)
class Cadence:
    interval_s: float
    ttl_s: float


class Watched(Protocol):
    def check_liveness(self, now: float) -> None: ...


class Liveness:
    def __init__(self, *, interval_s: float, ttl_s: float, max_heartbeats_per_s: float) -> None:
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._max_rate = max_heartbeats_per_s
        self.tick_s = min(1.0, interval_s / 4)

    def cadence(self, connected: int) -> Cadence:
        """The cadence for a stream opening while ``connected`` others are open."""
        interval = max(self._interval_s, (connected + 1) / self._max_rate)
        return Cadence(interval, self._ttl_s * interval / self._interval_s)

    def check(self, sessions: Iterable[Watched]) -> None:
        now = trio.current_time()
        for session in sessions:
            session.check_liveness(now)

    async def serve(
        self,
        sessions: Callable[[], Iterable[Watched]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.tick_s)
            self.check(sessions())
