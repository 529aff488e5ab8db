"""dispatchd's settings: one frozen dataclass, loaded once in ``__main__`` and passed down.

Every field is an option: ``--field-name`` on the command line, ``DISPATCH_FIELD_NAME`` in the
environment, ``field_name`` in the ``--config`` TOML file (flags win). Units are in the names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.settings import SettingsError, check, load_settings, setting

ENV_PREFIX = "DISPATCH_"

_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):(\d{1,5})$")


def split_listen(address: str) -> tuple[str, int]:
    """``"0.0.0.0:7443"`` -> ``("0.0.0.0", 7443)``; ``"[::1]:7443"`` -> ``("::1", 7443)``."""
    match = _LISTEN.match(address)
    if not match or int(match.group(2)) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return match.group(1).strip("[]") or "0.0.0.0", int(match.group(2))


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    db: str = setting(
        "sqlite:///./dispatch.db",
        help="database URL: sqlite:///PATH (embedded) or postgresql://USER:PASSWORD@HOST/DB",
        metavar="URL",
    )
    grpc_listen: str = setting("0.0.0.0:7443", help="where agents connect", metavar="HOST:PORT")
    http_listen: str = setting(
        "127.0.0.1:8080", help="where the HTTP API and web page listen", metavar="HOST:PORT"
    )
    agent_token: str | None = setting(
        None,
        help="enrolment token: a new agent presents it once and is given its own credential",
        secret=True,
    )
    agent_token_file: Path | None = setting(None, help="file holding the enrolment token")
    auto_approve: bool = setting(
        False,
        help="admit new hosts that present the enrolment token at once, instead of keeping them "
        "pending until an administrator approves them",
    )
    api_token: str | None = setting(None, help="bearer token for the HTTP API", secret=True)
    api_token_file: Path | None = setting(None, help="file holding the API token")
    insecure: bool = setting(
        False, help="allow running without agent/API tokens (local trials only)"
    )
    tls_cert: Path | None = setting(
        None, help="PEM certificate (chain) of the agent port; with --tls-key", metavar="FILE"
    )
    tls_key: Path | None = setting(None, help="PEM private key of --tls-cert", metavar="FILE")
    tls_client_ca: Path | None = setting(
        None,
        help="PEM CA certificates: agents must present a client certificate signed by one, "
        "naming their host id (mutual TLS)",
        metavar="FILE",
    )
    plaintext: bool = setting(
        False, help="serve the agent port without TLS (trusted networks and local trials only)"
    )

    max_running_executions: int = setting(
        1000, help="daemon-wide limit on executions running at once (the rest wait their turn)"
    )
    max_running_tasks: int = setting(
        20, help="tasks running at once; further started tasks wait, queued, in order"
    )
    agent_grace_s: float = setting(
        30.0,
        help="how long an execution waits for its agent to come back after the agent's "
        "connection dropped (or after a daemon restart) before it is recorded as lost",
    )
    kill_grace_s: float = setting(
        5.0, help="on timeout or cancel, time between SIGTERM and SIGKILL of the process group"
    )
    report_margin_s: float = setting(
        10.0,
        help="extra time given to a connected agent to report an execution's end after its "
        "timeout (or a cancel) before the daemon records it without the agent's word",
    )
    heartbeat_interval_s: float = setting(5.0, help="heartbeat period in both directions")
    max_heartbeats_per_s: float = setting(
        100.0,
        help="heartbeats the whole fleet may send per second each way: a stream's interval "
        "(and TTL) grows beyond --heartbeat-interval-s when this many agents are connected",
    )
    heartbeat_ttl_s: float = setting(
        15.0, help="a stream silent for this long is considered dead and closed"
    )
    hello_timeout_s: float = setting(10.0, help="time an agent has to say hello after connecting")
    max_output_bytes: int = setting(
        1024 * 1024,
        help="output stored per execution and stream: half from the start, half from the end",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, help="largest gRPC message accepted from an agent"
    )
    agent_max_messages_per_s: float = setting(
        500.0,
        help="messages one agent stream may send per second (bursts of twice that); "
        "past it the daemon reads that stream more slowly",
    )
    agent_max_bytes_per_s: int = setting(
        32 * 1024 * 1024, help="bytes one agent stream may send per second (bursts of twice that)"
    )
    grpc_backlog: int = setting(4096, help="listen backlog of the agent port (connect storms)")

    writer_batch_events: int = setting(
        2000, help="largest batch of changes written in one transaction"
    )
    writer_batch_age_s: float = setting(
        0.02, help="longest a change waits for others to share its transaction"
    )
    writer_queue_items: int = setting(
        4096, help="changes queued for the writer before producers wait (backpressure)"
    )
    db_read_threads: int = setting(4, help="threads serving database reads")
    db_busy_timeout_ms: int = setting(5000, help="SQLite: wait this long for a lock")

    http_max_body_bytes: int = setting(1024 * 1024, help="largest HTTP request body")
    max_targets_per_task: int = setting(10000, help="most hosts one task may target")
    sse_buffer_events: int = setting(
        1000, help="live events buffered per watcher before it resyncs from the database"
    )

    shutdown_grace_s: float = setting(
        10.0, help="on SIGTERM, time allowed for the front doors to close and the writer to flush"
    )
    retention_days: float = setting(
        0.0,
        help="delete finished tasks (with their executions and output), audit events and host "
        "connection records older than this many days; 0 keeps everything",
        metavar="DAYS",
    )
    retention_interval_s: float = setting(
        3600.0, help="how often the retention pass runs (when --retention-days is set)"
    )
    retention_batch_tasks: int = setting(
        500,
        help="tasks deleted per transaction by the retention pass (rows of other tables: "
        "ten times as many)",
    )
    retention_pause_s: float = setting(
        0.2,
        help="pause between two retention transactions, so the writer and the API are "
        "never starved",
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    log_json: bool = setting(False, help="log one JSON object per line")

    def __post_init__(self) -> None:
        for name in ("grpc_listen", "http_listen"):
            try:
                split_listen(getattr(self, name))
            except ValueError as exc:
                raise SettingsError("--" + name.replace("_", "-"), str(exc)) from None
        positive = (
            "max_running_executions", "agent_max_messages_per_s", "agent_max_bytes_per_s",
            "max_running_tasks", "heartbeat_interval_s", "max_heartbeats_per_s",
            "hello_timeout_s", "max_output_bytes", "max_message_bytes", "grpc_backlog",
            "writer_batch_events", "writer_batch_age_s",
            "writer_queue_items", "db_read_threads", "http_max_body_bytes",
            "max_targets_per_task", "sse_buffer_events", "shutdown_grace_s", "db_busy_timeout_ms",
            "retention_interval_s", "retention_batch_tasks",
        )  # fmt: skip
        for name in positive:
            check(getattr(self, name) > 0, "--" + name.replace("_", "-"), "must be greater than 0")
        for name in ("agent_grace_s", "kill_grace_s", "report_margin_s", "retention_days",
                     "retention_pause_s"):  # fmt: skip
            check(getattr(self, name) >= 0, "--" + name.replace("_", "-"), "must not be negative")
        check(
            self.heartbeat_ttl_s > self.heartbeat_interval_s,
            "--heartbeat-ttl-s",
            "must be longer than --heartbeat-interval-s",
        )
        check(self.max_output_bytes >= 2, "--max-output-bytes", "must be at least 2")
        check(
            self.log_level.lower() in ("debug", "info", "warning", "error"),
            "--log-level",
            "must be debug, info, warning or error",
        )
        check(
            self.db.startswith(("sqlite:///", "postgresql://", "postgres://")),
            "--db",
            "must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB",
        )
        check(
            (self.tls_cert is None) == (self.tls_key is None),
            "--tls-cert" if self.tls_cert is None else "--tls-key",
            "--tls-cert and --tls-key go together",
        )
        check(
            self.tls_client_ca is None or self.tls_cert is not None,
            "--tls-client-ca",
            "needs --tls-cert and --tls-key (mutual TLS is TLS first)",
        )
        check(
            not (self.plaintext and self.tls_cert is not None),
            "--plaintext",
            "give --tls-cert/--tls-key or --plaintext, not both",
        )
        for token, token_file in (
            ("agent_token", "agent_token_file"),
            ("api_token", "api_token_file"),
        ):
            check(
                getattr(self, token) is None or getattr(self, token_file) is None,
                "--" + token.replace("_", "-"),
                f"give --{token.replace('_', '-')} or --{token_file.replace('_', '-')}, not both",
            )

    def resolved_agent_token(self) -> str | None:
        return _token(self.agent_token, self.agent_token_file, "--agent-token-file")

    def resolved_api_token(self) -> str | None:
        return _token(self.api_token, self.api_token_file, "--api-token-file")


def _token(value: str | None, path: Path | None, option: str) -> str | None:
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SettingsError(option, f"cannot read {path}: {exc.strerror}") from None
        if not value:
            raise SettingsError(option, f"{path} is empty")
    if value is not None and len(value) < 16:
        raise SettingsError(option.removesuffix("-file"), "tokens must be at least 16 characters")
    return value


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> DaemonConfig:
    config = load_settings(
        DaemonConfig,
        argv,
        environ,
        prog="dispatchd",
        description="devops-dispatch daemon: agents connect here; the HTTP API and web page "
        "are served here.",
        env_prefix=ENV_PREFIX,
    )
    agent_token, api_token = config.resolved_agent_token(), config.resolved_api_token()
    if config.tls_cert is None and not config.plaintext:
        raise SettingsError(
            "--tls-cert",
            "the agent port needs TLS: give --tls-cert FILE and --tls-key FILE (and "
            "--tls-client-ca FILE for mutual TLS), or --plaintext to serve it unencrypted",
        )
    if not config.insecure:
        if agent_token is None:
            raise SettingsError(
                "--agent-token", "is required (or --insecure for a local trial without tokens)"
            )
        if api_token is None:
            raise SettingsError(
                "--api-token", "is required (or --insecure for a local trial without tokens)"
            )
    return config
