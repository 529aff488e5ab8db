"""What the engine may do with the connected agents, as the engine sees it.

The engine decides what runs where; ``daemon.agents`` holds the streams. The engine names here the
little it needs from them, and ``daemon.server`` hands it the agents' registry, which has this
shape: so the engine never imports the agents' side, and its tests drive it with fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proto.dispatch import v1 as pb


class AgentSession(Protocol):
    """One connected agent's stream: runs and cancels are queued on it without waiting."""

    @property
    def host_id(self) -> str: ...

    @property
    def known_ids(self) -> frozenset[int]:
        """The executions the agent held when it said hello."""
        ...

    def send_run_nowait(self, run: pb.Run) -> None: ...

    def send_cancel_nowait(self, ids: list[int]) -> None: ...

    def close(self, reason: str) -> None: ...


class Fleet(Protocol):
    """The connected agents, at most one session per host."""

    def current(self, host_id: str) -> AgentSession | None: ...

    def is_connected(self, host_id: str) -> bool: ...

    def revoke(self, host_id: str, reason: str) -> bool: ...


# What the agent port tells the engine, in order, through a bounded channel the server wires
# (``Dispatcher.serve``): a host's stream became current, or the host has none any more.


@dataclass(frozen=True, slots=True)
class Arrived:
    session: AgentSession


@dataclass(frozen=True, slots=True)
class Departed:
    host_id: str


Presence = Arrived | Departed
