"""Hostile HTTP requests against the API app (in process, over a fake task service and a real
SQLite file): each gets the JSON error of API.md with the exact status, code and field, a
message for a person, and changes nothing. ``tests/daemon/test_http_errors.py`` holds the first
bad inputs; none of those is repeated here. What only the wire can carry (bytes that are not
latin-1 in a header, oversized headers, chunked bodies): ``test_http_wire.py``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon.store import queries
from tests.hostile.catalogue import assert_json_error, register, table_counts

pytestmark = pytest.mark.hostile

TOKEN = "test-token-0123456789"  # tests/daemon/conftest.py
GOOD: dict[str, Any] = {
    "name": "n",
    "commands": [{"script": "true"}],
    "targets": {"hosts": ["web-1"]},
}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def db_url(sqlite_only: str) -> str:
    # Refusals here happen before the database; where the database's kind matters (integer
    # widths, NUL in text): test_http_hostile_db.py, on SQLite and PostgreSQL.
    return sqlite_only


def body_with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the dotted ``path`` set to ``value``."""
    body = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return body


def raw_with(path: str, json_text: str) -> bytes:
    """GOOD as JSON text with the value at ``path`` replaced by ``json_text`` verbatim (for what
    ``json.dumps`` cannot write: lone surrogates, repeated keys)."""
    marker = "@@HOSTILE@@"
    return json.dumps(body_with(path, marker)).replace(f'"{marker}"', json_text).encode()


def nested_objects(depth: int) -> bytes:
    return b'{"name": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


@dataclass(frozen=True)
class Req:
    name: str
    given: str
    method: str
    path: str
    want: tuple[int, str, str | None]  # status, code, field
    json: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    message_has: str | None = None
    asks_service: bool = False  # a well-formed id: the task service is asked, and says 404


def post(name: str, given: str, body: Any, want_field: str | None, *,
         message_has: str | None = None, status: int = 400, code: str = "invalid_request",
         headers: dict[str, str] | None = None) -> Req:  # fmt: skip
    if isinstance(body, bytes):
        return Req(name, given, "POST", "/api/v1/tasks", (status, code, want_field), raw=body,
                   headers={**JSON, **(headers or {})}, message_has=message_has)  # fmt: skip
    return Req(name, given, "POST", "/api/v1/tasks", (status, code, want_field), json=body,
               headers=headers or {}, message_has=message_has)  # fmt: skip


def get(name: str, given: str, path: str, want: tuple[int, str, str | None], *,
        headers: dict[str, str] | None = None, message_has: str | None = None,
        method: str = "GET", asks_service: bool = False) -> Req:  # fmt: skip
    return Req(name, given, method, path, want, headers=headers or {}, message_has=message_has,
               asks_service=asks_service)  # fmt: skip


BAD = (400, "invalid_request")
NOT_FOUND = (404, "not_found", None)

