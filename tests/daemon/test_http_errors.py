"""Authentication on every route, and every refusal as a JSON error with the right status and
field, without writing anything."""

from __future__ import annotations

import json
import logging

import peewee
import pytest

from daemon.store import queries

PUBLIC = {"healthz"}


@pytest.fixture
def db_url(sqlite_only: str) -> str:
    return sqlite_only  # refusals happen before the database; one kind is enough


GOOD = {"name": "n", "commands": [{"script": "true"}], "targets": {"hosts": ["web-1"]}}


def with_(path: str, value: object) -> dict:
    """GOOD with the dotted ``path`` set to ``value``."""
    body = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return body


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


def assert_error(status: int, body: dict, want_status: int, code: str, field: str | None) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code, error
    assert error.get("field") == field, error
    assert isinstance(error["message"], str) and error["message"]
    assert "pydantic" not in error["message"] and "Traceback" not in error["message"]
    assert set(error) <= {"code", "message", "field"}


async def test_every_route_but_the_public_ones_needs_the_token(app, client, rows):
    from daemon.api.auth import AUDITED_ATTRIBUTE, ROUTES

    task_id = rows.task("t")
    rows.host("web-1")
    routes = 0
    public = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", "web-1" if "host" in name else str(task_id))
        if rule.endpoint not in PUBLIC:  # an explicit role, and an audit action for changes
            assert rule.endpoint in ROUTES, rule.endpoint
            if rule.methods & {"POST", "PUT", "PATCH", "DELETE"}:
                assert ROUTES[rule.endpoint].action, rule.endpoint
                assert getattr(app.view_functions[rule.endpoint], AUDITED_ATTRIBUTE), rule.endpoint
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes += 1
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                response = await client.open(path, method=method, headers=headers)
                if rule.endpoint in PUBLIC:
                    assert response.status_code == 200
                    public.add(rule.endpoint)
                    continue
                assert response.status_code == 401, (method, path)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                body = await response.get_json()
                assert body["error"]["code"] == "unauthorized"
    assert public == PUBLIC
    assert routes == 23  # 22 API routes and /openapi.json
    response = await client.get("/no/such/route")
    assert response.status_code == 401  # unknown routes do not reveal themselves


async def test_no_api_token_means_no_authentication(database, tasks, live, caplog):
    from daemon.api.app import create_app

    with caplog.at_level(logging.WARNING, logger="daemon.api.app"):
        app = create_app(database=database, tasks=tasks, live=live, api_token=None)
    assert "WITHOUT authentication" in caplog.text
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/api/v1/tasks")
        assert response.status_code == 200


