"""The retry policy: exponential ceilings, full jitter drawn from the injected random source,
progress starting over, and arguments that would make no sense refused."""

from __future__ import annotations

import random

import pytest

from common.retry import Backoff


class Highest(random.Random):
    """Always the top of the range, so the delays are the ceilings themselves."""

    def uniform(self, a: float, b: float) -> float:
        assert a == 0
        return b


def test_ceilings_double_from_first_to_max() -> None:
    backoff = Backoff(0.5, 30.0, rng=Highest())
    assert [backoff.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.attempt == 8


def test_reset_starts_again_from_first() -> None:
    backoff = Backoff(0.2, 5.0, rng=Highest())
    for _ in range(5):
        backoff.next_delay()
    assert backoff.ceiling() == 5.0
    backoff.reset()
    assert (backoff.attempt, backoff.ceiling(), backoff.next_delay()) == (0, 0.2, 0.2)


def test_delays_are_full_jitter_from_the_given_random_source() -> None:
    delays = _take(Backoff(0.5, 30.0, rng=random.Random(7)), 200)
    source = random.Random(7)
    ceilings = [min(30.0, 0.5 * 2**n) for n in range(200)]
    assert delays == [source.uniform(0, ceiling) for ceiling in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == 200  # jittered, not a fixed schedule
    # the same seed, the same delays: a run can be replayed
    assert _take(Backoff(0.5, 30.0, rng=random.Random(7)), 200) == delays


def test_many_attempts_stay_at_the_maximum() -> None:
    backoff = Backoff(0.05, 5.0, rng=Highest())
    assert _take(backoff, 2000)[-1] == 5.0
    assert backoff.attempt == 2000


@pytest.mark.parametrize(("first_s", "max_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_nonsense_bounds_are_refused(first_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="0 < first_s <= max_s"):
        Backoff(first_s, max_s)


def _take(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]
