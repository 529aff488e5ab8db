"""The dispatcher with the real writer, scheduler and a SQLite file; agents are scripted sessions
registered directly (the gRPC path is covered end to end in tests/e2e)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from daemon.agents.registry import Registry
from daemon.engine.dispatcher import Dispatcher
from daemon.engine.executions import ExecutionLimits
from daemon.engine.records import DatabaseRecords
from daemon.engine.tasks import TaskService
from daemon.store import models
from daemon.store.database import Database
from daemon.store.models import CommandHost, Task
from daemon.store.writer import Writer
from daemon.taskspec import CommandSpec, TaskSpec
from proto.dispatch import v1 as pb
from tests.daemon.core_testing import open_acking_writer, open_engine

GRACE_S = 0.3


@dataclass(eq=False)
class ScriptedAgent:
    """An AgentSession whose agent answers runs the way ``behaviour`` says."""

    host_id: str
    writer: Writer
    behaviour: str = "succeed"  # succeed | fail | hang | silent
    known_ids: frozenset[int] = frozenset()
    runs: list[int] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)
    closed: str | None = None
    seqs: dict[int, int] = field(default_factory=dict)
    nursery: trio.Nursery | None = None
    running_now: set[int] = field(default_factory=set)
    peak_running: int = 0

    def send_run_nowait(self, run: pb.Run) -> None:
        self.runs.append(run.command_host_id)
        assert self.nursery is not None
        self.nursery.start_soon(self._execute, run.command_host_id)

    def send_cancel_nowait(self, ids: list[int]) -> None:
        self.cancels.extend(ids)
        assert self.nursery is not None
        for ch_id in ids:
            if ch_id in self.running_now and self.behaviour != "silent":
                self.nursery.start_soon(self._report, ch_id, pb.Finished(
                    outcome=pb.Outcome.CANCELLED, signal=15))  # fmt: skip

    def ack_nowait(self, acks: dict[int, int]) -> None:
        pass

    def close(self, reason: str) -> None:
        self.closed = reason

    async def _execute(self, ch_id: int) -> None:
        self.running_now.add(ch_id)
        self.peak_running = max(self.peak_running, len(self.running_now))
        await self._event(ch_id, started=pb.Started(pid=1000 + ch_id))
        if self.behaviour in ("hang", "silent"):
            return
        await trio.sleep(0.05)
        code = 0 if self.behaviour == "succeed" else 7
        await self._report(
            ch_id,
            pb.Finished(
                outcome=pb.Outcome.EXITED,
                has_exit_code=True,
                exit_code=code,
                duration_ns=50_000_000,
            ),
        )

    async def _report(self, ch_id: int, finished: pb.Finished) -> None:
        self.running_now.discard(ch_id)
        await self._event(ch_id, finished=finished)

    async def _event(self, ch_id: int, **kind: object) -> None:
        seq = self.seqs[ch_id] = self.seqs.get(ch_id, 0) + 1
        event = pb.Event(command_host_id=ch_id, seq=seq, monotonic_ns=time.monotonic_ns(), **kind)
        await self.writer.record_events(self.host_id, self, [(event, time.time())])


@dataclass
class Core:
    database: Database
    writer: Writer
    registry: Registry
    dispatcher: Dispatcher
    tasks: TaskService
    nursery: trio.Nursery

    async def connect(self, host_id: str, behaviour: str = "succeed",
                      known: frozenset[int] = frozenset()) -> ScriptedAgent:  # fmt: skip
        agent = ScriptedAgent(host_id, self.writer, behaviour, known, nursery=self.nursery)
        await self.database.write(_ensure_host, host_id)
        await self.registry.attach(agent)
        return agent

    async def run(self, hosts: list[str], *scripts: str, **settings: object) -> int:
        commands = tuple(CommandSpec(script=s, timeout_s=5) for s in scripts)
        spec = TaskSpec(name="t", commands=commands, target_hosts=tuple(hosts), **settings)  # type: ignore[arg-type]
        return await self.tasks.create(spec, start=True, idempotency_key=None)

    async def wait_task(self, task_id: int, timeout_s: float = 10) -> Task:
        with trio.fail_after(timeout_s):
            while True:
                task = await self.database.read(Task.get_by_id, task_id)
                if task.status in ("completed", "failed", "cancelled"):
                    return task
                await trio.sleep(0.02)

    async def executions(self, task_id: int) -> dict[tuple[str, int], CommandHost]:
        rows = await self.database.read(
            lambda: list(CommandHost.select().where(CommandHost.task == task_id))
        )
        return {(r.host_id, r.command_index): r for r in rows}


async def eventually(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    """Poll in-memory state that has no event of its own to wait on."""
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


def _ensure_host(host_id: str) -> None:
    models.Host.insert(id=host_id, first_seen_at=0.0, labels="{}").on_conflict_ignore().execute()


@asynccontextmanager
async def open_core(db_url: str, nursery: trio.Nursery) -> AsyncIterator[Core]:
    """The daemon's core on ``db_url``; leaving it is a daemon shutdown (work stays in flight)."""
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    database = Database(db, read_threads=4)
    for host in ("offline-1", "late-1"):
        with db.connection_context():
            _ensure_host(host)
    limits = ExecutionLimits(GRACE_S, kill_grace_s=0.1, report_margin_s=0.2, max_output_bytes=1000)
    async with (
        open_acking_writer(database) as writer,
        open_engine(writer, DatabaseRecords(database), max_running_executions=5, limits=limits)
        as engine,
    ):
        tasks = engine.task_service(database)
        yield Core(database, writer, engine.registry, engine.dispatcher, tasks, nursery)
    db.close_all()


