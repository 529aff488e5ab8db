"""Heartbeat cadence scales with the fleet; the ticker beats for idle streams and closes silent
ones (on trio's mock clock: no I/O in flight)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from daemon.liveness import Liveness


def test_small_fleets_keep_the_configured_cadence_large_ones_stretch_it() -> None:
    liveness = Liveness(interval_s=5, ttl_s=15, max_heartbeats_per_s=100)
    small = liveness.cadence(connected=10)
    large = liveness.cadence(connected=9999)
    assert (small.interval_s, small.ttl_s) == (5, 15)
    assert (large.interval_s, large.ttl_s) == (pytest.approx(100), pytest.approx(300))


@dataclass
class FakeSession:
    checks: list[float] = field(default_factory=list)

    def check_liveness(self, now: float) -> None:
        self.checks.append(now)


async def test_the_ticker_visits_every_session_about_once_a_tick(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    liveness = Liveness(interval_s=2, ttl_s=6, max_heartbeats_per_s=100)
    sessions = [FakeSession() for _ in range(3)]
    await nursery.start(liveness.serve, lambda: sessions)
    await trio.sleep(5.01)
    assert liveness.tick_s == 0.5
    assert [len(s.checks) for s in sessions] == [10, 10, 10]
