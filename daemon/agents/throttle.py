"""A token bucket: how the daemon keeps one agent stream from taking more than its share.

An agent's stream may send ``rate_per_s`` units (messages, or bytes) per second on average and
``burst`` at once. Past that the session simply reads its next message later: gRPC flow control
then slows the agent down. A well-behaved agent never notices (it sends coarse batches); a
hostile or broken one cannot flood the writer, the database or the other agents' share of the
event loop. Throttling never drops anything: the agent's journal holds what it could not send.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class StreamLimits:
    """What one agent stream may send: messages and bytes per second, and bursts of twice that."""

    messages_per_s: float
    bytes_per_s: float

    def buckets(self) -> tuple[TokenBucket, TokenBucket]:
        return (TokenBucket(self.messages_per_s, 2 * self.messages_per_s),
                TokenBucket(self.bytes_per_s, 2 * self.bytes_per_s))  # fmt: skip


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    _tokens: float = -1.0
    _updated: float = 0.0
    waits: int = 0  # how often taking had to wait

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._tokens = self.burst
        self._updated = trio.current_time()

    async def take(self, amount: float) -> None:
        """Wait until ``amount`` units are available, then use them. An amount over the burst
        is taken as a full bucket (it would never fit otherwise)."""
        amount = min(amount, self.burst)
        self._refill()
        if self._tokens < amount:
            self.waits += 1
            await trio.sleep((amount - self._tokens) / self.rate_per_s)
            self._refill()
        else:
            await trio.lowlevel.checkpoint()
        self._tokens -= amount

    def _refill(self) -> None:
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
