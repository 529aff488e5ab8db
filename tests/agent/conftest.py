"""Fixtures for the agent's tests: configs in a temporary state dir, an asyncio loop for the
bridge tests, and a fake daemon that speaks the protocol over ``common.link.memory_link_pair``.

Shared helpers (fake daemon, fake runner, recording report) live in ``agent_testing``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio_asyncio

from agent.config import AgentConfig
from tests.agent.agent_testing import FakeDaemon


@pytest.fixture
async def aio_loop() -> AsyncIterator[Any]:
    """An asyncio loop inside the test's trio run, as ``common.grpc_bridge.run`` opens one."""
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., AgentConfig]:
    """``make_config(**overrides)``: a config for a fast agent with its own state dir."""

    def make(**overrides: Any) -> AgentConfig:
        values: dict[str, Any] = {
            "server": "127.0.0.1:1",
            "host_id": "host-a",
            "state_dir": tmp_path / "state",
            "reconnect_min_s": 0.01,
            "reconnect_max_s": 0.05,
            "connect_timeout_s": 2.0,
            "kill_grace_s": 1.0,
            "pipe_drain_s": 0.5,
            "shutdown_delivery_s": 1.0,
            "plaintext": True,  # the test servers speak plaintext; TLS tests say otherwise
        }
        values.update(overrides)
        return AgentConfig(**values)

    return make


@pytest.fixture
def fake_daemon() -> FakeDaemon:
    return FakeDaemon()
