"""Every route's happy path, with exact field values, through quart's test client."""

from __future__ import annotations

from daemon.api import responses
from daemon.taskspec import CommandSpec, TaskSpec

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def iso(seconds: float) -> str:
    from daemon.store.views import rfc3339

    return rfc3339(seconds)


def same_fields(body: dict, model: type) -> None:
    """The body has exactly the fields its documented response model lists."""
    assert set(body) == set(model.model_fields), set(body) ^ set(model.model_fields)
    model.model_validate(body)


async def test_healthz_needs_no_token(client):
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}


async def test_hosts_list_filters_and_pages(api, rows):
    rows.host(
        "web-1", hostname="web-1.example", labels={"role": "web", "dc": "a"}, status="online",
        agent_version="0.1.0", address="10.0.0.1:40000", connected_at=T0 + 100,
        last_seen_at=T0 + 200,
    )  # fmt: skip
    rows.host("web-2", labels={"role": "web", "dc": "b"}, status="offline")
    rows.host("db-1", labels={"role": "db"}, status="online")

    status, body = await api("GET", "/api/v1/hosts")
    assert status == 200
    assert [h["id"] for h in body["items"]] == ["db-1", "web-1", "web-2"]
    assert body["next_cursor"] is None
    assert body["items"][1] == {
        "id": "web-1",
        "hostname": "web-1.example",
        "labels": {"role": "web", "dc": "a"},
        "status": "online",
        "connected_at": "2023-11-14T22:15:00.000Z",
        "last_seen_at": "2023-11-14T22:16:40.000Z",
        "first_seen_at": "2023-11-14T22:13:20.000Z",
        "agent_version": "0.1.0",
        "address": "10.0.0.1:40000",
        "enrollment": "approved",
    }
    same_fields(body["items"][1], responses.HostOut)

    async def ids(query: str) -> list[str]:
        status, body = await api("GET", f"/api/v1/hosts?{query}")
        assert status == 200, body
        return [h["id"] for h in body["items"]]

    assert await ids("status=online") == ["db-1", "web-1"]
    assert await ids("status=offline") == ["web-2"]
    assert await ids("label=role=web") == ["web-1", "web-2"]
    assert await ids("label=role=web&label=dc=b") == ["web-2"]
    assert await ids("status=online&label=role=web") == ["web-1"]
    assert await ids("label=role=nothing") == []

    status, first = await api("GET", "/api/v1/hosts?label=role=web&limit=1")
    assert [h["id"] for h in first["items"]] == ["web-1"]
    status, second = await api(
        "GET", f"/api/v1/hosts?label=role=web&limit=1&cursor={first['next_cursor']}"
    )
    assert [h["id"] for h in second["items"]] == ["web-2"]
    assert second["next_cursor"] is None


async def test_host_detail_has_newest_connections_bounded(api, rows):
    rows.host("web-1", status="online")
    for i in range(60):
        rows.connection(
            "web-1", connected_at=T0 + i, disconnected_at=T0 + i + 0.5, address=f"10.0.0.{i}:1",
            agent_version="0.1.0", close_reason="agent_lost",
        )  # fmt: skip
    rows.connection("other", connected_at=T0)
    status, body = await api("GET", "/api/v1/hosts/web-1")
    assert status == 200
    same_fields(body, responses.HostDetailOut)
    connections = body["connections"]
    assert len(connections) == 50  # HttpLimits.max_connections_shown
    assert connections[0] == {
        "id": "60",
        "connected_at": iso(T0 + 59),
        "disconnected_at": iso(T0 + 59.5),
        "address": "10.0.0.59:1",
        "agent_version": "0.1.0",
        "close_reason": "agent_lost",
    }
    assert [c["address"] for c in connections] == [f"10.0.0.{i}:1" for i in range(59, 9, -1)]


FULL_BODY = {
    "name": "restart nginx",
    "commands": [
        {
            "script": "systemctl restart nginx",
            "args": ["a", "b"],
            "timeout_s": 60,
            "env": {"LANG": "C"},
            "cwd": "/srv",
        },
        {"script": "echo done"},
    ],  # fmt: skip
    "targets": {"hosts": ["web-1", "web-2"], "labels": {"role": "web"}},
    "max_concurrency": 50,
    "max_failures": 0,
    "delivery_timeout_s": 30,
    "continue_on_error": True,
    "start": False,
}