CASES: list[Req] = [
    # --- type confusion ---------------------------------------------------------------------
    post("type.list_for_object", "targets: [{hosts: [web-1]}]",
         body_with("targets", [{"hosts": ["web-1"]}]), "targets",
         message_has="must be a JSON object"),
    post("type.number_for_string", "targets.hosts: [7]",
         body_with("targets.hosts", [7]), "targets.hosts.0"),
    post("type.string_for_int", 'max_concurrency: "5"',
         body_with("max_concurrency", "5"), "max_concurrency"),
    post("type.false_for_zero", "max_failures: false (False == 0 in Python)",
         body_with("max_failures", False), "max_failures"),
    post("type.object_for_string", 'name: {"$ne": ""} (an operator object)',
         body_with("name", {"$ne": ""}), "name"),
    post("type.null_for_object", "targets: null",
         body_with("targets", None), "targets"),
    post("type.bool_for_list", "commands[0].args: true",
         body_with("commands.0.args", True), "commands.0.args"),
    post("type.list_for_env_value", 'commands[0].env: {"A": ["x"]}',
         body_with("commands.0.env", {"A": ["x"]}), "commands.0.env.A"),
    post("type.string_for_bool", 'start: "true"',
         body_with("start", "true"), "start"),
    post("type.int_beyond_int64", "max_concurrency: 10**30",
         body_with("max_concurrency", 10**30), "max_concurrency"),
    # --- unknown fields --------------------------------------------------------------------
    post("unknown.dunder_field", '"__class__": "TaskCreate" at the top level',
         {**GOOD, "__class__": "TaskCreate"}, "__class__", message_has="is not a known field"),
    post("unknown.empty_key", '"": 1 at the top level',
         {**GOOD, "": 1}, "", message_has="'' is not a known field"),
    post("unknown.nested_in_command", '"__init__" inside a command',
         body_with("commands.0.__init__", {}), "commands.0.__init__"),
    # --- huge and deeply nested ------------------------------------------------------------
    post("huge.args_count", "commands[0].args: 100,000 empty strings (a 0.4 MB body)",
         body_with("commands.0.args", [""] * 100_000), "commands.0.args",
         message_has="at most 1000"),
    post("huge.env_count", "commands[0].env: 30,000 variables",
         body_with("commands.0.env", {f"V{i}": "" for i in range(30_000)}), "commands.0.env",
         message_has="at most 1000"),
    post("nested.objects_100k", "name: 100,000 nested objects (0.6 MB)",
         nested_objects(100_000), None, code="invalid_json", message_has="nests too deeply"),
    post("nested.arrays_in_field", "name: 500 nested arrays (parses, wrong type)",
         raw_with("name", "[" * 500 + "]" * 500), "name"),
    # --- NUL bytes and lone surrogates, in every kind of text -------------------------------
    post("nul.args_item", 'commands[0].args: ["a\\u0000b"]',
         body_with("commands.0.args", ["a\x00b"]), "commands.0.args.0",
         message_has="NUL"),
    post("surrogate.args_item", 'commands[0].args: ["\\ud800"]',
         raw_with("commands.0.args", '["\\ud800"]'), "commands.0.args.0",
         message_has="surrogate"),
    post("nul.env_key", 'commands[0].env: {"A\\u0000": "v"}',
         body_with("commands.0.env", {"A\x00": "v"}), "commands.0.env"),
    post("surrogate.env_value", 'commands[0].env: {"A": "\\udfff"}',
         raw_with("commands.0.env", '{"A": "\\udfff"}'), "commands.0.env.A",
         message_has="surrogate"),
    post("surrogate.env_key", 'commands[0].env: {"\\ud83d": "v"} (half an emoji)',
         raw_with("commands.0.env", '{"\\ud83d": "v"}'), "commands.0.env"),
    post("nul.cwd", 'commands[0].cwd: "/tmp\\u0000/x"',
         body_with("commands.0.cwd", "/tmp\x00/x"), "commands.0.cwd", message_has="NUL"),
    post("surrogate.cwd", 'commands[0].cwd: "/\\ud800"',
         raw_with("commands.0.cwd", '"/\\ud800"'), "commands.0.cwd", message_has="surrogate"),
    post("surrogate.script", 'commands[0].script: "echo \\udcff"',
         raw_with("commands.0.script", '"echo \\udcff"'), "commands.0.script",
         message_has="surrogate"),
    post("nul.label_key", 'targets.labels: {"ro\\u0000le": "web"}',
         body_with("targets.labels", {"ro\x00le": "web"}), "targets.labels"),
    post("surrogate.label_value", 'targets.labels: {"role": "\\ud800"}',
         raw_with("targets.labels", '{"role": "\\ud800"}'), "targets.labels.role",
         message_has="surrogate"),
    post("nul.target_host", 'targets.hosts: ["web-1\\u0000"]',
         body_with("targets.hosts", ["web-1\x00"]), "targets.hosts.0"),
    post("surrogate.target_host", 'targets.hosts: ["\\udc80"]',
         raw_with("targets.hosts", '["\\udc80"]'), "targets.hosts.0"),
    get("nul.query_host", "GET /tasks?host=web%00", "/api/v1/tasks?host=web%00", (*BAD, "host")),
    get("nul.query_label", "GET /hosts?label=role%3Dweb%00",
        "/api/v1/hosts?label=role%3Dweb%00", (*BAD, "label"), message_has="NUL"),
    get("nul.query_cursor", "GET /tasks?cursor=%00", "/api/v1/tasks?cursor=%00",
        (*BAD, "cursor")),
    get("surrogate.query_status", "GET /executions?status=%ED%A0%80 (a surrogate in UTF-8)",
        "/api/v1/executions?status=%ED%A0%80", (*BAD, "status")),
    get("nul.query_parameter_name", "GET /tasks?li%00mit=5", "/api/v1/tasks?li%00mit=5",
        (*BAD, "li\x00mit"), message_has="is not a known field"),
    post("nul.idempotency_key", "Idempotency-Key: k\\x00", GOOD, "Idempotency-Key",
         headers={"Idempotency-Key": "k\x00"}),
    post("latin1.idempotency_key", "Idempotency-Key: clé", GOOD, "Idempotency-Key",
         headers={"Idempotency-Key": "clé"}),
    get("nul.path_host_id", "GET /hosts/web%00", "/api/v1/hosts/web%00", NOT_FOUND),
    # --- path-like ids ---------------------------------------------------------------------
    get("path.dot_dot_encoded", "GET /tasks/%2e%2e/stats", "/api/v1/tasks/%2e%2e/stats",
        NOT_FOUND),
    get("path.arabic_digits", "GET /tasks/١٢ (int('١٢') == 12)",
        "/api/v1/tasks/%D9%A1%D9%A2", NOT_FOUND),
    get("path.fullwidth_digit", "GET /executions/１", "/api/v1/executions/%EF%BC%91", NOT_FOUND),
    get("path.underscore_digits", "GET /tasks/1_0 (int('1_0') == 10)", "/api/v1/tasks/1_0",
        NOT_FOUND),
    get("path.plus_sign", "POST /tasks/+1/start", "/api/v1/tasks/+1/start", NOT_FOUND,
        method="POST"),
    get("path.sql_in_host_id", "GET /hosts/x' OR '1'='1", "/api/v1/hosts/x'%20OR%20'1'='1",
        NOT_FOUND),
    get("path.max_id_cancel", "POST /tasks/9223372036854775807/cancel (the largest id)",
        "/api/v1/tasks/9223372036854775807/cancel", NOT_FOUND, method="POST",
        asks_service=True),
    # --- absurd pagination -----------------------------------------------------------------
    get("page.limit_fullwidth", "GET /tasks?limit=５", "/api/v1/tasks?limit=%EF%BC%95",
        (*BAD, "limit")),
    get("page.limit_nan", "GET /executions?limit=NaN", "/api/v1/executions?limit=NaN",
        (*BAD, "limit")),
    get("page.limit_exponent", "GET /tasks/{task}/executions?limit=1e2",
        "/api/v1/tasks/{task}/executions?limit=1e2", (*BAD, "limit")),
    get("page.hosts_limit_huge", "GET /hosts?limit=10**12", "/api/v1/hosts?limit=1000000000000",
        (*BAD, "limit")),
    get("page.hosts_limit_zero", "GET /hosts?limit=0", "/api/v1/hosts?limit=0", (*BAD, "limit")),
    get("page.cursor_of_hosts_on_tasks", "GET /tasks?cursor=<a cursor of /hosts>",
        "/api/v1/tasks?cursor={hosts_cursor}", (*BAD, "cursor")),
    get("page.cursor_forged_huge_position", "GET /tasks?cursor=<well-formed, position 10**30>",
        "/api/v1/tasks?cursor={forged_huge}", (*BAD, "cursor")),
    get("page.cursor_forged_negative", "GET /executions?cursor=<well-formed, position -1>",
        "/api/v1/executions?cursor={forged_negative}", (*BAD, "cursor")),
    get("page.cursor_bytes", "GET /hosts?cursor=%FF%FE", "/api/v1/hosts?cursor=%FF%FE",
        (*BAD, "cursor")),
    # --- content types, repeated keys, encodings -------------------------------------------
    Req("ctype.missing", "POST /tasks with a JSON body and no Content-Type", "POST",
        "/api/v1/tasks", (415, "unsupported_media_type", None), raw=json.dumps(GOOD).encode()),
    Req("ctype.form", "POST /tasks as application/x-www-form-urlencoded", "POST",
        "/api/v1/tasks", (415, "unsupported_media_type", None), raw=b"name=n&start=true",
        headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Req("ctype.multipart", "POST /tasks as multipart/form-data", "POST", "/api/v1/tasks",
        (415, "unsupported_media_type", None), raw=b"--x\r\n\r\n--x--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=x"}),
    post("json.repeated_env_key", 'commands[0].env: {"A": "1", "A": "2"}',
         raw_with("commands.0.env", '{"A": "1", "A": "2"}'), None, code="invalid_json",
         message_has="appears twice"),
    post("json.utf16_body", "the body in UTF-16 with a BOM", json.dumps(GOOD).encode("utf-16"),
         None, code="invalid_json", message_has="UTF-8"),
    post("json.overlong_utf8", 'name: "\\xc0\\xaf" (an overlong "/")',
         raw_with("name", '"\xc0\xaf"').replace(b"\xc3\x80\xc2\xaf", b"\xc0\xaf"), None,
         code="invalid_json", message_has="UTF-8"),
    post("json.utf8_bom", "a UTF-8 BOM before the JSON",
         b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), None, code="invalid_json"),
    post("json.trailing_garbage", "a second JSON value after the body",
         json.dumps(GOOD).encode() + b" {}", None, code="invalid_json"),
    # --- Authorization ---------------------------------------------------------------------
    get("auth.empty", "Authorization: (empty)", "/api/v1/tasks", (401, "unauthorized", None),
        headers={"Authorization": ""}),
    get("auth.right_token_wrong_scheme", "Authorization: Token <the right token>",
        "/api/v1/tasks", (401, "unauthorized", None), headers={"Authorization": f"Token {TOKEN}"}),
    get("auth.no_space", "Authorization: Bearer<token>", "/api/v1/tasks",
        (401, "unauthorized", None), headers={"Authorization": f"Bearer{TOKEN}"}),
    get("auth.nul_after_token", "Authorization: Bearer <token>\\x00", "/api/v1/tasks",
        (401, "unauthorized", None), headers={"Authorization": f"Bearer {TOKEN}\x00"}),
    get("auth.latin1_token", "Authorization: Bearer tökén (latin-1)", "/api/v1/tasks",
        (401, "unauthorized", None), headers={"Authorization": "Bearer tökén"}),
    get("auth.token_twice", "Authorization: Bearer <token> <token>", "/api/v1/tasks",
        (401, "unauthorized", None), headers={"Authorization": f"Bearer {TOKEN} {TOKEN}"}),
    # --- event stream ----------------------------------------------------------------------
    get("sse.last_event_id_overflow", "Last-Event-ID: 99999999999999999999",
        "/api/v1/tasks/{task}/events", (*BAD, "Last-Event-ID"),
        headers={"Last-Event-ID": "99999999999999999999"}),
    get("sse.last_event_id_arabic_digits", "Last-Event-ID: ١٢ (UTF-8 bytes)",
        "/api/v1/tasks/{task}/events", (*BAD, "Last-Event-ID"),
        headers={"Last-Event-ID": "١٢".encode().decode("latin-1")}),
    get("sse.last_event_id_query_overflow", "GET /tasks/{task}/events?last_event_id=10**19",
        "/api/v1/tasks/{task}/events?last_event_id=10000000000000000000",
        (*BAD, "last_event_id")),
    # --- methods and query strings ---------------------------------------------------------
    Req("method.trace", "TRACE /api/v1/tasks", "TRACE", "/api/v1/tasks",
        (405, "method_not_allowed", None)),
    get("query.repeated_status", "GET /tasks?status=running&status=failed",
        "/api/v1/tasks?status=running&status=failed", (*BAD, "status"),
        message_has="more than once"),
    get("query.empty_name", "GET /tasks?=1", "/api/v1/tasks?=1", (*BAD, ""),
        message_has="'' is not a known field"),
    get("query.long_unknown_name", "GET /tasks?<10,000 x>=1",
        "/api/v1/tasks?" + "x" * 10_000 + "=1", (*BAD, "x" * 10_000),
        message_has="(10000 characters) is not a known field"),
]  # fmt: skip

