"""Which agents are connected right now: at most one live session per host.

A second stream for a host replaces the first, deterministically: the newer wins and the older
is closed. Listeners (the dispatcher) hear of every arrival and departure, in order, so work in
flight can be reconciled with what a returning agent says it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)


class AgentSession(Protocol):
    """What the dispatcher may do with a connected agent."""

    host_id: str
    known_ids: frozenset[int]  # executions the agent held when it said hello

    def send_run_nowait(self, run: pb.Run) -> None: ...

    def send_cancel_nowait(self, ids: list[int]) -> None: ...

    def close(self, reason: str) -> None: ...


ArrivalListener = Callable[[AgentSession], Awaitable[None]]
DepartureListener = Callable[[str], None]


@dataclass(frozen=True)
class RegistryStatistics:
    connected: int
    arrivals: int
    departures: int
    replaced: int


class Registry:
    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        self._arrival_events: dict[str, trio.Event] = {}
        self._arrival_listeners: list[ArrivalListener] = []
        self._departure_listeners: list[DepartureListener] = []
        self._arrivals = self._departures = self._replaced = 0

    def on_arrival(self, listener: ArrivalListener) -> None:
        self._arrival_listeners.append(listener)

    def on_departure(self, listener: DepartureListener) -> None:
        self._departure_listeners.append(listener)

    def current(self, host_id: str) -> AgentSession | None:
        return self._sessions.get(host_id)

    def is_connected(self, host_id: str) -> bool:
        return host_id in self._sessions

    async def wait_connected(self, host_id: str) -> AgentSession:
        """Wait until the host has a session (callers bound the wait)."""
        while (session := self._sessions.get(host_id)) is None:
            event = self._arrival_events.setdefault(host_id, trio.Event())
            await event.wait()
        return session

    async def attach(self, session: AgentSession) -> None:
        """Make ``session`` the host's current one, closing any older session."""
        older = self._sessions.get(session.host_id)
        self._sessions[session.host_id] = session
        self._arrivals += 1
        if older is not None:
            self._replaced += 1
            older.close("replaced by a newer connection from the same host")
        event = self._arrival_events.pop(session.host_id, None)
        if event is not None:
            event.set()
        for listener in self._arrival_listeners:
            await listener(session)

    def detach(self, session: AgentSession) -> bool:
        """Forget ``session`` if it is still the host's current one; True if it was."""
        if self._sessions.get(session.host_id) is not session:
            return False
        del self._sessions[session.host_id]
        self._departures += 1
        for listener in self._departure_listeners:
            listener(session.host_id)
        return True

    def sessions(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            connected=len(self._sessions),
            arrivals=self._arrivals,
            departures=self._departures,
            replaced=self._replaced,
        )
