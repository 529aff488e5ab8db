"""The HTTP API of dispatchd (API.md): routes, authentication, error bodies, and serving them.

``create_app`` builds the quart-trio app over the daemon's services; ``serve_http`` runs it on
hypercorn's trio worker in the caller's nursery. Requests are validated by the pydantic models of
``daemon.api_schemas`` (the same models ``/openapi.json`` is generated from), reads go through
``Database.read`` into ``daemon.queries``/``daemon.stats``, changes through the task service.

Every route needs ``Authorization: Bearer <token>`` except those marked ``@public``
(``/healthz``); an ``Authenticate`` function (``bearer_token_auth`` by default) is the one seam
that decides who the caller is (``g.identity``). Every 4xx/5xx
answer is ``{"error": {"code", "message", "field"?}}``: unknown routes, wrong methods, malformed
JSON, oversized bodies and unexpected exceptions (logged with their traceback, answered
``internal`` with no details) included.

Status codes beyond API.md: 202 with the task for start and cancel, 201 with the new task (and a
``Location``) for create (a replay with the same Idempotency-Key and body too) and retry, 400
``invalid_request`` with ``field`` for a bad value, 400 ``invalid_json`` for a body that is not
JSON, 401 ``unauthorized``, 404 ``not_found`` (also for ids that are not ids), 405
``method_not_allowed``, 408 ``request_timeout``, 413 ``payload_too_large``, 415
``unsupported_media_type`` (a body that is not application/json), 503 ``unavailable`` (database
failing, too many event streams).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import peewee
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, g, request
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from daemon import __version__, errors, sse
from daemon.api_schemas import DEFAULT_LIMITS, HttpLimits
from daemon.database import Database
from daemon.http_routes import (
    PUBLIC_ATTRIBUTE,
    Services,
    TaskService,
    error_response,
    public,
    register_routes,
    services,
)
from daemon.live import LiveHub

__all__ = [
    "HttpLimits", "Identity", "Services", "TaskService", "bearer_token_auth", "create_app",
    "public", "serve_http", "services",
]  # fmt: skip

logger = logging.getLogger(__name__)


# --- authentication -------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who is calling. Roles and per-user tokens come later; they extend this."""

    name: str
    authenticated: bool


Authenticate = Callable[[Headers], Identity]


def bearer_token_auth(api_token: str | None) -> Authenticate:
    """One shared API token, compared in constant time. ``None`` turns authentication OFF:
    every caller is ``anonymous`` (for development only; the daemon logs a warning)."""
    if api_token is None:
        logger.warning("the HTTP API runs WITHOUT authentication (no API token configured)")

        def anonymous(headers: Headers) -> Identity:
            return Identity("anonymous", authenticated=False)

        return anonymous
    expected = api_token.encode()

    def authenticate(headers: Headers) -> Identity:
        scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthorized("send the API token as 'Authorization: Bearer <token>'")
        # headers arrive decoded as latin-1: encoding back gives the bytes that were sent
        if not hmac.compare_digest(token.strip().encode("latin-1"), expected):
            raise errors.Unauthorized("the API token is not valid")
        return Identity("api-token", authenticated=True)

    return authenticate


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
    authenticate: Authenticate | None = None,
) -> QuartTrio:
    """The API app. ``api_token=None`` runs it WITHOUT authentication (development only).
    ``extra_routes(app)`` adds routes owned elsewhere (``/metrics``, the web page); they need
    the token too unless decorated with ``@public``. ``authenticate`` replaces the one-token
    check (``bearer_token_auth(api_token)``) with another way to tell who the caller is."""
    app = QuartTrio(__name__, static_folder=None)
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
    authenticate_caller = authenticate or bearer_token_auth(api_token)
    state = Services(
        database=database,
        tasks=tasks,
        live=live,
        limits=limits,
        event_streams=sse.EventStreams(limits.max_event_streams),
    )
    app.extensions["dispatchd"] = state

    @app.before_request
    async def identify_caller() -> None:
        g.dispatch_limits = limits
        view = app.view_functions.get(request.endpoint) if request.endpoint else None
        if view is not None and getattr(view, PUBLIC_ATTRIBUTE, False):
            return
        g.identity = authenticate_caller(request.headers)

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
    if extra_routes is not None:
        extra_routes(app)
    return app


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
