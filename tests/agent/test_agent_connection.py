"""The agent's session logic against a fake daemon over memory links.

The journal writes from worker threads, so these use the real clock (with small intervals) and a
``fail_after`` each.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agent import __version__
from agent.config import AgentConfig
from agent.connection import open_agent
from common.retry import Backoff
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import FakeDaemon, FakeRunner, run_message, wait_until

MakeConfig = Callable[..., AgentConfig]


def agent_for(config: AgentConfig, daemon: FakeDaemon, runner: Any = None) -> Any:
    return open_agent(
        config, runner=runner or FakeRunner(), connect=daemon.connect, rng=random.Random(1)
    )


async def test_hello_describes_the_agent(make_config: MakeConfig, fake_daemon: FakeDaemon) -> None:
    config = make_config(labels={"role": "web", "dc": "a"}, max_parallel=3)
    with trio.fail_after(10):
        async with agent_for(config, fake_daemon):
            side = await fake_daemon.accept()
    assert side.hello == pb.Hello(
        host_id="host-a",
        agent_version=__version__,
        labels={"role": "web", "dc": "a"},
        hostname=socket.gethostname(),
        max_parallel=3,
        known_command_host_ids=[],
    )


async def test_run_events_ack_and_replay_after_reconnect(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    runner = FakeRunner()
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon, runner) as agent:
            side = await fake_daemon.accept()
            await side.welcome()
            await agent.wait_connected()
            await side.run(run_message(11, "first"))
            events = await side.events_until_finished(11)
            assert [(e.command_host_id, e.seq) for e in events] == [(11, 1), (11, 2), (11, 3)]
            assert events[1].output.data == b"ran first\n"
            assert all(e.monotonic_ns > 0 for e in events)
            await side.ack(11, 1)
            await wait_until(lambda: agent.journal.statistics().unacked_events == 2)

            # The stream drops before the rest is acknowledged: the agent says it knows 11,
            # and sends what was not acknowledged again, in order.
            await side.close()
            side = await fake_daemon.accept()
            assert side.hello.known_command_host_ids == [11]
            await side.welcome()
            replayed = await side.events(2)
            assert [(e.command_host_id, e.seq) for e in replayed] == [(11, 2), (11, 3)]
            assert replayed[1].finished == events[2].finished
            await side.ack(11, 3)
            await wait_until(lambda: agent.journal.statistics().unacked_events == 0)

            # Once the Finished is acknowledged, the id is no longer "known", but a repeated Run
            # for it is still never executed.
            await side.close()
            side = await fake_daemon.accept()
            assert side.hello.known_command_host_ids == []
            await side.welcome()
            await side.run(run_message(11, "again"), run_message(12, "second"))
            events = await side.events_until_finished(12)
            assert {e.command_host_id for e in events} == {12}
    assert runner.calls == [11, 12]


async def test_known_ids_include_running_commands(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon, runner):
            side = await fake_daemon.accept()
            await side.welcome()
            await side.run(run_message(5), run_message(6))
            await side.events(4)  # Started and Output of each
            await side.ack(5, 2)
            await side.ack(6, 2)
            await side.close()
            side = await fake_daemon.accept()
            assert side.hello.known_command_host_ids == [5, 6]
            await side.welcome()
            runner.release()
            events = await side.events(2)
            assert sorted((e.command_host_id, e.seq) for e in events) == [(5, 3), (6, 3)]


async def test_cancel_from_the_daemon_reaches_the_command(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon, runner):
            side = await fake_daemon.accept()
            await side.welcome()
            await side.run(run_message(7))
            await side.events(2)
            await side.cancel(7, 999)  # 999 is unknown: ignored
            [finished] = await side.events(1)
    assert (finished.command_host_id, finished.seq) == (7, 3)
    assert finished.finished == pb.Finished(
        outcome=pb.Outcome.CANCELLED, error="cancelled by the daemon; fake"
    )


async def test_heartbeats_are_sent_at_the_welcome_interval(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon):
            side = await fake_daemon.accept()
            await side.welcome(interval_ms=50, ttl_ms=5000)
            start = trio.current_time()
            for _ in range(5):
                message = await side.receive()
                assert message.heartbeat == pb.Heartbeat()
            elapsed = trio.current_time() - start
    assert 0.2 <= elapsed < 1.0


async def test_the_daemons_heartbeat_changes_the_cadence_at_once(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon):
            side = await fake_daemon.accept()
            await side.welcome(interval_ms=60_000, ttl_ms=180_000)
            await trio.sleep(0.2)
            # the fleet shrank: the agent must not finish the minute it began sleeping
            shorter = pb.Heartbeat(interval_ms=100, ttl_ms=2_000)
            await side.link.send(pb.ServerMessage(heartbeat=shorter))
            changed = trio.current_time()
            for _ in range(3):
                message = await side.receive()
                assert message.heartbeat == pb.Heartbeat()
            elapsed = trio.current_time() - changed
            assert elapsed < 1.0  # three beats 0.1 s apart, the first due at once
            # and the new TTL holds: a daemon silent for it (since that heartbeat) loses the stream
            await fake_daemon.accept()
            assert 2.0 <= trio.current_time() - changed < 3.0


async def test_watchdog_drops_a_silent_stream_and_reconnects(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon) as agent:
            side = await fake_daemon.accept()
            await side.welcome(interval_ms=50, ttl_ms=300)
            await agent.wait_connected()
            start = trio.current_time()
            second = await fake_daemon.accept()  # the daemon never spoke again
            elapsed = trio.current_time() - start
            assert fake_daemon.connects == 2
            await second.welcome()
    assert 0.3 <= elapsed < 1.0
    assert second.hello.host_id == "host-a"


async def test_daemon_messages_keep_the_watchdog_quiet(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    with trio.fail_after(10):
        async with agent_for(make_config(), fake_daemon):
            side = await fake_daemon.accept()
            await side.welcome(interval_ms=50, ttl_ms=300)
            for _ in range(10):
                await trio.sleep(0.1)
                await side.link.send(pb.ServerMessage(heartbeat=pb.Heartbeat()))
    assert fake_daemon.connects == 1


async def test_refusal_waits_the_maximum_backoff(
    make_config: MakeConfig, fake_daemon: FakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(reconnect_max_s=0.5)
    with trio.fail_after(10):
        async with agent_for(config, fake_daemon):
            side = await fake_daemon.accept()
            refusal = pb.Refusal(code="unknown_host", message="host-a is not enrolled")
            await side.link.send(pb.ServerMessage(refusal=refusal))
            start = trio.current_time()
            await fake_daemon.accept()
            elapsed = trio.current_time() - start
    assert 0.5 <= elapsed < 1.0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [
        "host host-a: the daemon refused the connection: unknown_host: host-a is not enrolled"
    ]


async def test_failed_connects_back_off(make_config: MakeConfig, fake_daemon: FakeDaemon) -> None:
    fake_daemon.refuse = True
    config = make_config(reconnect_min_s=0.01, reconnect_max_s=0.08)
    with trio.fail_after(10):
        async with agent_for(config, fake_daemon):
            await trio.sleep(1.0)
    # Full jitter averages half the ceiling: 0.005, 0.01, 0.02, 0.04 then 0.04 a try.
    assert 12 <= fake_daemon.connects <= 60


async def test_reconnect_waits_follow_the_backoff_and_start_over_after_a_welcome(
    make_config: MakeConfig, fake_daemon: FakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    refused = iter([True, True, True, False, True])  # three failures, a session, one more

    def connect() -> Any:
        fake_daemon.refuse = next(refused, False)
        return fake_daemon.connect()

    def waits() -> list[float]:  # the delays exactly as the agent computed them, not as logged
        logged = [r.args for r in caplog.records if "trying again in" in str(r.msg)]
        return [args[2] for args in logged if isinstance(args, tuple)]

    with trio.fail_after(10):
        async with open_agent(
            config, runner=FakeRunner(), connect=connect, rng=random.Random(1)
        ) as agent:
            side = await fake_daemon.accept()
            await side.welcome()
            await agent.wait_connected()
            await side.close()
            await wait_until(lambda: len(waits()) >= 5)
    backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s, rng=random.Random(1))
    expected = [backoff.next_delay() for _ in range(3)]
    backoff.reset()  # the welcome: the next loss starts from the shortest wait again
    expected += [backoff.next_delay() for _ in range(2)]
    assert waits()[:5] == expected


async def test_graceful_stop_kills_runs_and_delivers_their_end(
    make_config: MakeConfig, fake_daemon: FakeDaemon
) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def daemon() -> None:
                side = await fake_daemon.accept()
                await side.welcome()
                await side.run(run_message(21))
                events = await side.events_until_finished(21)
                finished = events[-1].finished
                assert finished.outcome == pb.Outcome.AGENT_RESTART
                assert finished.error == "agent stopped; fake"
                await side.ack(21, events[-1].seq)

            nursery.start_soon(daemon)
            config = make_config(shutdown_delivery_s=5.0)
            async with agent_for(config, fake_daemon, runner) as agent:
                await wait_until(lambda: runner.running == 1)
                await wait_until(lambda: agent.journal.statistics().unacked_events >= 2)
            start = trio.current_time()
    # Leaving the block waited for the ack, not for the whole delivery timeout.
    assert trio.current_time() - start < 1.0
    assert agent.journal.known_ids() == []


async def test_many_agents_in_one_process(make_config: MakeConfig, tmp_path: Path) -> None:
    count = 40
    daemons = [FakeDaemon() for _ in range(count)]
    results: dict[str, list[pb.Event]] = {}

    async def one(index: int) -> None:
        config = make_config(host_id=f"load-{index}", state_dir=tmp_path / f"agent-{index}")
        async with agent_for(config, daemons[index]):
            side = await daemons[index].accept()
            await side.welcome()
            await side.run(run_message(1000 + index, f"job{index}"))
            events = await side.events_until_finished(1000 + index)
            await side.ack(1000 + index, events[-1].seq)
            results[side.hello.host_id] = events

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    assert sorted(results) == sorted(f"load-{i}" for i in range(count))
    for host_id, events in results.items():
        index = int(host_id.split("-")[1])
        assert {e.command_host_id for e in events} == {1000 + index}
        assert [e.seq for e in events] == [1, 2, 3]
        assert events[1].output.data == f"ran job{index}\n".encode()
