"""The audit log through the real app: every change recorded as attempted and then completed
with its outcome, fail-closed when the record cannot be written, denials best-effort and
bounded, never a secret, and GET /api/v1/audit with filters and cursors."""

from __future__ import annotations

import json
from typing import Any

import peewee
import pytest
import trio
import trio.testing

from daemon.ops import audit
from daemon.ops.audit import AuditLog, AuditRecord, safe_details
from daemon.store.models import AuditEvent, Task
from tests.daemon.conftest import TOKEN


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def events(database: Any) -> list[tuple[Any, ...]]:
    return await database.read(
        lambda: [
            (e.actor, e.role, e.action, e.target, e.outcome, e.status, json.loads(e.details))
            for e in AuditEvent.select().order_by(AuditEvent.id)
        ]
    )


async def test_every_change_is_recorded_with_its_outcome(
    client: Any, rows: Any, database: Any
) -> None:
    rows.host("web-1")
    created = await client.post(
        "/api/v1/tokens", json={"name": "ops", "role": "operator"}, headers=bearer(TOKEN)
    )
    operator = bearer((await created.get_json())["token"])
    body = {"name": "n", "commands": [{"script": "true"}], "targets": {"hosts": ["web-1"]}}
    task = await (await client.post("/api/v1/tasks", json=body, headers=operator)).get_json()
    started = await client.post(f"/api/v1/tasks/{task['id']}/start", headers=operator)
    assert started.status_code == 202
    again = await client.post(f"/api/v1/tasks/{task['id']}/start", headers=operator)
    assert again.status_code == 409
    revoked = await client.post("/api/v1/hosts/web-1/revoke", headers=bearer(TOKEN))
    assert revoked.status_code == 200
    token_id = (await created.get_json())["id"]
    await client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(TOKEN))
    path = f"/api/v1/tasks/{task['id']}/start"
    assert await events(database) == [
        ("bootstrap", "admin", "token.create", "ops", "ok", 201,
         {"method": "POST", "path": "/api/v1/tokens", "role": "operator", "id": token_id}),
        ("token:ops", "operator", "task.create", task["id"], "ok", 201,
         {"method": "POST", "path": "/api/v1/tasks"}),
        ("token:ops", "operator", "task.start", task["id"], "ok", 202,
         {"method": "POST", "path": path}),
        ("token:ops", "operator", "task.start", task["id"], "failed", 409,
         {"method": "POST", "path": path}),
        ("bootstrap", "admin", "host.revoke", "web-1", "ok", 200,
         {"method": "POST", "path": "/api/v1/hosts/web-1/revoke", "stream_closed": False,
          "executions": 0}),
        ("bootstrap", "admin", "token.revoke", token_id, "ok", 200,
         {"method": "DELETE", "path": f"/api/v1/tokens/{token_id}",
          "name": "ops"}),
    ]  # fmt: skip
    addresses = await database.read(lambda: {e.address for e in AuditEvent.select()})
    assert addresses == {"<local>"}  # quart's test client; hypercorn gives the peer's address


async def test_a_malformed_change_is_refused_before_any_record(client: Any, rows: Any) -> None:
    response = await client.post("/api/v1/tasks", json={"name": ""}, headers=bearer(TOKEN))
    assert response.status_code == 400
    assert rows.counts()["AuditEvent"] == 0  # a request refused as malformed changed nothing


async def test_no_record_no_change(client: Any, rows: Any, tasks: Any, database: Any) -> None:
    """Fail-closed: when the attempted record cannot be written, the change is not made."""
    rows.host("web-1")
    task_id = rows.task("t", status="pending")
    await database.write(lambda: database.db.execute_sql("DROP TABLE audit_event"))
    body = {"name": "n", "commands": [{"script": "true"}], "targets": {"hosts": ["web-1"]}}
    for method, path, kwargs in (
        ("POST", "/api/v1/tasks", {"json": body}),
        ("POST", f"/api/v1/tasks/{task_id}/start", {}),
        ("POST", "/api/v1/hosts/web-1/revoke", {}),
    ):
        response = await client.open(path, method=method, headers=bearer(TOKEN), **kwargs)
        assert response.status_code == 503, path
        assert await response.get_json() == {"error": {
            "code": "unavailable",
            "message": "the audit log cannot be written, so no change is made; try again later",
        }}  # fmt: skip
    assert tasks.calls == []
    assert await database.read(lambda: [(t.id, t.status) for t in Task.select()]) == [
        (task_id, "pending")
    ]
    # reads go on, and denials are still denials (recorded best-effort)
    assert (await client.get("/api/v1/tasks", headers=bearer(TOKEN))).status_code == 200
    assert (await client.get("/api/v1/tasks", headers=bearer("wrong"))).status_code == 401