for _req in CASES:
    register(f"http.{_req.name}", "http", _req.given, f"{_req.want[0]} {_req.want[1]}"
             + (f" field={_req.want[2]!r}" if _req.want[2] is not None else ""))  # fmt: skip


def forged_cursor(kind: str, filters: object, position: Any) -> str:
    """A cursor made the way the API makes them: the key is in the source, so the checksum
    proves nothing and the position must be checked for what it is."""
    payload = json.dumps([kind, queries._digest(repr(filters), 6), position], separators=(",", ":"))
    token = f"{payload}|{queries._digest(payload, 8)}".encode()
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


@pytest.mark.parametrize("req", CASES, ids=[c.name for c in CASES])
async def test_hostile_request_is_refused_and_changes_nothing(api, rows, tasks, req: Req) -> None:
    rows.host("web-1")
    rows.host("web-2")
    task_id = rows.task("t")
    rows.execution(task_id, "web-1")
    status, page = await api("GET", "/api/v1/hosts?limit=1")
    assert status == 200 and page["next_cursor"], page
    context = {
        "task": task_id,
        "hosts_cursor": page["next_cursor"],
        "forged_huge": forged_cursor("tasks", queries.TaskFilter(), 10**30),
        "forged_negative": forged_cursor("executions", queries.ExecutionFilter(), -1),
    }
    path = req.path.format(**context) if "{" in req.path else req.path
    headers = dict(req.headers)
    before = table_counts()
    if req.json is not None:
        status, body = await api(req.method, path, json=req.json, headers=headers)
    elif req.raw is not None:
        status, body = await api(req.method, path, data=req.raw, headers=headers)
    else:
        status, body = await api(req.method, path, headers=headers)
    want_status, code, want_field = req.want
    assert_json_error(status, body, want_status, code, want_field, message_has=req.message_has)
    assert table_counts() == before
    if req.asks_service:
        assert [call[0] for call in tasks.calls] == [req.path.rsplit("/", 1)[-1]]
    else:
        assert tasks.calls == []
