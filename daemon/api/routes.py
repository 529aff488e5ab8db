"""The routes of the HTTP API (API.md) over the daemon's services, and the JSON they answer.

Each route validates its input (``daemon.api.parsing``), reads through ``Database.read`` into
``store.queries``/``store.stats``, or changes things through the task service, and answers
with records rendered by ``store.views``. Authentication and error bodies: ``daemon.api.app``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from quart import Response, request
from quart_schema import document_headers, document_response, security_scheme
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioResponse

from daemon import errors
from daemon.api import sse
from daemon.api.admin_schemas import HostListQueryWithEnrollment
from daemon.api.auth import ApiAccess, audited
from daemon.api.live import LiveHub
from daemon.api.parsing import (
    idempotency_key,
    json_body,
    last_event_id,
    path_id,
    query_args,
    statuses,
    task_spec,
    time_range,
)
from daemon.api.responses import (
    ErrorBody,
    ExecutionDetailOut,
    ExecutionPage,
    Health,
    HostDetailOut,
    HostPage,
    TaskOut,
    TaskPage,
    TaskStatsOut,
)
from daemon.api.schemas import (
    EventsQuery,
    ExecutionListQuery,
    HttpLimits,
    IdempotencyHeaders,
    OutputQuery,
    RetryQuery,
    TaskCreate,
    TaskListQuery,
)
from daemon.engine.hosts import HostAdmin
from daemon.identifiers import HOST_ID
from daemon.ops.audit import AuditLog
from daemon.store import queries, stats
from daemon.store.database import Database
from daemon.taskspec import TaskSpec

API = "/api/v1"
PUBLIC_ATTRIBUTE = "_dispatch_public"


class TaskService(Protocol):
    """The task use cases (``daemon.engine.tasks``) as the HTTP layer calls them."""

    async def create(self, spec: TaskSpec, *, start: bool, idempotency_key: str | None) -> int: ...
    async def start(self, task_id: int) -> None: ...
    async def cancel(self, task_id: int) -> None: ...
    async def retry(self, task_id: int, *, only: str) -> int: ...


def public(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a route as open to anyone (no token). Use sparingly: the test suite lists them."""
    setattr(view, PUBLIC_ATTRIBUTE, True)
    return security_scheme([])(view)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return TrioResponse(
        body.encode("utf-8", "backslashreplace"),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict | None = None
) -> Response:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return json_response({"error": error}, status, headers)


@dataclass
class Services:
    """What the routes use; ``app.extensions["dispatchd"]``."""

    database: Database
    tasks: TaskService
    live: LiveHub
    limits: HttpLimits
    event_streams: sse.EventStreams
    access: ApiAccess
    audit: AuditLog
    hosts: HostAdmin


def services(app: QuartTrio) -> Services:
    return app.extensions["dispatchd"]


