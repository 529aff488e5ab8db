"""ProcessRunner against real processes (real clock, every test under ``fail_after``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.runner import ProcessRunner, RunnerSettings, Stop
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import RecordingReport, alive, wait_dead

STDOUT = pb.OutputStream.STDOUT
STDERR = pb.OutputStream.STDERR
MIB = 1024 * 1024


async def run_script(
    script: str,
    *args: str,
    settings: RunnerSettings | None = None,
    stop: Stop | None = None,
    report: RecordingReport | None = None,
    **fields: Any,
) -> tuple[pb.Finished, RecordingReport]:
    report = report or RecordingReport()
    runner = ProcessRunner(settings or RunnerSettings(pipe_drain_s=0.5))
    run = pb.Run(command_host_id=7, script=script, args=list(args), **fields)
    finished = await runner(run, report, stop or Stop())
    return finished, report


def pids_in(data: bytes) -> list[int]:
    return [int(line) for line in data.split()]


async def test_exit_zero() -> None:
    with trio.fail_after(10):
        finished, report = await run_script("true")
    assert finished.outcome == pb.Outcome.EXITED
    assert finished.has_exit_code is True
    assert finished.exit_code == 0
    assert finished.signal == 0
    assert finished.error == ""
    assert finished.stdout_bytes == 0
    assert finished.stderr_bytes == 0
    assert report.pid is not None and report.pid > 1
    assert report.process is not None
    assert report.process.pgid == report.pid
    assert report.process.start_time > 0
    assert 0 < finished.duration_ns < 5_000_000_000


@pytest.mark.parametrize(("script", "code"), [("exit 3", 3), ("exit 300", 44), ("exit 255", 255)])
async def test_exit_codes(script: str, code: int) -> None:
    with trio.fail_after(10):
        finished, _ = await run_script(script)
    assert finished.outcome == pb.Outcome.EXITED
    assert finished.has_exit_code is True
    assert finished.exit_code == code
    assert finished.signal == 0
    assert finished.error == f"exited with status {code}"


async def test_death_by_signal_has_no_exit_code() -> None:
    with trio.fail_after(10):
        finished, _ = await run_script("kill -9 $$")
    assert finished.outcome == pb.Outcome.EXITED
    assert finished.has_exit_code is False
    assert finished.exit_code == 0
    assert finished.signal == 9
    assert finished.error == "killed by SIGKILL"


async def test_args_env_and_cwd(tmp_path: Path) -> None:
    script = 'printf "%s|" "$0" "$@"; printf "%s|" "$FOO"; pwd'
    with trio.fail_after(10):
        finished, report = await run_script(
            script, "a b", "c", env={"FOO": "bar baz"}, cwd=str(tmp_path)
        )
    assert finished.exit_code == 0
    assert report.data(STDOUT) == f"dispatch|a b|c|bar baz|{tmp_path}\n".encode()


async def test_inherits_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_TEST_INHERITED", "yes")
    with trio.fail_after(10):
        _, report = await run_script('echo "$DISPATCH_TEST_INHERITED"; read x; echo "[$x]"')
    assert report.data(STDOUT) == b"yes\n[]\n"  # stdin is /dev/null: read gets EOF


async def test_binary_output_is_byte_exact(tmp_path: Path) -> None:
    payload = os.urandom(300_000) + b"\xff\xfe\x00invalid utf-8 \xc3\x28"
    (tmp_path / "blob").write_bytes(payload)
    with trio.fail_after(10):
        finished, report = await run_script('cat "$1"; cat "$1" >&2', str(tmp_path / "blob"))
    assert report.data(STDOUT) == payload
    assert report.data(STDERR) == payload
    assert finished.stdout_bytes == len(payload)
    assert finished.stderr_bytes == len(payload)


async def test_streams_are_separate_and_ordered() -> None:
    script = "echo out1; echo err1 >&2; echo out2; echo err2 >&2; echo out3"
    with trio.fail_after(10):
        finished, report = await run_script(script)
    assert report.data(STDOUT) == b"out1\nout2\nout3\n"
    assert report.data(STDERR) == b"err1\nerr2\n"
    assert (finished.stdout_bytes, finished.stderr_bytes) == (15, 10)


async def test_output_is_coalesced_into_full_chunks() -> None:
    settings = RunnerSettings(chunk_bytes=64 * 1024, flush_s=5.0, pipe_drain_s=0.5)
    with trio.fail_after(10):
        _, report = await run_script("head -c 200000 /dev/zero", settings=settings)
    sizes = [len(data) for _, _, data in report.outputs]
    assert sizes == [65536, 65536, 65536, 200000 - 3 * 65536]
    assert report.data(STDOUT) == bytes(200000)


async def test_many_small_writes_become_one_chunk() -> None:
    settings = RunnerSettings(flush_s=1.0, pipe_drain_s=0.5)
    with trio.fail_after(10):
        _, report = await run_script(
            "for i in $(seq 1 200); do echo line$i; done", settings=settings
        )
    expected = b"".join(b"line%d\n" % i for i in range(1, 201))
    assert len(report.outputs) == 1
    assert report.outputs[0] == (STDOUT, 0, expected)


async def test_partial_chunk_flushed_after_its_age() -> None:
    settings = RunnerSettings(flush_s=0.05, pipe_drain_s=0.5)
    with trio.fail_after(10):
        _, report = await run_script("printf a; sleep 0.5; printf b", settings=settings)
    assert report.outputs == [(STDOUT, 0, b"a"), (STDOUT, 1, b"b")]


SCRIPT_WITH_BACKGROUND_JOB = "echo $$; sleep 60 & echo $!; sleep 60"


async def test_timeout_kills_the_whole_process_group() -> None:
    with trio.fail_after(10):
        finished, report = await run_script(SCRIPT_WITH_BACKGROUND_JOB, timeout_ms=1000)
    pids = pids_in(report.data(STDOUT))
    assert len(pids) == 2
    assert pids[0] == report.pid
    assert finished.outcome == pb.Outcome.TIMED_OUT
    assert finished.error == "timed out after 1.0 s; process group killed (SIGTERM)"
    assert finished.has_exit_code is False
    assert finished.signal == signal.SIGTERM
    assert 1_000_000_000 <= finished.duration_ns < 3_000_000_000
    assert await wait_dead(pids) == []


async def test_cancel_kills_the_whole_process_group() -> None:
    stop = Stop()
    report = RecordingReport()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def cancel_once_both_pids_are_out() -> None:
                await report.wait_for(lambda r: len(pids_in(r.data(STDOUT))) == 2)
                stop.request(pb.Outcome.CANCELLED, "cancelled by the daemon")

            nursery.start_soon(cancel_once_both_pids_are_out)
            finished, _ = await run_script(
                SCRIPT_WITH_BACKGROUND_JOB,
                stop=stop,
                report=report,
                settings=RunnerSettings(flush_s=0.01, pipe_drain_s=0.5),
            )
    assert finished.outcome == pb.Outcome.CANCELLED
    assert finished.error == "cancelled by the daemon; process group killed (SIGTERM)"
    assert finished.signal == signal.SIGTERM
    assert await wait_dead(pids_in(report.data(STDOUT))) == []


async def test_sigterm_ignored_gets_sigkill_after_the_grace() -> None:
    script = "trap '' TERM; echo $$; sleep 60 & echo $!; while :; do sleep 0.1; done"
    with trio.fail_after(10):
        finished, report = await run_script(script, timeout_ms=500, kill_grace_ms=700)
    assert finished.outcome == pb.Outcome.TIMED_OUT
    assert finished.error == (
        "timed out after 0.5 s; process group killed (SIGTERM, then SIGKILL after 0.7 s)"
    )
    assert finished.signal == signal.SIGKILL
    assert 1_200_000_000 <= finished.duration_ns < 4_000_000_000
    assert await wait_dead(pids_in(report.data(STDOUT))) == []


async def test_grandchild_holding_stdout_does_not_hang_the_run() -> None:
    settings = RunnerSettings(pipe_drain_s=0.3)
    with trio.fail_after(10):
        start = trio.current_time()
        finished, report = await run_script("sleep 30 & echo $!; echo done", settings=settings)
        elapsed = trio.current_time() - start
    leftover = int(report.data(STDOUT).split()[0])
    try:
        assert finished.outcome == pb.Outcome.EXITED
        assert finished.exit_code == 0
        assert report.data(STDOUT) == f"{leftover}\ndone\n".encode()
        assert elapsed < 2.0
        # A job the script left running on purpose is not killed when the script exits.
        assert alive(leftover)
    finally:
        os.kill(leftover, signal.SIGKILL)


async def test_missing_cwd_is_a_spawn_error() -> None:
    with trio.fail_after(10):
        finished, report = await run_script("true", cwd="/nonexistent/dispatch-test")
    assert finished.outcome == pb.Outcome.SPAWN_ERROR
    assert finished.error == (
        "could not start /bin/sh in /nonexistent/dispatch-test: No such file or directory"
    )
    assert finished.has_exit_code is False
    assert report.pid is None
    assert report.outputs == []


async def test_output_bomb_is_capped_with_its_tail_kept() -> None:
    limit = MIB
    total = 20_000_000
    with trio.fail_after(30):
        finished, report = await run_script(
            f"yes | head -c {total}", output_limit_bytes=limit, settings=RunnerSettings()
        )
    assert finished.outcome == pb.Outcome.EXITED
    assert finished.exit_code == 0
    assert finished.stdout_bytes == total
    chunks = [(offset, data) for _, offset, data in report.outputs]
    live = [(o, d) for o, d in chunks if o < 4 * limit]
    tail = [(o, d) for o, d in chunks if o >= 4 * limit]
    assert sum(len(d) for _, d in live) == 4 * limit
    assert b"".join(d for _, d in live) == b"y\n" * (2 * limit)
    tail_size = limit - limit // 2
    assert tail[0][0] == total - tail_size
    assert b"".join(d for _, d in tail) == b"y\n" * (tail_size // 2)
    assert sum(len(d) for _, d in chunks) == 4 * limit + tail_size
    assert max(len(d) for _, d in chunks) <= 64 * 1024


async def test_tail_overlapping_the_live_part_is_not_sent_twice() -> None:
    limit = 1000  # live up to 4000 bytes, tail of 500
    with trio.fail_after(10):
        finished, report = await run_script("head -c 4200 /dev/zero", output_limit_bytes=limit)
    assert finished.stdout_bytes == 4200
    offsets = [(offset, len(data)) for _, offset, data in report.outputs]
    assert sum(size for _, size in offsets) == 4200
    assert report.data(STDOUT) == bytes(4200)
