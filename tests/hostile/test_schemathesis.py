"""``/openapi.json`` against the API that serves it: schemathesis runs every documented operation
of a real ``dispatchd`` (with an agent connected and tasks present) with generated and mutated
inputs, and each answer must be no 5xx, a JSON error of the documented shape, in the documented
content type; and the document itself must list the errors each operation can answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.cluster import API_TOKEN, REPO, Cluster, Program, open_cluster
from tests.hostile.catalogue import register

pytestmark = pytest.mark.hostile

ST_TIMEOUT_S = 90
MAX_EXAMPLES = 20
SEED = 20260501

# Every check schemathesis has, except these two, and why:
EXCLUDED_CHECKS = {
    # The document does not list 401 (every route but /healthz) or 404 (every path id): routes
    # are documented in http_routes.py / http_api.py; the bug and its fix:
    # test_every_answer_is_documented below (xfail until then). And quart-schema documents JSON
    # answers only: the 200 of /metrics (Prometheus text) and of .../output (raw bytes) cannot
    # be listed, so this check cannot pass on those two even then.
    "status_code_conformance",
    # "Valid data must be accepted" cannot apply here: whether a request is valid depends on
    # the server's state, not on the schema (a cursor is an opaque token the server issued and
    # signs; target hosts must have connected; until must follow since); schemathesis counts
    # those 400s as "schema-valid request rejected".
    "positive_data_acceptance",
}
# The event stream never ends by itself (it is long-lived by design: no response timeout), so a
# generated request to it would only end at the client's timeout. Its refusals (bad ids,
# Last-Event-ID garbage) are cases of test_http_hostile.py.
EXCLUDED_PATHS = r"/events$"
# Twice in about ten runs under load, one request (both times the unsupported-method probe
# DELETE /api/v1/tasks with a JSON body, answered 405 without reading it) got no answer at all
# and was never access-logged, while every later request was served. Not reproduced alone; see
# test_http_wire.test_connection_close_is_honoured for the connection handling it points at.
# A request that times out is sent once more, so the run reports what it found otherwise.
REQUEST_TIMEOUT_S, REQUEST_RETRIES = 10, 1


@pytest.fixture
def db_url(sqlite_only: str) -> str:
    return sqlite_only


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Cluster]:
    with trio.fail_after(ST_TIMEOUT_S + 60):
        async with open_cluster(tmp_path, f"sqlite:///{tmp_path / 'dispatch.db'}") as cluster:
            await cluster.start_daemon()
            # The agent runs what schemathesis creates: in a directory of its own, so a
            # generated script such as '0>0' writes there, not into the repository.
            workdir = tmp_path / "agent-cwd"
            workdir.mkdir()
            argv = ["env", f"PYTHONPATH={REPO}", "/bin/sh", "-c", 'cd "$0" && exec "$@"',
                    str(workdir), *cluster.agent_argv("web-1")]  # fmt: skip
            agent = Program("web-1", argv, tmp_path / "agent-web-1.log")
            cluster.agents["web-1"] = agent
            await agent.start()
            await cluster.wait_online(["web-1"])
            done = await cluster.run_task(["web-1"], "echo done")
            await cluster.wait_task(done)
            pending = {"name": "pending", "commands": [{"script": "true"}],
                       "targets": {"hosts": ["web-1"]}}  # fmt: skip
            await cluster.post("/api/v1/tasks", pending)
            yield cluster


register("http.schemathesis", "http", f"schemathesis: every operation of /openapi.json, "
         f"{MAX_EXAMPLES} examples each, coverage + fuzzing + stateful phases",
         "no 5xx; responses, content types and headers as documented; negative data refused; "
         "auth not ignored")  # fmt: skip


def schemathesis(cluster: Cluster, report: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run",
        f"http://127.0.0.1:{cluster.http_port}/openapi.json",
        "--header", f"Authorization: Bearer {API_TOKEN}",
        "--checks", "all", "--exclude-checks", ",".join(sorted(EXCLUDED_CHECKS)),
        "--exclude-path-regex", EXCLUDED_PATHS,
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
        "--request-timeout", str(REQUEST_TIMEOUT_S), "--request-retries", str(REQUEST_RETRIES),
        "--generation-database", "none", "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=ST_TIMEOUT_S, cwd=cwd,
                          env=env, check=False)  # fmt: skip


@pytest.mark.e2e
async def test_schemathesis_finds_nothing(served: Cluster, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    result = await trio.to_thread.run_sync(schemathesis, served, report, tmp_path)
    summary: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    tail = result.stdout[-6000:] + result.stderr[-2000:]
    assert summary, tail
    assert (summary["failures"], summary["errors"]) == ([], []), tail
    assert result.returncode == 0, tail
    cases = summary["test_cases"]
    assert cases["generated"] >= 300 and cases["with_failures"] == 0, cases
    assert summary["operations"].get("tested", 0) >= 15, summary["operations"]
    # no request failed inside the daemon (a 500 is logged as an ERROR of daemon.api.app)
    log = served.daemon.log_text() if served.daemon else ""
    assert [line for line in log.splitlines() if " ERROR daemon." in line] == []


# ----------------------------------------------------------------------- the document itself


async def openapi(api: Any) -> dict[str, Any]:
    status, document = await api("GET", "/openapi.json")
    assert status == 200
    return document  # type: ignore[no-any-return]


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in document["paths"].items()
            for method, op in item.items()]  # fmt: skip


async def test_validated_inputs_document_their_errors(api) -> None:
    document = await openapi(api)
    checked = 0
    for method, path, op in operations(document):
        codes = set(op["responses"])
        if "requestBody" in op:
            assert {"400", "413", "415"} <= codes, (method, path, codes)
            checked += 1
        if any(p["in"] == "query" for p in op.get("parameters", [])):
            assert "400" in codes, (method, path, codes)
            checked += 1
        for code, answer in op["responses"].items():
            if code.startswith(("4", "5")):
                schema = answer["content"]["application/json"]["schema"]
                assert schema.get("title") == "ErrorBody", (method, path, code, schema)
                assert schema["required"] == ["error"], (method, path, code, schema)
    assert checked >= 8


async def test_every_answer_is_documented(api) -> None:
    document = await openapi(api)
    missing = []
    for method, path, op in operations(document):
        codes = set(op["responses"])
        if op.get("security", document.get("security")) and "401" not in codes:
            missing.append((method, path, "401"))
        if "{" in path and "404" not in codes:
            missing.append((method, path, "404"))
    assert missing == []
