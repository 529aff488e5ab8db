"""The core engine end to end: the real dispatchd and dispatch-agent programs on loopback, a real
database (SQLite file, and PostgreSQL when configured), every recorded state asserted exactly."""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.cluster import (
    AGENT_TOKEN,
    Cluster,
    CuttableProxy,
    Program,
    alive,
    wait_gone,
)

pytestmark = pytest.mark.e2e


def by_host(items: list[dict]) -> dict[tuple[str, int], dict]:
    return {(e["host_id"], e["command_index"]): e for e in items}


def moment(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_three_agents_two_commands_all_recorded_with_live_progress(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("a1", "a2", "a3")
    body = {
        "name": "two steps",
        "commands": [
            {"script": 'sleep 0.3; echo "out $1 $(hostname)"; echo "err $1" >&2', "args": ["one"],
             "timeout_s": 20},
            {"script": "sleep 0.3; printf 'second\\n'; exit 0", "timeout_s": 20},
        ],
        "targets": {"hosts": ["a1", "a2", "a3"]},
    }  # fmt: skip
    task_id = (await cluster.post("/api/v1/tasks", body))["id"]
    percents: list[float] = []
    async with cluster.http.stream("GET", f"/api/v1/tasks/{task_id}/events") as events:
        await cluster.post(f"/api/v1/tasks/{task_id}/start", expect=202)
        kind = None
        async for line in events.aiter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "progress":
                import json

                percents.append(json.loads(line[5:])["percent"])
            elif kind == "end":
                break
    task = await cluster.wait_task(task_id)
    assert (task["status"], task["progress"]["percent"], task["progress"]["by_status"]) == (
        "completed",
        100.0,
        {"succeeded": 6},
    )
    assert percents[-1] == 100.0 and any(0 < p < 100 for p in percents)
    assert percents == sorted(percents)
    rows = by_host(await cluster.executions(task_id))
    assert len(rows) == 6
    for host in ("a1", "a2", "a3"):
        first, second = rows[(host, 0)], rows[(host, 1)]
        detail = await cluster.execution(first["id"])
        assert (detail["status"], detail["reason"], detail["exit_code"], detail["signal"]) == (
            "succeeded",
            "exit_zero",
            0,
            None,
        )
        assert detail["stdout"].startswith("out one ") and detail["stderr"] == "err one\n"
        assert (await cluster.execution(second["id"]))["stdout"] == "second\n"
        for execution in (first, second):
            started, finished = moment(execution["started_at"]), moment(execution["finished_at"])
            assert 0.3 <= execution["duration_s"] < 5
            assert abs((finished - started) - execution["duration_s"]) < 0.5
        assert moment(second["started_at"]) >= moment(first["finished_at"])
    assert moment(task["finished_at"]) >= max(moment(e["finished_at"]) for e in rows.values())


async def test_an_offline_target_fails_dispatch_and_the_others_succeed(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("up-1", "up-2", "gone")
    await cluster.agents["gone"].kill(signal.SIGTERM)
    await cluster.wait_offline("gone")
    task_id = await cluster.run_task(["up-1", "gone", "up-2"], "echo fine")
    task = await cluster.wait_task(task_id)
    rows = by_host(await cluster.executions(task_id))
    assert task["status"] == "failed"
    assert {k: (e["status"], e["reason"], e["exit_code"]) for k, e in rows.items()} == {
        ("up-1", 0): ("succeeded", "exit_zero", 0),
        ("up-2", 0): ("succeeded", "exit_zero", 0),
        ("gone", 0): ("dispatch_failed", "agent_offline", None),
    }


async def test_a_timeout_kills_the_whole_process_group(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("t1")
    began = time.monotonic()
    task_id = await cluster.run_task(
        ["t1"], "echo $$; sh -c 'echo $$; exec sleep 60' & sleep 60", timeout_s=1
    )
    task = await cluster.wait_task(task_id)
    elapsed = time.monotonic() - began
    (execution,) = await cluster.executions(task_id)
    detail = await cluster.execution(execution["id"])
    assert (task["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
        "failed",
        "timed_out",
        "timeout",
        None,
    )
    assert detail["signal"] in (15, 9)
    assert elapsed < 8
    pids = [int(line) for line in detail["stdout"].split()]
    assert len(pids) == 2
    assert await wait_gone(pids) == []


async def test_cancel_mid_run_stops_every_process_on_every_host(cluster: Cluster) -> None:
    await cluster.start_daemon()
    hosts = ["c1", "c2", "c3"]
    await cluster.start_agents(*hosts)
    task_id = await cluster.run_task(hosts, "echo $$; sleep 60 & echo $!; wait", "echo never")
    running = await cluster.wait_executions(
        task_id, lambda items: sum(e["status"] == "running" for e in items) == 3
    )
    pids: list[int] = []
    for execution in running:
        if execution["status"] == "running":
            pids += [int(p) for p in await cluster.wait_stdout_lines(execution["id"], 2)]
    assert len(pids) == 6 and all(alive(pid) for pid in pids)
    await cluster.post(f"/api/v1/tasks/{task_id}/cancel", expect=202)
    await cluster.post(f"/api/v1/tasks/{task_id}/cancel", expect=202)  # twice: the same answer
    task = await cluster.wait_task(task_id, timeout_s=20)
    rows = by_host(await cluster.executions(task_id))
    assert task["status"] == "cancelled"
    assert {(e["status"], e["reason"]) for e in rows.values()} == {("cancelled", "user_cancel")}
    assert {rows[(h, 0)]["signal"] for h in hosts} <= {15, 9}
    assert all(rows[(h, 1)]["started_at"] is None for h in hosts)
    assert await wait_gone(pids) == []
    again = await cluster.http.post(f"/api/v1/tasks/{task_id}/cancel")
    assert again.status_code == 202
    done = await cluster.run_task(["c1"], "true")
    await cluster.wait_task(done)
    refused = await cluster.http.post(f"/api/v1/tasks/{done}/cancel")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"


async def test_an_agent_killed_mid_run_is_lost_after_the_grace(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("k1", "k2")
    task_id = await cluster.run_task(["k1", "k2"], "echo $$; sleep 4")
    running = await cluster.wait_executions(
        task_id, lambda items: all(e["status"] == "running" for e in items)
    )
    victim = by_host(running)[("k1", 0)]
    orphan = int((await cluster.wait_stdout_lines(victim["id"], 1))[0])
    await cluster.agents["k1"].kill(signal.SIGKILL)
    task = await cluster.wait_task(task_id, timeout_s=30)
    rows = by_host(await cluster.executions(task_id))
    assert task["status"] == "failed"
    assert (rows[("k1", 0)]["status"], rows[("k1", 0)]["reason"],
            rows[("k1", 0)]["exit_code"]) == ("failed", "agent_lost", None)  # fmt: skip
    assert (rows[("k2", 0)]["status"], rows[("k2", 0)]["exit_code"]) == ("succeeded", 0)
    lost_after = moment(rows[("k1", 0)]["finished_at"]) - moment(rows[("k1", 0)]["started_at"])
    assert lost_after >= 3  # the grace
    # Without its agent nobody reaps the command; a restarted agent would kill it (agent tests).
    await wait_gone([orphan], timeout_s=10)


async def test_a_dropped_connection_back_within_the_grace_keeps_the_real_result(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start_daemon()
    proxy = CuttableProxy(cluster.grpc_port)
    await cluster.nursery.start(proxy.serve)
    marker = tmp_path / "ran"
    await cluster.start_agent("p1", port=proxy.port)
    script = f"echo run >> {marker}; echo first; sleep 1.5; echo second; echo warn >&2; exit 7"
    task_id = await cluster.run_task(["p1"], script)
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    await cluster.wait_stdout_lines(execution["id"], 1)
    assert await proxy.cut() == 2
    task = await cluster.wait_task(task_id)
    detail = await cluster.execution(execution["id"])
    assert (task["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
        "failed",
        "failed",
        "exit_nonzero",
        7,
    )
    assert (detail["stdout"], detail["stderr"]) == ("first\nsecond\n", "warn\n")
    assert marker.read_text() == "run\n"  # it ran once
    assert proxy.accepted >= 2
    host = await cluster.get("/api/v1/hosts/p1")
    assert len(host["connections"]) >= 2


async def test_a_daemon_killed_mid_task_settles_everything_after_restart(
    cluster: Cluster,
) -> None:
    await cluster.start_daemon()
    hosts = ["r1", "r2", "r3"]
    await cluster.start_agents(*hosts)
    task_id = await cluster.run_task(hosts, "sleep 2; echo done-$1", "echo after")
    await cluster.wait_executions(
        task_id, lambda items: sum(e["status"] == "running" for e in items) == 3
    )
    assert cluster.daemon is not None
    await cluster.daemon.kill(signal.SIGKILL)
    await trio.sleep(2.5)  # the commands finish while the daemon is down
    await cluster.start_daemon()
    task = await cluster.wait_task(task_id, timeout_s=60)
    rows = by_host(await cluster.executions(task_id))
    assert task["status"] == "completed"
    assert {(e["status"], e["exit_code"]) for e in rows.values()} == {("succeeded", 0)}
    for host in hosts:
        assert (await cluster.execution(rows[(host, 1)]["id"]))["stdout"] == "after\n"
        first = await cluster.execution(rows[(host, 0)]["id"])
        assert first["stdout"] == "done-\n" and 1.5 < first["duration_s"] < 4


async def test_filters_by_host_status_and_time_return_exactly_the_matches(
    cluster: Cluster,
) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("f1", "f2")
    early = await cluster.run_task(["f1", "f2"], "exit 0")
    await cluster.wait_task(early)
    await trio.sleep(1.1)
    boundary = time.time()
    await trio.sleep(0.1)
    late = await cluster.run_task(["f1", "f2"], 'test "$(hostname)" = never && true; exit 4')
    await cluster.wait_task(late)
    everything = await cluster.get("/api/v1/executions?limit=1000")
    assert len(everything["items"]) == 4
    at = datetime.fromtimestamp(boundary).astimezone().isoformat()  # with a +hh:mm offset
    newer = await cluster.get("/api/v1/executions", since=at)
    assert {(e["task_id"], e["host_id"]) for e in newer["items"]} == {(late, "f1"), (late, "f2")}
    older = await cluster.get("/api/v1/executions", until=at)
    assert {(e["task_id"], e["host_id"]) for e in older["items"]} == {(early, "f1"), (early, "f2")}
    on_f2 = await cluster.get("/api/v1/executions?host=f2")
    assert {(e["task_id"], e["host_id"]) for e in on_f2["items"]} == {(early, "f2"), (late, "f2")}
    failed = await cluster.get("/api/v1/executions?status=failed")
    assert {(e["task_id"], e["exit_code"]) for e in failed["items"]} == {(late, 4)}
    in_task = await cluster.get(f"/api/v1/tasks/{late}/executions?host=f1&status=failed")
    assert [(e["host_id"], e["status"]) for e in in_task["items"]] == [("f1", "failed")]


async def test_two_hundred_agents_one_task_few_transactions(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start_daemon()
    fleet = Program("fleet", [
        sys.executable, "-m", "tests.e2e.many_agents", "--server",
        f"127.0.0.1:{cluster.grpc_port}", "--token", AGENT_TOKEN, "--prefix", "sim",
        "--count", "200", "--state-root", str(tmp_path / "fleet"),
    ], tmp_path / "fleet.log")  # fmt: skip
    cluster.agents["fleet"] = fleet
    await fleet.start()
    hosts = [f"sim-{i:04d}" for i in range(200)]
    await cluster.wait_online(hosts, timeout_s=90)
    events_before = await cluster.metric("dispatch_writer_events_total")
    batches_before = await cluster.metric("dispatch_writer_batches_total")
    task_id = (await cluster.post("/api/v1/tasks", {
        "name": "fleet", "commands": [{"script": "echo hi", "timeout_s": 60}],
        "targets": {"labels": {"fleet": "sim"}}, "start": True,
    }))["id"]  # fmt: skip
    task = await cluster.wait_task(task_id, timeout_s=120)
    rows = await cluster.executions(task_id)
    assert task["status"] == "completed" and len(rows) == 200
    assert {(e["status"], e["exit_code"], e["stdout_bytes"]) for e in rows} == {("succeeded", 0, 3)}
    assert {e["host_id"] for e in rows} == set(hosts)
    events = await cluster.metric("dispatch_writer_events_total") - events_before
    batches = await cluster.metric("dispatch_writer_batches_total") - batches_before
    assert events >= 600  # started, output, finished from each
    assert batches * 10 < events, (batches, events)


async def test_the_daemon_wide_limit_holds_across_twenty_targets(cluster: Cluster) -> None:
    cluster.extra_daemon_args = ["--max-running-executions", "5"]
    await cluster.start_daemon()
    hosts = [f"l{i:02d}" for i in range(20)]
    await cluster.start_agents(*hosts)
    task_id = await cluster.run_task(hosts, "sleep 0.4")
    task = await cluster.wait_task(task_id, timeout_s=60)
    rows = await cluster.executions(task_id)
    assert task["status"] == "completed" and len(rows) == 20
    moments = sorted([(moment(e["started_at"]), 1) for e in rows]
                     + [(moment(e["finished_at"]), -1) for e in rows])  # fmt: skip
    running = peak = 0
    for _, step in moments:
        running += step
        peak = max(peak, running)
    assert 1 <= peak <= 5


async def test_bad_requests_are_refused_in_words_and_write_nothing(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("b1")
    good = {"name": "x", "commands": [{"script": "true", "timeout_s": 5}],
            "targets": {"hosts": ["b1"]}}  # fmt: skip
    cases: list[tuple[object, str | None]] = [
        (b"{not json", None),
        ({**good, "name": 5}, "name"),
        ({**good, "surprise": True}, "surprise"),
        ({**good, "commands": [{"script": "", "timeout_s": 5}]}, "commands.0.script"),
        ({**good, "commands": [{"script": "echo \u0000", "timeout_s": 5}]}, "commands.0.script"),
        ({**good, "commands": [{"script": "true", "timeout_s": 0}]}, "commands.0.timeout_s"),
        ({**good, "commands": [{"script": "true", "timeout_s": 10**9}]}, "commands.0.timeout_s"),
        ({**good, "targets": {"hosts": ["no-such-host"]}}, "targets.hosts.0"),
        ({**good, "commands": [{"script": "x" * 2_000_000, "timeout_s": 5}]}, None),
    ]
    for body, field in cases:
        raw = body if isinstance(body, bytes) else None
        response = await cluster.http.post(
            "/api/v1/tasks", content=raw, json=None if raw else body,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert 400 <= response.status_code < 500, (body if raw else field, response.text)
        error = response.json()["error"]
        assert error["code"] and error["message"]
        if field is not None:
            assert error.get("field") == field, (field, error)
    unauthenticated = await httpx.AsyncClient(base_url=str(cluster.http.base_url)).post(
        "/api/v1/tasks", json=good
    )
    assert unauthenticated.status_code == 401
    assert (await cluster.get("/api/v1/tasks"))["items"] == []


async def test_big_output_keeps_exactly_the_head_and_the_tail(cluster: Cluster) -> None:
    await cluster.start_daemon("--max-output-bytes", "65536")
    await cluster.start_agents("o1")
    task_id = await cluster.run_task(["o1"], "seq 1 200000; echo tail-err >&2")
    await cluster.wait_task(task_id)
    (execution,) = await cluster.executions(task_id)
    produced = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    assert (execution["status"], execution["stdout_bytes"], execution["stderr_bytes"]) == (
        "succeeded",
        len(produced),
        9,
    )
    assert execution["output_truncated"] is True
    raw = await cluster.http.get(f"/api/v1/executions/{execution['id']}/output",
                                 params={"stream": "stdout"})  # fmt: skip
    assert raw.content == produced[:32768] + produced[-32768:]
    detail = await cluster.execution(execution["id"])
    assert detail["stdout_omitted_bytes"] == len(produced) - 65536
    assert detail["stdout"].startswith("1\n2\n3\n") and detail["stdout"].endswith(
        "199999\n200000\n"
    )
    assert f"{len(produced) - 65536} bytes omitted" in detail["stdout"]
    assert (detail["stderr"], detail["stderr_omitted_bytes"]) == ("tail-err\n", 0)


async def test_sigterm_stops_the_daemon_cleanly_and_work_resumes(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("s1", "s2")
    task_id = await cluster.run_task(["s1", "s2"], "sleep 1.5; echo done")
    await cluster.wait_executions(
        task_id, lambda items: all(e["status"] == "running" for e in items)
    )
    assert cluster.daemon is not None
    assert await cluster.daemon.kill(signal.SIGTERM) == 0
    log = cluster.daemon.log_text()
    assert "the writer has flushed; dispatchd stopped" in log and "Traceback" not in log
    await cluster.start_daemon()
    task = await cluster.wait_task(task_id)
    rows = await cluster.executions(task_id)
    assert task["status"] == "completed"
    assert {(e["status"], e["exit_code"], e["stdout_bytes"]) for e in rows} == {("succeeded", 0, 5)}


async def test_an_agent_restarted_after_kill_9_cleans_up_and_reports(cluster: Cluster) -> None:
    await cluster.start_daemon()
    await cluster.start_agents("x1")
    task_id = await cluster.run_task(["x1"], "echo $$; sleep 60 & echo $!; wait")
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    pids = [int(p) for p in await cluster.wait_stdout_lines(execution["id"], 2)]
    await cluster.agents["x1"].kill(signal.SIGKILL)
    assert all(alive(pid) for pid in pids)  # nobody killed them yet
    await cluster.start_agent("x1")  # within the grace, same state directory
    task = await cluster.wait_task(task_id)
    detail = await cluster.execution(execution["id"])
    assert (task["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
        "failed",
        "failed",
        "agent_restart",
        None,
    )
    assert "agent restarted" in detail["error"]
    assert await wait_gone(pids) == []
