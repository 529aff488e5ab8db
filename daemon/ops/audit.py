"""The audit log: who did what, when, from where, and how it ended (``AuditEvent`` rows).

Recorded: every state-changing call of the HTTP API (each POST/PUT/DELETE route), every
denial (401, 403) and every agent stream the daemon refuses, and each per-host credential it
issues. Who: ``token:<name>``, ``bootstrap`` (the configured ``--api-token``), ``anonymous``
(``--insecure`` without an API token), ``agent:<host id>``, or ``unknown``.

Fail-closed for changes, best-effort for denials, and why:
- A change first writes an ``attempted`` record; if that write fails the change is refused with
  503 before anything happens. A change nobody can account for is worse than one that waits for
  the database (Teleport's synchronous recording makes the same choice: no record, no session).
  Once the change ran, the record is completed with its outcome (``ok``/``failed``) and HTTP
  status; if that second write fails, the record stays ``attempted``, which reads as "outcome
  unknown", and the failure is logged.
- A per-host credential is issued in the same transaction as its record: both or neither.
- Denials are written best-effort: refusing a caller must not depend on the database, and a flood
  of bad credentials must not monopolise the database's single writer. At most
  ``max_denials_in_flight`` denial writes run at once; more are dropped and counted
  (``dispatch_audit_denials_dropped``), and every denial is logged anyway.

Never a secret: callers pass names and ids; ``safe_details`` drops any key that names a secret
(token, credential, password, secret, authorization) and bounds the rest.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import peewee
import trio

from daemon import errors
from daemon.store import views
from daemon.store.database import Database
from daemon.store.models import AuditEvent
from daemon.store.queries import Page, decode_cursor, encode_cursor

logger = logging.getLogger(__name__)

ATTEMPTED, OK, DENIED, FAILED = "attempted", "ok", "denied", "failed"
_SECRET_KEY = re.compile(r"token|credential|secret|password|authorization", re.IGNORECASE)
_MAX_VALUE_CHARS = 200
_MAX_DETAILS_CHARS = 2000
_DENIAL_WRITE_S = 5.0


def safe_details(details: Mapping[str, Any] | None) -> str:
    """``details`` as bounded JSON, without any key that names a secret."""
    kept: dict[str, Any] = {}
    for key, value in (details or {}).items():
        if _SECRET_KEY.search(key):
            continue
        if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
            value = value[:_MAX_VALUE_CHARS] + "…"
        elif not isinstance(value, str | int | float | bool | None):
            value = str(value)[:_MAX_VALUE_CHARS]
        kept[key] = value
    text = json.dumps(kept, sort_keys=True, ensure_ascii=False)
    if len(text) > _MAX_DETAILS_CHARS:
        text = json.dumps({"truncated": True})
    return text


@dataclass(frozen=True)
class AuditRecord:
    """One event as the daemon describes it (``AuditLog`` adds the time)."""

    actor: str
    action: str
    outcome: str
    role: str | None = None
    target: str | None = None
    status: int | None = None
    address: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


# --- synchronous: run through Database (or inside a caller's transaction) --------------------


def insert_event(record: AuditRecord, at: float) -> int:
    row = AuditEvent.create(
        at=at,
        actor=record.actor[:300],
        role=record.role,
        action=record.action,
        target=record.target[:300] if record.target is not None else None,
        outcome=record.outcome,
        status=record.status,
        address=record.address[:100],
        details=safe_details(record.details),
    )
    return int(row.id)


def complete_event(
    event_id: int,
    outcome: str,
    status: int | None,
    target: str | None,
    details: Mapping[str, Any] | None,
) -> None:
    fields: dict[Any, Any] = {AuditEvent.outcome: outcome, AuditEvent.status: status}
    if target is not None:
        fields[AuditEvent.target] = target[:300]
    if details:
        row = AuditEvent.select(AuditEvent.details).where(AuditEvent.id == event_id).first()
        merged = {**(json.loads(row.details) if row is not None else {}), **details}
        fields[AuditEvent.details] = safe_details(merged)
    AuditEvent.update(fields).where(AuditEvent.id == event_id).execute()


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    since: float | None = None  # at >= since
    until: float | None = None  # at < until


def list_events(filters: AuditFilter, limit: int, cursor: str | None) -> Page:
    """Newest first, keyset-paged by id."""
    before = decode_cursor(cursor, "audit", filters)
    if before is not None and (not isinstance(before, int) or isinstance(before, bool)):
        raise errors.InvalidRequest("cursor is not a cursor this API gave out", field="cursor")
    query = AuditEvent.select().order_by(AuditEvent.id.desc()).limit(limit + 1)
    if filters.actor is not None:
        query = query.where(AuditEvent.actor == filters.actor)
    if filters.action is not None:
        query = query.where(AuditEvent.action == filters.action)
    if filters.outcome is not None:
        query = query.where(AuditEvent.outcome == filters.outcome)
    if filters.since is not None:
        query = query.where(AuditEvent.at >= filters.since)
    if filters.until is not None:
        query = query.where(AuditEvent.at < filters.until)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    rows = list(query.dicts())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor("audit", filters, rows[-1]["id"]) if more else None
    return Page([views.audit_view(row) for row in rows], next_cursor)


# --- the daemon's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditStatistics:
    recorded: int
    denials_dropped: int
    failures: int


class AuditLog:
    def __init__(self, database: Database, *, max_denials_in_flight: int = 8) -> None:
        self._database = database
        self._denial_slots = trio.CapacityLimiter(max_denials_in_flight)
        self._recorded = 0
        self._dropped = 0
        self._failures = 0

    async def attempt(self, record: AuditRecord) -> int:
        """Record a change about to happen; ``errors.Unavailable`` if that cannot be done (the
        change must then not happen)."""
        try:
            event_id = await self._database.write(insert_event, record, time.time())
        except peewee.DatabaseError as exc:
            self._failures += 1
            logger.error("audit: cannot record %s of %s by %s: %s", record.action,
                         record.target or "-", record.actor, exc)  # fmt: skip
            raise errors.Unavailable(
                "the audit log cannot be written, so no change is made; try again later"
            ) from None
        self._recorded += 1
        return event_id

    async def complete(
        self,
        event_id: int,
        outcome: str,
        status: int | None,
        *,
        target: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """The outcome of an attempted change (logged, not raised, when it cannot be written:
        the change has happened either way)."""
        try:
            with trio.CancelScope(shield=True):
                await self._database.write(
                    complete_event, event_id, outcome, status, target, details
                )
        except peewee.DatabaseError as exc:
            self._failures += 1
            logger.error(
                "audit: event %s stays 'attempted' (outcome %s not recorded): %s",
                event_id,
                outcome,
                exc,
            )

    async def record(self, record: AuditRecord) -> None:
        """A finished event, best-effort (an agent refusal, a denial): bounded, never raises,
        and not abandoned when the caller hangs up meanwhile (shielded, with a deadline)."""
        try:
            self._denial_slots.acquire_nowait()
        except trio.WouldBlock:
            self._dropped += 1
            logger.warning(
                "audit: too many denials being written; dropped %s by %s (%s)",
                record.action,
                record.actor,
                record.target,
            )
            return
        try:
            with trio.move_on_after(_DENIAL_WRITE_S, shield=True) as waited:
                await self._database.write(insert_event, record, time.time())
                self._recorded += 1
            if waited.cancelled_caught:
                self._dropped += 1
                logger.warning("audit: %s of %s by %s not written in time", record.action,
                               record.target or "-", record.actor)  # fmt: skip
        except peewee.DatabaseError as exc:
            self._failures += 1
            logger.error("audit: cannot record %s of %s by %s: %s", record.action,
                         record.target or "-", record.actor, exc)  # fmt: skip
        finally:
            self._denial_slots.release()

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(self._recorded, self._dropped, self._failures)