BAD_BODIES = [
    (without("name"), "name"),
    (with_("name", ""), "name"),
    (with_("name", "x" * 201), "name"),
    (with_("name", "a\x00b"), "name"),
    (with_("name", 5), "name"),
    (without("commands"), "commands"),
    (with_("commands", []), "commands"),
    (with_("commands", [{"script": "true"}] * 21), "commands"),
    (with_("commands", {"script": "true"}), "commands"),
    (with_("commands.0.script", ""), "commands.0.script"),
    (with_("commands.0.script", "echo a\x00b"), "commands.0.script"),
    (with_("commands.0.script", "é" * (32 * 1024 + 1)), "commands.0.script"),
    (with_("commands.0.timeout_s", 0), "commands.0.timeout_s"),
    (with_("commands.0.timeout_s", -1.5), "commands.0.timeout_s"),
    (with_("commands.0.timeout_s", 86401), "commands.0.timeout_s"),
    (with_("commands.0.timeout_s", True), "commands.0.timeout_s"),
    (with_("commands.0.timeout_s", "60"), "commands.0.timeout_s"),
    (with_("commands.0.timeout_s", None), "commands.0.timeout_s"),
    (with_("commands.0.args", "a b"), "commands.0.args"),
    (with_("commands.0.args", ["ok", 1]), "commands.0.args.1"),
    (with_("commands.0.env", {"1BAD": "x"}), "commands.0.env"),
    (with_("commands.0.env", {"A": 1}), "commands.0.env.A"),
    (with_("commands.0.cwd", "relative/dir"), "commands.0.cwd"),
    (with_("commands.0.shell", "bash"), "commands.0.shell"),
    (with_("targets", {}), "targets"),
    (with_("targets", {"hosts": [], "labels": {}}), "targets"),
    (with_("targets.hosts", ["web 1"]), "targets.hosts.0"),
    (with_("targets.hosts", ["web-1", "../etc"]), "targets.hosts.1"),
    (with_("targets.hosts", ["web-1", "web-1"]), "targets.hosts"),
    (with_("targets.hosts", [f"h{i}" for i in range(10_001)]), "targets.hosts"),
    (with_("targets.hosts", "web-1"), "targets.hosts"),
    (with_("targets.labels", {"role": "a\x00"}), "targets.labels.role"),
    (with_("targets.groups", ["x"]), "targets.groups"),
    (with_("max_concurrency", 0), "max_concurrency"),
    (with_("max_concurrency", 1.5), "max_concurrency"),
    (with_("max_concurrency", True), "max_concurrency"),
    (with_("max_failures", -1), "max_failures"),
    (with_("delivery_timeout_s", -1), "delivery_timeout_s"),
    (with_("delivery_timeout_s", 86401), "delivery_timeout_s"),
    (with_("continue_on_error", "yes"), "continue_on_error"),
    (with_("start", 1), "start"),
    (with_("priority", 5), "priority"),
    ([GOOD], None),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
async def test_bad_task_bodies_are_refused_and_write_nothing(api, rows, tasks, body, field):
    rows.host("web-1")
    before = rows.counts()
    status, error = await api("POST", "/api/v1/tasks", json=body)
    assert_error(status, error, 400, "invalid_request", field)
    assert rows.counts() == before
    assert tasks.calls == []


async def test_validation_messages_are_for_people(api, rows):
    cases = {
        "commands.0.timeout_s": (
            with_("commands.0.timeout_s", 0), "timeout_s must be greater than 0"
        ),
        "priority": (with_("priority", 1), "priority is not a known field"),
        "name": (without("name"), "name is required"),
        "commands.0.script": (
            with_("commands.0.script", "a\x00"), "script must not contain NUL characters"
        ),
        "targets.hosts.0": (
            with_("targets.hosts", ["a b"]),
            "hosts[0] must match the pattern ^[A-Za-z0-9._:-]{1,253}$",
        ),
        "commands.0.env": (with_("commands.0.env", {"1X": "v"}), "key '1X' of env must match"),
        None: ([1], "the body must be a JSON object"),
    }  # fmt: skip
    for field, (body, message) in cases.items():
        status, error = await api("POST", "/api/v1/tasks", json=body)
        assert error["error"].get("field") == field
        assert error["error"]["message"].startswith(message), error


RAW_BODIES = [
    (b'{"name": "n", "commands": [{"script": "true", "timeout_s": NaN}]}', "invalid_json"),
    (b'{"name": "n", "commands": [{"script": "true", "timeout_s": Infinity}]}', "invalid_json"),
    (b'{"name": "a", "name": "b"}', "invalid_json"),
    (b'{"name": "n",', "invalid_json"),
    (b"", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"[" * 200_000 + b"]" * 200_000, "invalid_json"),
]


@pytest.mark.parametrize(("raw", "code"), RAW_BODIES)
async def test_bodies_that_are_not_json(api, rows, raw, code):
    before = rows.counts()
    status, error = await api(
        "POST", "/api/v1/tasks", data=raw, headers={"Content-Type": "application/json"}
    )
    assert_error(status, error, 400, code, None)
    assert rows.counts() == before


async def test_lone_surrogate_is_refused(api, rows):
    rows.host("web-1")
    raw = json.dumps(GOOD).replace('"n"', '"\\ud800"').encode()
    status, error = await api(
        "POST", "/api/v1/tasks", data=raw, headers={"Content-Type": "application/json"}
    )
    assert_error(status, error, 400, "invalid_request", "name")
    assert "surrogate" in error["error"]["message"]


async def test_idempotency_key_must_be_sane(api, rows, tasks):
    rows.host("web-1")
    for key in ("k" * 201, "two words", "\tx"):
        status, error = await api(
            "POST", "/api/v1/tasks", json=GOOD, headers={"Idempotency-Key": key}
        )
        assert_error(status, error, 400, "invalid_request", "Idempotency-Key")
    assert rows.counts()["Task"] == 0


async def test_wrong_content_type_and_too_large(api, rows):
    status, error = await api(
        "POST", "/api/v1/tasks", data=json.dumps(GOOD), headers={"Content-Type": "text/plain"}
    )
    assert_error(status, error, 415, "unsupported_media_type", None)
    big = with_("commands.0.script", "x" * (1 << 20))
    status, error = await api("POST", "/api/v1/tasks", json=big)
    assert_error(status, error, 413, "payload_too_large", None)
    assert rows.counts()["Task"] == 0


async def test_unknown_route_and_wrong_method(api):
    status, error = await api("GET", "/api/v1/nothing")
    assert_error(status, error, 404, "not_found", None)
    response = await api.raw("DELETE", "/api/v1/tasks")
    assert response.status_code == 405
    assert_error(405, await response.get_json(), 405, "method_not_allowed", None)
    assert "GET" in response.headers["Allow"] and "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tasks/..%2Fetc",
        "/api/v1/tasks/1;drop",
        "/api/v1/tasks/99999999999999999999999",
        "/api/v1/tasks/9223372036854775808",
        "/api/v1/tasks/0",
        "/api/v1/tasks/-1",
        "/api/v1/tasks/1e3",
        "/api/v1/tasks/%00",
        "/api/v1/tasks/12345",
        "/api/v1/tasks/x/stats",
        "/api/v1/tasks/x/executions",
        "/api/v1/tasks/x/events",
        "/api/v1/executions/abc",
        "/api/v1/executions/abc/output",
        "/api/v1/executions/777",
        "/api/v1/hosts/no%20such",
        "/api/v1/hosts/ghost",
    ],
)
async def test_ids_that_name_nothing(api, path):
    status, error = await api("GET", path)
    assert_error(status, error, 404, "not_found", None)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1001", "limit"),
        ("limit=1000000000000", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=" + "A" * 600, "cursor"),
        ("cursor=eyJ4Ijox", "cursor"),
        ("status=bogus", "status"),
        ("status=running,bogus", "status"),
        ("since=yesterday", "since"),
        ("until=2023-13-01T00:00:00Z", "until"),
        ("since=2024-01-02T00:00:00Z&until=2024-01-01T00:00:00Z", "until"),
        ("host=no%20such", "host"),
        ("stauts=running", "stauts"),
        ("limit=1&limit=2", "limit"),
    ],
)
async def test_bad_list_queries(api, rows, query, field):
    rows.task("t")
    status, error = await api("GET", f"/api/v1/tasks?{query}")
    assert_error(status, error, 400, "invalid_request", field)