async def test_create_task_returns_it_as_get_shows_it(api, rows, tasks):
    rows.host("web-1")
    rows.host("web-2")
    response = await api.raw("POST", "/api/v1/tasks", json=FULL_BODY)
    assert response.status_code == 201
    created = await response.get_json()
    assert response.headers["Location"] == f"/api/v1/tasks/{created['id']}"
    same_fields(created, responses.TaskOut)
    assert created["name"] == "restart nginx"
    assert created["status"] == "pending"
    assert created["commands"] == [
        {"index": 0, "script": "systemctl restart nginx", "args": ["a", "b"],
         "env": {"LANG": "C"}, "cwd": "/srv", "timeout_s": 60.0},
        {"index": 1, "script": "echo done", "args": [], "env": {}, "cwd": "", "timeout_s": 600.0},
    ]  # fmt: skip
    assert created["targets"] == {"hosts": ["web-1", "web-2"], "labels": {"role": "web"}}
    assert (created["max_concurrency"], created["max_failures"]) == (50, 0)
    assert created["delivery_timeout_s"] == 30.0
    assert created["continue_on_error"] is True
    assert created["progress"] == {
        "total": 4, "finished": 0, "percent": 0.0, "by_status": {"pending": 4},
    }  # fmt: skip
    status, fetched = await api("GET", f"/api/v1/tasks/{created['id']}")
    assert status == 200 and fetched == created
    assert tasks.calls == [
        (
            "create",
            TaskSpec(
                name="restart nginx",
                commands=(
                    CommandSpec(
                        script="systemctl restart nginx",
                        timeout_s=60.0,
                        args=("a", "b"),
                        env={"LANG": "C"},
                        cwd="/srv",
                    ),
                    CommandSpec(script="echo done", timeout_s=600.0),
                ),  # fmt: skip
                target_hosts=("web-1", "web-2"),
                target_labels={"role": "web"},
                max_concurrency=50,
                max_failures=0,
                delivery_timeout_s=30.0,
                continue_on_error=True,
            ),
            False,
            None,
        )
    ]


async def test_create_and_start(api, rows, tasks):
    rows.host("web-1")
    body = {"name": "n", "commands": [{"script": "true"}], "targets": {"hosts": ["web-1"]},
            "start": True}  # fmt: skip
    status, created = await api("POST", "/api/v1/tasks", json=body)
    assert status == 201 and created["status"] == "queued"
    assert tasks.calls[0][2] is True


async def test_idempotency_key_replays_the_same_task(api, rows, tasks):
    rows.host("web-1")
    body = {"name": "n", "commands": [{"script": "true"}], "targets": {"hosts": ["web-1"]}}
    key = {"Idempotency-Key": "create-n-1"}
    status1, first = await api("POST", "/api/v1/tasks", json=body, headers=key)
    status2, second = await api("POST", "/api/v1/tasks", json=body, headers=key)
    assert (status1, status2) == (201, 201)
    assert first == second
    assert rows.counts()["Task"] == 1
    assert [call[3] for call in tasks.calls] == ["create-n-1", "create-n-1"]

    other = {**body, "name": "other"}
    status, error = await api("POST", "/api/v1/tasks", json=other, headers=key)
    assert status == 409 and error["error"]["code"] == "conflict"
    assert rows.counts()["Task"] == 1


async def test_task_service_refusal_names_the_field(api, rows):
    rows.host("web-1")
    before = rows.counts()
    body = {"name": "n", "commands": [{"script": "true"}],
            "targets": {"hosts": ["web-1", "ghost"]}}  # fmt: skip
    status, error = await api("POST", "/api/v1/tasks", json=body)
    assert status == 400
    assert error["error"]["field"] == "targets.hosts[1]"
    # nothing is written but the audit record of the refused attempt
    assert rows.counts() == {**before, "AuditEvent": before["AuditEvent"] + 1}


async def test_get_task_with_progress(api, rows):
    task_id = rows.task("deploy", status="running", created_at=T0, started_at=T0 + 1)
    statuses = ["succeeded"] * 3 + ["failed", "running", "pending"]
    for i, status in enumerate(statuses):
        rows.execution(task_id, f"h{i}", status=status)
    status, body = await api("GET", f"/api/v1/tasks/{task_id}")
    assert status == 200
    assert body["id"] == str(task_id)
    assert body["created_at"] == "2023-11-14T22:13:20.000Z"
    assert body["started_at"] == "2023-11-14T22:13:21.000Z"
    assert body["finished_at"] is None and body["duration_s"] is None
    assert body["progress"] == {
        "total": 6,
        "finished": 4,
        "percent": 66.67,
        "by_status": {"failed": 1, "pending": 1, "running": 1, "succeeded": 3},
    }


