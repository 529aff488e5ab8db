"""The agent's settings: one frozen settings model, loaded once in ``__main__``.

Flags, ``DISPATCH_AGENT_*`` environment variables and ``--config`` TOML keys all derive from the
fields (``common.settings``). Nothing below ``__main__`` reads the environment or the token file.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from pydantic import field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import (
    KeyValues,
    Settings,
    SettingsError,
    UserPath,
    check,
    load_settings,
    setting,
)
from common.tls import client_context

ENV_PREFIX = "DISPATCH_AGENT_"
KIB = 1024
MIB = 1024 * KIB

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class AgentConfig(Settings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    server: str = setting(help="dispatchd's agent endpoint", metavar="HOST:PORT")
    token: str | None = setting(
        None, help="credential sent as a bearer token", metavar="TOKEN", secret=True
    )
    token_file: UserPath | None = setting(
        None, help="file holding the credential (instead of --token)", metavar="FILE"
    )
    host_id: str = setting(
        default_factory=socket.gethostname,
        help="this host's id (default: the machine's hostname)",
        metavar="ID",
    )
    labels: KeyValues = setting(
        default_factory=dict,
        flag="--label",
        metavar="KEY=VALUE",
        help="label reported to the daemon (repeatable)",
    )
    state_dir: UserPath | None = setting(
        None,
        help="directory of the journal (default: ~/.local/state/dispatch-agent/<host-id>)",
        metavar="DIR",
    )
    max_parallel: int = setting(
        8, ge=1, le=10_000, help="commands run at the same time", metavar="N"
    )
    tls_ca: UserPath | None = setting(
        None,
        help="PEM CA certificates that verify the daemon (default: the system's CAs)",
        metavar="FILE",
    )
    tls_cert: UserPath | None = setting(
        None, help="PEM client certificate, for a daemon that requires mutual TLS", metavar="FILE"
    )
    tls_key: UserPath | None = setting(None, help="PEM private key of --tls-cert", metavar="FILE")
    plaintext: bool = setting(
        False, help="connect without TLS (only to a daemon started with --plaintext)"
    )

    reconnect_min_s: float = setting(0.5, gt=0, help="first reconnect backoff step")
    reconnect_max_s: float = setting(30.0, help="longest reconnect backoff")
    connect_timeout_s: float = setting(10.0, gt=0, help="TCP connect and handshake limit")
    heartbeat_interval_s: float = setting(
        10.0, gt=0, help="heartbeat period used when the daemon's Welcome gives none"
    )
    heartbeat_ttl_s: float = setting(
        30.0, gt=0, help="silence before the stream is dropped, when the Welcome gives none"
    )
    max_message_bytes: int = setting(4 * MIB, ge=64 * KIB, help="largest gRPC message accepted")
    event_batch_max_events: int = setting(256, gt=0, help="events coalesced into one message")
    event_batch_max_bytes: int = setting(1 * MIB, help="bytes of events in one message")

    output_chunk_bytes: int = setting(
        64 * KIB, gt=0, help="output is sent in chunks up to this size"
    )
    output_flush_s: float = setting(
        0.05, gt=0, help="a partial output chunk is sent after this age"
    )
    output_limit_bytes: int = setting(
        1 * MIB, ge=2, help="per-stream output limit when a run does not set one"
    )
    kill_grace_s: float = setting(
        5.0, ge=0, help="SIGTERM to SIGKILL delay when a run does not set one"
    )
    cgroups: bool = setting(
        True,
        help="run each command in its own cgroup v2 (killed with cgroup.kill) where the machine "
        "allows it; --no-cgroups: process groups only",
    )
    cgroup_root: UserPath | None = setting(
        None,
        help="cgroup v2 directory under which the agent makes its command cgroups (default: the "
        "agent's own cgroup)",
        metavar="DIR",
    )
    pipe_drain_s: float = setting(
        2.0, gt=0, help="how long output is still read after the main process exited"
    )
    shutdown_delivery_s: float = setting(
        3.0, ge=0, help="on SIGTERM, how long to try delivering the last events"
    )

    journal_fsync: bool = setting(
        True, help="fsync the journal for claims and Finished events (off only for benchmarks)"
    )
    journal_compact_bytes: int = setting(
        16 * MIB, ge=0, help="journal size from which a mostly acknowledged journal is rewritten"
    )
    remembered_ids: int = setting(100_000, ge=1_000, help="started CommandHost ids remembered")

    log_level: str = setting("info", help="debug, info, warning or error")
    log_json: bool = setting(False, help="log JSON lines instead of text")

    @field_validator("server")
    @classmethod
    def _host_port(cls, value: str) -> str:
        try:
            split_server(value)
        except ValueError:
            raise ValueError(f"expected HOST:PORT, got {value!r}") from None
        return value

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if "/" in value:
            raise ValueError("must not contain '/'")
        return value

    @field_validator("cgroup_root")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in _LOG_LEVELS:
            raise ValueError(f"one of {_LOG_LEVELS}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check(
            self.token is None or self.token_file is None,
            "--token",
            "give --token or --token-file, not both",
        )
        check(
            (self.tls_cert is None) == (self.tls_key is None),
            "--tls-cert" if self.tls_cert is None else "--tls-key",
            "--tls-cert and --tls-key go together",
        )
        check(
            not self.plaintext or (self.tls_ca, self.tls_cert) == (None, None),
            "--plaintext",
            "give --plaintext or the --tls-* options, not both",
        )
        check(
            self.reconnect_max_s >= self.reconnect_min_s,
            "--reconnect-max-s",
            "must be at least --reconnect-min-s",
        )
        check(
            self.heartbeat_ttl_s > self.heartbeat_interval_s,
            "--heartbeat-ttl-s",
            "must be longer than --heartbeat-interval-s",
        )
        # An output chunk plus the event and batch framing has to fit in one message.
        check(
            self.output_chunk_bytes + 4 * KIB <= self.event_batch_max_bytes,
            "--output-chunk-bytes",
            "must be at least 4 KiB under --event-batch-max-bytes",
        )
        check(
            self.event_batch_max_bytes + 4 * KIB <= self.max_message_bytes,
            "--event-batch-max-bytes",
            "must be at least 4 KiB under --max-message-bytes",
        )
        return self

    @property
    def journal_dir(self) -> Path:
        """Where the journal lives: ``--state-dir``, or a per-host-id default."""
        if self.state_dir is not None:
            return self.state_dir
        return Path.home() / ".local" / "state" / "dispatch-agent" / self.host_id


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> AgentConfig:
    """Settings from flags, environment and TOML; ``--token-file`` is read here, once."""
    config = load_settings(
        AgentConfig,
        argv,
        environ,
        prog="dispatch-agent",
        description="Run the commands dispatchd sends to this host and report their results.",
    )
    if not config.plaintext:  # unreadable TLS files stop start-up here, with the option named
        client_context(config.tls_ca, config.tls_cert, config.tls_key)
    if config.token_file is None:
        return config
    try:
        token = config.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError("--token-file", f"cannot read {config.token_file}: {exc}") from None
    check(bool(token), "--token-file", f"{config.token_file} is empty")
    return config.model_copy(update={"token": token, "token_file": None})


def split_server(server: str) -> tuple[str, int]:
    """``"host:7443"`` or ``"[::1]:7443"`` as ``(host, port)``; ValueError when malformed."""
    host, sep, port_text = server.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {server!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {server!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