@pytest.fixture
async def core(db_url: str, nursery: trio.Nursery) -> AsyncIterator[Core]:
    async with open_core(db_url, nursery) as running:
        yield running


def statuses(rows: dict[tuple[str, int], CommandHost]) -> dict[tuple[str, int], tuple[str, str]]:
    return {key: (row.status, row.reason) for key, row in sorted(rows.items())}


async def test_every_host_runs_every_command_in_order(core: Core) -> None:
    agents = [await core.connect(f"h{i}") for i in range(3)]
    task_id = await core.run(["h0", "h1", "h2"], "echo one", "echo two")
    task = await core.wait_task(task_id)
    assert task.status == "completed" and task.error is None
    rows = await core.executions(task_id)
    assert set(statuses(rows).values()) == {("succeeded", "exit_zero")} and len(rows) == 6
    for agent in agents:
        first, second = (rows[(agent.host_id, i)] for i in (0, 1))
        assert agent.runs == [first.id, second.id]
        assert second.started_at >= first.finished_at


async def test_offline_target_fails_dispatch_and_the_task(core: Core) -> None:
    await core.connect("h0")
    task_id = await core.run(["h0", "offline-1"], "true", "true")
    assert (await core.wait_task(task_id)).status == "failed"
    assert statuses(await core.executions(task_id)) == {
        ("h0", 0): ("succeeded", "exit_zero"), ("h0", 1): ("succeeded", "exit_zero"),
        ("offline-1", 0): ("dispatch_failed", "agent_offline"),
        ("offline-1", 1): ("skipped", "previous_failed"),
    }  # fmt: skip


async def test_delivery_timeout_waits_for_a_late_agent(core: Core) -> None:
    task_id = await core.run(["late-1", "offline-1"], "true", delivery_timeout_s=1.0)
    await trio.sleep(0.3)
    await core.connect("late-1")
    await core.wait_task(task_id)
    assert statuses(await core.executions(task_id)) == {
        ("late-1", 0): ("succeeded", "exit_zero"),
        ("offline-1", 0): ("dispatch_failed", "delivery_timeout"),
    }


async def test_a_failure_skips_the_hosts_later_commands_unless_told_otherwise(core: Core) -> None:
    await core.connect("h0", behaviour="fail")
    skipping = await core.run(["h0"], "false", "true")
    await core.wait_task(skipping)
    assert statuses(await core.executions(skipping)) == {
        ("h0", 0): ("failed", "exit_nonzero"),
        ("h0", 1): ("skipped", "previous_failed"),
    }
    continuing = await core.run(["h0"], "false", "true", continue_on_error=True)
    await core.wait_task(continuing)
    assert statuses(await core.executions(continuing)) == {
        ("h0", 0): ("failed", "exit_nonzero"),
        ("h0", 1): ("failed", "exit_nonzero"),
    }
    row = (await core.executions(continuing))[("h0", 0)]
    assert (row.exit_code, row.error) == (7, "exited with 7")


async def test_past_max_failures_nothing_new_starts(core: Core) -> None:
    for i in range(6):
        await core.connect(f"f{i}", behaviour="fail")
    task_id = await core.run(
        [f"f{i}" for i in range(6)], "false", max_concurrency=1, max_failures=1
    )
    task = await core.wait_task(task_id)
    assert task.status == "failed" and "stopped after 2 hosts failed" in task.error
    rows = statuses(await core.executions(task_id))
    assert (
        list(rows.values())
        == [("failed", "exit_nonzero")] * 2 + [("cancelled", "error_threshold")] * 4
    )


