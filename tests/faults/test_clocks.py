"""Wall clocks that are wrong or jump, on an agent or on the daemon (libfaketime with
``FAKETIME_DONT_FAKE_MONOTONIC=1``: only the wall clock moves, as settimeofday would move it).
Timeouts and graces run on monotonic clocks, so they fire when they should; recorded times come
from the daemon's clock, durations from the agent's monotonic one."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultCluster,
    by_host,
    environment,
    faketime_env,
    kill_pids,
    record_figure,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

HOUR = 3600.0


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


def moment(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_an_agent_clock_a_day_behind_that_jumps_mid_command(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    await cluster.start_daemon()
    clock = cluster.tmp / "agent-clock"
    with environment(**faketime_env(clock, "-1d")):
        await cluster.start_agent("c1")
    before = time.time()
    task_id = await cluster.run_task(["c1"], "echo $$; sleep 30", "echo next", timeout_s=2,
                                     continue_on_error=True)  # fmt: skip
    first, _ = await cluster.wait_executions(task_id, lambda items: items[0]["status"] == "running")
    clock.write_text("+1h\n")  # mid-command, the agent's wall clock jumps 25 hours forward
    jumped = time.monotonic()
    task = await cluster.wait_task(task_id, timeout_s=30)
    record_figure(request, "agent clock jump to timeout recorded (timeout 2 s)",
                  time.monotonic() - jumped, "s")  # fmt: skip
    after = time.time()
    rows = by_host(await cluster.executions(task_id))
    timed_out, following = rows[("c1", 0)], rows[("c1", 1)]
    detail = await cluster.execution(timed_out["id"])
    assert (task["status"], detail["status"], detail["reason"], detail["exit_code"],
            detail["signal"]) == ("failed", "timed_out", "timeout", None, 15)  # fmt: skip
    assert detail["error"] == "timed out after 2.0 s; process group killed (SIGTERM)"
    assert (following["status"], following["exit_code"]) == ("succeeded", 0)
    # The agent's clock never reaches the record: every time is the daemon's, in this window.
    for row in (timed_out, following):
        started, finished = moment(row["started_at"]), moment(row["finished_at"])
        assert before - 1 <= started <= finished <= after + 1, row
        assert abs((finished - started) - row["duration_s"]) < 1.0, row
    assert 2.0 <= timed_out["duration_s"] < 60  # the monotonic timeout, not a wall-clock one
    assert moment(following["started_at"]) >= moment(timed_out["finished_at"])
    kill_pids([int(detail["stdout"].split()[0])])


async def test_a_daemon_clock_that_jumps_an_hour_mid_task(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    clock = cluster.tmp / "daemon-clock"
    with environment(**faketime_env(clock, "+0")):
        # A TTL a loaded machine's stalls cannot reach, a grace short enough to wait for.
        await cluster.start_daemon("--heartbeat-ttl-s", "8", "--agent-grace-s", "5")
    await cluster.start_agents("ok", "gone")
    before = time.time()
    task_id = await cluster.run_task(["ok", "gone"], "echo $$; sleep 3; echo done")
    running = await cluster.wait_executions(
        task_id, lambda items: all(e["status"] == "running" for e in items)
    )
    gone = by_host(running)[("gone", 0)]
    orphan = int((await cluster.wait_stdout_lines(gone["id"], 1))[0])
    clock.write_text("+1h\n")  # the daemon's wall clock jumps an hour forward
    await cluster.agents["gone"].kill(signal.SIGKILL)
    killed = time.monotonic()
    try:
        task = await cluster.wait_task(task_id, timeout_s=30)
        record_figure(request, "agent killed to agent_lost across the jump (grace 5 s)",
                      time.monotonic() - killed, "s")  # fmt: skip
        rows = by_host(await cluster.executions(task_id))
        ok, lost = rows[("ok", 0)], rows[("gone", 0)]
        assert task["status"] == "failed"
        assert (ok["status"], ok["reason"], ok["exit_code"]) == ("succeeded", "exit_zero", 0)
        assert (lost["status"], lost["reason"], lost["exit_code"]) == (
            "failed", "agent_lost", None,
        )  # fmt: skip
        assert (await cluster.execution(ok["id"]))["stdout"].endswith("\ndone\n")
        # Times are the daemon's clock: before the jump for the starts, after it for the ends.
        for row in (ok, lost):
            assert before - 1 <= moment(row["started_at"]) <= before + 30, row
            assert before + HOUR <= moment(row["finished_at"]) <= before + HOUR + 60, row
        # The duration is the agent's monotonic measurement, the lost one the daemon's view.
        assert 3.0 <= ok["duration_s"] < 60
        assert moment(task["finished_at"]) >= before + HOUR
    finally:
        kill_pids([orphan])
