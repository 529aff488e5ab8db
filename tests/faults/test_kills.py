"""``kill -9`` of an agent and of the daemon at awkward moments, through the real programs: every
recorded state asserted exactly, every byte produced found in the record, every pid checked."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import trio

from tests.e2e.cluster import alive, wait_gone
from tests.faults.harness import FaultCluster, FaultyProxy, by_host, kill_pids, record_figure

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

SEQ = "".join(f"{i}\n" for i in range(1, 2001))


def restart_error(cluster: FaultCluster) -> str:
    """What the restarted agent reports for a command it found running (one setsid child)."""
    text = "agent restarted while the command ran; process group killed (SIGTERM)"
    if cluster.cgroup_root is not None:
        text += ", and 1 process that had left it, through the command's cgroup"
    return text


async def start_running(cluster: FaultCluster, host: str) -> tuple[str, dict, list[int]]:
    """A task whose command printed everything it will print, and now sleeps (with a setsid
    child that left its process group)."""
    script = "echo $$ >&2; seq 1 2000; setsid sh -c 'echo $$ >&2; exec sleep 60' & wait"
    task_id = await cluster.run_task([host], script, timeout_s=60)
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    with trio.fail_after(20):
        while True:
            detail = await cluster.execution(execution["id"])
            if detail["stdout_bytes"] == len(SEQ) and len(detail["stderr"].split()) == 2:
                return task_id, execution, [int(p) for p in detail["stderr"].split()]
            await trio.sleep(0.05)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_an_agent_killed_again_and_again_loses_nothing(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    # A long grace (the daemon's default is 30 s) for the rounds that come back within it; the
    # round that stays away longer waits for it once.
    await cluster.start_daemon("--agent-grace-s", "6")
    proxy = FaultyProxy(cluster.grpc_port)
    await cluster.nursery.start(proxy.serve)
    await cluster.start_agent("k1", port=proxy.port)
    leftovers: list[int] = []
    try:
        # Round 1, back within the grace: the new agent kills what its predecessor left
        # (process group and cgroup) and reports it; the output produced before is all there.
        for _round in range(2):
            task_id, execution, pids = await start_running(cluster, "k1")
            await cluster.agents["k1"].kill(signal.SIGKILL)
            assert [alive(pid) for pid in pids] == [True, True]  # nobody killed them yet
            await cluster.start_agent("k1", port=proxy.port)
            task = await cluster.wait_task(task_id)
            detail = await cluster.execution(execution["id"])
            got = (task["status"], detail["status"], detail["reason"], detail["exit_code"])
            assert got == ("failed", "failed", "agent_restart", None)
            assert detail["signal"] is None
            assert detail["error"] == restart_error(cluster)
            assert (detail["stdout"], detail["stdout_bytes"]) == (SEQ, len(SEQ))
            survivors = pids[1:] if cluster.cgroup_root is None else []
            leftovers += survivors
            assert await wait_gone(pids[:1] if survivors else pids) == []

        # Round 2, back after the grace: recorded agent_lost by the daemon; the agent that
        # comes back later still kills what was left, and the record does not change again.
        task_id, execution, pids = await start_running(cluster, "k1")
        await cluster.agents["k1"].kill(signal.SIGKILL)
        began = time.monotonic()
        task = await cluster.wait_task(task_id, timeout_s=30)
        record_figure(request, "kill -9 to agent_lost", time.monotonic() - began, "s")
        lost = await cluster.execution(execution["id"])
        assert (task["status"], lost["status"], lost["reason"], lost["exit_code"]) == (
            "failed", "failed", "agent_lost", None,
        )  # fmt: skip
        assert (lost["stdout"], lost["stdout_bytes"]) == (SEQ, len(SEQ))
        assert [alive(pid) for pid in pids] == [True, True]
        await cluster.start_agent("k1", port=proxy.port)
        survivors = pids[1:] if cluster.cgroup_root is None else []
        leftovers += survivors
        assert await wait_gone(pids[:1] if survivors else pids) == []
        check = await cluster.run_task(["k1"], "echo fine")  # its replay went through first
        assert (await cluster.wait_task(check))["status"] == "completed"
        assert await cluster.execution(execution["id"]) == lost

        # Round 3, a result produced while disconnected survives the agent's crash: the
        # command ends behind a partition, its Finished is journaled, the agent dies, comes
        # back within the grace, and replays it.
        marker = cluster.tmp / "ran"
        script = f"echo run >> {marker}; sleep 1; echo out; echo err >&2; exit 3"
        task_id = await cluster.run_task(["k1"], script)
        (execution,) = await cluster.wait_executions(
            task_id, lambda items: items[0]["status"] == "running"
        )
        proxy.blackhole()
        with trio.fail_after(20):
            while f"command_host {execution['id']}: finished" not in cluster.agent_log("k1"):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await cluster.agents["k1"].kill(signal.SIGKILL)
        proxy.heal()
        await cluster.start_agent("k1", port=proxy.port, wait=False)
        task = await cluster.wait_task(task_id)
        detail = await cluster.execution(execution["id"])
        assert (task["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
            "failed", "failed", "exit_nonzero", 3,
        )  # fmt: skip
        assert (detail["stdout"], detail["stderr"]) == ("out\n", "err\n")
        assert marker.read_text() == "run\n"  # it ran once
    finally:
        kill_pids(leftovers)


async def test_a_daemon_killed_mid_task_loses_no_result(cluster: FaultCluster) -> None:
    await cluster.start_daemon()
    hosts = ["d1", "d2", "d3", "gone"]
    await cluster.start_agents(*hosts)
    lines = "".join(f"line-{i}\n" for i in range(1, 21))
    script = "echo $$ >&2; for i in $(seq 1 20); do echo line-$i; sleep 0.1; done"
    task_id = await cluster.run_task(hosts, script, "echo after")
    running = await cluster.wait_executions(
        task_id, lambda items: sum(e["status"] == "running" for e in items) == 4
    )
    gone = by_host(running)[("gone", 0)]
    with trio.fail_after(20):
        while not (await cluster.execution(gone["id"]))["stderr"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    orphan = int((await cluster.execution(gone["id"]))["stderr"])
    assert cluster.daemon is not None
    await cluster.daemon.kill(signal.SIGKILL)  # mid-output
    await cluster.agents["gone"].kill(signal.SIGKILL)  # and one agent never comes back
    await trio.sleep(2.5)  # the other commands finish while the daemon is down
    await cluster.start_daemon()
    try:
        task = await cluster.wait_task(task_id, timeout_s=60)
        rows = by_host(await cluster.executions(task_id))
        assert task["status"] == "failed"
        assert {key: (e["status"], e["reason"], e["exit_code"]) for key, e in rows.items()} == {
            ("d1", 0): ("succeeded", "exit_zero", 0),
            ("d2", 0): ("succeeded", "exit_zero", 0),
            ("d3", 0): ("succeeded", "exit_zero", 0),
            ("d1", 1): ("succeeded", "exit_zero", 0),
            ("d2", 1): ("succeeded", "exit_zero", 0),
            ("d3", 1): ("succeeded", "exit_zero", 0),
            ("gone", 0): ("failed", "daemon_restart", None),
            ("gone", 1): ("skipped", "previous_failed", None),
        }
        for host in ("d1", "d2", "d3"):
            first = await cluster.execution(rows[(host, 0)]["id"])
            assert (first["stdout"], first["stdout_bytes"]) == (lines, len(lines))
            assert (await cluster.execution(rows[(host, 1)]["id"]))["stdout"] == "after\n"
    finally:
        kill_pids([orphan])


async def test_an_idempotent_create_survives_a_daemon_killed_at_any_moment(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("i1")
    body = {"name": "once", "commands": [{"script": "true", "timeout_s": 5}],
            "targets": {"hosts": ["i1"]}}  # fmt: skip
    delays_s = [0.0, 0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.05]
    answered_first = written_unanswered = 0
    ids: dict[str, str] = {}
    for attempt, delay_s in enumerate(delays_s):
        key = f"create-{attempt}"
        first: list[httpx.Response] = []

        async def create(key: str = key, first: list[httpx.Response] = first) -> None:
            try:
                first.append(await cluster.http.post("/api/v1/tasks", json=body,
                                                     headers={"Idempotency-Key": key}))  # fmt: skip
            except httpx.TransportError:
                pass  # the daemon died under the request

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await trio.sleep(delay_s)
            assert cluster.daemon is not None
            await cluster.daemon.kill(signal.SIGKILL)
        await cluster.start_daemon()
        before = len((await cluster.get("/api/v1/tasks?limit=1000"))["items"])
        if before > len(ids) and not (first and first[0].status_code == 201):
            written_unanswered += 1  # the window that matters: written, answer lost
        again = await cluster.http.post("/api/v1/tasks", json=body,
                                        headers={"Idempotency-Key": key})  # fmt: skip
        assert again.status_code == 201, again.text
        ids[key] = again.json()["id"]
        if first and first[0].status_code == 201:
            answered_first += 1
            assert first[0].json()["id"] == ids[key]
    tasks = (await cluster.get("/api/v1/tasks?limit=1000"))["items"]
    assert sorted(t["id"] for t in tasks) == sorted(ids.values())  # exactly one task per key
    assert len(set(ids.values())) == len(delays_s)
    record_figure(
        request, "creates answered before the kill", answered_first, f"of {len(delays_s)}"
    )
    record_figure(
        request, "creates written but unanswered", written_unanswered, f"of {len(delays_s)}"
    )
