"""Host and connection rows: who connected, when, from where, and why they left (synchronous;
run through ``Database``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from daemon.states import EnrollmentState, HostStatus
from daemon.store.models import Host, HostConnection, execute_many


def record_connect(
    host_id: str,
    *,
    hostname: str,
    labels: Mapping[str, str],
    agent_version: str,
    address: str,
    at: float,
) -> int:
    """Mark the host online (creating it on first contact); returns the connection's id."""
    db = Host._meta.database
    with db.atomic():
        fields = {
            Host.hostname: hostname,
            Host.labels: json.dumps(dict(labels), sort_keys=True),
            Host.status: HostStatus.ONLINE.value,
            Host.agent_version: agent_version,
            Host.address: address,
            Host.connected_at: at,
            Host.last_seen_at: at,
        }
        updated = Host.update(fields).where(Host.id == host_id).execute()
        if not updated:
            Host.insert({Host.id: host_id, Host.first_seen_at: at, **fields}).execute()
        connection = HostConnection.create(
            host_id=host_id, connected_at=at, address=address, agent_version=agent_version
        )
    return int(connection.id)


def record_disconnect(
    connection_id: int, host_id: str, *, at: float, reason: str, was_current: bool
) -> None:
    db = Host._meta.database
    with db.atomic():
        HostConnection.update(disconnected_at=at, close_reason=reason).where(
            HostConnection.id == connection_id
        ).execute()
        if was_current:
            Host.update(status=HostStatus.OFFLINE.value, last_seen_at=at).where(
                Host.id == host_id
            ).execute()


def record_last_seen(seen: Sequence[tuple[float, str]]) -> None:
    """(time, host id) pairs, written in one statement: heartbeats are not written one by one."""
    db = Host._meta.database
    with db.atomic():
        execute_many(db, "UPDATE host SET last_seen_at = ? WHERE id = ?", seen)


def reset_presence(at: float) -> int:
    """At start-up no agent is connected yet: every host is offline, every connection closed."""
    db = Host._meta.database
    with db.atomic():
        HostConnection.update(disconnected_at=at, close_reason="daemon_restart").where(
            HostConnection.disconnected_at.is_null()
        ).execute()
        return int(
            Host.update(status=HostStatus.OFFLINE.value)
            .where(Host.status == HostStatus.ONLINE.value)
            .execute()
        )


@dataclass(frozen=True)
class HostState:
    enrollment: EnrollmentState
    credential_hash: str | None


def host_state(host_id: str) -> HostState | None:
    row = (
        Host.select(Host.enrollment, Host.credential_hash)
        .where(Host.id == host_id)
        .tuples()
        .first()
    )
    return HostState(EnrollmentState(row[0]), row[1]) if row is not None else None
