"""dispatchd's lifetimes, nested so the shutdown order reads in the code.

    database
      writer                      exits last: writes everything queued before it
        work (scheduler, dispatcher, presence)
          front doors (agent port, HTTP)   exit first

On SIGTERM/SIGINT (trio owns the signals, here and nowhere else): the front doors close (agent
streams end and are recorded, HTTP stops), then running work is cancelled without being
recorded as cancelled (executions stay in flight on the agents and are resumed on restart),
then the writer flushes. The next start resumes running tasks and collects what the agents'
journals hold.
"""

from __future__ import annotations

import functools
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response
from quart_trio import QuartTrio

from common import tls
from common.sd_notify import Notifier
from daemon import __version__
from daemon.agents import grpc_bridge
from daemon.agents.acks import serve_acks
from daemon.agents.admission import SessionManager
from daemon.agents.enrollment import Enrollment
from daemon.agents.registry import Registry
from daemon.agents.throttle import StreamLimits
from daemon.api import web_routes
from daemon.api.app import create_app, serve_http
from daemon.api.auth import ApiAccess
from daemon.api.live import LiveHub
from daemon.api.schemas import HttpLimits
from daemon.config import DaemonConfig, split_listen
from daemon.engine.dispatcher import Dispatcher
from daemon.engine.executions import ExecutionLimits
from daemon.engine.fleet import Presence
from daemon.engine.hosts import HostAdmin
from daemon.engine.records import DatabaseRecords
from daemon.engine.scheduler import Scheduler
from daemon.engine.tasks import TaskService
from daemon.errors import StartupError
from daemon.ops.audit import AuditLog
from daemon.ops.metrics import Metrics
from daemon.ops.transition_metrics import TransitionMetrics
from daemon.store import host_records, models
from daemon.store.database import Database
from daemon.store.retention import Retention
from daemon.store.writer import open_writer

logger = logging.getLogger(__name__)

_PRESENCE_INTERVAL_S = 30.0
_PRESENCE_BUFFER = 1024  # agents arriving or leaving not yet seen by the engine


@dataclass(frozen=True)
class Addresses:
    grpc: tuple[str, int]
    http: tuple[str, int]


async def serve(
    config: DaemonConfig,
    *,
    shutdown: trio.Event | None = None,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``shutdown`` is set); ``notifier`` tells systemd
    when both doors listen (READY=1) and when shutdown begins (STOPPING=1)."""
    shutdown = shutdown or trio.Event()
    notifier = notifier or Notifier(None)
    agent_tls = _agent_port_tls(config)
    database = await _open_database(config)
    offline = await database.write(host_records.reset_presence, time.time())
    if offline:
        logger.info(
            "%d hosts were online when the daemon last stopped; they reconnect now", offline
        )
    async with open_writer(
        database, max_output_bytes=config.max_output_bytes,
        queue_items=config.writer_queue_items, batch_events=config.writer_batch_events,
        batch_age_s=config.writer_batch_age_s, close_timeout_s=config.shutdown_grace_s,
    ) as writer:  # fmt: skip
        # Who reacts to what the writer committed, each reading its own subscription.
        commits_for_engine = writer.feed.subscribe("engine")
        commits_for_acks = writer.feed.subscribe("acks")
        commits_for_live = writer.feed.subscribe("live")
        commits_for_metrics = writer.feed.subscribe("metrics")
        presence_send, presence_receive = trio.open_memory_channel[Presence](_PRESENCE_BUFFER)
        registry = Registry(presence=presence_send)
        records = DatabaseRecords(database)
        dispatcher = Dispatcher(
            writer=writer, records=records, fleet=registry,
            max_running_executions=config.max_running_executions,
            limits=ExecutionLimits(
                agent_grace_s=config.agent_grace_s, kill_grace_s=config.kill_grace_s,
                report_margin_s=config.report_margin_s, max_output_bytes=config.max_output_bytes,
            ),
        )  # fmt: skip
        scheduler = Scheduler(dispatcher, records, max_running_tasks=config.max_running_tasks)
        tasks = TaskService(
            database=database, writer=writer, scheduler=scheduler, dispatcher=dispatcher,
            max_targets=config.max_targets_per_task,
        )  # fmt: skip
        audit = AuditLog(database)
        enrollment = Enrollment(
            database, enrolment_token=config.resolved_agent_token(),
            auto_approve=config.auto_approve, require_certificate=config.tls_client_ca is not None,
        )  # fmt: skip
        sessions = SessionManager(
            registry=registry, writer=writer, database=database, authenticator=enrollment,
            hello_timeout_s=config.hello_timeout_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_ttl_s=config.heartbeat_ttl_s, daemon_version=__version__, audit=audit,
            stream_limits=StreamLimits(config.agent_max_messages_per_s,
                                       config.agent_max_bytes_per_s),
            max_heartbeats_per_s=config.max_heartbeats_per_s,
        )  # fmt: skip
        retention = Retention(
            database, days=config.retention_days, interval_s=config.retention_interval_s,
            batch_tasks=config.retention_batch_tasks, pause_s=config.retention_pause_s,
        )  # fmt: skip
        live = LiveHub(buffer_events=config.sse_buffer_events)
        transitions = TransitionMetrics()
        metrics = Metrics({
            "registry": registry.statistics, "writer": writer.statistics,
            "dispatcher": dispatcher.statistics, "scheduler": scheduler.statistics,
            "live": live.statistics, "database": database.statistics, "audit": audit.statistics,
            "retention": retention.statistics,
        }, database=database, transitions=transitions)  # fmt: skip
        app = create_app(
            database=database, tasks=tasks, live=live, api_token=config.resolved_api_token(),
            access=ApiAccess(database, bootstrap_token=config.resolved_api_token()), audit=audit,
            hosts=HostAdmin(database, fleet=registry, dispatcher=dispatcher),
            limits=HttpLimits(
                max_body_bytes=config.http_max_body_bytes,
                max_targets=config.max_targets_per_task,
                sse_buffer_events=config.sse_buffer_events,
            ),
            extra_routes=functools.partial(
                _extra_routes, render=metrics.render, refresh=metrics.refresh
            ),
        )  # fmt: skip
        async with trio.open_nursery() as work:
            await work.start(dispatcher.serve, commits_for_engine, presence_receive)
            await work.start(serve_acks, commits_for_acks)
            await work.start(live.serve, commits_for_live, database)
            await work.start(transitions.serve, commits_for_metrics)
            await work.start(scheduler.serve)
            await work.start(retention.serve)
            await work.start(sessions.serve_liveness)
            await work.start(
                functools.partial(sessions.serve_presence, interval_s=_PRESENCE_INTERVAL_S)
            )
            async with trio.open_nursery() as doors:
                doors.start_soon(_wait_for_signal, shutdown)
                agent_port = trio.CancelScope()
                grpc_host, grpc_port = split_listen(config.grpc_listen)
                grpc_address = await _start_door(doors, "agent port", config.grpc_listen,
                    functools.partial(
                        _serve_in, agent_port, grpc_bridge.serve_grpc, sessions.handle_stream,
                        host=grpc_host,
                        port=grpc_port, backlog=config.grpc_backlog,
                        max_message_bytes=config.max_message_bytes,
                        close_timeout_s=config.shutdown_grace_s, tls=agent_tls,
                    ),
                )  # fmt: skip
                http_urls = await _start_door(doors, "HTTP", config.http_listen,
                    functools.partial(serve_http, app, listen=config.http_listen,
                                      shutdown_trigger=shutdown.wait,
                                      graceful_timeout_s=config.shutdown_grace_s),
                )  # fmt: skip
                http_address = split_listen(http_urls[0].removeprefix("http://"))
                logger.info(
                    "dispatchd %s ready: agents connect to %s:%s, HTTP API on http://%s:%s",
                    __version__,
                    *grpc_address,
                    *http_address,
                )
                task_status.started(Addresses(grpc_address, http_address))
                notifier.ready(f"agents on {grpc_address[0]}:{grpc_address[1]}, "
                               f"HTTP on {http_address[0]}:{http_address[1]}")  # fmt: skip
                await shutdown.wait()
                notifier.stopping("closing the agent port and the HTTP API")
                logger.info("shutting down: closing the agent port and the HTTP API")
                # The agent port closes now (its streams are recorded as they end); the HTTP
                # server stops on the same trigger and gives requests in flight the grace. The
                # deadline only bounds both, should either hang.
                agent_port.cancel()
                doors.cancel_scope.deadline = trio.current_time() + config.shutdown_grace_s + 1
            logger.info("stopping work in progress; running executions resume on restart")
            work.cancel_scope.cancel()
    logger.info("the writer has flushed; dispatchd stopped")


def _extra_routes(
    app: QuartTrio,
    *,
    render: Callable[[], bytes],
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Routes owned outside the API modules: /metrics and the web console."""
    _metrics_route(app, render=render, refresh=refresh)
    web_routes.register_web_routes(app)


