"""The read queries: paging, filters, output assembly, statistics, changes, and their cost."""

from __future__ import annotations

import time

import pytest

from daemon.api import catch_up
from daemon.store import queries, stats
from daemon.store.queries import ExecutionFilter, assemble_output, omitted_marker

T0 = 1_700_000_000.0


async def walk(api, path: str) -> list[list[str]]:
    """Follow next_cursor from ``path`` to the end; the ids of each page."""
    pages: list[list[str]] = []
    cursor = None
    while True:
        joiner = "&" if "?" in path else "?"
        url = path if cursor is None else f"{path}{joiner}cursor={cursor}"
        status, body = await api("GET", url)
        assert status == 200, body
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100


async def test_task_pages_walk_newest_first(api, rows):
    ids = [rows.task(f"t{i}", created_at=T0 + i) for i in range(23)]
    pages = await walk(api, "/api/v1/tasks?limit=10")
    assert [len(page) for page in pages] == [10, 10, 3]
    flat = [int(i) for page in pages for i in page]
    assert flat == ids[::-1]
    # a page boundary exactly at the end: the last full page says there is no more
    pages = await walk(api, "/api/v1/tasks?limit=23")
    assert [len(page) for page in pages] == [23]


async def test_execution_pages_walk_in_id_order_with_a_filter(api, rows):
    task_id = rows.task("t")
    other = rows.task("other")
    executions = rows.executions(task_id, [f"h{i:03}" for i in range(250)])
    rows.executions(other, ["h000", "h001"])
    for execution in executions[::7]:
        rows.update_execution(execution, status="failed")
    pages = await walk(api, f"/api/v1/tasks/{task_id}/executions?limit=100")
    assert [len(page) for page in pages] == [100, 100, 50]
    assert [int(i) for page in pages for i in page] == executions
    pages = await walk(api, f"/api/v1/tasks/{task_id}/executions?limit=10&status=failed")
    flat = [int(i) for page in pages for i in page]
    assert flat == executions[::7] and len(pages) == 4 and len(set(flat)) == len(flat)
    pages = await walk(api, "/api/v1/executions?limit=120&host=h001")
    assert [int(i) for page in pages for i in page][0] > executions[-1]  # newest first


async def test_execution_filters_match_exactly(api, rows):
    a, b = rows.task("a"), rows.task("b")
    e = {
        "a1": rows.execution(a, "web-1", status="succeeded", started_at=T0 + 10),
        "a2": rows.execution(a, "web-2", status="failed", started_at=T0 + 20),
        "a3": rows.execution(a, "web-1", status="pending"),  # never started
        "b1": rows.execution(b, "web-1", status="failed", started_at=T0 + 30),
        "b2": rows.execution(b, "web-2", status="timed_out", started_at=T0 + 40),
    }

    async def names(path: str) -> set[str]:
        status, body = await api("GET", path)
        assert status == 200, body
        by_id = {str(v): k for k, v in e.items()}
        return {by_id[item["id"]] for item in body["items"]}

    assert await names("/api/v1/executions") == set(e)
    assert await names("/api/v1/executions?host=web-1") == {"a1", "a3", "b1"}
    assert await names("/api/v1/executions?status=failed") == {"a2", "b1"}
    assert await names("/api/v1/executions?status=failed,timed_out&host=web-2") == {"a2", "b2"}
    # started: a1 22:13:30, a2 22:13:40, b1 22:13:50, b2 22:14:00; a3 never
    assert await names("/api/v1/executions?since=2023-11-14T22:13:35Z") == {"a2", "b1", "b2"}
    assert await names("/api/v1/executions?since=2023-11-14T22:13:40Z") == {"a2", "b1", "b2"}
    assert await names("/api/v1/executions?until=2023-11-14T22:13:40Z") == {"a1"}
    assert await names(
        "/api/v1/executions?since=2023-11-14T22:13:45Z&until=2023-11-14T22:14:00Z"
    ) == {"b1"}  # fmt: skip
    assert await names(
        "/api/v1/executions?since=2023-11-14T22:13:00Z&until=2023-11-14T22:15:00Z&host=web-1"
    ) == {"a1", "b1"}  # fmt: skip
    assert await names(f"/api/v1/tasks/{a}/executions?host=web-1") == {"a1", "a3"}
    assert await names(f"/api/v1/tasks/{a}/executions?since=2000-01-01T00:00:00Z") == {"a1", "a2"}
    assert await names(f"/api/v1/tasks/{b}/executions?status=pending") == set()
    status, body = await api("GET", "/api/v1/tasks/999/executions")
    assert status == 404


def test_assemble_head_gap_tail_and_overlaps():
    head, tail = b"0123456789", b"uvwxyz"
    out = assemble_output([(94, tail), (0, head)], 100)
    assert out.data == head + tail
    assert out.ranges == ((0, 10), (94, 100))
    assert (out.total_bytes, out.omitted_bytes) == (100, 84)
    assert out.text() == "0123456789" + omitted_marker(84) + "uvwxyz"
    assert omitted_marker(84) == "\n[... 84 bytes omitted ...]\n"

    overlapping = [(0, b"abcdef"), (4, b"efgh"), (2, b"cd"), (8, b"ij"), (20, b"tail")]
    out = assemble_output(overlapping, 30)
    assert out.data == b"abcdefghijtail"
    assert out.ranges == ((0, 10), (20, 24))
    assert out.text() == "abcdefghij" + omitted_marker(10) + "tail" + omitted_marker(6)

    out = assemble_output([(5, b"late")], 9)  # the head is gone
    assert out.text() == omitted_marker(5) + "late" and out.omitted_bytes == 5
    out = assemble_output([(0, b"more than counted")], 4)  # a counter behind the rows
    assert out.total_bytes == 17 and out.omitted_bytes == 0
    assert assemble_output([], 0).text() == ""
    assert assemble_output([], 7).text() == omitted_marker(7)


