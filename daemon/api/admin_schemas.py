"""Request and answer shapes of the administration routes (hosts' enrolment, API tokens, the
audit log), in the style of ``daemon.api.schemas``: strict bodies, query strings that reject
unknown parameters, limits from the validation context."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from daemon.api.auth import TOKEN_NAME
from daemon.api.responses import HostOut
from daemon.api.schemas import Cursor, HostListQuery, Text, _Page, _Query, _Strict
from daemon.states import EnrollmentState


class HostListQueryWithEnrollment(HostListQuery):
    enrollment: EnrollmentState | None = Field(
        None, description="pending, approved, rejected or revoked"
    )


class TokenCreate(_Strict):
    name: Annotated[Text, StringConstraints(pattern=TOKEN_NAME.pattern)] = Field(
        description="1-64 letters, digits, '.', '_' or '-'; unique, kept after revocation"
    )
    role: Literal["viewer", "operator", "admin"]


class TokenListQuery(_Query):
    limit: int | None = Field(None, ge=1, le=1000)
    cursor: Cursor = None


AuditOutcome = Literal["attempted", "ok", "denied", "failed"]


class AuditQuery(_Page):
    """Newest first; since/until filter on the event's time."""

    actor: Annotated[Text, StringConstraints(max_length=300)] | None = Field(
        None, description="token:<name>, bootstrap, anonymous, agent:<host>, unknown"
    )
    action: Annotated[Text, StringConstraints(pattern=r"^[a-z_]+\.[a-z_]+$")] | None = Field(
        None, description="e.g. task.create, host.revoke, auth.denied, agent.refused"
    )
    outcome: AuditOutcome | None = None


# --- answers (documentation; daemon.store.views renders them) -------------------------------------


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: str | None
    created_by: str
    last_used_at: str | None
    revoked_at: str | None


class TokenCreated(TokenOut):
    token: str = Field(description="the token itself: shown this once, never again")


class TokenPage(BaseModel):
    items: list[TokenOut]
    next_cursor: str | None


class AuditEventOut(BaseModel):
    id: str
    at: str | None
    actor: str
    role: str | None
    action: str
    target: str | None
    outcome: str
    status: int | None
    address: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None


class HostRevokedOut(HostOut):
    executions_failed: int = Field(description="executions in flight on it, now failed")
    stream_closed: bool