async def test_the_daemon_wide_limit_bounds_running_executions(core: Core) -> None:
    agents = [await core.connect(f"h{i}") for i in range(20)]
    task_id = await core.run([a.host_id for a in agents], "sleep 1")
    await core.wait_task(task_id)
    rows = list((await core.executions(task_id)).values())
    assert {r.status for r in rows} == {"succeeded"}
    moments = sorted(
        [(r.started_at, 1) for r in rows] + [(r.finished_at, -1) for r in rows],
        key=lambda m: (m[0], m[1]),
    )
    running = peak = 0
    for _, step in moments:
        running += step
        peak = max(peak, running)
    assert peak <= 5


async def test_user_cancel_reaches_every_agent_and_waits_for_their_word(core: Core) -> None:
    agents = [await core.connect(f"h{i}", behaviour="hang") for i in range(3)]
    task_id = await core.run([a.host_id for a in agents], "sleep 60", "true")
    await eventually(lambda: all(a.runs for a in agents))
    await core.tasks.cancel(task_id)
    await core.tasks.cancel(task_id)  # twice: the same answer
    task = await core.wait_task(task_id)
    assert (task.status, task.error) == ("cancelled", "cancelled by user")
    rows = await core.executions(task_id)
    for agent in agents:
        assert agent.cancels == [rows[(agent.host_id, 0)].id]
        assert (rows[(agent.host_id, 0)].status, rows[(agent.host_id, 0)].signal) == (
            "cancelled",
            15,
        )
        assert rows[(agent.host_id, 1)].status == "cancelled"
        assert rows[(agent.host_id, 1)].error == "cancelled before it started"


async def test_an_unconfirmed_cancel_is_recorded_anyway(core: Core) -> None:
    agent = await core.connect("h0", behaviour="silent")
    task_id = await core.run(["h0"], "sleep 60")
    await eventually(lambda: bool(agent.runs))
    await core.tasks.cancel(task_id)
    await core.wait_task(task_id)
    row = (await core.executions(task_id))[("h0", 0)]
    assert (row.status, row.reason) == ("cancelled", "user_cancel")
    assert "did not confirm" in row.error


async def test_a_silent_connected_agent_times_out_after_the_backstop(core: Core) -> None:
    agent = await core.connect("h0", behaviour="silent")
    spec = TaskSpec(
        name="t", commands=(CommandSpec(script="sleep 60", timeout_s=0.2),), target_hosts=("h0",)
    )
    task_id = await core.tasks.create(spec, start=True, idempotency_key=None)
    await core.wait_task(task_id)
    row = (await core.executions(task_id))[("h0", 0)]
    assert (row.status, row.reason) == ("timed_out", "timeout")
    assert agent.cancels == [row.id]


async def test_an_agent_gone_past_the_grace_is_lost(core: Core) -> None:
    agent = await core.connect("h0", behaviour="hang")
    task_id = await core.run(["h0"], "sleep 60")
    await eventually(lambda: bool(agent.runs))
    await core.registry.detach(agent)
    task = await core.wait_task(task_id)
    row = (await core.executions(task_id))[("h0", 0)]
    assert (task.status, row.status, row.reason, row.exit_code) == (
        "failed",
        "failed",
        "agent_lost",
        None,
    )
    assert row.finished_at - row.started_at >= GRACE_S


async def test_an_agent_back_within_the_grace_delivers_its_result(core: Core) -> None:
    agent = await core.connect("h0", behaviour="hang")
    task_id = await core.run(["h0"], "sleep 1")
    await eventually(lambda: bool(agent.runs))
    ch_id = agent.runs[0]
    await core.registry.detach(agent)
    await trio.sleep(GRACE_S / 3)
    back = await core.connect("h0", behaviour="hang", known=frozenset({ch_id}))
    back.seqs = dict(agent.seqs)  # the same agent, its journal intact
    await back._report(
        ch_id,
        pb.Finished(outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=0, duration_ns=1),
    )
    await core.wait_task(task_id)
    row = (await core.executions(task_id))[("h0", 0)]
    assert (row.status, row.exit_code) == ("succeeded", 0)
    assert back.runs == []  # it was not sent again: it had it


