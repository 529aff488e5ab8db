"""Per-command cgroups (``agent.cgroups``) with the real runner and real processes.

The tests that need a writable cgroup v2 hierarchy with ``cgroup.kill`` skip, saying why, where
the machine does not offer one (no cgroup2 mount, not root, Linux < 5.14). Each works in a cgroup
of its own under the test process's cgroup and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent import cgroups as cg
from agent.journal import open_journal
from agent.process_group import describe_process
from agent.runner import GATE, SHELL, ProcessRunner, RunnerSettings, Stop
from agent.worker import finish_interrupted
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import RecordingReport, alive, remove_cgroup_tree, wait_dead

STDOUT = pb.OutputStream.STDOUT

MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_the_v2_hierarchy_is_found_from_proc_mounts_and_proc_self_cgroup(tmp_path: Path) -> None:
    assert cg.cgroup2_mounts(MOUNTS) == [Path("/sys/fs/cgroup/unified")]
    assert cg.cgroup2_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == [Path("/sys/fs/cgroup")]
    assert cg.cgroup2_mounts(r"none /a\040b cgroup2 rw 0 0") == [Path("/a b")]
    assert cg.own_cgroup("4:memory:/x\n0::/system.slice/agent.service\n") == (
        "/system.slice/agent.service"
    )
    assert cg.own_cgroup("0::/\n") == "/"
    assert cg.own_cgroup("4:memory:/x\n") is None
    with pytest.raises(cg.CgroupsUnavailable, match="no cgroup2 file system is mounted"):
        cg.default_parent("proc /proc proc rw 0 0\n", "0::/\n")
    with pytest.raises(cg.CgroupsUnavailable, match="in no cgroup v2 hierarchy"):
        cg.default_parent(MOUNTS, "4:memory:/x\n")
    fake_mount = tmp_path / "unified"
    (fake_mount / "agents" / "a1").mkdir(parents=True)
    (fake_mount / "agents" / "a1" / "cgroup.procs").touch()
    mounts = f"cgroup2 {fake_mount} cgroup2 rw 0 0\n"
    assert cg.default_parent(mounts, "0::/agents/a1\n") == fake_mount / "agents" / "a1"


def test_agent_directory_names_are_safe_stable_and_distinct(tmp_path: Path) -> None:
    one = cg.agent_directory_name("web-1", tmp_path / "a")
    assert one == cg.agent_directory_name("web-1", tmp_path / "a")
    assert one.startswith("dispatch-agent.web-1.") and len(one) == len("dispatch-agent.web-1.") + 8
    assert one != cg.agent_directory_name("web-1", tmp_path / "b")
    odd = cg.agent_directory_name("../x y\n" + "z" * 300, tmp_path)
    assert "/" not in odd and " " not in odd and len(odd) < 255


def test_no_cgroups_touches_nothing(tmp_path: Path) -> None:
    setup = cg.open_cgroups(enabled=False, root=None, host_id="h", state_dir=tmp_path)
    assert (setup.cgroups, setup.recovery, setup.mechanism) == (
        None,
        None,
        "process groups only (--no-cgroups)",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_root_outside_any_cgroup2_file_system_falls_back_to_process_groups(
    tmp_path: Path,
) -> None:
    setup = cg.open_cgroups(enabled=True, root=tmp_path / "x", host_id="h", state_dir=tmp_path)
    assert setup.cgroups is None and setup.recovery is None
    assert setup.mechanism == (
        f"process groups only (no usable cgroup v2: --cgroup-root {tmp_path / 'x'} is not in a "
        "cgroup2 file system)"
    )


async def test_without_a_usable_cgroup_the_command_runs_with_its_process_group_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cgroups = cg.AgentCgroups(tmp_path / "missing" / "agent")  # mkdir fails: no parent
    runner = ProcessRunner(RunnerSettings(pipe_drain_s=0.5, cgroups=cgroups))
    report = RecordingReport()
    with caplog.at_level(logging.WARNING), trio.fail_after(10):
        finished = await runner(pb.Run(command_host_id=4, script="echo $0 $1", args=["a"]),
                                report, Stop())  # fmt: skip
    assert (finished.outcome, finished.exit_code, report.data(STDOUT)) == (
        pb.Outcome.EXITED,
        0,
        b"dispatch a\n",
    )
    assert "command_host 4: no cgroup of its own" in caplog.text


# ------------------------------------------------------------------ with a real hierarchy


def _usable_parent() -> Path:
    try:
        parent = cg.default_parent(
            Path("/proc/mounts").read_text(), Path("/proc/self/cgroup").read_text()
        )
    except cg.CgroupsUnavailable as exc:
        pytest.skip(f"no cgroup v2 hierarchy here: {exc}")
    reason = cg._probe(parent)
    if reason is not None:
        pytest.skip(f"cgroups cannot be used here: {reason}")
    return parent


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    root = _usable_parent() / f"dispatch-test.{uuid.uuid4().hex[:12]}"
    root.mkdir()
    try:
        yield root
    finally:
        remove_cgroup_tree(root)


@pytest.fixture
def agent_cgroups(cgroup_root: Path, tmp_path: Path) -> cg.AgentCgroups:
    setup = cg.open_cgroups(enabled=True, root=cgroup_root, host_id="h1", state_dir=tmp_path)
    assert setup.cgroups is not None, setup.mechanism
    return setup.cgroups


def command_dirs(cgroups: cg.AgentCgroups) -> list[str]:
    if not cgroups.directory.exists():
        return []
    return sorted(p.name for p in cgroups.directory.iterdir() if p.is_dir())


async def run(
    cgroups: cg.AgentCgroups, script: str, *, stop: Stop | None = None, **fields: object
) -> tuple[pb.Finished, RecordingReport]:
    runner = ProcessRunner(RunnerSettings(pipe_drain_s=0.5, cgroups=cgroups))
    report = RecordingReport()
    run = pb.Run(command_host_id=7, script=script, **fields)  # type: ignore[arg-type]
    return await runner(run, report, stop or Stop()), report


def test_open_cgroups_probes_and_records_where_the_command_cgroups_go(
    cgroup_root: Path, tmp_path: Path
) -> None:
    setup = cg.open_cgroups(enabled=True, root=cgroup_root, host_id="h1", state_dir=tmp_path)
    assert setup.cgroups is not None and setup.recovery is setup.cgroups
    directory = cgroup_root / cg.agent_directory_name("h1", tmp_path)
    assert setup.cgroups.directory == directory
    assert setup.mechanism == (
        f"process groups and a cgroup per command under {directory} (cgroup.kill)"
    )
    assert (tmp_path / "cgroup").read_text() == f"{directory}\n"
    assert sorted(p.name for p in cgroup_root.iterdir() if p.is_dir()) == []  # made on demand


async def test_the_script_runs_inside_its_cgroup_with_its_arguments_and_no_stdin(
    agent_cgroups: cg.AgentCgroups,
) -> None:
    script = 'cat /proc/self/cgroup | grep "^0::"; echo "$0|$1|$2"; wc -c'
    with trio.fail_after(10):
        finished, report = await run(agent_cgroups, script, args=["a b", "c"])
    relative = "/" + str(agent_cgroups.directory / "cmd-7").split("/", 5)[5]
    assert report.data(STDOUT).decode().splitlines() == [
        f"0::{relative}",
        "dispatch|a b|c",
        "0",
    ]
    assert (finished.outcome, finished.exit_code) == (pb.Outcome.EXITED, 0)
    assert report.process is not None and report.process.pgid == report.pid
    assert command_dirs(agent_cgroups) == []  # removed once empty
    assert not agent_cgroups.directory.exists()


async def test_a_timeout_kills_what_left_the_session_setsid_and_double_fork(
    agent_cgroups: cg.AgentCgroups,
) -> None:
    script = (
        "echo $$; setsid sh -c 'echo $$; exec sleep 60' & "
        "sh -c 'sh -c \"echo \\$\\$; exec sleep 60\" & exit 0' & "  # a daemonizing double fork
        "sleep 60"
    )
    with trio.fail_after(15):
        finished, report = await run(agent_cgroups, script, timeout_ms=1000, kill_grace_ms=2000)
        pids = [int(p) for p in report.data(STDOUT).split()]
        left = await wait_dead(pids)
    assert len(pids) == 3 and left == []
    assert finished.outcome == pb.Outcome.TIMED_OUT
    assert finished.error == (
        "timed out after 1.0 s; process group killed (SIGTERM), and 1 process that had left it, "
        "through the command's cgroup"
    )
    assert command_dirs(agent_cgroups) == []


async def test_a_cancel_kills_an_escaped_process_that_ignores_sigterm_and_keeps_forking(
    agent_cgroups: cg.AgentCgroups,
) -> None:
    forker = "trap '' TERM; echo $$; while :; do sleep 30 & sleep 0.01; done"
    script = f'setsid sh -c "{forker}" & sleep 60'
    stop = Stop()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            outcome: list[pb.Finished] = []
            report = RecordingReport()

            async def go() -> None:
                runner = ProcessRunner(RunnerSettings(pipe_drain_s=0.5, cgroups=agent_cgroups))
                run = pb.Run(command_host_id=8, script=script, kill_grace_ms=500)
                outcome.append(await runner(run, report, stop))

            nursery.start_soon(go)
            await report.wait_for(lambda r: bool(r.data(STDOUT)))
            await trio.sleep(0.3)  # the forker has made a few children
            members = cg.CommandCgroup(agent_cgroups.directory / "cmd-8").pids()
            stop.request(pb.Outcome.CANCELLED, "cancelled by the daemon")
        left = await wait_dead(members)
    assert len(members) >= 4 and left == []
    forker_pid = int(report.data(STDOUT))
    assert not alive(forker_pid)
    (finished,) = outcome
    assert finished.outcome == pb.Outcome.CANCELLED
    assert finished.error == (
        "cancelled by the daemon; process group killed (SIGTERM, then SIGKILL after 0.5 s), and "
        f"{finished.error.split(', and ')[1].split(' ')[0]} processes that had left it, through "
        "the command's cgroup"
    )
    assert int(finished.error.split(", and ")[1].split(" ")[0]) >= 2
    assert command_dirs(agent_cgroups) == []


async def test_what_a_command_that_exited_leaves_running_is_left_alone_then_its_cgroup_goes(
    agent_cgroups: cg.AgentCgroups,
) -> None:
    script = "setsid sh -c 'echo $$; exec sleep 60' >&2 & exit 3"
    with trio.fail_after(10):
        finished, report = await run(agent_cgroups, script)
    (service,) = [int(p) for p in report.data(pb.OutputStream.STDERR).split()]
    try:
        assert (finished.outcome, finished.exit_code) == (pb.Outcome.EXITED, 3)
        assert alive(service)
        assert command_dirs(agent_cgroups) == ["cmd-7"]  # kept while it holds the service
        assert cg.CommandCgroup(agent_cgroups.directory / "cmd-7").pids() == [service]
        assert agent_cgroups.sweep() != []
    finally:
        os.kill(service, signal.SIGKILL)
    with trio.fail_after(5):
        assert await wait_dead([service]) == []
        while agent_cgroups.sweep():  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert command_dirs(agent_cgroups) == []
    assert not agent_cgroups.directory.exists()


async def test_an_output_bomb_and_a_grandchild_holding_stdout_end_on_time(
    agent_cgroups: cg.AgentCgroups,
) -> None:
    script = "setsid sh -c 'exec sleep 60' & yes"
    with trio.fail_after(15):
        finished, report = await run(
            agent_cgroups, script, timeout_ms=1000, kill_grace_ms=500, output_limit_bytes=4096
        )
    assert finished.outcome == pb.Outcome.TIMED_OUT
    assert finished.stdout_bytes > 4 * 4096
    assert finished.error.endswith("and 1 process that had left it, through the command's cgroup")
    assert command_dirs(agent_cgroups) == []


def test_the_gate_never_runs_the_script_when_the_agent_dies_before_opening_it(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    process = subprocess.Popen(
        [SHELL, "-c", GATE, f"touch {marker}", "dispatch"], stdin=subprocess.PIPE
    )
    assert process.stdin is not None
    process.stdin.close()  # what the kernel does when the agent dies
    assert process.wait(timeout=5) == 125
    assert not marker.exists()


def spawn_previous_agents_commands(
    cgroups: cg.AgentCgroups, spawned: list[subprocess.Popen[bytes]], pids: dict[str, int]
) -> None:
    """As the previous agent left them: command 9 running (a setsid child escaped its group),
    command 10 exited normally after starting a service."""
    for name, group, script in (
        ("leader", cgroups.create(9), "setsid sh -c 'echo $$; exec sleep 60' & echo $$; wait"),
        ("service", cgroups.create(10), "setsid sh -c 'echo $$; exec sleep 60' & exit 0"),
    ):
        process = subprocess.Popen(
            [SHELL, "-c", GATE, script, "dispatch"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        spawned.append(process)
        group.place(process.pid)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"go\n")
        process.stdin.close()
        pids[name] = int(process.stdout.readline())
        if name == "leader":
            pids["escaped"] = int(process.stdout.readline())
    spawned[1].wait(timeout=5)


async def test_a_restarted_agent_kills_the_cgroup_of_an_interrupted_command_only(
    cgroup_root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    setup = cg.open_cgroups(enabled=True, root=cgroup_root, host_id="h1", state_dir=state)
    assert setup.cgroups is not None
    spawned: list[subprocess.Popen[bytes]] = []
    pids: dict[str, int] = {}
    try:
        spawn_previous_agents_commands(setup.cgroups, spawned, pids)
        with trio.fail_after(20):
            async with open_journal(state) as journal:
                await journal.claim(9)
                await journal.record_started(9, spawned[0].pid, describe_process(spawned[0].pid))
            # The agent died; the next one starts with the directory it recorded:
            again = cg.open_cgroups(enabled=True, root=cgroup_root, host_id="h1", state_dir=state)
            async with open_journal(state) as journal:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, spawned[0].wait)  # init's job
                    await finish_interrupted(journal, kill_grace_s=1.0, cgroups=again.recovery)
                journal.rewind()
                events = await journal.next_batch(max_events=10, max_bytes=1 << 20)
            assert await wait_dead([pids["leader"], pids["escaped"]]) == []
        assert alive(pids["service"])
        assert events[-1].finished.outcome == pb.Outcome.AGENT_RESTART
        assert events[-1].finished.error == (
            "agent restarted while the command ran; process group killed (SIGTERM), and 1 "
            "process that had left it, through the command's cgroup"
        )
        assert again.cgroups is not None
        assert command_dirs(again.cgroups) == ["cmd-10"]
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in spawned:
            process.wait(timeout=5)
