"""A network partition that TCP does not notice: the connection between an agent and the daemon
stays open but no byte moves (a loopback proxy black-holes both directions, and any new
connection too). Both sides must notice by their heartbeats within the TTL; a partition that
heals within the agent grace delivers the real result, one that does not ends ``agent_lost``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from tests.faults.harness import FaultCluster, FaultyProxy, record_figure

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

TTL_S = 2.0
AGENT_SILENT = f"nothing heard from the daemon for {TTL_S:.1f} s"
DAEMON_SILENT = f"silent for {TTL_S:g} s (heartbeat TTL)"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


async def partition(
    cluster: FaultCluster, proxy: FaultyProxy, host: str, request: pytest.FixtureRequest
) -> None:
    """Black-hole the agent's traffic and wait until both sides noticed; report how long each
    took (the agent learns the TTL from the daemon's Welcome)."""
    agent_log_before = cluster.agent_log(host).count(AGENT_SILENT)
    daemon_log_before = cluster.daemon_log().count(DAEMON_SILENT)
    proxy.blackhole()
    began = time.monotonic()
    noticed: dict[str, float] = {}
    with trio.fail_after(5 * TTL_S):
        while len(noticed) < 2:
            now = time.monotonic() - began
            if "daemon" not in noticed and (
                (await cluster.get(f"/api/v1/hosts/{host}"))["status"] == "offline"
            ):
                noticed["daemon"] = now
            if "agent" not in noticed and cluster.agent_log(host).count(AGENT_SILENT) > (
                agent_log_before
            ):
                noticed["agent"] = now
            await trio.sleep(0.02)
    assert cluster.daemon is not None
    assert cluster.daemon.log_text().count(DAEMON_SILENT) > daemon_log_before
    for side, seconds in noticed.items():
        record_figure(request, f"partition noticed by the {side} (TTL {TTL_S:g} s)", seconds, "s")


async def start(cluster: FaultCluster, grace_s: float) -> FaultyProxy:
    await cluster.start_daemon(
        "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", str(TTL_S),
        "--agent-grace-s", str(grace_s),
    )  # fmt: skip
    proxy = FaultyProxy(cluster.grpc_port)
    await cluster.nursery.start(proxy.serve)
    await cluster.start_agent("p1", port=proxy.port)
    return proxy


async def test_a_partition_healed_within_the_grace_delivers_the_real_result(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    proxy = await start(cluster, grace_s=15)
    marker = cluster.tmp / "ran"
    script = f"echo run >> {marker}; echo before; sleep 2; echo during; echo warn >&2; exit 5"
    task_id = await cluster.run_task(["p1"], script)
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    await cluster.wait_stdout_lines(execution["id"], 1)
    await partition(cluster, proxy, "p1", request)
    await trio.sleep(1.0)  # the command ends during the partition
    assert (await cluster.execution(execution["id"]))["status"] == "running"
    healed = time.monotonic()
    proxy.heal()
    task = await cluster.wait_task(task_id, timeout_s=30)
    record_figure(request, "heal to result recorded", time.monotonic() - healed, "s")
    detail = await cluster.execution(execution["id"])
    assert (task["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
        "failed", "failed", "exit_nonzero", 5,
    )  # fmt: skip
    assert (detail["stdout"], detail["stderr"]) == ("before\nduring\n", "warn\n")
    assert (detail["stdout_bytes"], detail["stderr_bytes"]) == (14, 5)
    assert marker.read_text() == "run\n"  # it ran once
    await cluster.wait_online(["p1"])


async def test_a_partition_longer_than_the_grace_ends_agent_lost(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    proxy = await start(cluster, grace_s=2)
    script = "echo before; sleep 2; echo during; exit 5"
    task_id = await cluster.run_task(["p1"], script)
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    await cluster.wait_stdout_lines(execution["id"], 1)
    began = time.monotonic()
    await partition(cluster, proxy, "p1", request)
    task = await cluster.wait_task(task_id, timeout_s=30)
    record_figure(request, "partition to agent_lost (TTL 2 s + grace 2 s)",
                  time.monotonic() - began, "s")  # fmt: skip
    lost = await cluster.execution(execution["id"])
    assert (task["status"], lost["status"], lost["reason"], lost["exit_code"]) == (
        "failed", "failed", "agent_lost", None,
    )  # fmt: skip
    assert lost["stdout"] == "before\n"
    proxy.heal()  # the agent comes back with its real result: the record stays as decided
    await cluster.wait_online(["p1"])
    check = await cluster.run_task(["p1"], "echo fine")
    assert (await cluster.wait_task(check))["status"] == "completed"
    after = await cluster.execution(execution["id"])
    assert (after["status"], after["reason"], after["exit_code"]) == ("failed", "agent_lost", None)


async def test_output_produced_during_a_long_partition_is_still_stored(
    cluster: FaultCluster, request: pytest.FixtureRequest
) -> None:
    proxy = await start(cluster, grace_s=2)
    task_id = await cluster.run_task(["p1"], "echo before; sleep 2; echo during; exit 5")
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    await cluster.wait_stdout_lines(execution["id"], 1)
    await partition(cluster, proxy, "p1", request)
    await cluster.wait_task(task_id, timeout_s=30)
    proxy.heal()
    await cluster.wait_online(["p1"])
    check = await cluster.run_task(["p1"], "echo fine")
    await cluster.wait_task(check)
    after = await cluster.execution(execution["id"])
    # The decision stands (agent_lost, no exit code), but every byte the command wrote and the
    # agent delivered is part of the record.
    assert (after["status"], after["reason"], after["exit_code"]) == ("failed", "agent_lost", None)
    assert (after["stdout"], after["stdout_bytes"]) == ("before\nduring\n", 14)


async def test_enrolment_survives_an_agent_that_gave_up_waiting(cluster: FaultCluster) -> None:
    await cluster.start_daemon()
    proxy = FaultyProxy(cluster.grpc_port)
    await cluster.nursery.start(proxy.serve)
    proxy.blackhole("down")  # the daemon hears the agent; its answers are held back
    await cluster.start_agent("e1", "--connect-timeout-s", "1", port=proxy.port, wait=False)
    with trio.fail_after(20):
        while "host e1: credential issued" not in cluster.daemon_log():  # noqa: ASYNC110
            await trio.sleep(0.05)
        while "no Welcome within 1.0 s" not in cluster.agent_log("e1"):  # noqa: ASYNC110
            await trio.sleep(0.05)
    proxy.heal()
    await cluster.wait_online(["e1"], timeout_s=15)