async def test_the_audit_list_filters_and_pages(client: Any, rows: Any) -> None:
    with rows.db.connection_context():
        for i in range(7):
            audit.insert_event(
                AuditRecord(actor="token:a" if i % 2 else "bootstrap", action="task.create",
                            outcome="ok" if i < 5 else "failed", target=str(i)),
                at=1_700_000_000.0 + i,
            )  # fmt: skip
        audit.insert_event(AuditRecord(actor="unknown", action="auth.denied", outcome="denied"),
                           at=1_700_000_100.0)  # fmt: skip

    async def get(query: str) -> tuple[int, Any]:
        response = await client.get(f"/api/v1/audit?{query}", headers=bearer(TOKEN))
        return response.status_code, await response.get_json()

    status, page = await get("limit=3")
    assert status == 200 and [e["target"] for e in page["items"]] == [None, "6", "5"]
    assert set(page["items"][0]) == {"id", "at", "actor", "role", "action", "target", "outcome",
                                     "status", "address", "details"}  # fmt: skip
    status, rest = await get(f"limit=3&cursor={page['next_cursor']}")
    assert [e["target"] for e in rest["items"]] == ["4", "3", "2"]
    assert (await get("actor=token:a"))[1]["items"][0]["target"] == "5"
    assert [e["target"] for e in (await get("actor=token:a&outcome=ok"))[1]["items"]] == [
        "3", "1"
    ]  # fmt: skip
    assert [e["actor"] for e in (await get("action=auth.denied"))[1]["items"]] == ["unknown"]
    since, until = "2023-11-14T22:13:22Z", "2023-11-14T22:13:24Z"
    assert [e["target"] for e in (await get(f"since={since}&until={until}"))[1]["items"]] == [
        "3", "2"
    ]  # fmt: skip
    status, error = await get(f"limit=3&outcome=ok&cursor={page['next_cursor']}")
    assert (status, error["error"]["field"]) == (400, "cursor")
    for bad, field in (
        ("outcome=maybe", "outcome"), ("action=DROP TABLE", "action"), ("limit=0", "limit"),
        ("since=yesterday", "since"), ("who=me", "who"),
    ):  # fmt: skip
        status, error = await get(bad)
        assert (status, error["error"]["field"]) == (400, field), bad


async def test_denials_are_bounded_and_never_raise() -> None:
    release = trio.Event()

    class SlowDatabase:
        writes = 0

        async def write(self, fn: Any, *args: Any) -> None:
            self.writes += 1
            await release.wait()

    class BrokenDatabase:
        async def write(self, fn: Any, *args: Any) -> None:
            raise peewee.OperationalError("disk I/O error")

    slow = SlowDatabase()
    log = AuditLog(slow, max_denials_in_flight=2)  # type: ignore[arg-type]
    record = AuditRecord(actor="unknown", action="auth.denied", outcome="denied")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(log.record, record)
            await trio.testing.wait_all_tasks_blocked()
            await log.record(record)  # a third, while two are being written: dropped
            assert (slow.writes, log.statistics().denials_dropped) == (2, 1)
            release.set()
    assert log.statistics() == audit.AuditStatistics(recorded=2, denials_dropped=1, failures=0)
    broken = AuditLog(BrokenDatabase())  # type: ignore[arg-type]
    await broken.record(record)  # logged, not raised
    assert broken.statistics().failures == 1
    with pytest.raises(Exception, match="the audit log cannot be written"):
        await broken.attempt(record)


def test_details_never_carry_a_secret() -> None:
    details = json.loads(
        safe_details(
            {
                "token": "dsp_x",
                "credential": "c",
                "api_token_hash": "h",
                "Authorization": "Bearer x",
                "password": "p",
                "name": "n" * 300,
                "count": 3,
                "nested": {"a": 1},
            }
        )  # fmt: skip
    )
    assert details == {"name": "n" * 200 + "…", "count": 3, "nested": "{'a': 1}"}
    assert json.loads(safe_details({f"k{i}": "v" * 150 for i in range(40)})) == {"truncated": True}
