"""The engine at the speed of logic: the real writer, ledger, dispatcher and scheduler over an
in-memory record (``memory_store``), scripted agents, and trio's ``MockClock`` with autojump, so
grace periods, delivery timeouts, backstops and limits are checked to the virtual second without
sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from daemon.agents.registry import Registry
from daemon.engine.dispatcher import Dispatcher
from daemon.engine.executions import ExecutionLimits
from daemon.engine.scheduler import Scheduler
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store.ledger import Ledger
from daemon.store.writer import Writer, run_writer
from proto.dispatch import v1 as pb
from tests.daemon.core_testing import WRITER_SETTINGS, acknowledging, open_engine
from tests.daemon.memory_store import MemoryStore

GRACE_S = 10.0
KILL_GRACE_S = 1.0
MARGIN_S = 2.0


@dataclass(eq=False)
class FakeAgent:
    """An agent that answers runs as ``behaviour`` says, after ``work_s`` virtual seconds."""

    host_id: str
    writer: Writer
    nursery: trio.Nursery
    behaviour: str = "succeed"  # succeed | fail | hang | silent (ignores cancels too)
    work_s: float = 1.0
    known_ids: frozenset[int] = frozenset()
    runs: list[tuple[float, int]] = field(default_factory=list)  # (when, execution id)
    cancels: list[tuple[float, int]] = field(default_factory=list)
    running: set[int] = field(default_factory=set)
    peak_running: int = 0
    seqs: dict[int, int] = field(default_factory=dict)

    def send_run_nowait(self, run: pb.Run) -> None:
        self.runs.append((trio.current_time(), run.command_host_id))
        self.nursery.start_soon(self._execute, run.command_host_id)

    def send_cancel_nowait(self, ids: list[int]) -> None:
        for ch_id in ids:
            self.cancels.append((trio.current_time(), ch_id))
            if ch_id in self.running and self.behaviour != "silent":
                self.running.discard(ch_id)
                cancelled = pb.Finished(outcome=pb.Outcome.CANCELLED, signal=15)
                self.nursery.start_soon(self._event, ch_id, "finished", cancelled)

    def ack_nowait(self, acks: dict[int, int]) -> None:
        pass

    def close(self, reason: str) -> None:
        pass

    async def _execute(self, ch_id: int) -> None:
        self.running.add(ch_id)
        self.peak_running = max(self.peak_running, len(self.running))
        await self._event(ch_id, "started", pb.Started(pid=100))
        if self.behaviour in ("hang", "silent"):
            return
        await trio.sleep(self.work_s)
        if ch_id not in self.running:
            return
        self.running.discard(ch_id)
        code = 0 if self.behaviour == "succeed" else 3
        await self._event(
            ch_id,
            "finished",
            pb.Finished(
                outcome=pb.Outcome.EXITED,
                has_exit_code=True,
                exit_code=code,
                duration_ns=int(self.work_s * 1e9),
            ),
        )

    async def _event(self, ch_id: int, kind: str, value: object) -> None:
        seq = self.seqs[ch_id] = self.seqs.get(ch_id, 0) + 1
        event = pb.Event(command_host_id=ch_id, seq=seq, **{kind: value})  # type: ignore[arg-type]
        await self.writer.record_events(self.host_id, self, [(event, trio.current_time())])


@dataclass
class Harness:
    store: MemoryStore
    writer: Writer
    registry: Registry
    dispatcher: Dispatcher
    scheduler: Scheduler
    nursery: trio.Nursery

    async def connect(self, host_id: str, **behaviour: object) -> FakeAgent:
        agent = FakeAgent(host_id, self.writer, self.nursery, **behaviour)  # type: ignore[arg-type]
        await self.registry.attach(agent)
        return agent

    def start(self, hosts: list[str], *scripts: str, **settings: object) -> int:
        task_id = self.store.create_task(hosts, *scripts, **settings)  # type: ignore[arg-type]
        self.scheduler.wake()
        return task_id

    async def wait_task(self, task_id: int) -> float:
        """When (virtual time) the task reached its final state."""
        while not self.store.tasks[task_id].status.terminal:  # noqa: ASYNC110
            await trio.sleep(0.01)
        return trio.current_time()


@asynccontextmanager
async def open_harness(
    store: MemoryStore | None = None, *, max_running_executions: int = 100
) -> AsyncIterator[Harness]:
    store = store or MemoryStore()
    ledger = Ledger(max_output_bytes=1000, next_seq=1)
    limits = ExecutionLimits(GRACE_S, KILL_GRACE_S, MARGIN_S, max_output_bytes=1000)
    settings = {k: v for k, v in WRITER_SETTINGS.items() if k != "max_output_bytes"}
    async with (
        run_writer(store.flush, ledger, **settings) as writer,
        acknowledging(writer),
        open_engine(
            writer, store, max_running_executions=max_running_executions, limits=limits
        ) as engine,
        trio.open_nursery() as agents,
    ):
        yield Harness(store, writer, engine.registry, engine.dispatcher, engine.scheduler, agents)
        agents.cancel_scope.cancel()


@pytest.fixture
async def engine() -> AsyncIterator[Harness]:
    """Tests using it also ask for ``autojump_clock``: pytest-trio takes the clock only from
    the test's own arguments."""
    async with open_harness() as harness:
        yield harness