def register_routes(app: QuartTrio, state: Services) -> None:
    database, tasks, limits = state.database, state.tasks, state.limits

    async def read_task(task_id: int) -> dict[str, Any]:
        task = await database.read(queries.get_task, task_id)
        if task is None:
            raise errors.NotFound(f"there is no task {task_id}")
        return task

    @app.get("/healthz")
    @public
    @document_response(Health)
    async def healthz() -> Response:
        """Liveness: the daemon answers."""
        return json_response({"status": "ok"})

    @app.get(f"{API}/hosts")
    @query_args(HostListQueryWithEnrollment)
    @document_response(HostPage)
    @document_response(ErrorBody, 400)
    async def list_hosts(args: HostListQueryWithEnrollment) -> Response:
        """Hosts by id, filtered by status, enrolment state and labels."""
        status = args.status.value if args.status is not None else None
        enrollment = args.enrollment.value if args.enrollment is not None else None
        limit = args.limit or limits.default_page_size
        page = await database.read(
            queries.list_hosts, status, args.label_selectors(), limit, args.cursor, enrollment
        )
        return json_response({"items": page.items, "next_cursor": page.next_cursor})

    @app.get(f"{API}/hosts/<host_id>")
    @document_response(HostDetailOut)
    @document_response(ErrorBody, 404)
    async def get_host(host_id: str) -> Response:
        """One host with its newest connection records."""
        if HOST_ID.fullmatch(host_id) is None:
            raise errors.NotFound(f"there is no host {host_id[:40]!r}")
        host = await database.read(queries.get_host, host_id, limits.max_connections_shown)
        if host is None:
            raise errors.NotFound(f"there is no host {host_id!r}")
        return json_response(host)

    @app.post(f"{API}/tasks")
    @json_body(TaskCreate)
    @document_headers(IdempotencyHeaders)
    @document_response(TaskOut, 201)
    @document_response(ErrorBody, 400)
    @document_response(ErrorBody, 409)
    @audited
    async def create_task(body: TaskCreate) -> Response:
        """Create a task (and start it with "start": true)."""
        task_id = await tasks.create(
            task_spec(body), start=body.start, idempotency_key=idempotency_key()
        )
        task = await read_task(task_id)
        return json_response(task, 201, {"Location": f"{API}/tasks/{task_id}"})

    @app.get(f"{API}/tasks")
    @query_args(TaskListQuery)
    @document_response(TaskPage)
    @document_response(ErrorBody, 400)
    async def list_tasks(args: TaskListQuery) -> Response:
        """Tasks, newest first; since/until filter on created_at."""
        since, until = time_range(args)
        filters = queries.TaskFilter(statuses(args.status), args.host, since, until)
        page = await database.read(queries.list_tasks, filters, args.page_size(limits), args.cursor)
        return json_response({"items": page.items, "next_cursor": page.next_cursor})

    @app.get(f"{API}/tasks/<task_id>")
    @document_response(TaskOut)
    @document_response(ErrorBody, 404)
    async def get_task(task_id: str) -> Response:
        """One task with its progress."""
        return json_response(await read_task(path_id(task_id, "task")))

    @app.post(f"{API}/tasks/<task_id>/start")
    @document_response(TaskOut, 202)
    @document_response(ErrorBody, 409)
    @audited
    async def start_task(task_id: str) -> Response:
        """Start a pending task."""
        number = path_id(task_id, "task")
        await tasks.start(number)
        return json_response(await read_task(number), 202)

    @app.post(f"{API}/tasks/<task_id>/cancel")
    @document_response(TaskOut, 202)
    @document_response(ErrorBody, 409)
    @audited
    async def cancel_task(task_id: str) -> Response:
        """Cancel a task that has not finished (asking twice is fine)."""
        number = path_id(task_id, "task")
        await tasks.cancel(number)
        return json_response(await read_task(number), 202)

    @app.post(f"{API}/tasks/<task_id>/retry")
    @query_args(RetryQuery)
    @document_response(TaskOut, 201)
    @document_response(ErrorBody, 409)
    @audited
    async def retry_task(task_id: str, args: RetryQuery) -> Response:
        """A new task over the hosts that did not succeed."""
        new_id = await tasks.retry(path_id(task_id, "task"), only=args.only)
        task = await read_task(new_id)
        return json_response(task, 201, {"Location": f"{API}/tasks/{new_id}"})

    @app.get(f"{API}/tasks/<task_id>/stats")
    @document_response(TaskStatsOut)
    @document_response(ErrorBody, 404)
    async def task_stats(task_id: str) -> Response:
        """Counts by status and exit code, durations, groups of identical results."""
        number = path_id(task_id, "task")
        result = await database.read(
            functools.partial(
                stats.task_stats,
                max_groups=limits.stats_max_groups,
                hosts_per_group=limits.stats_hosts_per_group,
                preview_bytes=limits.stats_preview_bytes,
            ),
            number,
        )
        if result is None:
            raise errors.NotFound(f"there is no task {number}")
        return json_response(result)

    async def executions_page(args: ExecutionListQuery, task_id: int | None) -> Response:
        since, until = time_range(args)
        filters = queries.ExecutionFilter(task_id, statuses(args.status), args.host, since, until)
        page = await database.read(
            queries.list_executions, filters, args.page_size(limits), args.cursor
        )
        if page is None:
            raise errors.NotFound(f"there is no task {task_id}")
        return json_response({"items": page.items, "next_cursor": page.next_cursor})

    @app.get(f"{API}/tasks/<task_id>/executions")
    @query_args(ExecutionListQuery)
    @document_response(ExecutionPage)
    @document_response(ErrorBody, 400)
    async def list_task_executions(task_id: str, args: ExecutionListQuery) -> Response:
        """A task's executions by id; since/until filter on started_at."""
        return await executions_page(args, path_id(task_id, "task"))

    @app.get(f"{API}/executions")
    @query_args(ExecutionListQuery)
    @document_response(ExecutionPage)
    @document_response(ErrorBody, 400)
    async def list_executions(args: ExecutionListQuery) -> Response:
        """Executions of all tasks, newest first (audit); since/until filter on started_at."""
        return await executions_page(args, None)

    @app.get(f"{API}/executions/<execution_id>")
    @document_response(ExecutionDetailOut)
    @document_response(ErrorBody, 404)
    async def get_execution(execution_id: str) -> Response:
        """One execution with its stored output as text."""
        number = path_id(execution_id, "execution")
        execution = await database.read(queries.get_execution, number)
        if execution is None:
            raise errors.NotFound(f"there is no execution {number}")
        return json_response(execution)

    @app.get(f"{API}/executions/<execution_id>/output")
    @query_args(OutputQuery)
    @document_response(ErrorBody, 404)
    async def execution_output(execution_id: str, args: OutputQuery) -> Response:
        """The stored bytes of one stream, exactly (application/octet-stream).

        X-Output-Total-Bytes: what the process wrote; X-Output-Omitted-Bytes: what was not
        stored; X-Output-Ranges: the stored byte ranges (start-end, end exclusive)."""
        number = path_id(execution_id, "execution")
        output = await database.read(queries.execution_output, number, args.stream)
        if output is None:
            raise errors.NotFound(f"there is no execution {number}")
        headers = {
            "X-Output-Total-Bytes": str(output.total_bytes),
            "X-Output-Omitted-Bytes": str(output.omitted_bytes),
            "X-Output-Ranges": ",".join(f"{start}-{end}" for start, end in output.ranges),
        }
        return TrioResponse(output.data, headers=headers, content_type="application/octet-stream")

    @app.get(f"{API}/tasks/<task_id>/events")
    @query_args(EventsQuery)
    @document_response(ErrorBody, 404)
    async def task_events(task_id: str, args: EventsQuery) -> Response:
        """Live events of a task (text/event-stream): task, execution, output, progress, end.

        Reconnect with Last-Event-ID (or ?last_event_id=) to get every change after it."""
        number = path_id(task_id, "task")
        resume = last_event_id(args)
        if not await database.read(queries.task_exists, number):
            raise errors.NotFound(f"there is no task {number}")
        if request.method == "HEAD":  # headers only: no stream to hold open
            return TrioResponse(b"", content_type="text/event-stream; charset=utf-8")
        if state.event_streams.full():
            raise errors.Unavailable("too many open event streams; try again later")
        body = sse.task_events(
            database=database,
            live=state.live,
            streams=state.event_streams,
            task_id=number,
            last_event_id=resume,
            include_output=args.output,
            keepalive_s=limits.sse_keepalive_s,
            replay_batch=limits.sse_replay_batch,
        )
        response = TrioResponse(body, content_type="text/event-stream; charset=utf-8")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None  # long-lived: no response timeout
        return response
