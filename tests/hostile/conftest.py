"""Fixtures for the hostile-input suite, borrowed from the suites that own them (so this one
follows their changes): the HTTP app over a fake task service and a real database
(``tests/daemon/conftest.py``), the daemon side of the agent port over in-memory links
(``tests/daemon/test_session.py``), and an asyncio loop for grpclib (``tests/agent/conftest.py``).
Every test here is marked ``hostile``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent.conftest import aio_loop  # noqa: F401
from tests.daemon.conftest import (  # noqa: F401
    api,
    app,
    client,
    database,
    limits,
    live,
    peewee_db,
    rows,
    sqlite_only,
    tasks,
)
from tests.daemon.test_session import port  # noqa: F401

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == HERE:
            item.add_marker(pytest.mark.hostile)