async def test_a_run_lost_on_the_way_is_sent_again_on_reconnect(core: Core) -> None:
    agent = await core.connect("h0", behaviour="hang")
    agent.send_run_nowait = lambda run: agent.runs.append(run.command_host_id)  # type: ignore[method-assign]
    task_id = await core.run(["h0"], "true")
    await eventually(lambda: bool(agent.runs))
    await core.registry.detach(agent)
    back = await core.connect("h0", behaviour="succeed")
    await core.wait_task(task_id)
    assert back.runs == agent.runs
    assert statuses(await core.executions(task_id)) == {("h0", 0): ("succeeded", "exit_zero")}


async def test_start_and_cancel_answer_conflicts(core: Core) -> None:
    from daemon.errors import Conflict, NotFound

    await core.connect("h0")
    spec = TaskSpec(
        name="t", commands=(CommandSpec(script="true", timeout_s=5),), target_hosts=("h0",)
    )
    task_id = await core.tasks.create(spec, start=False, idempotency_key=None)
    await core.tasks.cancel(task_id)
    with pytest.raises(Conflict):
        await core.tasks.start(task_id)
    assert statuses(await core.executions(task_id)) == {("h0", 0): ("cancelled", "user_cancel")}
    done = await core.run(["h0"], "true")
    await core.wait_task(done)
    with pytest.raises(Conflict):
        await core.tasks.cancel(done)
    with pytest.raises(NotFound):
        await core.tasks.start(123456)


async def test_retry_runs_again_only_where_it_did_not_succeed(core: Core) -> None:
    await core.connect("good")
    await core.connect("bad", behaviour="fail")
    first = await core.run(["good", "bad", "offline-1"], "true")
    await core.wait_task(first)
    retry = await core.tasks.retry(first, only="failed")
    await core.wait_task(retry)
    rows = await core.executions(retry)
    assert sorted(host for host, _ in rows) == ["bad", "offline-1"]
    task = await core.database.read(Task.get_by_id, retry)
    assert task.retry_of == first


async def test_idempotency_key_gives_one_task(core: Core) -> None:
    from daemon.errors import Conflict

    await core.connect("h0")
    spec = TaskSpec(
        name="t", commands=(CommandSpec(script="true", timeout_s=5),), target_hosts=("h0",)
    )
    first = await core.tasks.create(spec, start=False, idempotency_key="k-1")
    again = await core.tasks.create(spec, start=False, idempotency_key="k-1")
    assert first == again
    other = TaskSpec(name="other", commands=spec.commands, target_hosts=("h0",))
    with pytest.raises(Conflict):
        await core.tasks.create(other, start=False, idempotency_key="k-1")
    count: Callable[[], int] = lambda: Task.select().count()  # noqa: E731
    assert await core.database.read(count) == 1


async def test_after_a_restart_in_flight_work_is_settled_and_queued_work_runs(
    db_url: str, nursery: trio.Nursery
) -> None:
    async with open_core(db_url, nursery) as before:
        returning = await before.connect("back", behaviour="hang")
        await before.connect("never", behaviour="hang")
        running = await before.run(["back", "never"], "sleep 60", "echo next")
        await eventually(lambda: len(returning.runs) == 1)
        await eventually(lambda: before.dispatcher.statistics().executions_in_flight == 2)
        await trio.sleep(0.1)  # both Started events durable
        for host in ("back", "never"):
            await before.registry.detach(before.registry.current(host))  # type: ignore[arg-type]
        spec = TaskSpec(
            name="q", commands=(CommandSpec(script="true", timeout_s=5),), target_hosts=("back",)
        )
        queued = await before.tasks.create(spec, start=False, idempotency_key=None)
        await before.database.write(  # started just as the daemon died: queued, never picked
            lambda: (
                models.Task.update(status="queued", queued_at=1.0)
                .where(models.Task.id == queued)
                .execute()
            )
        )
    # The daemon stopped: the first task is still running, its executions in flight.
    ch_id = returning.runs[0]
    async with open_core(db_url, nursery) as after:
        back = await after.connect("back", behaviour="succeed", known=frozenset({ch_id}))
        back.seqs = dict(returning.seqs)
        await back._report(
            ch_id,
            pb.Finished(outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=0, duration_ns=1),
        )
        first = await after.wait_task(running)
        second = await after.wait_task(queued)
        rows = statuses(await after.executions(running))
    assert (first.status, second.status) == ("failed", "completed")
    assert rows == {
        ("back", 0): ("succeeded", "exit_zero"),
        ("back", 1): ("succeeded", "exit_zero"),
        ("never", 0): ("failed", "daemon_restart"),
        ("never", 1): ("skipped", "previous_failed"),
    }