async def test_cursor_is_bound_to_its_list_and_filters(api, rows):
    task_id = rows.task("a")
    rows.task("b")
    for host in ("h1", "h2"):
        rows.execution(task_id, host)
    status, page = await api("GET", "/api/v1/tasks?limit=1")
    cursor = page["next_cursor"]
    assert cursor
    status, error = await api("GET", f"/api/v1/tasks?limit=1&cursor={cursor}&status=running")
    assert_error(status, error, 400, "invalid_request", "cursor")
    status, error = await api("GET", f"/api/v1/executions?cursor={cursor}")
    assert_error(status, error, 400, "invalid_request", "cursor")
    tampered = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    status, error = await api("GET", f"/api/v1/tasks?limit=1&cursor={tampered}")
    assert_error(status, error, 400, "invalid_request", "cursor")


async def test_other_bad_queries(api, rows):
    task_id = rows.task("t")
    execution = rows.execution(task_id, "h1")
    cases = [
        (f"/api/v1/executions/{execution}/output?stream=stdin", "stream"),
        (f"/api/v1/tasks/{task_id}/retry?only=all", "only"),
        ("/api/v1/hosts?status=sleeping", "status"),
        ("/api/v1/hosts?label=novalue", "label"),
        ("/api/v1/hosts?label==x", "label"),
        ("/api/v1/executions?status=done", "status"),
        (f"/api/v1/tasks/{task_id}/events?last_event_id=-5", "last_event_id"),
        (f"/api/v1/tasks/{task_id}/events?output=maybe", "output"),
    ]
    for path, field in cases:
        method = "POST" if "retry" in path else "GET"
        status, error = await api(method, path)
        assert_error(status, error, 400, "invalid_request", field)
    status, error = await api(
        "GET", f"/api/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "abc"}
    )
    assert_error(status, error, 400, "invalid_request", "Last-Event-ID")
    assert rows.counts()["Task"] == 1


async def test_unexpected_exception_is_500_without_details(api, rows, tasks, caplog):
    rows.host("web-1")
    tasks.fail_with = RuntimeError("secret detail at /etc/dispatch/token")
    with caplog.at_level(logging.ERROR, logger="daemon.api.app"):
        status, error = await api("POST", "/api/v1/tasks", json=GOOD)
    assert (status, error) == (500, {"error": {"code": "internal", "message": "internal error"}})
    records = [r for r in caplog.records if r.exc_info]
    assert records and "secret detail" in str(records[0].exc_info[1])


async def test_database_failure_is_503(api, monkeypatch):
    def broken(*args, **kwargs):
        raise peewee.OperationalError("disk I/O error")

    monkeypatch.setattr(queries, "get_task", broken)
    status, error = await api("GET", "/api/v1/tasks/1")
    assert_error(status, error, 503, "unavailable", None)
    assert "disk" not in error["error"]["message"]
