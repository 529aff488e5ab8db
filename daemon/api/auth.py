"""Who may call which HTTP route: API tokens, roles, and the one table that says it.

Roles, each including the one before: ``viewer`` (every read except the admin-only ones),
``operator`` (+ create, start, cancel and retry tasks), ``admin`` (+ hosts' enrolment, API
tokens, the audit log). ``ROUTES`` names, for every route, its minimum role and, for each route
that changes anything, its audit action. A route missing from it is refused to everyone (403,
logged): default-deny, as Nomad and Choria's actionpolicy do. A route that changes anything
also carries ``@audited`` as its innermost decorator (its audit record is written once the
request is valid, before the change); the test suite walks the URL map to prove no route is
missing from the table and every changing route is audited.

Tokens: ``dsp_`` + 32 random bytes, urlsafe; only their sha256 is stored (``ApiToken``), the
token itself is shown once, when created. A presented token is hashed and looked up; the stored
hash is compared in constant time. Verified tokens are cached in-process for
``cache_ttl_s`` (revocation empties the cache at once, so a revoked token is refused by the next
request); ``last_used_at`` is written at most once a minute per token. The configured
``--api-token`` is a bootstrap ``admin`` token (compared in constant time, never stored), so a
fresh daemon can create the first real tokens. Without one (``--insecure``) every caller is
``anonymous`` with the admin role.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import peewee
from quart import g
from werkzeug.datastructures import Headers

from daemon import errors
from daemon.store import queries, views
from daemon.store.database import Database
from daemon.store.models import ApiToken

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "dsp_"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LAST_USED_EVERY_S = 60.0
_CACHE_ENTRIES = 4096


class Role(IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        return cls[text.upper()]


@dataclass(frozen=True)
class Access:
    role: Role
    action: str | None = None  # the audit action of a route that changes something


VIEWER, OPERATOR, ADMIN = Access(Role.VIEWER), Access(Role.OPERATOR), Access(Role.ADMIN)

# Every route by endpoint (the view function's name): its minimum role and audit action. The
# only routes not here are the @public ones (/healthz, and the web console's files).
ROUTES: dict[str, Access] = {
    "openapi": VIEWER,
    "metrics": VIEWER,
    "whoami": VIEWER,  # daemon.api.web_routes: the console asks who its token is
    "list_hosts": VIEWER,
    "get_host": VIEWER,
    "list_tasks": VIEWER,
    "get_task": VIEWER,
    "task_stats": VIEWER,
    "task_events": VIEWER,
    "list_task_executions": VIEWER,
    "list_executions": VIEWER,
    "get_execution": VIEWER,
    "execution_output": VIEWER,
    "create_task": Access(Role.OPERATOR, "task.create"),
    "start_task": Access(Role.OPERATOR, "task.start"),
    "cancel_task": Access(Role.OPERATOR, "task.cancel"),
    "retry_task": Access(Role.OPERATOR, "task.retry"),
    "approve_host": Access(Role.ADMIN, "host.approve"),
    "reject_host": Access(Role.ADMIN, "host.reject"),
    "revoke_host": Access(Role.ADMIN, "host.revoke"),
    "create_token": Access(Role.ADMIN, "token.create"),
    "list_tokens": ADMIN,
    "revoke_token": Access(Role.ADMIN, "token.revoke"),
    "list_audit": ADMIN,
}


AUDITED_ATTRIBUTE = "_dispatch_audited"


def audited(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """The innermost decorator of every route that changes something: once the request is
    validated, and before the view changes anything, its ``attempted`` audit record is written
    (``daemon.api.app`` prepared it; 503 if it cannot be written). A route that changes state
    without it is refused to everyone."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        pending = g.pop("audit_pending", None)
        if pending is not None:
            log, record = pending
            g.audit_event = await log.attempt(record)
        return await view(*args, **kwargs)

    setattr(wrapper, AUDITED_ATTRIBUTE, True)
    return wrapper


class Forbidden(errors.DispatchError):
    status = 403
    code = "forbidden"


class Denied(errors.Unauthorized):
    """401 with what the audit log should say about it (never the token)."""

    def __init__(self, message: str, *, actor: str = "unknown", reason: str) -> None:
        super().__init__(message)
        self.actor = actor
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    actor: str  # "token:<name>", "bootstrap", "anonymous"
    role: Role
    token_id: int | None = None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def authorize(caller: Caller, endpoint: str | None) -> Access | None:
    """The route's access entry if ``caller`` may call it; ``Forbidden`` otherwise. None for an
    unknown route (routing answers 404/405 next)."""
    if endpoint is None:
        return None
    access = ROUTES.get(endpoint)
    if access is None:
        logger.error("route %r declares no role: refused to everyone", endpoint)
        raise Forbidden("this route is not open to any role")
    if caller.role < access.role:
        raise Forbidden(
            f"this needs the {access.role.label} role; {caller.actor} has {caller.role.label}"
        )
    return access


# --- synchronous: run through Database ------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    id: int
    name: str
    role: Role
    token_hash: str
    revoked: bool


def _find(hashed: str) -> _Token | None:
    row = ApiToken.select().where(ApiToken.token_hash == hashed).first()
    if row is None:
        return None
    return _Token(
        row.id, row.name, Role.parse(row.role), row.token_hash, row.revoked_at is not None
    )


