"""The per-stream token bucket, on trio's mock clock (no I/O in flight)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from daemon.agents.throttle import TokenBucket


async def test_a_burst_passes_at_once_then_the_rate_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)
    start = trio.current_time()
    for _ in range(5):
        await bucket.take(1)
    assert trio.current_time() == start and bucket.waits == 0
    for _ in range(20):
        await bucket.take(1)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert bucket.waits == 20


async def test_idle_time_refills_up_to_the_burst_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate_per_s=100, burst=50)
    await bucket.take(50)
    await trio.sleep(60)  # a minute idle refills 50, not 6000
    start = trio.current_time()
    await bucket.take(50)
    assert trio.current_time() == start
    await bucket.take(100)  # more than the burst counts as a full bucket
    assert trio.current_time() - start == pytest.approx(0.5)


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate_per_s=0, burst=1)


async def test_an_agent_sending_too_fast_is_read_more_slowly_never_cut(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    from common.link import memory_link_pair
    from daemon.agents.identity import HostIdentity
    from daemon.agents.session import Session
    from daemon.agents.throttle import StreamLimits
    from proto.dispatch import v1 as pb

    agent, daemon_end = memory_link_pair()
    identity = HostIdentity(host_id="h1", labels={}, hostname="h1", agent_version="t")
    session = Session(daemon_end, identity, pb.Hello(host_id="h1"), writer=None,  # type: ignore[arg-type]
                      heartbeat_interval_s=10, heartbeat_ttl_s=60,
                      limits=StreamLimits(messages_per_s=20, bytes_per_s=1e9))  # fmt: skip
    nursery.start_soon(session.serve)
    start = trio.current_time()
    for _ in range(60):
        await agent.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
    while daemon_end._receive_channel.statistics().current_buffer_used:  # noqa: ASYNC110
        await trio.sleep(0.01)
    # 40 pass at once (the burst), the other 20 at 20 per second.
    assert trio.current_time() - start == pytest.approx(1.0, abs=0.05)
    assert session.close_reason is None and session.throttled() == 20
    session.close("test over")
