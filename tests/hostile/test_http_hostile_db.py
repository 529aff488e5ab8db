"""Hostile HTTP requests whose fate depends on the database's kind (integer widths, what text
may hold), on a SQLite file and on PostgreSQL: refused with the JSON error, nothing changed."""

from __future__ import annotations

import pytest

from daemon.store import queries
from tests.hostile.catalogue import assert_json_error, register, table_counts
from tests.hostile.test_http_hostile import GOOD, body_with, forged_cursor

pytestmark = pytest.mark.hostile


register("http.db.max_concurrency_int32", "http", "max_concurrency: 2**31 (PostgreSQL integer)",
         "400 invalid_request field='max_concurrency'")  # fmt: skip
register("http.db.max_failures_int64", "http", "max_failures: 2**63 (beyond any integer column)",
         "400 invalid_request field='max_failures'")  # fmt: skip
register("http.db.hosts_cursor_nul", "http",
         "GET /hosts?cursor=<well-formed, position 'web-1\\x00'>", "400 invalid_request "
         "field='cursor'")  # fmt: skip
register("http.db.hosts_cursor_surrogate", "http",
         "GET /hosts?cursor=<well-formed, position '\\ud800'>", "400 invalid_request "
         "field='cursor'")  # fmt: skip


@pytest.mark.parametrize(("field", "value"), [("max_concurrency", 2**31), ("max_failures", 2**63)])
async def test_counts_beyond_the_columns_are_refused(api, rows, tasks, field, value) -> None:
    rows.host("web-1")
    before = table_counts()
    status, body = await api("POST", "/api/v1/tasks", json=body_with(field, value))
    assert_json_error(
        status, body, 400, "invalid_request", field, message_has="less than or equal to 1000000"
    )
    assert table_counts() == before
    assert tasks.calls == []
    # the largest accepted value is stored and read back exactly
    status, task = await api("POST", "/api/v1/tasks", json={**GOOD, field: 1_000_000})
    assert (status, task[field]) == (201, 1_000_000)


@pytest.mark.parametrize("position", ["web-1\x00", "\ud800"], ids=["nul", "surrogate"])
async def test_forged_host_cursor_is_refused(api, rows, position) -> None:
    # The cursor key is in the source: a forged cursor passes the checksum, so its position
    # must be checked for what it is (a host id).
    rows.host("web-1")
    rows.host("web-2")
    before = table_counts()
    cursor = forged_cursor("hosts", (None, ()), position)
    status, body = await api("GET", f"/api/v1/hosts?limit=1&cursor={cursor}")
    assert_json_error(status, body, 400, "invalid_request", "cursor")
    assert table_counts() == before


def test_forged_cursor_helper_makes_what_the_api_makes() -> None:
    filters = queries.TaskFilter()
    assert forged_cursor("tasks", filters, 7) == queries.encode_cursor("tasks", filters, 7)