async def test_list_tasks_newest_first_with_filters(api, rows):
    a = rows.task("a", status="completed", created_at=T0)
    b = rows.task("b", status="running", created_at=T0 + 10)
    c = rows.task("c", status="failed", created_at=T0 + 20)
    rows.execution(a, "web-1")
    rows.execution(c, "web-1")
    rows.execution(b, "web-2")

    async def ids(query: str = "") -> list[int]:
        status, body = await api("GET", f"/api/v1/tasks?{query}")
        assert status == 200, body
        assert body["next_cursor"] is None
        return [int(t["id"]) for t in body["items"]]

    assert await ids() == [c, b, a]
    assert await ids("status=running") == [b]
    assert await ids("status=completed,failed") == [c, a]
    assert await ids("host=web-1") == [c, a]
    assert await ids("host=web-1&status=failed") == [c]
    assert await ids("since=2023-11-14T22:13:30Z") == [c, b]  # inclusive
    assert await ids("until=2023-11-14T22:13:30Z") == [a]  # exclusive
    assert await ids("since=2023-11-14T22:13:35Z&until=2023-11-14T22:13:45Z") == [c]
    status, body = await api("GET", "/api/v1/tasks")
    same_fields(body, responses.TaskPage)
    same_fields(body["items"][0], responses.TaskOut)
    assert body["items"][2]["progress"]["by_status"] == {"pending": 1}


async def test_start_cancel_retry(api, rows, tasks):
    pending = rows.task("p", status="pending")
    status, body = await api("POST", f"/api/v1/tasks/{pending}/start")
    assert status == 202 and body["status"] == "queued"
    status, body = await api("POST", f"/api/v1/tasks/{pending}/start")
    assert status == 409 and body["error"]["code"] == "conflict"

    status, body = await api("POST", f"/api/v1/tasks/{pending}/cancel")
    assert status == 202 and body["cancel_requested"] is True
    status, again = await api("POST", f"/api/v1/tasks/{pending}/cancel")
    assert (status, again) == (202, body)
    finished = rows.task("f", status="completed")
    status, body = await api("POST", f"/api/v1/tasks/{finished}/cancel")
    assert status == 409

    response = await api.raw("POST", f"/api/v1/tasks/{finished}/retry?only=failed")
    assert response.status_code == 201
    retried = await response.get_json()
    assert retried["retry_of"] == str(finished)
    assert response.headers["Location"] == f"/api/v1/tasks/{retried['id']}"
    status, body = await api("POST", f"/api/v1/tasks/{finished}/retry")
    assert status == 201
    assert tasks.calls[-2:] == [("retry", finished, "failed"), ("retry", finished, "failed")]
    status, body = await api("POST", "/api/v1/tasks/999/start")
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_executions_of_a_task_and_one_execution(api, rows):
    task_id = rows.task("t")
    other = rows.task("other")
    first = rows.execution(
        task_id, "web-1", status="failed", reason="exit_nonzero", error="exited with 3",
        exit_code=3, dispatched_at=T0, started_at=T0 + 1, finished_at=T0 + 3.5, duration_s=2.5,
        stdout_bytes=6, stderr_bytes=4, pid=42,
    )  # fmt: skip
    second = rows.execution(task_id, "web-2")
    rows.execution(other, "web-1")
    rows.chunk(first, 0, b"hello\n", stream=1)
    rows.chunk(first, 0, b"oops", stream=2)

    status, body = await api("GET", f"/api/v1/tasks/{task_id}/executions")
    assert status == 200
    same_fields(body, responses.ExecutionPage)
    assert [e["id"] for e in body["items"]] == [str(first), str(second)]
    expected = {
        "id": str(first), "task_id": str(task_id), "command_index": 0, "host_id": "web-1",
        "status": "failed", "reason": "exit_nonzero", "error": "exited with 3", "exit_code": 3,
        "signal": None, "dispatched_at": iso(T0), "started_at": iso(T0 + 1),
        "finished_at": iso(T0 + 3.5), "duration_s": 2.5, "stdout_bytes": 6, "stderr_bytes": 4,
        "output_truncated": False,
    }  # fmt: skip
    assert body["items"][0] == expected
    same_fields(body["items"][0], responses.ExecutionOut)

    status, detail = await api("GET", f"/api/v1/executions/{first}")
    assert status == 200
    assert detail == {
        **expected, "stdout": "hello\n", "stderr": "oops", "stdout_omitted_bytes": 0,
        "stderr_omitted_bytes": 0,
    }  # fmt: skip
    same_fields(detail, responses.ExecutionDetailOut)


