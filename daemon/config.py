"""dispatchd's settings: one frozen settings model, loaded once in ``__main__`` and passed down.

Every field is an option: ``--field-name`` on the command line, ``DISPATCH_FIELD_NAME`` in the
environment, ``field_name`` in the ``--config`` TOML file (flags win; ``common.settings``). Units
are in the names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from pydantic import field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import (
    Settings,
    SettingsError,
    UserPath,
    check,
    load_settings,
    setting,
)

ENV_PREFIX = "DISPATCH_"

_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):(\d{1,5})$")


def split_listen(address: str) -> tuple[str, int]:
    """``"0.0.0.0:7443"`` -> ``("0.0.0.0", 7443)``; ``"[::1]:7443"`` -> ``("::1", 7443)``."""
    match = _LISTEN.match(address)
    if not match or int(match.group(2)) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return match.group(1).strip("[]") or "0.0.0.0", int(match.group(2))


class DaemonConfig(Settings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

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
    agent_token_file: UserPath | None = setting(None, help="file holding the enrolment token")
    auto_approve: bool = setting(
        False,
        help="admit new hosts that present the enrolment token at once, instead of keeping them "
        "pending until an administrator approves them",
    )
    api_token: str | None = setting(None, help="bearer token for the HTTP API", secret=True)
    api_token_file: UserPath | None = setting(None, help="file holding the API token")
    insecure: bool = setting(
        False, help="allow running without agent/API tokens (local trials only)"
    )
    tls_cert: UserPath | None = setting(
        None, help="PEM certificate (chain) of the agent port; with --tls-key", metavar="FILE"
    )
    tls_key: UserPath | None = setting(None, help="PEM private key of --tls-cert", metavar="FILE")
    tls_client_ca: UserPath | None = setting(
        None,
        help="PEM CA certificates: agents must present a client certificate signed by one, "
        "naming their host id (mutual TLS)",
        metavar="FILE",
    )
    plaintext: bool = setting(
        False, help="serve the agent port without TLS (trusted networks and local trials only)"
    )

    max_running_executions: int = setting(
        1000,
        gt=0,
        help="daemon-wide limit on executions running at once (the rest wait their turn)",
    )
    max_running_tasks: int = setting(
        20, gt=0, help="tasks running at once; further started tasks wait, queued, in order"
    )
    agent_grace_s: float = setting(
        30.0,
        ge=0,
        help="how long an execution waits for its agent to come back after the agent's "
        "connection dropped (or after a daemon restart) before it is recorded as lost",
    )
    kill_grace_s: float = setting(
        5.0,
        ge=0,
        help="on timeout or cancel, time between SIGTERM and SIGKILL of the process group",
    )
    report_margin_s: float = setting(
        10.0,
        ge=0,
        help="extra time given to a connected agent to report an execution's end after its "
        "timeout (or a cancel) before the daemon records it without the agent's word",
    )
    heartbeat_interval_s: float = setting(5.0, gt=0, help="heartbeat period in both directions")
    max_heartbeats_per_s: float = setting(
        100.0,
        gt=0,
        help="heartbeats the whole fleet may send per second each way: a stream's interval "
        "(and TTL) grows beyond --heartbeat-interval-s when this many agents are connected",
    )
    heartbeat_ttl_s: float = setting(
        15.0, help="a stream silent for this long is considered dead and closed"
    )
    hello_timeout_s: float = setting(
        10.0, gt=0, help="time an agent has to say hello after connecting"
    )
    max_output_bytes: int = setting(
        1024 * 1024,
        ge=2,
        help="output stored per execution and stream: half from the start, half from the end",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, gt=0, help="largest gRPC message accepted from an agent"
    )
    agent_max_messages_per_s: float = setting(
        500.0,
        gt=0,
        help="messages one agent stream may send per second (bursts of twice that); "
        "past it the daemon reads that stream more slowly",
    )
    agent_max_bytes_per_s: int = setting(
        32 * 1024 * 1024,
        gt=0,
        help="bytes one agent stream may send per second (bursts of twice that)",
    )
    grpc_backlog: int = setting(
        4096, gt=0, help="listen backlog of the agent port (connect storms)"
    )

    writer_batch_events: int = setting(
        2000, gt=0, help="largest batch of changes written in one transaction"
    )
    writer_batch_age_s: float = setting(
        0.02, gt=0, help="longest a change waits for others to share its transaction"
    )
    writer_queue_items: int = setting(
        4096, gt=0, help="changes queued for the writer before producers wait (backpressure)"
    )
    db_read_threads: int = setting(4, gt=0, help="threads serving database reads")
    db_busy_timeout_ms: int = setting(5000, gt=0, help="SQLite: wait this long for a lock")

    http_max_body_bytes: int = setting(1024 * 1024, gt=0, help="largest HTTP request body")
    max_targets_per_task: int = setting(10000, gt=0, help="most hosts one task may target")
    sse_buffer_events: int = setting(
        1000, gt=0, help="live events buffered per watcher before it resyncs from the database"
    )

    shutdown_grace_s: float = setting(
        10.0,
        gt=0,
        help="on SIGTERM, time allowed for the front doors to close and the writer to flush",
    )
    retention_days: float = setting(
        0.0,
        ge=0,
        help="delete finished tasks (with their executions and output), audit events and host "
        "connection records older than this many days; 0 keeps everything",
        metavar="DAYS",
    )
    retention_interval_s: float = setting(
        3600.0, gt=0, help="how often the retention pass runs (when --retention-days is set)"
    )
    retention_batch_tasks: int = setting(
        500,
        gt=0,
        help="tasks deleted per transaction by the retention pass (rows of other tables: "
        "ten times as many)",
    )
    retention_pause_s: float = setting(
        0.2,
        ge=0,
        help="pause between two retention transactions, so the writer and the API are "
        "never starved",
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    log_json: bool = setting(False, help="log one JSON object per line")

    @field_validator("grpc_listen", "http_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return value

    @field_validator("db")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check(
            self.heartbeat_ttl_s > self.heartbeat_interval_s,
            "--heartbeat-ttl-s",
            "must be longer than --heartbeat-interval-s",
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
        check(
            self.agent_token is None or self.agent_token_file is None,
            "--agent-token",
            "give --agent-token or --agent-token-file, not both",
        )
        check(
            self.api_token is None or self.api_token_file is None,
            "--api-token",
            "give --api-token or --api-token-file, not both",
        )
        return self

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
