"""Heartbeat cadence scales with the fleet; the ticker beats for idle streams and closes silent
ones (on trio's mock clock: no I/O in flight)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from daemon.agents.liveness import Cadence, Liveness, differs


def test_small_fleets_keep_the_configured_cadence_large_ones_stretch_it() -> None:
    liveness = Liveness(interval_s=5, ttl_s=15, max_heartbeats_per_s=100)
    small = liveness.cadence(connected=10)
    large = liveness.cadence(connected=9999)
    assert (small.interval_s, small.ttl_s) == (5, 15)
    assert (large.interval_s, large.ttl_s) == (pytest.approx(100), pytest.approx(300))


@dataclass
class FakeSession:
    checks: list[float] = field(default_factory=list)
    fleets: list[Cadence] = field(default_factory=list)

    def check_liveness(self, now: float, fleet: Cadence) -> None:
        self.checks.append(now)
        self.fleets.append(fleet)


async def test_the_ticker_visits_every_session_about_once_a_tick(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    liveness = Liveness(interval_s=2, ttl_s=6, max_heartbeats_per_s=100)
    sessions = [FakeSession() for _ in range(3)]
    await nursery.start(liveness.serve, lambda: sessions)
    await trio.sleep(5.01)
    assert liveness.tick_s == 0.5
    assert [len(s.checks) for s in sessions] == [10, 10, 10]


async def test_each_tick_hands_every_session_the_cadence_of_the_fleet_as_it_is_now(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    liveness = Liveness(interval_s=2, ttl_s=6, max_heartbeats_per_s=1)
    sessions = [FakeSession() for _ in range(3)]
    await nursery.start(liveness.serve, lambda: sessions)
    await trio.sleep(1.01)  # two ticks of 0.5 s: three streams at one beat a second: 3 s
    assert sessions[0].fleets == [Cadence(3, 9), Cadence(3, 9)]
    sessions.extend(FakeSession() for _ in range(97))
    await trio.sleep(0.5)  # 100 streams: every 100 s, so the tick stretches to 5 s
    assert sessions[0].fleets[-1] == Cadence(100, 300)
    assert liveness.tick_s == 5.0
    del sessions[2:]
    await trio.sleep(5)
    assert sessions[0].fleets[-1] == Cadence(2, 6)
    assert liveness.tick_s == 0.5


def test_a_cadence_is_worth_telling_the_agent_when_it_moves_by_more_than_a_quarter() -> None:
    current = Cadence(100, 300)
    assert not differs(current, Cadence(120, 360))
    assert not differs(current, Cadence(81, 243))
    assert differs(current, Cadence(126, 378))
    assert differs(current, Cadence(79, 237))
