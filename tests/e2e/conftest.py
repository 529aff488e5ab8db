"""The fixture the end-to-end tests share: a cluster (a scratch directory, the database of the
``db_url`` parameter, ports) in which a test starts the real programs it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.e2e.cluster import Cluster, open_cluster


@pytest.fixture
async def cluster(tmp_path: Path, db_url: str) -> AsyncIterator[Cluster]:
    with trio.fail_after(240):
        async with open_cluster(tmp_path, db_url) as running:
            yield running
