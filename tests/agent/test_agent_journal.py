"""The journal: append, ack, replay, compaction, damaged files and restart recovery.

Real files and worker threads, so the real clock and a ``fail_after`` in every test.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from agent import journal_file as jf
from agent.journal import JOURNAL_NAME, Journal, open_journal
from agent.process_group import ProcessInfo, describe_process
from agent.worker import finish_interrupted
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import alive, wait_dead

STDOUT = pb.OutputStream.STDOUT


async def drain(journal: Journal) -> list[pb.Event]:
    """Everything the sender would send right now."""
    events: list[pb.Event] = []
    with trio.move_on_after(0.2):
        while True:
            events.extend(await journal.next_batch(max_events=1000, max_bytes=1 << 30))
    return events


def seqs(events: list[pb.Event]) -> list[tuple[int, int]]:
    return [(e.command_host_id, e.seq) for e in events]


async def run_one(journal: Journal, command_host_id: int, output: bytes = b"hello\n") -> None:
    await journal.claim(command_host_id)
    await journal.record_started(command_host_id, 100, None)
    await journal.record_output(command_host_id, STDOUT, 0, output)
    finished = pb.Finished(outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=0)
    await journal.record_finished(command_host_id, finished)


async def test_append_assigns_seq_and_monotonic_time(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            journal.rewind()
            await run_one(journal, 5)
            events = await drain(journal)
    assert seqs(events) == [(5, 1), (5, 2), (5, 3)]
    assert events[0].started == pb.Started(pid=100)
    assert events[1].output == pb.Output(stream=STDOUT, offset=0, data=b"hello\n")
    assert events[2].finished.exit_code == 0
    stamps = [e.monotonic_ns for e in events]
    assert stamps == sorted(stamps) and stamps[0] > 0


async def test_acks_trim_and_the_rest_is_replayed_after_reopen(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            await run_one(journal, 1)
            await run_one(journal, 2)
            journal.ack(1, 2)
            journal.ack(2, 3)
            assert journal.known_ids() == [1]
            assert journal.statistics().unacked_events == 1
        async with open_journal(tmp_path) as journal:
            assert journal.known_ids() == [1]
            assert journal.is_remembered(1) and journal.is_remembered(2)
            assert not journal.is_remembered(3)
            assert journal.interrupted() == []
            journal.rewind()
            events = await drain(journal)
            assert seqs(events) == [(1, 3)]
            assert events[0].finished is not None
            journal.ack(1, 3)
            assert journal.known_ids() == []
        async with open_journal(tmp_path) as journal:
            assert journal.known_ids() == []
            assert journal.is_remembered(1)
            journal.rewind()
            assert await drain(journal) == []


async def test_unacknowledged_events_survive_repeated_restarts(tmp_path: Path) -> None:
    # Each open rewrites the file as a snapshot; the second and third open read snapshots.
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            await run_one(journal, 1)
            await journal.claim(2)
            await journal.record_started(2, 7, None)
            journal.ack(1, 1)
        for _ in range(3):
            async with open_journal(tmp_path) as journal:
                journal.rewind()
                assert seqs(await drain(journal)) == [(1, 2), (1, 3), (2, 1)]
                assert sorted(journal.known_ids()) == [1, 2]
        async with open_journal(tmp_path) as journal:
            await journal.record_output(2, STDOUT, 0, b"more")  # seq continues after a restart
            journal.rewind()
            assert seqs(await drain(journal)) == [(1, 2), (1, 3), (2, 1), (2, 2)]


async def test_rewind_replays_in_order_then_live_events_follow(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            journal.rewind()
            await run_one(journal, 1)
            assert seqs(await drain(journal)) == [(1, 1), (1, 2), (1, 3)]
            assert await drain(journal) == []  # sent once per stream
            journal.ack(1, 1)
            journal.rewind()  # a new stream: everything unacknowledged again
            await journal.claim(2)
            await journal.record_started(2, 1, None)
            assert seqs(await drain(journal)) == [(1, 2), (1, 3), (2, 1)]


async def test_batches_respect_the_bounds(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            journal.rewind()
            await journal.claim(1)
            for index in range(10):
                await journal.record_output(1, STDOUT, index * 1000, bytes(1000))
            first = await journal.next_batch(max_events=4, max_bytes=1 << 20)
            second = await journal.next_batch(max_events=100, max_bytes=2500)
            rest = await journal.next_batch(max_events=100, max_bytes=1 << 20)
    assert [e.seq for e in first] == [1, 2, 3, 4]
    assert [e.seq for e in second] == [5, 6]  # a third 1 KB event would pass 2500 bytes
    assert [e.seq for e in rest] == [7, 8, 9, 10]


async def test_a_claim_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            await journal.claim(77)
            scan = await trio.to_thread.run_sync(jf.scan, tmp_path / JOURNAL_NAME)
            assert (jf.Kind.CLAIM, jf.CLAIM.pack(77)) in scan.records
            with pytest.raises(ValueError, match="already claimed"):
                await journal.claim(77)


async def test_damaged_tail_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            await run_one(journal, 1)
        path = tmp_path / JOURNAL_NAME
        good = path.read_bytes()
        # A record cut short by a crash, after a record with a wrong checksum.
        record = jf.encode(jf.Kind.CLAIM, jf.CLAIM.pack(2))
        path.write_bytes(good + record[:-1] + b"\x00" + record[:5])
        with caplog.at_level(logging.WARNING, logger="agent.journal"):
            async with open_journal(tmp_path) as journal:
                assert journal.known_ids() == [1]
                assert not journal.is_remembered(2)
                journal.rewind()
                assert seqs(await drain(journal)) == [(1, 1), (1, 2), (1, 3)]
                await journal.claim(3)  # appended after the good prefix, not the garbage
        assert "dropped an unreadable tail of 22 bytes after" in caplog.text
        async with open_journal(tmp_path) as journal:
            assert journal.is_remembered(3)
            assert sorted(journal.known_ids()) == [1, 3]


async def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(b"something else entirely")
    with trio.fail_after(10), pytest.raises(jf.NotAJournal):
        async with open_journal(tmp_path):
            pass
    assert (tmp_path / JOURNAL_NAME).read_bytes() == b"something else entirely"


async def test_compaction_shrinks_a_mostly_acknowledged_journal(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    with trio.fail_after(20):
        async with open_journal(tmp_path, compact_bytes=64 * 1024) as journal:
            for command_host_id in range(1, 41):
                await run_one(journal, command_host_id, output=bytes(4000))
                journal.ack(command_host_id, 3)
            await run_one(journal, 41, output=b"kept")
            journal.ack(41, 1)
            await journal.flush()
            size = journal.statistics().file_bytes
            assert size < 64 * 1024
            assert size == path.stat().st_size
        async with open_journal(tmp_path) as journal:
            assert journal.known_ids() == [41]
            assert all(journal.is_remembered(i) for i in range(1, 42))
            journal.rewind()
            events = await drain(journal)
            assert seqs(events) == [(41, 2), (41, 3)]
            assert events[0].output.data == b"kept"
            await journal.claim(42)
            await journal.record_started(42, 9, None)
            assert seqs(await drain(journal)) == [(42, 1)]


async def test_remembered_ids_are_bounded(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path, remembered_ids=3) as journal:
            for command_host_id in range(1, 6):
                await run_one(journal, command_host_id)
                journal.ack(command_host_id, 3)
            assert [journal.is_remembered(i) for i in range(1, 6)] == [
                False,
                False,
                True,
                True,
                True,
            ]
        async with open_journal(tmp_path, remembered_ids=3) as journal:
            assert [journal.is_remembered(i) for i in range(1, 6)] == [
                False,
                False,
                True,
                True,
                True,
            ]
            assert journal.statistics().remembered == 3


async def test_a_state_dir_is_used_by_one_agent_at_a_time(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path):
            with pytest.raises(jf.JournalLocked):
                async with open_journal(tmp_path):
                    pass
        async with open_journal(tmp_path):
            pass  # released on close


async def test_write_failure_keeps_events_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_append = jf.append
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def failing_append(fd: int, data: bytes, *, sync: bool) -> None:
        if failures:
            real_append(fd, data[: len(data) // 2], sync=False)  # a partial write, then ENOSPC
            raise failures.pop()
        real_append(fd, data, sync=sync)

    monkeypatch.setattr(jf, "append", failing_append)
    with trio.fail_after(20):
        async with open_journal(tmp_path) as journal:
            await journal.claim(1)  # the first write (its claim) fails and is retried
            assert journal.statistics().write_failures == 1
            journal.rewind()
            await journal.record_started(1, 5, None)
            assert seqs(await drain(journal)) == [(1, 1)]
        assert "write failed ([Errno 28] No space left on device)" in caplog.text
        async with open_journal(tmp_path) as journal:
            assert journal.known_ids() == [1]
            assert journal.interrupted()[0].started is True
            journal.rewind()
            assert seqs(await drain(journal)) == [(1, 1)]


async def test_events_reach_the_sender_while_the_disk_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_append(fd: int, data: bytes, *, sync: bool) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with trio.fail_after(20):
        async with open_journal(tmp_path, close_timeout_s=0.5) as journal:
            await journal.claim(1)
            monkeypatch.setattr(jf, "append", broken_append)
            monkeypatch.setattr(jf, "rewrite", broken_rewrite)
            journal.rewind()
            await journal.record_started(1, 5, None)
            await journal.record_output(1, STDOUT, 0, b"x")
            assert seqs(await drain(journal)) == [(1, 1), (1, 2)]
            assert journal.statistics().write_failures >= 1
            assert journal.statistics().unacked_events == 2


def broken_rewrite(path: Path, records: bytes, *, sync: bool) -> int:
    raise OSError(errno.EIO, "Input/output error")


# ------------------------------------------------------------------ restart recovery


def spawn_previous_agents_command() -> tuple[subprocess.Popen[bytes], list[int]]:
    """A command group as a previous agent would have left it: a leader and a background job."""
    process = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60 & echo $!; exec sleep 60"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    background = int(process.stdout.readline())
    return process, [process.pid, background]


async def reap(process: subprocess.Popen[bytes], returncodes: list[int]) -> None:
    returncodes.append(await trio.to_thread.run_sync(process.wait))


async def test_restart_kills_the_group_a_previous_agent_left(tmp_path: Path) -> None:
    process, pids = spawn_previous_agents_command()
    try:
        with trio.fail_after(20):
            async with open_journal(tmp_path) as journal:
                await journal.claim(9)
                await journal.record_started(9, process.pid, describe_process(process.pid))
                await journal.record_output(9, STDOUT, 0, b"12345")
            # The agent "died" here: no Finished. The next one starts:
            async with open_journal(tmp_path) as journal:
                [interrupted] = journal.interrupted()
                assert interrupted.command_host_id == 9
                assert interrupted.stdout_bytes == 5
                returncodes: list[int] = []
                async with trio.open_nursery() as nursery:
                    # After a real restart init reaps the old leader; here the test is its parent.
                    nursery.start_soon(reap, process, returncodes)
                    await finish_interrupted(journal, kill_grace_s=2.0)
                journal.rewind()
                events = await drain(journal)
            assert returncodes == [-signal.SIGTERM]
            assert await wait_dead(pids) == []
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert seqs(events) == [(9, 1), (9, 2), (9, 3)]
    finished = events[2].finished
    assert finished.outcome == pb.Outcome.AGENT_RESTART
    assert finished.error == "agent restarted while the command ran; process group killed (SIGTERM)"
    assert finished.has_exit_code is False
    assert finished.stdout_bytes == 5


async def test_restart_never_kills_a_process_that_reused_the_pid(tmp_path: Path) -> None:
    process, pids = spawn_previous_agents_command()
    try:
        real = describe_process(process.pid)
        stranger = ProcessInfo(real.pid, real.pgid, real.start_time + 1)
        with trio.fail_after(20):
            async with open_journal(tmp_path) as journal:
                await journal.claim(9)
                await journal.record_started(9, process.pid, stranger)
            async with open_journal(tmp_path) as journal:
                await finish_interrupted(journal, kill_grace_s=0.5)
                journal.rewind()
                events = await drain(journal)
        assert all(alive(pid) for pid in pids)
        assert events[-1].finished.error == (
            "agent restarted while the command ran; its process group was already gone"
        )
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        process.wait()


async def test_restart_of_a_claim_that_never_started(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_journal(tmp_path) as journal:
            await journal.claim(3)
        async with open_journal(tmp_path) as journal:
            await finish_interrupted(journal, kill_grace_s=0.5)
            journal.rewind()
            events = await drain(journal)
            assert journal.is_remembered(3)
    assert seqs(events) == [(3, 1)]
    assert events[0].finished.outcome == pb.Outcome.AGENT_RESTART
    assert events[0].finished.error == (
        "agent restarted before the command's start was recorded; it may not have run"
    )
