"""A real dispatchd (SQLite: the browser does not care which database) for the web tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.e2e.cluster import Cluster, open_cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    with trio.fail_after(300):
        async with open_cluster(tmp_path, f"sqlite:///{tmp_path / 'dispatch.db'}") as running:
            yield running