def _metrics_route(
    app: QuartTrio,
    *,
    render: Callable[[], bytes],
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> None:
    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        if refresh is not None:
            await refresh()
        return Response(render(), content_type=CONTENT_TYPE_LATEST)


def _agent_port_tls(config: DaemonConfig) -> ssl.SSLContext | None:
    """The agent port's TLS context; None only with an explicit --plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        if not config.plaintext:
            raise StartupError(
                "the agent port needs TLS: give --tls-cert and --tls-key, or --plaintext"
            )
        logger.warning("the agent port runs WITHOUT TLS (--plaintext)")
        return None
    try:
        return tls.server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    except tls.TlsConfigError as exc:
        raise StartupError(str(exc)) from None


async def _open_database(config: DaemonConfig) -> Database:
    try:
        db = models.open_database(
            config.db, max_connections=config.db_read_threads + 4,
            busy_timeout_ms=config.db_busy_timeout_ms,
        )  # fmt: skip
        models.bind(db)
        await trio.to_thread.run_sync(models.create_schema, db)
    except (models.DatabaseUrlError, RuntimeError) as exc:
        raise StartupError(f"database {config.db}: {exc}") from None
    except Exception as exc:  # the driver's own error for an unreachable or unwritable database
        raise StartupError(f"cannot open the database {config.db}: {exc}") from exc
    return Database(db, read_threads=config.db_read_threads)


async def _start_door(
    nursery: trio.Nursery, what: str, address: str, serve: functools.partial
) -> tuple[str, int]:  # type: ignore[type-arg]
    try:
        bound: tuple[str, int] = await nursery.start(serve)
    except OSError as exc:
        raise StartupError(f"cannot listen for the {what} on {address}: {exc.strerror}") from None
    return bound


async def _serve_in(
    scope: trio.CancelScope,
    serve: Callable[..., Awaitable[None]],
    *args: Any,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    **kwargs: Any,
) -> None:
    """``serve`` until ``scope`` is cancelled (a door closed on its own, before the others)."""
    with scope:
        await serve(*args, task_status=task_status, **kwargs)


async def _wait_for_signal(shutdown: trio.Event) -> None:
    """Until SIGTERM/SIGINT (which sets ``shutdown``) or ``shutdown`` is set otherwise."""
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("received %s", signal.Signals(signum).name)
                    shutdown.set()
                    return

        nursery.start_soon(on_signal)
        await shutdown.wait()
        nursery.cancel_scope.cancel()