async def test_raw_output_is_byte_exact(api, rows):
    task_id = rows.task("t")
    execution = rows.execution(task_id, "web-1", stdout_bytes=100, stderr_bytes=3)
    head, tail = bytes(range(0, 10)) + b"\xff\xfe", bytes(range(200, 220))
    rows.chunk(execution, 0, head)
    rows.chunk(execution, 80, tail)
    rows.chunk(execution, 0, b"\xc3\xa9!", stream=2)
    response = await api.raw("GET", f"/api/v1/executions/{execution}/output?stream=stdout")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert await response.get_data() == head + tail
    assert response.headers["X-Output-Total-Bytes"] == "100"
    assert response.headers["X-Output-Omitted-Bytes"] == str(100 - len(head) - len(tail))
    assert response.headers["X-Output-Ranges"] == "0-12,80-100"
    response = await api.raw("GET", f"/api/v1/executions/{execution}/output?stream=stderr")
    assert await response.get_data() == b"\xc3\xa9!"
    assert response.headers["X-Output-Omitted-Bytes"] == "0"
    response = await api.raw("GET", f"/api/v1/executions/{execution}/output")  # stdout default
    assert await response.get_data() == head + tail


async def test_executions_across_tasks_newest_first(api, rows):
    a, b = rows.task("a"), rows.task("b")
    e1 = rows.execution(a, "web-1", started_at=T0)
    e2 = rows.execution(b, "web-1", started_at=T0 + 5)
    e3 = rows.execution(b, "web-2")
    status, body = await api("GET", "/api/v1/executions")
    assert [e["id"] for e in body["items"]] == [str(e3), str(e2), str(e1)]
    status, body = await api("GET", "/api/v1/executions?host=web-1&since=2023-11-14T22:13:21Z")
    assert [e["id"] for e in body["items"]] == [str(e2)]


async def test_task_stats(api, rows):
    task_id = rows.task("t", scripts=("uname", "uptime"))
    same = dict(status="succeeded", exit_code=0, output_digest="aaa")
    ids = [
        rows.execution(task_id, "h3", duration_s=3.0, **same),
        rows.execution(task_id, "h1", duration_s=1.0, **same),
        rows.execution(task_id, "h2", duration_s=2.0, **same),
        rows.execution(task_id, "h4", duration_s=4.0, status="failed", exit_code=1,
                       output_digest="bbb"),
        rows.execution(task_id, "h5", duration_s=5.0, status="failed", exit_code=1,
                       output_digest="bbb"),
        rows.execution(task_id, "h1", command_index=1, duration_s=10.0, status="succeeded",
                       exit_code=0, output_digest="aaa"),
        rows.execution(task_id, "h6", status="running"),
    ]  # fmt: skip
    rows.chunk(ids[0], 0, "Linux h3 — ok\n".encode() + b"x" * 300)
    rows.chunk(ids[0], 500, b"tail")
    rows.chunk(ids[3], 0, b"error\n")

    status, body = await api("GET", f"/api/v1/tasks/{task_id}/stats")
    assert status == 200
    same_fields(body, responses.TaskStatsOut)
    assert body["task_id"] == str(task_id)
    assert body["total"] == 7
    assert body["by_status"] == {"failed": 2, "running": 1, "succeeded": 4}
    assert body["by_exit_code"] == {"0": 4, "1": 2}
    assert body["duration_s"] == {"count": 6, "min": 1.0, "avg": 25 / 6, "p95": 10.0, "max": 10.0}
    assert body["groups_total"] == 3
    groups = body["groups"]
    assert groups[0] == {
        "command_index": 0, "exit_code": 0, "output_digest": "aaa", "count": 3,
        "hosts": ["h1", "h2", "h3"],
        "stdout_preview": ("Linux h3 — ok\n".encode() + b"x" * 300)[:200].decode(),
    }  # fmt: skip
    assert groups[1] == {
        "command_index": 0, "exit_code": 1, "output_digest": "bbb", "count": 2,
        "hosts": ["h4", "h5"], "stdout_preview": "error\n",
    }  # fmt: skip
    assert groups[2]["hosts"] == ["h1"] and groups[2]["command_index"] == 1
    assert groups[2]["stdout_preview"] == ""


async def test_openapi_documents_every_route_and_the_auth(api, app):
    status, doc = await api("GET", "/openapi.json")
    assert status == 200
    assert doc["components"]["securitySchemes"] == {
        "bearerAuth": {"type": "http", "scheme": "bearer"}
    }
    assert doc["security"] == [{"bearerAuth": []}]
    routes = {
        (method.lower(), rule.rule.replace("<", "{").replace(">", "}"))
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "openapi"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented
    assert len(routes) == 22
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    create = doc["paths"]["/api/v1/tasks"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "commands", "targets"}
    assert schema["properties"]["commands"]["items"] == {"$ref": "#/components/schemas/CommandIn"}
    command = doc["components"]["schemas"]["CommandIn"]
    assert command["properties"]["timeout_s"]["exclusiveMinimum"] == 0
    assert {"name": "idempotency-key", "in": "header"}.items() <= create["parameters"][0].items()
    listing = doc["paths"]["/api/v1/tasks"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {
        "status", "host", "since", "until", "limit", "cursor"
    }  # fmt: skip
    assert "201" in {str(code) for code in create["responses"]}
