"""The HTTP API of dispatchd (API.md): routes, authentication, error bodies, and serving them.

``create_app`` builds the quart-trio app over the daemon's services; ``serve_http`` runs it on
hypercorn's trio worker in the caller's nursery. Requests are validated by the pydantic models of
``daemon.api.schemas`` (the same models ``/openapi.json`` is generated from), reads go through
``Database.read`` into ``store.queries``/``store.stats``, changes through the task service.

Every route needs ``Authorization: Bearer <token>`` except those marked ``@public``
(``/healthz``); ``daemon.api.auth`` decides who the caller is (``g.caller``) and whether its role
may call the route (its one table, ``ROUTES``). A route that changes anything is audited
(``daemon.ops.audit``): once its request is valid, an ``attempted`` record before the view changes
anything (``@audited``; 503 if it cannot be written), completed with the outcome after; every
401 and 403 is recorded too. Requests refused as malformed (400) change nothing and are not
recorded. Every 4xx/5xx
answer is ``{"error": {"code", "message", "field"?}}``: unknown routes, wrong methods, malformed
JSON, oversized bodies and unexpected exceptions (logged with their traceback, answered
``internal`` with no details) included.

Status codes beyond API.md: 202 with the task for start and cancel, 201 with the new task (and a
``Location``) for create (a replay with the same Idempotency-Key and body too) and retry, 400
``invalid_request`` with ``field`` for a bad value, 400 ``invalid_json`` for a body that is not
JSON, 401 ``unauthorized``, 403 ``forbidden`` (the caller's role is not enough), 404
``not_found`` (also for ids that are not ids), 405 ``method_not_allowed``, 408
``request_timeout``, 413 ``payload_too_large``, 415 ``unsupported_media_type`` (a body that is
not application/json), 503 ``unavailable`` (database failing, the audit log cannot be written,
too many event streams).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import peewee
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, g, request
from quart_schema import QuartSchema
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from daemon import __version__, errors
from daemon.api import sse
from daemon.api.admin_routes import register_admin_routes
from daemon.api.auth import AUDITED_ATTRIBUTE, ApiAccess, Caller, Denied, Forbidden, authorize
from daemon.api.http_connection import DispatchQuart
from daemon.api.live import LiveHub
from daemon.api.responses import ErrorBody
from daemon.api.routes import (
    PUBLIC_ATTRIBUTE,
    Services,
    TaskService,
    error_response,
    public,
    register_routes,
    services,
)
from daemon.api.schemas import DEFAULT_LIMITS, HttpLimits
from daemon.engine.hosts import HostAdmin
from daemon.ops.audit import ATTEMPTED, DENIED, FAILED, OK, AuditLog, AuditRecord
from daemon.store.database import Database

__all__ = [
    "Caller", "HttpLimits", "Services", "TaskService", "create_app", "public", "serve_http",
    "services",
]  # fmt: skip

logger = logging.getLogger(__name__)

CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# --- errors ---------------------------------------------------------------------------------


_HTTP_ERRORS = {
    400: ("bad_request", "the request is malformed"),
    404: ("not_found", "there is no such API route"),
    405: ("method_not_allowed", "this route does not take that method"),
    408: ("request_timeout", "the request body did not arrive in time"),
    413: ("payload_too_large", "the request body is too large"),
    415: ("unsupported_media_type", "send the body as application/json"),
    431: ("headers_too_large", "the request headers are too large"),
}


def _install_error_handlers(app: QuartTrio, limits: HttpLimits) -> None:
    @app.errorhandler(errors.DispatchError)
    async def dispatch_error(error: errors.DispatchError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error_response(error.status, error.code, error.message, error.field, headers)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Any:
        status = error.code or 500
        if status < 400:
            return error  # redirects
        if status >= 500:
            logger.error("%s %s: %s", request.method, request.path, error.name)
            return error_response(500, "internal", "internal error")
        code, message = _HTTP_ERRORS.get(
            status, (re.sub(r"\W+", "_", error.name.lower()), error.name.lower())
        )
        headers = None
        if status == 413:
            message = f"the request body is larger than {limits.max_body_bytes} bytes"
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            allowed = ", ".join(sorted(error.valid_methods))
            message = f"{request.method} is not allowed here; use {allowed}"
            headers = {"Allow": allowed}
        return error_response(status, code, message, headers=headers)

    @app.errorhandler(peewee.OperationalError)
    @app.errorhandler(peewee.InterfaceError)
    async def database_error(error: peewee.DatabaseError) -> Response:
        logger.error("%s %s: database error", request.method, request.path, exc_info=error)
        return error_response(503, "unavailable", "the database is not answering; try again")

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.path, exc_info=error)
        return error_response(500, "internal", "internal error")


# --- the app --------------------------------------------------------------------------------


def _body_unread() -> bool:
    sent_body = (request.content_length or 0) > 0 or "chunked" in request.headers.get(
        "Transfer-Encoding", ""
    ).lower()
    return sent_body and not g.get("body_read", False)


def create_app(
    *,
    database: Database,
    tasks: TaskService,
    live: LiveHub,
    api_token: str | None,
    limits: HttpLimits = DEFAULT_LIMITS,
    extra_routes: Callable[[QuartTrio], None] | None = None,
    access: ApiAccess | None = None,
    audit: AuditLog | None = None,
    hosts: HostAdmin | None = None,
) -> QuartTrio:
    """The API app. ``api_token`` is the bootstrap admin token; ``None`` runs it WITHOUT
    authentication (development only). ``extra_routes(app)`` adds routes owned elsewhere
    (``/metrics``, the web page); they need a token too unless decorated with ``@public``, and
    an entry in ``daemon.api.auth.ROUTES`` (a route without one is refused to everyone).
    ``access``, ``audit`` and ``hosts`` default to ones over ``database`` alone (no live agent
    registry: revoking a host then changes only its record)."""
    app = DispatchQuart(__name__, static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=limits.max_body_bytes,
        BODY_TIMEOUT=limits.body_timeout_s,
        RESPONSE_TIMEOUT=limits.response_timeout_s,  # the event stream sets its own: none
        PROPAGATE_EXCEPTIONS=False,
    )
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
        info={"title": "dispatchd", "version": __version__},
        security_schemes={"bearerAuth": {"type": "http", "scheme": "bearer"}},
        security=[{"bearerAuth": []}],
    )
    access = access or ApiAccess(database, bootstrap_token=api_token)
    audit = audit or AuditLog(database)
    state = Services(
        database=database,
        tasks=tasks,
        live=live,
        limits=limits,
        event_streams=sse.EventStreams(limits.max_event_streams),
        access=access,
        audit=audit,
        hosts=hosts or HostAdmin(database),
    )
    app.extensions["dispatchd"] = state

    async def record_denial(actor: str, role: str | None, status: int, reason: str) -> None:
        await audit.record(
            AuditRecord(
                actor=actor, action="auth.denied", outcome=DENIED, role=role,
                target=request.endpoint, status=status, address=request.remote_addr or "",
                details={"method": request.method, "path": request.path, "reason": reason},
            )
        )  # fmt: skip

    @app.before_request
    async def authorize_caller() -> None:
        g.dispatch_limits = limits
        view = app.view_functions.get(request.endpoint) if request.endpoint else None
        if view is not None and getattr(view, PUBLIC_ATTRIBUTE, False):
            return
        try:
            caller = await access.authenticate(request.headers)
        except Denied as denied:
            await record_denial(denied.actor, None, 401, denied.reason)
            raise
        g.caller = caller
        try:
            route = authorize(caller, request.endpoint)
        except Forbidden as forbidden:
            await record_denial(caller.actor, caller.role.label, 403, forbidden.message)
            raise
        if route is None or request.method not in CHANGING_METHODS:
            return
        if route.action is None or not getattr(view, AUDITED_ATTRIBUTE, False):
            # fail closed: a change nobody would account for
            logger.error("route %r changes state but is not audited", request.endpoint)
            raise Forbidden("this route is not open to any role")
        target = next(iter((request.view_args or {}).values()), None)
        # written by @audited once the request is valid, before the view changes anything
        g.audit_pending = (
            audit,
            AuditRecord(
                actor=caller.actor, action=route.action, outcome=ATTEMPTED,
                role=caller.role.label, target=str(target) if target is not None else None,
                address=request.remote_addr or "",
                details={"method": request.method, "path": request.path},
            ),
        )  # fmt: skip

    @app.after_request
    async def complete_audit(response: Response) -> Response:
        event_id = g.pop("audit_event", None)
        if event_id is not None:
            status = response.status_code
            target = g.get("audit_target")
            if target is None and (location := response.headers.get("Location")):
                target = location.rstrip("/").rsplit("/", 1)[-1]
            await audit.complete(
                event_id, OK if status < 400 else FAILED, status, target=target,
                details=g.get("audit_details"),
            )  # fmt: skip
        return response

    @app.after_request
    async def common_headers(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.status_code >= 400 and _body_unread():
            # refused before its body was read (401, 413, ...): close the connection rather
            # than read the rest, so a client still sending gets the answer instead of stalling
            response.headers["Connection"] = "close"
        return response

    _install_error_handlers(app, limits)
    register_routes(app, state)
    register_admin_routes(app, state)
    if extra_routes is not None:
        extra_routes(app)
    _document_common_errors(app)
    return app


def _document_common_errors(app: QuartTrio) -> None:
    """List in /openapi.json what every route may answer besides its own: 401 and 403 without a
    valid token or role (all but the public routes), 404 for an id in the path that names
    nothing."""
    for rule in app.url_map.iter_rules():
        view = app.view_functions.get(rule.endpoint)
        if view is None or rule.endpoint == "openapi":
            continue
        schemas = dict(getattr(view, QUART_SCHEMA_RESPONSE_ATTRIBUTE, {}))
        if not getattr(view, PUBLIC_ATTRIBUTE, False):
            schemas.setdefault(401, (ErrorBody, None))
            schemas.setdefault(403, (ErrorBody, None))
        if rule.arguments:
            schemas.setdefault(404, (ErrorBody, None))
        setattr(view, QUART_SCHEMA_RESPONSE_ATTRIBUTE, schemas)


# --- serving --------------------------------------------------------------------------------


async def serve_http(
    app: QuartTrio,
    *,
    listen: str,
    shutdown_trigger: Callable[[], Awaitable[None]],
    backlog: int = 1024,
    graceful_timeout_s: float = 5.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` ("host:port"; port 0 picks one) until ``shutdown_trigger``
    returns; then event streams end, and requests in flight get ``graceful_timeout_s``.
    Reports readiness once listening, with the bound URLs (``["http://127.0.0.1:8080"]``)."""
    config = HypercornConfig()
    config.bind = [listen]
    config.backlog = backlog
    config.graceful_timeout = graceful_timeout_s
    config.accesslog = logging.getLogger("daemon.http.access")
    config.errorlog = logging.getLogger("daemon.http.server")
    config.include_server_header = False
    streams = services(app).event_streams

    async def trigger() -> None:
        await shutdown_trigger()
        streams.close_all()

    await serve(app, config, shutdown_trigger=trigger, task_status=task_status)