def _create(name: str, role: Role, hashed: str, created_by: str, at: float) -> dict[str, Any]:
    if ApiToken.select().where(ApiToken.name == name).exists():
        raise errors.Conflict(
            f"a token named {name!r} exists (revoked tokens keep their names for the audit log)"
        )
    try:
        row = ApiToken.create(
            name=name, role=role.label, token_hash=hashed, created_at=at, created_by=created_by
        )
    except peewee.IntegrityError:
        raise errors.Conflict(f"a token named {name!r} exists") from None
    return views.token_view(ApiToken.select().where(ApiToken.id == row.id).dicts().get())


def _revoke(token_id: int, at: float) -> dict[str, Any]:
    row = ApiToken.select().where(ApiToken.id == token_id).dicts().first()
    if row is None:
        raise errors.NotFound(f"there is no token {token_id}")
    if row["revoked_at"] is None:
        ApiToken.update(revoked_at=at).where(ApiToken.id == token_id).execute()
        row["revoked_at"] = at
    return views.token_view(row)


def _list(limit: int, cursor: str | None) -> queries.Page:
    after = queries.decode_cursor(cursor, "tokens", ())
    if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
        raise errors.InvalidRequest("cursor is not a cursor this API gave out", field="cursor")
    query = ApiToken.select().order_by(ApiToken.id).limit(limit + 1)
    if after is not None:
        query = query.where(ApiToken.id > after)
    rows = list(query.dicts())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = queries.encode_cursor("tokens", (), rows[-1]["id"]) if more else None
    return queries.Page([views.token_view(row) for row in rows], next_cursor)


def _touch(token_id: int, at: float) -> None:
    ApiToken.update(last_used_at=at).where(ApiToken.id == token_id).execute()


# --- the daemon's side ----------------------------------------------------------------------


class ApiAccess:
    def __init__(
        self, database: Database, *, bootstrap_token: str | None, cache_ttl_s: float = 60.0
    ) -> None:
        self._database = database
        self._bootstrap = bootstrap_token.encode() if bootstrap_token is not None else None
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[_Token, float]] = {}
        self._touched: dict[int, float] = {}
        self._epoch = 0  # bumped by every revocation
        if bootstrap_token is None:
            logger.warning("the HTTP API runs WITHOUT authentication (no API token configured)")

    @property
    def open(self) -> bool:
        """No API token configured (``--insecure``): everyone is an anonymous admin."""
        return self._bootstrap is None

    async def authenticate(self, headers: Headers) -> Caller:
        if self._bootstrap is None:
            return Caller("anonymous", Role.ADMIN)
        scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Denied(
                "send an API token as 'Authorization: Bearer <token>'", reason="no bearer token"
            )
        # headers arrive decoded as latin-1: encoding back gives the bytes that were sent
        raw = token.encode("latin-1", "replace")
        if hmac.compare_digest(raw, self._bootstrap):
            return Caller("bootstrap", Role.ADMIN)
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Denied("the API token is not valid", reason="unknown token")
        hashed = token_hash(token)
        found = await self._lookup(hashed)
        if found is None or not hmac.compare_digest(found.token_hash, hashed):
            raise Denied("the API token is not valid", reason="unknown token")
        if found.revoked:
            raise Denied(
                "the API token is not valid", actor=f"token:{found.name}", reason="revoked token"
            )
        await self._touch(found.id)
        return Caller(f"token:{found.name}", found.role, found.id)

    async def _lookup(self, hashed: str) -> _Token | None:
        now = time.monotonic()
        cached = self._cache.get(hashed)
        if cached is not None and now - cached[1] < self._cache_ttl_s:
            return cached[0]
        epoch = self._epoch
        found = await self._database.read(_find, hashed)
        # not cached if a revocation happened while it was read: it may be the one revoked
        if found is not None and not found.revoked and epoch == self._epoch:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[hashed] = (found, now)
        return found

    async def _touch(self, token_id: int) -> None:
        now = time.monotonic()
        if now - self._touched.get(token_id, -_LAST_USED_EVERY_S) < _LAST_USED_EVERY_S:
            return
        self._touched[token_id] = now
        try:
            await self._database.write(_touch, token_id, time.time())
        except peewee.DatabaseError as exc:  # a statistic: never worth refusing a request for
            logger.warning("token %s: last_used_at not written: %s", token_id, exc)

    async def create_token(self, name: str, role: Role, created_by: str) -> tuple[dict, str]:
        """The new token's view and the token itself (shown once, never stored)."""
        token = new_token()
        view = await self._database.write(
            _create, name, role, token_hash(token), created_by, time.time()
        )
        logger.info("API token %r (%s) created by %s", name, role.label, created_by)
        return view, token

    async def revoke_token(self, token_id: int) -> dict[str, Any]:
        view = await self._database.write(_revoke, token_id, time.time())
        self._epoch += 1
        self._cache.clear()  # at once: the next request with it is refused
        logger.info("API token %r revoked", view["name"])
        return view

    async def list_tokens(self, limit: int, cursor: str | None) -> queries.Page:
        return await self._database.read(_list, limit, cursor)
