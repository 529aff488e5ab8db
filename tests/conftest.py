"""Fixtures every test directory shares: a real database of each kind; and, at the end of a run,
which suites this machine could not run and the one command that runs them all.

``db_url`` runs a test once on a SQLite file and once on a fresh PostgreSQL database (created
for the test and dropped after it) when ``DISPATCH_TEST_POSTGRES_URL`` names a server and a
database the user may connect to with CREATEDB rights; ``.ci/run`` starts such a server.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest

POSTGRES_URL = os.environ.get("DISPATCH_TEST_POSTGRES_URL")


def _admin(sql: str) -> None:
    import psycopg2

    assert POSTGRES_URL is not None
    connection = psycopg2.connect(POSTGRES_URL)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dispatch.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("set DISPATCH_TEST_POSTGRES_URL to run against PostgreSQL")
    name = f"dispatch_test_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield urlunparse(urlparse(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        _drop_database(name)


def _drop_database(name: str) -> None:
    """FORCE cannot end an autovacuum worker that happens to be in the fresh database (it runs
    as a superuser): PostgreSQL refuses, and the worker is gone a moment later."""
    import psycopg2.errors

    for attempt in range(20):
        try:
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg2.errors.InsufficientPrivilege:
            if attempt == 19:
                raise
            time.sleep(0.25)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name what was skipped, by reason (no PostgreSQL server named, no Chromium, no faketime...),
    so a green run on a bare machine does not read as every suite having run."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reasons[str(report.longrepr[2]).removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.section("suites skipped on this machine")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:5d} tests: {reason}")
    terminalreporter.write_line(
        "every suite (installs and starts PostgreSQL, Chromium and faketime as root): bash .ci/run"
    )
