"""How long to wait before trying again: exponential backoff with full jitter.

The one retry policy of dispatchd, dispatch-agent and dispatchctl. It only computes delays and
never sleeps, so each caller waits in its own flavour (``trio.sleep`` in the daemon and the agent,
``time.sleep`` in dispatchctl, ``asyncio.sleep`` in the bench's simulated agents) and can be
cancelled the way its event loop cancels, and tests check the delays without waiting them.

Full jitter (a delay drawn uniformly between 0 and the exponential ceiling, as in "Exponential
Backoff And Jitter", AWS Architecture Blog, 2015) is used because a fleet that lost its daemon at
the same moment would otherwise come back in synchronised waves, each as large as the fleet.
"""

from __future__ import annotations

import random

# first_s * 2**attempt overflows a float near attempt 1024; far before that it is above any
# sensible max_s, so the exponent stops growing here while the attempt count goes on.
_MAX_EXPONENT = 62


class Backoff:
    """The delay before each next attempt: uniform(0, min(max_s, first_s * 2**attempt)).

    ``attempt`` counts the delays handed out since the last ``reset()``; call ``reset()`` when
    an attempt made progress, so the next failure starts again from ``first_s``. ``rng`` is the
    random source (a seeded ``random.Random`` in tests); each instance has its own by default.
    """

    def __init__(self, first_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(
                f"backoff needs 0 < first_s <= max_s, got first_s={first_s!r}, max_s={max_s!r}"
            )
        self.first_s = first_s
        self.max_s = max_s
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        return self._attempt

    def ceiling(self) -> float:
        """The longest the next delay can be."""
        exponent = min(self._attempt, _MAX_EXPONENT)
        return min(self.max_s, self.first_s * float(2**exponent))

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; counts one attempt."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0