async def test_every_command_runs_in_order_on_every_host(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = await engine.connect("a"), await engine.connect("b")
    task_id = engine.start(["a", "b"], "one", "two")
    await engine.wait_task(task_id)
    assert engine.store.tasks[task_id].status == TaskStatus.COMPLETED
    assert [i for _, i in a.runs] == sorted(i for _, i in a.runs) and len(b.runs) == 2
    assert {s for s, _ in engine.store.statuses(task_id).values()} == {ExecStatus.SUCCEEDED}


async def test_max_concurrency_one_is_a_rolling_run_in_target_order(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    agents = [await engine.connect(h, work_s=5.0) for h in ("c", "a", "b")]
    t0 = trio.current_time()
    task_id = engine.start(["c", "a", "b"], "deploy", max_concurrency=1)
    await engine.wait_task(task_id)
    starts = [agent.runs[0][0] - t0 for agent in agents]
    assert starts == sorted(starts)  # c, then a, then b: target order
    assert starts[1] - starts[0] >= 5.0 and starts[2] - starts[1] >= 5.0  # one at a time


async def test_daemon_wide_limit_bounds_executions_across_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness(max_running_executions=2) as engine:
        agents = [await engine.connect(f"h{i}", work_s=3.0) for i in range(6)]
        first = engine.start([f"h{i}" for i in range(3)], "x")
        second = engine.start([f"h{i}" for i in range(3, 6)], "y")
        t0 = trio.current_time()
        await engine.wait_task(first)
        done = await engine.wait_task(second)
        assert max(a.peak_running for a in agents) == 1
        # six executions of 3 s, two at a time: three rounds
        assert done - t0 == pytest.approx(9.0, abs=0.5)


async def test_past_max_failures_the_rest_never_start(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await engine.connect("bad", behaviour="fail")
    for host in ("x", "y"):
        await engine.connect(host)
    task_id = engine.start(["bad", "x", "y"], "x", max_concurrency=1, max_failures=0)
    await engine.wait_task(task_id)
    statuses = engine.store.statuses(task_id)
    assert statuses[("bad", 0)] == (ExecStatus.FAILED, Reason.EXIT_NONZERO)
    assert (
        statuses[("x", 0)] == statuses[("y", 0)] == (ExecStatus.CANCELLED, Reason.ERROR_THRESHOLD)
    )
    assert engine.store.tasks[task_id].status == TaskStatus.FAILED


async def test_offline_target_waits_exactly_the_delivery_timeout(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    t0 = trio.current_time()
    task_id = engine.start(["gone"], "x", delivery_timeout_s=30.0)
    done = await engine.wait_task(task_id)
    assert engine.store.statuses(task_id)[("gone", 0)] == (
        ExecStatus.DISPATCH_FAILED,
        Reason.DELIVERY_TIMEOUT,
    )
    assert done - t0 == pytest.approx(30.0, abs=0.1)


async def test_a_late_agent_within_the_delivery_timeout_runs(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    task_id = engine.start(["late"], "x", delivery_timeout_s=30.0)
    await trio.sleep(12.0)
    agent = await engine.connect("late")
    await engine.wait_task(task_id)
    assert engine.store.tasks[task_id].status == TaskStatus.COMPLETED
    assert agent.runs and agent.runs[0][0] >= 12.0


async def test_an_offline_target_without_patience_fails_at_once(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    task_id = engine.start(["gone"], "x")
    await engine.wait_task(task_id)
    assert engine.store.statuses(task_id)[("gone", 0)] == (
        ExecStatus.DISPATCH_FAILED,
        Reason.AGENT_OFFLINE,
    )


async def test_an_agent_gone_past_the_grace_is_lost_after_exactly_the_grace(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await engine.connect("h", behaviour="hang")
    task_id = engine.start(["h"], "x", timeout_s=600.0)
    while not agent.runs:  # noqa: ASYNC110
        await trio.sleep(0.01)
    left = trio.current_time()
    await engine.registry.detach(agent)
    done = await engine.wait_task(task_id)
    assert engine.store.statuses(task_id)[("h", 0)] == (ExecStatus.FAILED, Reason.AGENT_LOST)
    assert done - left == pytest.approx(GRACE_S, abs=0.1)


async def test_an_agent_back_within_the_grace_reports_and_nothing_is_decided(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await engine.connect("h", work_s=15.0)
    task_id = engine.start(["h"], "x", timeout_s=600.0)
    await trio.sleep(1.0)
    await engine.registry.detach(agent)
    await trio.sleep(GRACE_S - 1.0)
    ran = agent.runs[0][1]
    agent.known_ids = frozenset({ran})
    await engine.registry.attach(agent)
    await engine.wait_task(task_id)
    assert engine.store.statuses(task_id)[("h", 0)][0] == ExecStatus.SUCCEEDED
    assert len(agent.runs) == 1  # it held the run: nothing was sent twice


async def test_a_silent_connected_agent_is_stopped_at_the_backstop(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await engine.connect("h", behaviour="silent")
    t0 = trio.current_time()
    task_id = engine.start(["h"], "x", timeout_s=5.0)
    done = await engine.wait_task(task_id)
    assert engine.store.statuses(task_id)[("h", 0)] == (ExecStatus.TIMED_OUT, Reason.TIMEOUT)
    ((cancelled_at, _),) = agent.cancels
    backstop = 5.0 + KILL_GRACE_S + MARGIN_S
    assert cancelled_at - t0 == pytest.approx(backstop, abs=0.1)
    assert done - cancelled_at == pytest.approx(KILL_GRACE_S + MARGIN_S, abs=0.1)


async def test_a_user_cancel_is_recorded_when_the_agent_confirms(
    engine: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await engine.connect("h", behaviour="hang")
    await engine.connect("idle")
    task_id = engine.start(["h", "idle"], "x", "y", max_concurrency=1)
    while not agent.runs:  # noqa: ASYNC110
        await trio.sleep(0.01)
    assert engine.dispatcher.cancel_task(task_id)
    await engine.wait_task(task_id)
    statuses = engine.store.statuses(task_id)
    assert statuses[("h", 0)][0] == ExecStatus.CANCELLED
    assert statuses[("h", 1)] == statuses[("idle", 0)] == (ExecStatus.CANCELLED, Reason.USER_CANCEL)
    assert engine.store.tasks[task_id].status == TaskStatus.CANCELLED


async def test_after_a_restart_an_agent_that_never_returns_is_settled_daemon_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    task_id = store.create_task(["h"], "x", timeout_s=600.0)
    store.tasks[task_id].status = TaskStatus.RUNNING
    (execution,) = store.executions.values()
    execution.status = ExecStatus.RUNNING  # in flight when the daemon stopped
    execution.last_seq = 1
    async with open_harness(store) as engine:
        t0 = trio.current_time()
        done = await engine.wait_task(task_id)
    assert store.statuses(task_id)[("h", 0)] == (ExecStatus.FAILED, Reason.DAEMON_RESTART)
    assert done - t0 == pytest.approx(GRACE_S, abs=0.1)
