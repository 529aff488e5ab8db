"""Storage that stops cooperating: the SQLite file locked by another process for longer than the
busy timeout, a full disk under the database, a full disk under an agent's journal. Each must
give clear errors in the logs, recover once the fault clears, lose no result and corrupt
nothing (``PRAGMA integrity_check``)."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.faults.harness import (
    FaultCluster,
    fill,
    free_bytes,
    locker_argv,
    open_fault_cluster,
    record_figure,
    sqlite_integrity,
    sqlite_path,
    tmpfs,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

SEQ = "".join(f"{i}\n" for i in range(1, 1001))


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


async def wait_for_text(read: object, text: str, timeout_s: float = 20) -> None:
    with trio.fail_after(timeout_s):
        while text not in read():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_a_database_locked_longer_than_the_busy_timeout(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    await cluster.start_daemon("--db-busy-timeout-ms", "200")
    await cluster.start_agents("l1")
    task_id = await cluster.run_task(["l1"], "sleep 1; seq 1 1000; echo err >&2; exit 4")
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    locker = await cluster.start_program("locker", locker_argv(sqlite_path(cluster.db_url), 8))
    await wait_for_text(locker.log_text, "locked")
    body = {"name": "during the lock", "commands": [{"script": "true", "timeout_s": 5}],
            "targets": {"hosts": ["l1"]}}  # fmt: skip
    key = {"Idempotency-Key": "during-the-lock"}
    # While it lasts: the command ends (its events cannot be written; the writer retries), a
    # create is refused in words, reads still work (WAL), a new agent dials in.
    refused = await cluster.http.post("/api/v1/tasks", json=body, headers=key)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "unavailable")
    await cluster.start_agent("late", wait=False)
    assert (await cluster.execution(execution["id"]))["status"] == "running"
    await wait_for_text(cluster.daemon_log, "database is locked")
    assert locker.process is not None
    await locker.process.wait()
    released = time.monotonic()
    assert locker.log_text().split() == ["locked", "released"]
    # Then everything recovers: the result is recorded exactly, the create goes through once,
    # the agent that dialled during the lock is in.
    task = await cluster.wait_task(task_id, timeout_s=30)
    record_figure(request, "lock released to result recorded", time.monotonic() - released, "s")
    detail = await cluster.execution(execution["id"])
    assert (task["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
        "failed", "failed", "exit_nonzero", 4,
    )  # fmt: skip
    assert (detail["stdout"], detail["stderr"]) == (SEQ, "err\n")
    created = await cluster.post("/api/v1/tasks", body, headers=key)
    await cluster.wait_online(["late"])
    tasks = (await cluster.get("/api/v1/tasks?limit=100"))["items"]
    assert sorted(t["id"] for t in tasks) == sorted([task_id, created["id"]])
    assert cluster.daemon is not None and cluster.daemon.running
    assert sqlite_integrity(sqlite_path(cluster.db_url)) == "ok"


@pytest.fixture
async def cluster_on_tmpfs(tmp_path: Path) -> AsyncIterator[tuple[FaultCluster, Path]]:
    with tmpfs(tmp_path / "dbfs", "16m") as dbfs, trio.fail_after(120):
        async with open_fault_cluster(tmp_path, f"sqlite:///{dbfs / 'dispatch.db'}") as cluster:
            yield cluster, dbfs


async def test_a_full_disk_under_the_database(
    cluster_on_tmpfs: tuple[FaultCluster, Path], request: pytest.FixtureRequest
) -> None:
    cluster, dbfs = cluster_on_tmpfs
    await cluster.start_daemon("--max-output-bytes", "65536")
    await cluster.start_agents("f1")
    produced = "".join(f"{i}\n" for i in range(1, 100_001)).encode()
    task_id = await cluster.run_task(["f1"], "sleep 1; seq 1 100000; echo err >&2")
    await cluster.wait_executions(task_id, lambda items: items[0]["status"] == "running")
    filler = fill(dbfs, leave_bytes=0)
    record_figure(request, "free bytes under the database while full", free_bytes(dbfs), "B")
    # While it is full: the output cannot be written (the writer retries), and a create is
    # refused in words.
    await wait_for_text(cluster.daemon_log, "writing a batch of")
    body = {"name": "while full", "commands": [{"script": "true", "timeout_s": 5}],
            "targets": {"hosts": ["f1"]}}  # fmt: skip
    refused = await cluster.http.post("/api/v1/tasks", json=body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "unavailable")
    filler.unlink()
    cleared = time.monotonic()
    task = await cluster.wait_task(task_id, timeout_s=60)
    record_figure(request, "disk freed to result recorded", time.monotonic() - cleared, "s")
    (row,) = await cluster.executions(task_id)
    assert (task["status"], row["status"], row["exit_code"]) == ("completed", "succeeded", 0)
    assert (row["stdout_bytes"], row["stderr_bytes"]) == (len(produced), 4)
    raw = await cluster.http.get(f"/api/v1/executions/{row['id']}/output",
                                 params={"stream": "stdout"})  # fmt: skip
    assert raw.content == produced[:32768] + produced[-32768:]
    assert cluster.daemon is not None and cluster.daemon.running
    assert sqlite_integrity(dbfs / "dispatch.db") == "ok"


async def test_a_full_disk_under_the_agent_journal(
    cluster: FaultCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with tmpfs(tmp_path / "agentfs", "4m") as agentfs:
        state = agentfs / "j1"
        await cluster.start_daemon()
        await cluster.start_agent("j1", "--state-dir", str(state))
        filler = fill(agentfs, leave_bytes=0)
        marker = tmp_path / "ran"
        produced = "".join(f"{i}\n" for i in range(1, 100_001))
        task_id = await cluster.run_task(["j1"], f"echo run >> {marker}; seq 1 100000")
        await wait_for_text(lambda: cluster.agent_log("j1"), "No space left on device")
        filler.unlink()
        cleared = time.monotonic()
        await wait_for_text(lambda: cluster.agent_log("j1"), "writing again after")
        task = await cluster.wait_task(task_id, timeout_s=30)
        record_figure(request, "journal disk freed to result recorded",
                      time.monotonic() - cleared, "s")  # fmt: skip
        (row,) = await cluster.executions(task_id)
        assert (task["status"], row["status"], row["exit_code"], row["stdout_bytes"]) == (
            "completed", "succeeded", 0, len(produced),
        )  # fmt: skip
        raw = await cluster.http.get(f"/api/v1/executions/{row['id']}/output",
                                     params={"stream": "stdout"})  # fmt: skip
        assert raw.content == produced.encode()
        # The journal survived: a crash now and a restart find it whole, and nothing runs twice.
        await cluster.agents["j1"].kill(signal.SIGKILL)
        await cluster.wait_offline("j1")  # else "online" may still be the dead agent's stream
        await cluster.start_agent("j1", "--state-dir", str(state))
        again = await cluster.run_task(["j1"], "echo after")
        assert (await cluster.wait_task(again))["status"] == "completed"
        assert marker.read_text() == "run\n"
        assert "Traceback" not in cluster.agent_log("j1")
        assert await cluster.executions(task_id) == [row]


async def test_a_full_journal_disk_does_not_hold_results_back(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "agentfs", "4m") as agentfs:
        await cluster.start_daemon()
        await cluster.start_agent("j1", "--state-dir", str(agentfs / "j1"))
        fill(agentfs, leave_bytes=0)
        produced = "".join(f"{i}\n" for i in range(1, 100_001))
        task_id = await cluster.run_task(["j1"], "seq 1 100000")
        # The module docstring of agent/journal.py: "A failed write (a full disk) is logged and
        # retried with the state held in memory; the events still reach the sender, so nothing
        # is lost while the daemon is reachable."
        task = await cluster.wait_task(task_id, timeout_s=8)  # about 1 s with a working disk
        (row,) = await cluster.executions(task_id)
        assert (task["status"], row["stdout_bytes"]) == ("completed", len(produced))


async def test_a_full_disk_under_the_database_is_named_in_the_log(
    cluster_on_tmpfs: tuple[FaultCluster, Path],
) -> None:
    cluster, dbfs = cluster_on_tmpfs
    await cluster.start_daemon()
    await cluster.start_agents("f1")
    task_id = await cluster.run_task(["f1"], "sleep 1; seq 1 1000")
    await cluster.wait_executions(task_id, lambda items: items[0]["status"] == "running")
    filler = fill(dbfs, leave_bytes=0)
    try:
        await wait_for_text(cluster.daemon_log, "writing a batch of")
        await trio.sleep(0.5)
        failures = [line for line in cluster.daemon_log().splitlines() if "writing a batch" in line]
        assert all("database or disk is full" in line for line in failures), failures[0]
    finally:
        filler.unlink()
