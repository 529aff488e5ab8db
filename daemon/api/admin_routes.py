"""The administration routes: hosts' enrolment, API tokens and the audit log (admin role, as
``daemon.api.auth.ROUTES`` says; every change is audited by ``daemon.api.app``).

- ``POST /api/v1/hosts/{id}/approve`` (pending, rejected or revoked -> approved; any old
  credential is cleared, so the agent enrols again with the enrolment token),
  ``/reject`` (pending -> rejected), ``/revoke`` (approved -> revoked: credential cleared, the
  live stream closed at once, executions in flight on it ``failed`` / ``host_revoked``). 200 with
  the host; 404 for no such host; 409 when the host is not in a state the change applies to.
- ``POST /api/v1/tokens {"name", "role"}`` -> 201 with the token, shown this once;
  ``GET /api/v1/tokens`` (never a secret); ``DELETE /api/v1/tokens/{id}`` -> 200, revoked at once.
- ``GET /api/v1/audit?actor=&action=&outcome=&since=&until=&limit=&cursor=`` newest first.
"""

from __future__ import annotations

from typing import Any

from quart import Response, g
from quart_schema import document_response
from quart_trio import QuartTrio

from daemon import errors
from daemon.api.admin_schemas import (
    AuditPage,
    AuditQuery,
    HostRevokedOut,
    TokenCreate,
    TokenCreated,
    TokenListQuery,
    TokenOut,
    TokenPage,
)
from daemon.api.auth import Role, audited
from daemon.api.parsing import json_body, path_id, query_args, time_range
from daemon.api.responses import ErrorBody, HostOut
from daemon.api.routes import Services, json_response
from daemon.identifiers import HOST_ID
from daemon.ops import audit

API = "/api/v1"


def note_audit(target: str | None = None, **details: Any) -> None:
    """What the audit record of this request should say beyond its route: the target when the
    path does not name it, and small details (never a secret)."""
    if target is not None:
        g.audit_target = target
    g.audit_details = {**g.get("audit_details", {}), **details}


def _host_id(text: str) -> str:
    if HOST_ID.fullmatch(text) is None:
        raise errors.NotFound(f"there is no host {text[:40]!r}")
    return text


def register_admin_routes(app: QuartTrio, state: Services) -> None:
    database, hosts, access, limits = state.database, state.hosts, state.access, state.limits

    @app.post(f"{API}/hosts/<host_id>/approve")
    @document_response(HostOut)
    @document_response(ErrorBody, 404)
    @document_response(ErrorBody, 409)
    @audited
    async def approve_host(host_id: str) -> Response:
        """Admit a pending, rejected or revoked host; it enrols again with the enrolment token."""
        return json_response(await hosts.approve(_host_id(host_id)))

    @app.post(f"{API}/hosts/<host_id>/reject")
    @document_response(HostOut)
    @document_response(ErrorBody, 404)
    @document_response(ErrorBody, 409)
    @audited
    async def reject_host(host_id: str) -> Response:
        """Refuse a pending host."""
        return json_response(await hosts.reject(_host_id(host_id)))

    @app.post(f"{API}/hosts/<host_id>/revoke")
    @document_response(HostRevokedOut)
    @document_response(ErrorBody, 404)
    @document_response(ErrorBody, 409)
    @audited
    async def revoke_host(host_id: str) -> Response:
        """Revoke an approved host: its credential stops working, its stream is closed now and
        what runs on it is recorded failed (host_revoked)."""
        host, done = await hosts.revoke(_host_id(host_id))
        note_audit(**done)
        return json_response(
            {
                **host,
                "executions_failed": done["executions"],
                "stream_closed": done["stream_closed"],
            }
        )

    @app.post(f"{API}/tokens")
    @json_body(TokenCreate)
    @document_response(TokenCreated, 201)
    @document_response(ErrorBody, 400)
    @document_response(ErrorBody, 409)
    @audited
    async def create_token(body: TokenCreate) -> Response:
        """A new API token with a role; the answer carries the token, shown this once."""
        note_audit(target=body.name, role=body.role)
        view, token = await access.create_token(body.name, Role.parse(body.role), g.caller.actor)
        note_audit(id=view["id"])
        return json_response({**view, "token": token}, 201)

    @app.get(f"{API}/tokens")
    @query_args(TokenListQuery)
    @document_response(TokenPage)
    @document_response(ErrorBody, 400)
    async def list_tokens(args: TokenListQuery) -> Response:
        """API tokens by id, revoked ones included (never the tokens themselves)."""
        page = await access.list_tokens(args.limit or limits.default_page_size, args.cursor)
        return json_response({"items": page.items, "next_cursor": page.next_cursor})

    @app.delete(f"{API}/tokens/<token_id>")
    @document_response(TokenOut)
    @document_response(ErrorBody, 404)
    @audited
    async def revoke_token(token_id: str) -> Response:
        """Revoke an API token: refused from the next request on (asking twice is fine)."""
        view = await access.revoke_token(path_id(token_id, "token"))
        note_audit(name=view["name"])
        return json_response(view)

    @app.get(f"{API}/audit")
    @query_args(AuditQuery)
    @document_response(AuditPage)
    @document_response(ErrorBody, 400)
    async def list_audit(args: AuditQuery) -> Response:
        """Who did what, newest first: every change, every denial, every refused agent."""
        since, until = time_range(args)
        filters = audit.AuditFilter(args.actor, args.action, args.outcome, since, until)
        page = await database.read(audit.list_events, filters, args.page_size(limits), args.cursor)
        return json_response({"items": page.items, "next_cursor": page.next_cursor})
