"""An administrator's say over hosts' enrolment (the admin routes of ``daemon.api.admin_routes``).

approve (pending/rejected/revoked -> approved, any old credential cleared so the agent enrols
again with the enrolment token), reject (pending -> rejected), revoke (approved -> revoked:
credential cleared, the live stream closed at once through the registry, executions in flight on
it settled ``failed`` / ``host_revoked``). Each is one conditional update: racing administrators
get one winner and a 409.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon import errors
from daemon.engine.dispatcher import Dispatcher
from daemon.engine.fleet import Fleet
from daemon.states import EnrollmentState, Reason
from daemon.store import queries
from daemon.store.database import Database
from daemon.store.host_records import host_state
from daemon.store.models import Host

logger = logging.getLogger(__name__)


# --- synchronous: run through Database ------------------------------------------------------


def change_enrollment(
    host_id: str, to: EnrollmentState, allowed_from: frozenset[EnrollmentState]
) -> tuple[bool, EnrollmentState | None]:
    """Move the host to ``to`` (clearing its credential) if it is in ``allowed_from``: whether
    it moved, and the state it was found in when it did not (None: no such host)."""
    moved = (
        Host.update(enrollment=to.value, credential_hash=None, credential_issued_at=None)
        .where((Host.id == host_id) & Host.enrollment.in_([s.value for s in allowed_from]))
        .execute()
    )
    if moved:
        return True, to
    state = host_state(host_id)
    return False, state.enrollment if state is not None else None


def host_view(host_id: str) -> dict[str, Any] | None:
    host = queries.get_host(host_id, 0)
    if host is not None:
        host.pop("connections", None)
    return host


# --- the daemon's side ----------------------------------------------------------------------


_APPROVABLE = frozenset(
    {EnrollmentState.PENDING, EnrollmentState.REJECTED, EnrollmentState.REVOKED}
)


class HostAdmin:
    """Approve, reject and revoke hosts. ``fleet``/``dispatcher`` (the live daemon) let a
    revocation close the host's stream and settle what runs on it; without them (an HTTP app
    alone) only the record changes."""

    def __init__(
        self,
        database: Database,
        *,
        fleet: Fleet | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self._database = database
        self._fleet = fleet
        self._dispatcher = dispatcher

    async def _change(
        self, host_id: str, to: EnrollmentState, allowed_from: frozenset[EnrollmentState]
    ) -> None:
        moved, found = await self._database.write(change_enrollment, host_id, to, allowed_from)
        if found is None:
            raise errors.NotFound(f"there is no host {host_id!r}")
        if not moved:
            allowed = " or ".join(sorted(s.value for s in allowed_from))
            raise errors.Conflict(
                f"host {host_id!r} is {found.value}; only a {allowed} host can become {to.value}"
            )

    async def view(self, host_id: str) -> dict[str, Any]:
        host = await self._database.read(host_view, host_id)
        if host is None:
            raise errors.NotFound(f"there is no host {host_id!r}")
        return host

    async def approve(self, host_id: str) -> dict[str, Any]:
        await self._change(host_id, EnrollmentState.APPROVED, _APPROVABLE)
        logger.info("host %s approved; it enrols again with the enrolment token", host_id)
        return await self.view(host_id)

    async def reject(self, host_id: str) -> dict[str, Any]:
        await self._change(host_id, EnrollmentState.REJECTED, frozenset({EnrollmentState.PENDING}))
        logger.info("host %s rejected", host_id)
        return await self.view(host_id)

    async def revoke(self, host_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Returns the host and what the revocation did (for the audit record)."""
        await self._change(host_id, EnrollmentState.REVOKED, frozenset({EnrollmentState.APPROVED}))
        closed = settled = 0
        if self._fleet is not None:
            closed = int(self._fleet.revoke(host_id, "the host was revoked"))
        if self._dispatcher is not None:
            settled = await self._dispatcher.fail_host(
                host_id, Reason.HOST_REVOKED, "the host was revoked by an administrator"
            )
        logger.warning(
            "host %s revoked: credential cleared, %d stream closed, %d executions failed",
            host_id,
            closed,
            settled,
        )
        return await self.view(host_id), {"stream_closed": bool(closed), "executions": settled}
