"""API tokens and roles through the real app: every route x every role (allowed, or 403 with the
JSON error body), token lifecycle (shown once, stored as a hash, refused at once when revoked),
the bootstrap token, and default-deny for routes the role table does not name."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import pytest

from daemon import server
from daemon.api.app import create_app
from daemon.api.auth import ROUTES, Role
from daemon.store.models import ApiToken, AuditEvent
from tests.daemon.conftest import TOKEN

ROLES = ("viewer", "operator", "admin")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def app(database: Any, tasks: Any, live: Any, limits: Any) -> Any:
    """The API with /metrics, as the daemon serves it."""
    metrics = functools.partial(server._metrics_route, render=lambda: b"# metrics\n")
    return create_app(database=database, tasks=tasks, live=live, api_token=TOKEN, limits=limits,
                      extra_routes=metrics)  # fmt: skip


async def make_token(client: Any, name: str, role: str) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/tokens", json={"name": name, "role": role}, headers=bearer(TOKEN)
    )
    assert response.status_code == 201, await response.get_data()
    return await response.get_json()


async def test_every_role_on_every_route(app: Any, client: Any, rows: Any, database: Any) -> None:
    rows.host("web-1")
    task_id = rows.task("t", status="completed")
    execution_id = rows.execution(task_id, "web-1", status="succeeded")
    tokens = {role: (await make_token(client, f"{role}-1", role))["token"] for role in ROLES}
    victim = await make_token(client, "victim", "viewer")  # what DELETE /tokens/{id} revokes
    values = {"host_id": "web-1", "task_id": str(task_id), "execution_id": str(execution_id),
              "token_id": victim["id"]}  # fmt: skip
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "healthz":
            continue
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", values[name])
        needed = ROUTES[rule.endpoint].role
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for role in ROLES:
                checked += 1
                response = await client.open(path, method=method, headers=bearer(tokens[role]))
                if Role.parse(role) >= needed:
                    assert response.status_code not in (401, 403), (method, path, role)
                    continue
                assert response.status_code == 403, (method, path, role)
                body = await response.get_json()
                assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
                assert body["error"]["code"] == "forbidden"
                assert body["error"]["message"] == (
                    f"this needs the {needed.label} role; token:{role}-1 has {role}"
                )
    assert checked == 23 * 3  # the API's 21 routes besides /healthz, /metrics, /openapi.json
    denied = await database.read(
        lambda: list(AuditEvent.select().where(AuditEvent.action == "auth.denied"))
    )
    # viewers are refused the 4 task changes and the 7 admin routes, operators the 7 admin ones
    assert sorted((e.actor, e.role, e.status, e.outcome) for e in denied) == sorted(
        [("token:viewer-1", "viewer", 403, "denied")] * 11
        + [("token:operator-1", "operator", 403, "denied")] * 7
    )


async def test_what_each_role_may_do(client: Any, rows: Any) -> None:
    """The table itself, stated the way README states it."""
    by_role = {
        role: sorted(e for e, a in ROUTES.items() if a.role == role) for role in Role
    }  # fmt: skip
    assert by_role[Role.OPERATOR] == ["cancel_task", "create_task", "retry_task", "start_task"]
    assert by_role[Role.ADMIN] == [
        "approve_host", "create_token", "list_audit", "list_tokens", "reject_host",
        "revoke_host", "revoke_token",
    ]  # fmt: skip
    assert "metrics" in by_role[Role.VIEWER] and "list_hosts" in by_role[Role.VIEWER]


async def test_a_token_is_shown_once_and_stored_as_its_hash(
    client: Any, rows: Any, database: Any
) -> None:
    created = await make_token(client, "ci-bot", "operator")
    token = created["token"]
    assert token.startswith("dsp_") and len(token) == 4 + 43
    assert set(created) == {"id", "name", "role", "created_at", "created_by", "last_used_at",
                            "revoked_at", "token"}  # fmt: skip
    assert (created["name"], created["role"], created["created_by"], created["revoked_at"]) == (
        "ci-bot", "operator", "bootstrap", None
    )  # fmt: skip
    row = await database.read(ApiToken.get_by_id, int(created["id"]))
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    listed = await client.get("/api/v1/tokens", headers=bearer(TOKEN))
    text = (await listed.get_data()).decode()
    assert token not in text and row.token_hash not in text
    (item,) = (await listed.get_json())["items"]
    assert item == {k: v for k, v in created.items() if k != "token"}

    response = await client.get("/api/v1/tasks", headers=bearer(token))
    assert response.status_code == 200
    row = await database.read(ApiToken.get_by_id, int(created["id"]))
    assert row.last_used_at is not None
    events = await database.read(lambda: list(AuditEvent.select().dicts()))
    assert token not in json.dumps(events, default=str) and TOKEN not in json.dumps(
        events, default=str
    )


async def test_a_revoked_token_is_refused_at_once(client: Any, rows: Any, database: Any) -> None:
    created = await make_token(client, "temp", "admin")
    token = created["token"]
    for _ in range(3):  # used, and cached
        assert (await client.get("/api/v1/tasks", headers=bearer(token))).status_code == 200
    response = await client.delete(f"/api/v1/tokens/{created['id']}", headers=bearer(TOKEN))
    assert response.status_code == 200
    assert (await response.get_json())["revoked_at"] is not None
    refused = await client.get("/api/v1/tasks", headers=bearer(token))
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert await refused.get_json() == {
        "error": {"code": "unauthorized", "message": "the API token is not valid"}
    }
    again = await client.delete(f"/api/v1/tokens/{created['id']}", headers=bearer(TOKEN))
    assert again.status_code == 200  # revoking twice is fine
    missing = await client.delete("/api/v1/tokens/999", headers=bearer(TOKEN))
    assert missing.status_code == 404
    denial = await database.read(
        lambda: AuditEvent.select().where(AuditEvent.action == "auth.denied").get()
    )
    assert (denial.actor, denial.status, json.loads(denial.details)["reason"]) == (
        "token:temp", 401, "revoked token"
    )  # fmt: skip
    # its name stays taken: the audit log keeps meaning what it said
    response = await client.post("/api/v1/tokens", json={"name": "temp", "role": "viewer"},
                                 headers=bearer(TOKEN))  # fmt: skip
    assert response.status_code == 409


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "role": "root"}, "role"),
        ({"name": "", "role": "viewer"}, "name"),
        ({"name": "has space", "role": "viewer"}, "name"),
        ({"name": "x" * 65, "role": "viewer"}, "name"),
        ({"name": "x", "role": "viewer", "token": "dsp_mine"}, "token"),
        ({"role": "viewer"}, "name"),
    ],
)
async def test_bad_token_requests(client: Any, rows: Any, body: dict, field: str) -> None:
    response = await client.post("/api/v1/tokens", json=body, headers=bearer(TOKEN))
    assert response.status_code == 400
    assert (await response.get_json())["error"]["field"] == field


async def test_no_bad_or_unknown_token_is_401(client: Any, rows: Any, database: Any) -> None:
    for headers in (
        {},
        bearer("dsp_" + "A" * 43),
        bearer(TOKEN + "x"),
        {"Authorization": "Basic dXNlcjpwdw=="},
    ):
        response = await client.get("/api/v1/hosts", headers=headers)
        assert response.status_code == 401
        assert (await response.get_json())["error"]["code"] == "unauthorized"
    denials = await database.read(
        lambda: [(e.actor, e.role, e.status, json.loads(e.details)["reason"])
                 for e in AuditEvent.select().order_by(AuditEvent.id)]
    )  # fmt: skip
    assert denials == [
        ("unknown", None, 401, "no bearer token"), ("unknown", None, 401, "unknown token"),
        ("unknown", None, 401, "unknown token"), ("unknown", None, 401, "no bearer token"),
    ]  # fmt: skip


async def test_the_bootstrap_token_is_an_admin_that_is_not_stored(
    client: Any, rows: Any, database: Any
) -> None:
    response = await client.get("/api/v1/audit", headers=bearer(TOKEN))
    assert response.status_code == 200
    assert await database.read(lambda: ApiToken.select().count()) == 0


async def test_a_route_missing_from_the_table_is_refused_to_everyone(
    database: Any, tasks: Any, live: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def extra(app: Any) -> None:
        @app.get("/api/v1/secret")
        async def unlisted_route() -> Any:
            return "leak"

    app = create_app(database=database, tasks=tasks, live=live, api_token=TOKEN,
                     extra_routes=extra)  # fmt: skip
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/api/v1/secret", headers=bearer(TOKEN))
    assert response.status_code == 403
    assert await response.get_json() == {
        "error": {"code": "forbidden", "message": "this route is not open to any role"}
    }
    assert "route 'unlisted_route' declares no role" in caplog.text


async def test_a_changing_route_that_is_not_audited_is_refused(
    database: Any, tasks: Any, live: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.api import auth

    def extra(app: Any) -> None:
        @app.post("/api/v1/unaudited")
        async def unaudited_change() -> Any:
            raise AssertionError("must not run")

    monkeypatch.setitem(auth.ROUTES, "unaudited_change", auth.Access(Role.VIEWER, "x.y"))
    app = create_app(database=database, tasks=tasks, live=live, api_token=TOKEN,
                     extra_routes=extra)  # fmt: skip
    async with app.test_app() as test_app:
        response = await test_app.test_client().post("/api/v1/unaudited", headers=bearer(TOKEN))
    assert response.status_code == 403
