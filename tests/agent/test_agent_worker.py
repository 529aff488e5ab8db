"""The worker: at-most-once, the parallelism limit, cancel and stop, all with a fake runner.

The journal writes files from worker threads, so these use the real clock and ``fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from agent.journal import Journal, open_journal
from agent.runner import Stop
from agent.worker import Worker
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import FakeRunner, run_message, wait_until


@asynccontextmanager
async def open_worker(
    state_dir: Path, runner: Any, *, max_parallel: int = 4
) -> AsyncIterator[tuple[Worker, Journal]]:
    async with open_journal(state_dir) as journal, trio.open_nursery() as nursery:
        worker = Worker(journal, runner, max_parallel=max_parallel)
        await nursery.start(worker.serve)
        yield worker, journal
        nursery.cancel_scope.cancel()


async def events_of(journal: Journal, command_host_id: int) -> list[pb.Event]:
    journal.rewind()
    events: list[pb.Event] = []
    with trio.move_on_after(0.2):
        while True:
            events.extend(await journal.next_batch(max_events=100, max_bytes=1 << 20))
    return [e for e in events if e.command_host_id == command_host_id]


async def wait_finished(journal: Journal, command_host_id: int) -> list[pb.Event]:
    while True:
        events = await events_of(journal, command_host_id)
        if events and events[-1].finished is not None:
            return events


async def test_the_same_run_twice_runs_once(tmp_path: Path) -> None:
    runner = FakeRunner()
    with trio.fail_after(10):
        async with open_worker(tmp_path, runner) as (worker, journal):
            assert worker.submit(run_message(1)) is True
            assert worker.submit(run_message(1)) is False  # while it runs
            events = await wait_finished(journal, 1)
            assert worker.submit(run_message(1)) is False  # after it finished
        # ... and after an agent restart, even once the daemon acknowledged everything.
        async with open_worker(tmp_path, runner) as (worker, journal):
            journal.ack(1, 3)
            assert worker.submit(run_message(1)) is False
            await trio.sleep(0.1)
    assert runner.calls == [1]
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[0].started == pb.Started(pid=4242)
    assert events[2].finished.outcome == pb.Outcome.EXITED


async def test_max_parallel_is_respected(tmp_path: Path) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with open_worker(tmp_path, runner, max_parallel=2) as (worker, journal):
            for command_host_id in range(1, 6):
                worker.submit(run_message(command_host_id))
            await wait_until(lambda: runner.running == 2)
            await trio.sleep(0.2)
            statistics = worker.statistics()
            assert (statistics.running, statistics.queued) == (2, 3)
            assert sorted(worker.active_ids()) == [1, 2, 3, 4, 5]
            assert sorted(journal.known_ids()) == [1, 2, 3, 4, 5]
            runner.release()
            for command_host_id in range(1, 6):
                await wait_finished(journal, command_host_id)
    assert runner.max_running == 2
    assert sorted(runner.calls) == [1, 2, 3, 4, 5]


async def test_cancel_of_a_queued_run_finishes_it_without_starting(tmp_path: Path) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with open_worker(tmp_path, runner, max_parallel=1) as (worker, journal):
            worker.submit(run_message(1))
            await wait_until(lambda: runner.running == 1)
            worker.submit(run_message(2))
            await trio.sleep(0.2)  # claimed, now waiting for the only slot
            assert journal.known_ids() == [1, 2]
            worker.cancel(2)
            events = await wait_finished(journal, 2)
            worker.cancel(2)  # finished: ignored
            worker.cancel(99)  # unknown: ignored
            runner.release()
            await wait_finished(journal, 1)
    assert runner.calls == [1]
    assert [e.seq for e in events] == [1]
    assert events[0].finished.outcome == pb.Outcome.CANCELLED
    assert events[0].finished.error == "cancelled by the daemon before it started"


async def test_cancel_of_a_running_command_reaches_its_runner(tmp_path: Path) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with open_worker(tmp_path, runner) as (worker, journal):
            worker.submit(run_message(1))
            await wait_until(lambda: runner.running == 1)
            worker.cancel(1)
            events = await wait_finished(journal, 1)
    assert events[-1].finished.outcome == pb.Outcome.CANCELLED
    assert events[-1].finished.error == "cancelled by the daemon; fake"


async def test_stop_all_ends_everything_as_agent_restart(tmp_path: Path) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with open_worker(tmp_path, runner, max_parallel=1) as (worker, journal):
            worker.submit(run_message(1))
            await wait_until(lambda: runner.running == 1)
            worker.submit(run_message(2))
            await worker.stop_all()
            assert worker.active_ids() == []
            assert worker.submit(run_message(3)) is False
            running = await events_of(journal, 1)
            queued = await events_of(journal, 2)
    assert running[-1].finished.outcome == pb.Outcome.AGENT_RESTART
    assert running[-1].finished.error == "agent stopped; fake"
    assert [e.seq for e in queued] == [1]
    assert queued[0].finished.error == "agent stopped before it started"


async def test_a_failing_runner_still_ends_in_a_finished_event(tmp_path: Path) -> None:
    async def broken_runner(run: pb.Run, report: Any, stop: Stop) -> pb.Finished:
        await report.started(1, None)
        raise RuntimeError("boom")

    with trio.fail_after(10):
        async with open_worker(tmp_path, broken_runner) as (worker, journal):
            worker.submit(run_message(1))
            events = await wait_finished(journal, 1)
    assert [e.seq for e in events] == [1, 2]
    assert events[1].finished.outcome == pb.Outcome.UNSPECIFIED
    assert events[1].finished.error == (
        "agent error while running the command: RuntimeError('boom')"
    )


async def test_cancelling_the_worker_still_journals_finished(tmp_path: Path) -> None:
    runner = FakeRunner(hold=True)
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            async with trio.open_nursery() as nursery:
                worker = Worker(journal, runner, max_parallel=2)
                await nursery.start(worker.serve)
                worker.submit(run_message(1))
                await wait_until(lambda: runner.running == 1)
                nursery.cancel_scope.cancel()
            events = await events_of(journal, 1)
    assert events[-1].finished.outcome == pb.Outcome.AGENT_RESTART
    assert events[-1].finished.error == "agent stopped; its process group was killed"
