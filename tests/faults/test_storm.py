"""2,000 agents reconnecting at once after ``kill -9`` of the daemon, with a command in flight
on every one of them: all come back, none is refused for good, no result is lost. The time until
all are back is reported."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.e2e.cluster import AGENT_TOKEN
from tests.faults.harness import FaultCluster, record_figure

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

PROCESSES, PER_PROCESS = 4, 500


async def online_hosts(cluster: FaultCluster) -> set[str]:
    found: set[str] = set()
    cursor = None
    while True:
        query = "/api/v1/hosts?status=online&limit=1000" + (f"&cursor={cursor}" if cursor else "")
        page = await cluster.get(query)
        found |= {host["id"] for host in page["items"]}
        cursor = page["next_cursor"]
        if not cursor:
            return found


async def wait_all_online(cluster: FaultCluster, hosts: list[str], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while not set(hosts) <= await online_hosts(cluster):  # noqa: ASYNC110
            await trio.sleep(0.25)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


async def test_two_thousand_agents_reconnect_after_a_daemon_crash_and_lose_nothing(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    # Heartbeats scaled to the fleet (the daemon's defaults), a grace long enough for a storm.
    daemon_args = ("--heartbeat-interval-s", "5", "--heartbeat-ttl-s", "15",
                   "--agent-grace-s", "120", "--log-level", "info")  # fmt: skip
    await cluster.start_daemon(*daemon_args)
    hosts = []
    began = time.monotonic()
    for number in range(PROCESSES):
        prefix = f"f{number}"
        hosts += [f"{prefix}-{i:04d}" for i in range(PER_PROCESS)]
        argv = [
            sys.executable, "-m", "tests.e2e.many_agents", "--server",
            f"127.0.0.1:{cluster.grpc_port}", "--token", AGENT_TOKEN, "--prefix", prefix,
            "--count", str(PER_PROCESS), "--state-root", str(cluster.tmp / "fleet"),
            "--reconnect-min-s", "0.1", "--reconnect-max-s", "5", "--connect-timeout-s", "10",
            "--no-journal-fsync",
        ]  # fmt: skip
        if cluster.cgroup_root is not None:
            argv += ["--cgroup-root", str(cluster.cgroup_root)]
        await cluster.start_program(f"fleet-{prefix}", argv)
        # The first connection (enrolment) is not the fault under test: one process at a time.
        await wait_all_online(cluster, hosts, timeout_s=120)
    record_figure(request, "2000 agents first connected, 500 at a time",
                  time.monotonic() - began, "s")  # fmt: skip

    body = {"name": "storm", "commands": [{"script": "sleep 10; echo ok", "timeout_s": 300}],
            "targets": {"hosts": hosts}, "start": True}  # fmt: skip
    task_id = (await cluster.post("/api/v1/tasks", body))["id"]
    started = await cluster.wait_executions(
        task_id,
        lambda items: all(e["status"] in ("running", "succeeded") for e in items),
        timeout_s=120,
    )
    in_flight = sum(e["status"] == "running" for e in started)
    record_figure(request, "commands in flight when the daemon was killed", in_flight, "of 2000")
    assert cluster.daemon is not None
    await cluster.daemon.kill(signal.SIGKILL)
    crashed = time.monotonic()
    await cluster.start_daemon(*daemon_args)
    await wait_all_online(cluster, hosts, timeout_s=240)
    record_figure(request, "2000 agents all back after the daemon's restart",
                  time.monotonic() - crashed, "s")  # fmt: skip
    task = await cluster.wait_task(task_id, timeout_s=240)
    record_figure(request, "all 2000 results recorded after the restart",
                  time.monotonic() - crashed, "s")  # fmt: skip
    rows = await cluster.executions(task_id)
    assert task["status"] == "completed" and len(rows) == len(hosts)
    assert {e["host_id"] for e in rows} == set(hosts)
    assert {(e["status"], e["reason"], e["exit_code"], e["stdout_bytes"]) for e in rows} == {
        ("succeeded", "exit_zero", 0, 3)
    }
    assert await online_hosts(cluster) == set(hosts)  # none refused for good
    for number in range(PROCESSES):
        assert "Traceback" not in cluster.agents[f"fleet-f{number}"].log_text()
