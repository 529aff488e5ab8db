"""The database: peewee models, opening SQLite or PostgreSQL by URL, and the schema.

Everything here is synchronous and runs in a worker thread (``store.database.Database`` owns the
threads and limiters). Times are stored as UTC seconds since the epoch (``*_at`` columns, floats)
and durations in seconds; the HTTP layer renders them as RFC 3339.

Tables: ``host`` (one row per agent identity), ``host_connection`` (each stream an agent held),
``task``, ``command`` (the scripts of a task, in order), ``command_host`` (one command on one
host: the execution record) and ``output_chunk`` (stored output, capped per stream: the head
from the start, the tail from the end).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from peewee import (
    BigAutoField,
    BigIntegerField,
    BlobField,
    BooleanField,
    Database,
    DatabaseProxy,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
    __exception_wrapper__,
)
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from daemon.store import migrations

logger = logging.getLogger(__name__)

SCHEMA_VERSION = migrations.LATEST

database_proxy = DatabaseProxy()


class _Model(Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class SchemaVersion(_Model):
    version = IntegerField()


class Host(_Model):
    id = TextField(primary_key=True)
    hostname = TextField(default="")
    labels = TextField(default="{}")  # JSON object of strings
    status = TextField(default="offline", index=True)  # online | offline (a live stream or not)
    # pending | approved | rejected | revoked: whether this host may run anything
    enrollment = TextField(default="approved", index=True)
    credential_hash = TextField(null=True)  # sha256 of the per-host credential issued at enrolment
    credential_issued_at = DoubleField(null=True)
    agent_version = TextField(default="")
    address = TextField(default="")
    first_seen_at = DoubleField()
    connected_at = DoubleField(null=True)
    last_seen_at = DoubleField(null=True)


class ApiToken(_Model):
    """A bearer token for the HTTP API; only its sha256 is kept."""

    id = BigAutoField()
    name = TextField(unique=True)
    role = TextField()  # viewer | operator | admin
    token_hash = TextField(unique=True)
    created_at = DoubleField()
    created_by = TextField()
    revoked_at = DoubleField(null=True)
    last_used_at = DoubleField(null=True)


class AuditEvent(_Model):
    """Who did what, when, from where: every state-changing call and every refusal."""

    id = BigAutoField()
    at = DoubleField(index=True)
    actor = TextField(index=True)  # "token:<name>", "agent:<host id>", "anonymous", "unknown"
    role = TextField(null=True)
    action = TextField(index=True)  # e.g. task.create, host.approve, auth.denied, agent.refused
    target = TextField(null=True)  # task id, host id, token name, route
    outcome = TextField()  # attempted | ok | denied | failed
    status = IntegerField(null=True)  # the HTTP status answered, when there is one
    address = TextField(default="")
    details = TextField(default="{}")  # JSON


class HostConnection(_Model):
    id = BigAutoField()
    host_id = TextField(index=True)
    connected_at = DoubleField()
    disconnected_at = DoubleField(null=True, index=True)  # the retention pass's range scan
    address = TextField(default="")
    agent_version = TextField(default="")
    close_reason = TextField(null=True)


class Task(_Model):
    id = BigAutoField()
    name = TextField()
    status = TextField(index=True)
    created_at = DoubleField(index=True)
    queued_at = DoubleField(null=True)
    started_at = DoubleField(null=True)
    finished_at = DoubleField(null=True, index=True)  # the retention pass's range scan
    targets = TextField()  # JSON: what was asked for ({"hosts": [...], "labels": {...}})
    max_concurrency = IntegerField(null=True)
    max_failures = IntegerField(null=True)
    delivery_timeout_s = DoubleField(default=0.0)
    continue_on_error = BooleanField(default=False)
    retry_of = BigIntegerField(null=True)
    idempotency_key = TextField(null=True, unique=True)
    request_digest = TextField(null=True)
    cancel_requested = BooleanField(default=False)
    error = TextField(null=True)
    change_seq = BigIntegerField(default=0)


class Command(_Model):
    id = BigAutoField()
    task = ForeignKeyField(Task, on_delete="CASCADE", backref="commands")
    index = IntegerField()
    script = TextField()
    args = TextField(default="[]")  # JSON list of strings
    env = TextField(default="{}")  # JSON object of strings
    cwd = TextField(default="")
    timeout_s = DoubleField()

    class Meta:
        indexes = ((("task", "index"), True),)


class CommandHost(_Model):
    id = BigAutoField()
    task = ForeignKeyField(Task, on_delete="CASCADE", backref="executions")
    command = ForeignKeyField(Command, on_delete="CASCADE")
    command_index = IntegerField()
    host_id = TextField()
    status = TextField()
    reason = TextField(null=True)
    error = TextField(null=True)
    exit_code = IntegerField(null=True)  # NULL until the process really exited
    signal = IntegerField(null=True)
    pid = IntegerField(null=True)
    dispatched_at = DoubleField(null=True)
    started_at = DoubleField(null=True)
    finished_at = DoubleField(null=True)
    duration_s = DoubleField(null=True)
    stdout_bytes = BigIntegerField(default=0)  # what the process wrote, stored or not
    stderr_bytes = BigIntegerField(default=0)
    output_truncated = BooleanField(default=False)
    # sha256 over exit code, stdout and stderr as forwarded: equal digests, equal results
    output_digest = TextField(null=True)
    last_seq = BigIntegerField(default=0)  # the agent's events up to here are stored
    change_seq = BigIntegerField(default=0)

    class Meta:
        indexes = (
            (("task", "status"), False),
            (("task", "change_seq"), False),
            (("host_id", "started_at"), False),
            (("status", "started_at"), False),
            (("started_at",), False),
            (("task", "output_digest"), False),
        )


class OutputChunk(_Model):
    id = BigAutoField()
    command_host = ForeignKeyField(CommandHost, on_delete="CASCADE")
    task_id = BigIntegerField()
    stream = SmallIntegerField()  # 1 stdout, 2 stderr
    offset = BigIntegerField()  # byte offset within the stream
    size = IntegerField()
    data = BlobField()
    change_seq = BigIntegerField()

    class Meta:
        indexes = (
            (("command_host", "stream", "offset"), False),
            (("task_id", "change_seq"), False),
        )


MODELS: Sequence[type[Model]] = (
    SchemaVersion,
    Host,
    ApiToken,
    AuditEvent,
    HostConnection,
    Task,
    Command,
    CommandHost,
    OutputChunk,
)


class DatabaseUrlError(ValueError):
    pass


def open_database(url: str, *, max_connections: int = 8, busy_timeout_ms: int = 5000) -> Database:
    """A pooled peewee database for ``sqlite:///path`` or ``postgresql://user:pw@host/db``.

    SQLite gets WAL (readers never wait for the writer), ``busy_timeout`` set *before* the WAL
    switch (a concurrent opener would otherwise fail at once), and foreign keys on.
    """
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise DatabaseUrlError(
                "sqlite URLs name a file, e.g. sqlite:///./dispatch.db "
                "(in-memory databases cannot be shared between worker threads)"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return PooledSqliteDatabase(
            path,
            max_connections=max_connections,
            stale_timeout=300,
            check_same_thread=False,
            pragmas=[
                ("busy_timeout", busy_timeout_ms),
                ("journal_mode", "wal"),
                ("synchronous", "normal"),
                ("foreign_keys", 1),
            ],
        )
    if parsed.scheme in ("postgres", "postgresql"):
        if not parsed.path.strip("/"):
            raise DatabaseUrlError("postgresql URLs name a database, e.g. postgresql://u:p@host/db")
        return PooledPostgresqlDatabase(
            parsed.path.lstrip("/"),
            max_connections=max_connections,
            stale_timeout=300,
            user=parsed.username,
            password=parsed.password,
            host=parsed.hostname,
            port=parsed.port,
        )
    raise DatabaseUrlError(
        f"unsupported database URL scheme {parsed.scheme!r}: use sqlite or postgresql"
    )


def bind(db: Database) -> None:
    database_proxy.initialize(db)


def create_schema(db: Database) -> None:
    """Create a fresh database at the newest schema, or upgrade an older one step by step
    (``daemon.store.migrations``); refuse a database written by a newer dispatchd."""
    with db.connection_context():
        if db.table_exists("schema_version"):
            row = SchemaVersion.select().first()
            current = row.version if row is not None else SCHEMA_VERSION
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the database has schema version {current}; this dispatchd knows "
                    f"{SCHEMA_VERSION} at most: upgrade dispatchd"
                )
            # Before create_tables: its indexes may name columns the upgrade adds.
            migrations.upgrade(db, current, record=_record_version)
        db.create_tables(MODELS, safe=True)
        with db.atomic():
            if SchemaVersion.select().first() is None:
                SchemaVersion.create(version=SCHEMA_VERSION)


def _record_version(version: int) -> None:
    if not SchemaVersion.update(version=version).execute():
        SchemaVersion.create(version=version)


def is_postgres(db: Database) -> bool:
    return isinstance(db, PooledPostgresqlDatabase)


def execute_many(db: Database, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """One parameterised statement over many rows (``?`` placeholders), in the caller's transaction.

    peewee's query builder costs more than the database on hot paths; this is the plain DB-API
    path. psycopg2's ``executemany`` makes a round trip per row, so PostgreSQL gets
    ``execute_batch``.
    """
    rows = list(rows)
    if not rows:
        return
    cursor = db.cursor()
    # The plain DB-API path raises the driver's exceptions: map them to peewee's, as every
    # peewee call does, so callers (the writer's retry of a locked or full database) see them.
    with __exception_wrapper__:
        if is_postgres(db):
            from psycopg2.extras import execute_batch

            execute_batch(cursor, sql.replace("?", "%s"), rows, page_size=500)
        else:
            cursor.executemany(sql, rows)
