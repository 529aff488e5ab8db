"""Liveness of agent streams: heartbeats out, silence noticed, at a rate that scales with the
fleet.

One ticker walks every connected session about once a second: a session that has sent nothing
for its heartbeat interval gets a heartbeat queued, one that has heard nothing for its TTL is
closed. No session keeps a timer of its own, so thousands of idle streams cost a loop over a
list, not thousands of deadlines and tasks.

A stream's cadence is the configured interval and TTL, stretched (as Nomad stretches its
heartbeat TTLs) so that the whole fleet sends at most ``max_heartbeats_per_s`` heartbeats each
way: a 10,000-host fleet at 100 per second beats every 100 s. The Welcome tells the agent the
cadence of the fleet it joins; as the fleet grows or shrinks by more than a quarter, the ticker
hands each session the new cadence, which the session's next heartbeat tells its agent (so the
streams that connected first, to a small fleet, do not keep beating at the small fleet's rate).
Silence is noticed within TTL plus one tick; the tick stretches with the interval (a twentieth of
it, at most 5 s), so a big idle fleet costs a walk over its list every few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio


@dataclass(frozen=True)
class Cadence:
    interval_s: float
    ttl_s: float


class Watched(Protocol):
    def check_liveness(self, now: float, fleet: Cadence) -> None: ...


def differs(current: Cadence, wanted: Cadence) -> bool:
    """Worth telling the agent: more than a quarter longer or shorter (no churn on every join)."""
    ratio = wanted.interval_s / current.interval_s
    return ratio > 1.25 or ratio < 0.8


class Liveness:
    def __init__(self, *, interval_s: float, ttl_s: float, max_heartbeats_per_s: float) -> None:
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._max_rate = max_heartbeats_per_s
        self.tick_s = self._base_tick_s = min(1.0, interval_s / 4)

    def cadence(self, connected: int) -> Cadence:
        """The cadence for a stream opening while ``connected`` others are open."""
        interval = max(self._interval_s, (connected + 1) / self._max_rate)
        return Cadence(interval, self._ttl_s * interval / self._interval_s)

    def check(self, sessions: Sequence[Watched]) -> None:
        now = trio.current_time()
        fleet = self.cadence(len(sessions) - 1)
        self.tick_s = max(self._base_tick_s, min(5.0, fleet.interval_s / 20))
        for session in sessions:
            session.check_liveness(now, fleet)

    async def serve(
        self,
        sessions: Callable[[], Sequence[Watched]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.tick_s)
            self.check(sessions())