async def test_invalid_utf8_is_replaced_in_text_and_exact_in_bytes(api, rows):
    task_id = rows.task("t")
    execution = rows.execution(task_id, "h", stdout_bytes=9)
    raw = b"ok \xff\xfe \xe2\x82\xac"
    rows.chunk(execution, 0, raw)
    status, body = await api("GET", f"/api/v1/executions/{execution}")
    assert body["stdout"] == "ok \ufffd\ufffd €"
    response = await api.raw("GET", f"/api/v1/executions/{execution}/output")
    assert await response.get_data() == raw


async def test_execution_text_marks_the_gap(api, rows):
    task_id = rows.task("t")
    execution = rows.execution(task_id, "h", stdout_bytes=1_000_000, output_truncated=True)
    rows.chunk(execution, 0, b"head\n")
    rows.chunk(execution, 999_990, b"tail line\n")
    rows.chunk(execution, 999_995, b"line\n")  # overlaps the tail
    status, body = await api("GET", f"/api/v1/executions/{execution}")
    assert body["stdout"] == "head\n\n[... 999985 bytes omitted ...]\ntail line\n"
    assert body["stdout_omitted_bytes"] == 999_985
    assert body["output_truncated"] is True
    assert body["stderr"] == "" and body["stderr_omitted_bytes"] == 0


def test_stats_groups_are_bounded(rows, peewee_db):
    task_id = rows.task("t")
    rows.executions(task_id, [f"h{i:02}" for i in range(25)], status="succeeded", exit_code=0,
                    output_digest="same")  # fmt: skip
    for i in range(5):
        rows.execution(task_id, f"x{i}", status="failed", exit_code=2, output_digest=f"d{i}")
    with peewee_db.connection_context():
        result = stats.task_stats(task_id, max_groups=3, hosts_per_group=20, preview_bytes=10)
        assert stats.task_stats(999, max_groups=3, hosts_per_group=20, preview_bytes=10) is None
    assert result["groups_total"] == 6
    assert [g["count"] for g in result["groups"]] == [25, 1, 1]
    assert result["groups"][0]["hosts"] == [f"h{i:02}" for i in range(20)]
    assert [g["output_digest"] for g in result["groups"][1:]] == ["d0", "d1"]
    assert result["by_exit_code"] == {"0": 25, "2": 5}
    assert result["duration_s"] == {"count": 0, "min": None, "avg": None, "p95": None, "max": None}


def test_changes_since_pages_by_seq_across_tables(rows, peewee_db):
    task_id = rows.task("t")  # 1
    a = rows.execution(task_id, "a")  # 2
    for i in range(5):
        rows.chunk(a, i, b"x")  # 3..7
    rows.update_execution(a, status="running")  # 8
    rows.update_task(task_id, status="running")  # 9
    with peewee_db.connection_context():
        assert catch_up.changes_since(999, 0, 10) is None
        seen: list[tuple[str, int]] = []
        after = 0
        while True:
            batch = catch_up.changes_since(task_id, after, 3)
            seen += [(event.kind, event.seq) for event in batch.events]
            if batch.complete:
                break
            after = batch.events[-1].seq
        assert seen == [("output", s) for s in range(3, 8)] + [("execution", 8), ("task", 9)]
        assert batch.progress == {"total": 1, "finished": 0, "percent": 0.0,
                                  "by_status": {"running": 1}}  # fmt: skip
        quiet = catch_up.changes_since(task_id, 9, 3, include_output=False)
        assert quiet.events == [] and quiet.complete
        no_output = catch_up.changes_since(task_id, 0, 100, include_output=False)
        assert [e.kind for e in no_output.events] == ["execution", "task"]
        snapshot = catch_up.task_snapshot(task_id)
        assert snapshot.seq == 9 and snapshot.task["status"] == "running"


def test_progress_of_a_large_task_is_fast(rows, peewee_db):
    task_id = rows.task("big")
    rows.executions(task_id, [f"host-{i:05}" for i in range(10_000)], status="running")
    timings = []
    with peewee_db.connection_context():
        for _ in range(30):
            started = time.perf_counter()
            task = queries.get_task(task_id)
            timings.append(time.perf_counter() - started)
        page = queries.list_executions(ExecutionFilter(task_id=task_id), 1000, None)
    assert task["progress"]["total"] == 10_000
    assert len(page.items) == 1000
    timings.sort()
    assert timings[-2] < 0.1, timings[-5:]


@pytest.mark.parametrize(
    "cursor",
    ["", "AAAA", "eyJ4IjoxfQ", queries.encode_cursor("tasks", (), -5),
     queries.encode_cursor("tasks", (), "x"), queries.encode_cursor("tasks", (), 2**64)],
)  # fmt: skip
def test_bad_cursors_are_invalid_requests(rows, peewee_db, cursor):
    from daemon.errors import InvalidRequest

    with peewee_db.connection_context(), pytest.raises(InvalidRequest) as caught:
        queries.list_tasks(queries.TaskFilter(), 10, cursor)
    assert caught.value.field == "cursor"
