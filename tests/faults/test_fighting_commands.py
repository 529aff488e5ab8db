"""Commands that fight back, through the real programs: what escapes the session, ignores
SIGTERM, holds stdout open, floods output, writes bytes that are not text, or ends oddly. Every
execution's recorded state is asserted exactly and every pid a command printed is checked
afterwards.

With cgroups (a writable v2 hierarchy), a timeout or cancel kills everything the command
started; without, what left the session survives, which is asserted too (and then killed by the
test): that is the promise the README makes in each case.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.cluster import wait_gone
from tests.faults.harness import FaultCluster, kill_pids, open_fault_cluster, pids_alive

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


@pytest.fixture(params=["cgroups", "process_groups"])
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, db_url: str
) -> AsyncIterator[FaultCluster]:
    """Agents with a cgroup per command where the machine allows it, and with --no-cgroups."""
    with trio.fail_after(120):
        async with open_fault_cluster(
            tmp_path, db_url, cgroups=request.param == "cgroups"
        ) as running:
            if request.param == "cgroups" and running.cgroup_root is None:
                pytest.skip("no writable cgroup v2 hierarchy with cgroup.kill here")
            yield running


# name -> (script, pids the command prints that must die with it, pids that left the session)
# Every script prints its pids on stderr, so stdout stays free for the output bomb.
ESCAPED = "setsid sh -c 'echo $$ >&2; exec sleep 60' &"
CASES: dict[str, tuple[str, int, int]] = {
    "setsid": (f"echo $$ >&2; {ESCAPED} sleep 60", 1, 1),
    "nohup": ("echo $$ >&2; nohup sh -c 'echo $$ >&2; exec sleep 60' >/dev/null & sleep 60", 2, 0),
    "double_fork": (
        'echo $$ >&2; sh -c \'setsid nohup sh -c "echo \\$\\$ >&2; exec sleep 60" '
        ">/dev/null & exit 0'; sleep 60",
        1,
        1,
    ),
    "ignores_term": (
        "trap '' TERM; echo $$ >&2; sh -c 'echo $$ >&2; exec sleep 60' & sleep 60",
        2,
        0,
    ),  # fmt: skip
    "holds_stdout": ("echo $$ >&2; sleep 60 & echo $! >&2; sleep 60", 2, 0),
    "output_bomb": (f"echo $$ >&2; {ESCAPED} yes", 1, 1),
}


def expected_error(cluster: FaultCluster, case: str, how: str) -> str:
    _, _, escaped = CASES[case]
    killed = "SIGTERM, then SIGKILL after 1.0 s" if case == "ignores_term" else "SIGTERM"
    text = f"{how}; process group killed ({killed})"
    if escaped and cluster.cgroup_root is not None:
        text += f", and {escaped} process{'es' if escaped > 1 else ''} that had left it, " \
            "through the command's cgroup"  # fmt: skip
    return text


async def start_cases(cluster: FaultCluster, host: str, timeout_s: float) -> dict[str, str]:
    tasks = {}
    for case, (script, _, _) in CASES.items():
        tasks[case] = await cluster.run_task([host], script, timeout_s=timeout_s, name=case)
    return tasks


async def settle_and_check(
    cluster: FaultCluster, tasks: dict[str, str], status: str, reason: str, how: dict[str, str]
) -> None:
    leftovers: list[int] = []
    try:
        for case, task_id in tasks.items():
            task = await cluster.wait_task(task_id, timeout_s=30)
            (row,) = await cluster.executions(task_id)
            detail = await cluster.execution(row["id"])
            script, own, escaped = CASES[case]
            pids = [int(p) for p in detail["stderr"].split()]
            assert len(pids) == own + escaped, (case, detail["stderr"])
            got = (task["status"], detail["status"], detail["reason"], detail["exit_code"])
            assert got == ("failed" if status == "timed_out" else "cancelled", status, reason,
                           None), case  # fmt: skip
            assert detail["signal"] == (9 if case == "ignores_term" else 15), case
            assert detail["error"] == expected_error(cluster, case, how[case]), case
            if case == "output_bomb":
                assert detail["stdout_bytes"] > 65536 and detail["output_truncated"] is True
                raw = await cluster.http.get(f"/api/v1/executions/{row['id']}/output",
                                             params={"stream": "stdout"})  # fmt: skip
                assert len(raw.content) == 65536 and set(raw.content) == {ord("y"), ord("\n")}
            survivors = pids[own:] if cluster.cgroup_root is None else []
            leftovers += survivors
            assert await wait_gone([p for p in pids if p not in survivors]) == [], case
            assert pids_alive(survivors) == survivors, case  # without cgroups: they escaped
    finally:
        kill_pids(leftovers)


async def test_timeouts_kill_everything_a_command_started(cluster: FaultCluster) -> None:
    await cluster.start_daemon("--max-output-bytes", "65536")
    await cluster.start_agents("t1")
    tasks = await start_cases(cluster, "t1", timeout_s=1)
    how = {case: "timed out after 1.0 s" for case in CASES}
    await settle_and_check(cluster, tasks, "timed_out", "timeout", how)


async def test_cancels_kill_everything_a_command_started(cluster: FaultCluster) -> None:
    await cluster.start_daemon("--max-output-bytes", "65536")
    await cluster.start_agents("c1")
    tasks = await start_cases(cluster, "c1", timeout_s=60)
    with trio.fail_after(30):
        for case, task_id in tasks.items():
            await cluster.wait_executions(task_id, lambda items: items[0]["status"] == "running")
            (row,) = await cluster.executions(task_id)
            _, own, escaped = CASES[case]
            while len((await cluster.execution(row["id"]))["stderr"].split()) < own + escaped:  # noqa: ASYNC110
                await trio.sleep(0.05)
    for task_id in tasks.values():
        await cluster.post(f"/api/v1/tasks/{task_id}/cancel", expect=202)
    how = {case: "cancelled by the daemon" for case in CASES}
    await settle_and_check(cluster, tasks, "cancelled", "user_cancel", how)


async def test_odd_endings_and_bytes_that_are_not_text_are_recorded_exactly(
    cluster: FaultCluster,
) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("e1")
    binary = b"\xff\xfe\x00abc\xc0\n\xe2\x82"  # NUL, invalid UTF-8, a cut-off character
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "exit 300": (
            "exit 300",
            {"status": "failed", "reason": "exit_nonzero", "exit_code": 44, "signal": None},
        ),  # fmt: skip
        "exit 255": (
            "exit 255",
            {"status": "failed", "reason": "exit_nonzero", "exit_code": 255, "signal": None},
        ),  # fmt: skip
        "SIGKILL": (
            "kill -9 $$",
            {"status": "failed", "reason": "signal", "exit_code": None, "signal": 9},
        ),  # fmt: skip
        "SIGSEGV": (
            "kill -SEGV $$",
            {"status": "failed", "reason": "signal", "exit_code": None, "signal": 11},
        ),  # fmt: skip
        "binary": (
            "printf '\\377\\376\\000abc\\300\\n\\342\\202'",
            {
                "status": "succeeded",
                "reason": "exit_zero",
                "exit_code": 0,
                "signal": None,
                "stdout_bytes": len(binary),
            },
        ),  # fmt: skip
        "grandchild keeps stdout": (
            "sleep 30 & echo $!; exit 0",
            {"status": "succeeded", "reason": "exit_zero", "exit_code": 0, "signal": None},
        ),
    }
    tasks = {name: await cluster.run_task(["e1"], script, name=name)
             for name, (script, _) in cases.items()}  # fmt: skip
    background: list[int] = []
    try:
        for name, (_, expected) in cases.items():
            await cluster.wait_task(tasks[name], timeout_s=30)
            (row,) = await cluster.executions(tasks[name])
            assert {k: row[k] for k in expected} == expected, name
            if name == "binary":
                raw = await cluster.http.get(f"/api/v1/executions/{row['id']}/output",
                                             params={"stream": "stdout"})  # fmt: skip
                assert raw.content == binary
                detail = await cluster.execution(row["id"])
                assert detail["stdout"] == "\ufffd\ufffd\x00abc\ufffd\n\ufffd"
            if name == "grandchild keeps stdout":
                detail = await cluster.execution(row["id"])
                background = [int(detail["stdout"])]
                # Left running on purpose (a started service is legitimate); its output is no
                # longer collected, and the command still ended on time.
                assert pids_alive(background) == background
                assert detail["duration_s"] < 30
    finally:
        kill_pids(background)
