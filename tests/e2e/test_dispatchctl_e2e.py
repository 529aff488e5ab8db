"""dispatchctl end to end: the real command (``python -m dispatchctl``) against the real daemon
and agents on loopback: what it prints, its JSON, its exit status, the API's errors in words,
the event stream resumed after its connection is cut, and output made safe for a terminal."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.cluster import API_TOKEN, REPO, Cluster, CuttableProxy, free_port, open_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """The client does not depend on the daemon's database: SQLite only."""
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


@pytest.fixture
async def cluster(tmp_path: Path, db_url: str) -> AsyncIterator[Cluster]:
    with trio.fail_after(180):
        async with open_cluster(tmp_path, db_url) as running:
            await running.start_daemon()
            await running.start_agents("c1", "c2", extra=("--label", "role=ctl"))
            yield running


def environment(cluster: Cluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH")}
    return {
        **env,
        "DISPATCH_URL": f"http://127.0.0.1:{cluster.http_port}",
        "DISPATCH_TOKEN": API_TOKEN,
        "XDG_CONFIG_HOME": str(cluster.tmp),
        **extra,
    }


async def ctl(cluster: Cluster, *args: str, **env: str) -> tuple[int, str, str]:
    done = await trio.run_process(
        [sys.executable, "-m", "dispatchctl", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=environment(cluster, **env),
        cwd=REPO,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def ctl_json(cluster: Cluster, *args: str) -> Any:
    code, out, err = await ctl(cluster, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_run_summaries_json_and_exit_status(cluster: Cluster) -> None:
    code, out, err = await ctl(
        cluster, "run", "--host", "c1", "--host", "c2", "--", "printf", "'same\\n'"
    )
    assert code == 0, err
    assert "task 1 started (2 executions); dispatchctl cancel 1 stops it" in err
    lines = out.splitlines()
    assert lines[0].startswith("task 1 \"printf 'same\\n'\": completed in ")
    assert lines[0].endswith(": 2/2 succeeded")
    assert [line.split()[:3] for line in lines[2:4]] == [
        ["c1", "succeeded", "0"],
        ["c2", "succeeded", "0"],
    ]
    assert lines[4:] == [
        "identical results (1 of 1 groups):",
        "  2 hosts, command 0, exit 0: c1, c2",
        "    | same",
    ]

    once = cluster.tmp / "once"
    code, out, _ = await ctl(
        cluster,
        "run",
        "--json",
        "--label",
        "role=ctl",
        "--max-concurrency",
        "1",
        "--name",
        "one wins",
        "--",
        f"mkdir {once} || exit 4",
    )
    assert code == 1  # a host did not succeed
    result = json.loads(out)
    assert (result["succeeded"], result["task"]["status"], result["task"]["name"]) == (
        False,
        "failed",
        "one wins",
    )
    assert sorted(e["exit_code"] for e in result["executions"]) == [0, 4]
    assert result["stats"]["by_status"] == {"failed": 1, "succeeded": 1}

    code, out, err = await ctl(
        cluster,
        "run",
        "--follow",
        "--host",
        "c1",
        "--host",
        "c2",
        "-c",
        "echo one",
        "--",
        "echo two >&2; printf 'no newline'",
    )
    assert code == 0, err
    followed = out[: out.index('task 3 "echo one"')].splitlines()
    assert sorted(followed) == [
        "c1#0 | one",
        "c1#1 ! two",
        "c1#1 | no newline",
        "c2#0 | one",
        "c2#1 ! two",
        "c2#1 | no newline",
    ]

    code, out, _ = await ctl(
        cluster, "run", "--json", "--follow", "--host", "c1", "--", "echo json"
    )
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[-1]["summary"]["succeeded"] is True
    assert [e["data"] for e in events[:-1] if e["event"] == "end"] == [{"status": "completed"}]
    assert any(e["event"] == "output" and e["data"]["text"] == "json\n" for e in events[:-1])


async def test_listing_showing_changing_and_errors_in_words(cluster: Cluster) -> None:
    task_id = await cluster.run_task(["c1", "c2"], "printf 'ok\\033]0;t\\007\\n'; exit 0")
    failed_id = await cluster.run_task(["c1"], "printf 'e\\n' >&2; exit 5")
    await cluster.wait_task(task_id)
    await cluster.wait_task(failed_id)

    listed = await ctl_json(cluster, "tasks", "--status", "failed", "--since", "1h")
    assert [t["id"] for t in listed["items"]] == [failed_id]
    code, out, _ = await ctl(cluster, "task", failed_id)
    assert code == 0 and f'task {failed_id} "e2e": failed' in out
    assert "  command 0: printf 'e\\n' >&2; exit 5  (timeout 30 s)" in out
    failed = await ctl_json(cluster, "executions", "--status", "failed", "--host", "c1")
    assert [(e["task_id"], e["exit_code"]) for e in failed["items"]] == [(failed_id, 5)]
    execution = failed["items"][0]["id"]
    code, out, err = await ctl(cluster, "output", execution)
    assert (code, out, err) == (0, "", "e\n")  # stderr to stderr
    ok_id = (await cluster.executions(task_id))[0]["id"]
    code, out, _ = await ctl(cluster, "output", ok_id, "--stream", "stdout")
    assert out == "ok\x1b]0;t\x07\n"  # not a terminal: the stored bytes, exactly
    page = await ctl_json(cluster, "executions", "--task", task_id, "--limit", "1")
    assert len(page["items"]) == 1 and page["next_cursor"]
    assert len((await ctl_json(cluster, "executions", "--task", task_id, "--all"))["items"]) == 2

    code, _, err = await ctl(cluster, "cancel", task_id)
    assert code == 3
    assert err == (
        f"dispatchctl: task {task_id} already completed; there is nothing to cancel "
        "[conflict, HTTP 409]\n"
    )
    code, out, _ = await ctl(cluster, "retry", failed_id, "--failed")
    assert code == 0 and f"task {failed_id} retried as task " in out and "(1 executions)" in out
    code, _, err = await ctl(cluster, "task", "999")
    assert (code, err) == (3, "dispatchctl: there is no task 999 [not_found, HTTP 404]\n")

    hosts = await ctl_json(cluster, "hosts", "--label", "role=ctl", "--status", "online")
    assert sorted(h["id"] for h in hosts["items"]) == ["c1", "c2"]
    code, out, _ = await ctl(cluster, "host", "show", "c2")
    assert code == 0 and out.startswith("host c2: online, enrolment approved\n")

    code, token, err = await ctl(cluster, "tokens", "create", "looker", "--role", "viewer")
    assert code == 0 and "it is shown this once" in err and token.startswith("dsp_")
    code, _, err = await ctl(cluster, "tokens", "list", DISPATCH_TOKEN=token.strip())
    assert code == 3
    assert err == (
        "dispatchctl: this needs the admin role; token:looker has viewer [forbidden, HTTP 403]\n"
    )
    tokens = await ctl_json(cluster, "tokens", "list")
    assert [t["name"] for t in tokens["items"]] == ["looker"]
    code, out, _ = await ctl(cluster, "tokens", "revoke", tokens["items"][0]["id"])
    assert code == 0 and " (looker) revoked at " in out
    audit = await ctl_json(cluster, "audit", "--action", "token.create")
    assert [(a["target"], a["outcome"]) for a in audit["items"]] == [("looker", "ok")]

    code, _, err = await ctl(cluster, "tasks", DISPATCH_TOKEN="wrong-token-0123456789")
    assert (code, err) == (
        3,
        "dispatchctl: the API token is not valid [unauthorized, HTTP 401]; "
        "give a token with --token, --token-file or DISPATCH_TOKEN\n",
    )
    port = free_port()
    code, _, err = await ctl(cluster, "tasks", DISPATCH_URL=f"http://127.0.0.1:{port}")
    assert code == 3 and err.startswith(f"dispatchctl: cannot reach http://127.0.0.1:{port}: ")
    (cluster.tmp / "dispatchctl.toml").write_text("urll = 'x'\n")  # the default config file
    code, _, err = await ctl(cluster, "tasks")
    assert (code, err) == (2, "dispatchctl: urll: unknown setting in the config file\n")


async def test_follow_resumes_after_the_connection_is_cut_and_ctrl_c_leaves_the_task(
    cluster: Cluster,
) -> None:
    proxy = CuttableProxy(cluster.http_port)
    cluster.nursery.start_soon(proxy.serve)
    await trio.sleep(0.2)
    script = "for i in $(seq 1 20); do echo line $i; sleep 0.1; done"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dispatchctl", "run", "--follow", "--host", "c1", "--", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=environment(cluster, DISPATCH_URL=f"http://127.0.0.1:{proxy.port}"),
    )
    assert process.stdout is not None
    seen = b""
    cuts = 0
    with trio.fail_after(60):
        while b"line 3\n" not in seen:
            seen += await process.stdout.receive_some(4096)
        cuts += await proxy.cut()
        await trio.sleep(0.5)
        cuts += await proxy.cut()
        while chunk := await process.stdout.receive_some(4096):
            seen += chunk
        assert await process.wait() == 0
    assert cuts >= 2
    lines = seen.decode().splitlines()
    assert lines[:20] == [f"c1 | line {i}" for i in range(1, 21)]  # each once, in order
    assert lines[20].endswith(": 1/1 succeeded")

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dispatchctl", "run", "--host", "c2", "--", "sleep 30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=environment(cluster),
    )
    assert process.stderr is not None
    with trio.fail_after(30):
        note = b""
        while b"stops it" not in note:
            note += await process.stderr.receive_some(4096)
        task_id = note.split()[1].decode()
        await cluster.wait_executions(task_id, lambda items: items[0]["status"] == "running")
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 130
        rest = await process.stderr.receive_some(4096)
    assert (
        f"interrupted: task {task_id} goes on (dispatchctl cancel {task_id} stops it)"
        in (note + rest).decode()
    )
    assert (await cluster.get(f"/api/v1/tasks/{task_id}"))["status"] == "running"
    code, out, _ = await ctl(cluster, "cancel", task_id)
    assert code == 0 and out == f"task {task_id}: running\n"
    assert (await cluster.wait_task(task_id))["status"] == "cancelled"


async def test_output_to_a_terminal_is_made_safe_unless_raw(cluster: Cluster) -> None:
    task_id = await cluster.run_task(["c1"], "printf 'a\\033[2Jb\\033]0;title\\007c\\007\\n'")
    await cluster.wait_task(task_id)
    execution = (await cluster.executions(task_id))[0]["id"]

    def on_a_terminal(*args: str) -> bytes:
        main, child = pty.openpty()
        try:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dispatchctl",
                    "output",
                    execution,
                    "--stream",
                    "stdout",
                    *args,
                ],
                stdout=child,
                check=True,
                timeout=30,
                env=environment(cluster),
                cwd=REPO,
            )
            return os.read(main, 65536)
        finally:
            os.close(main)
            os.close(child)

    assert await trio.to_thread.run_sync(on_a_terminal) == "abc␇\r\n".encode()
    raw = await trio.to_thread.run_sync(on_a_terminal, "--raw")
    assert raw == b"a\x1b[2Jb\x1b]0;title\x07c\x07\r\n"
