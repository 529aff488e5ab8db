"""Which agents are connected right now: at most one live session per host.

A second stream for a host replaces the first, deterministically: the newer wins and the older
is closed. Every arrival and departure goes, in order, into the engine's presence channel
(``engine.fleet.Presence``), so work in flight can be reconciled with what a returning agent
says it holds.

Revoking a host (``revoke``) closes its stream at once and bumps the host's generation: a stream
that was admitted before the revocation but attaches after it is refused (``attach`` raises
``HostRevoked``), so no admission can slip between the database's decision and this one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from daemon.engine.fleet import AgentSession, Arrived, Departed, Presence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryStatistics:
    connected: int
    arrivals: int
    departures: int
    replaced: int


class HostRevoked(Exception):
    """The host was revoked after its stream was admitted."""


class Registry:
    def __init__(self, presence: trio.MemorySendChannel[Presence] | None = None) -> None:
        """``presence``: where arrivals and departures go (None: nobody follows them)."""
        self._sessions: dict[str, AgentSession] = {}
        self._generations: dict[str, int] = {}
        self._presence = presence
        self._arrivals = self._departures = self._replaced = 0

    def current(self, host_id: str) -> AgentSession | None:
        return self._sessions.get(host_id)

    def is_connected(self, host_id: str) -> bool:
        return host_id in self._sessions

    def generation(self, host_id: str) -> int:
        """Read before admitting a stream, passed back to ``attach``."""
        return self._generations.get(host_id, 0)

    def revoke(self, host_id: str, reason: str) -> bool:
        """Close the host's stream now and refuse streams admitted before this call; True if a
        stream was open."""
        self._generations[host_id] = self.generation(host_id) + 1
        session = self._sessions.get(host_id)
        if session is None:
            return False
        session.close(reason)
        return True

    async def attach(self, session: AgentSession, *, generation: int | None = None) -> None:
        """Make ``session`` the host's current one, closing any older session. With
        ``generation`` (read before the stream was admitted), refuse it with ``HostRevoked``
        if the host was revoked since."""
        if generation is not None and generation != self.generation(session.host_id):
            raise HostRevoked(session.host_id)
        older = self._sessions.get(session.host_id)
        self._sessions[session.host_id] = session
        self._arrivals += 1
        if older is not None:
            self._replaced += 1
            older.close("replaced by a newer connection from the same host")
        if self._presence is not None:
            await self._presence.send(Arrived(session))

    async def detach(self, session: AgentSession) -> bool:
        """Forget ``session`` if it is still the host's current one; True if it was."""
        if self._sessions.get(session.host_id) is not session:
            return False
        del self._sessions[session.host_id]
        self._departures += 1
        if self._presence is not None:
            await self._presence.send(Departed(session.host_id))
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
