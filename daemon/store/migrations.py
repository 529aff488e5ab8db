"""Schema upgrades: how a database written by an older dispatchd is brought up to date.

The ``schema_version`` table holds the version a database is at. A fresh database is created
whole at the newest version; an older one gets each step from its version up, in order, each in
its own transaction (PostgreSQL and SQLite both run DDL transactionally), so an upgrade never
needs a wipe and an interrupted one resumes where it stopped. A step must be safe to repeat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from peewee import Database, DoubleField, TextField
from playhouse.migrate import PostgresqlMigrator, SchemaMigrator, SqliteMigrator, migrate

logger = logging.getLogger(__name__)


def _v2_enrollment(db: Database, migrator: SchemaMigrator) -> None:
    """Hosts gain an enrolment state and the hash of their per-host credential. Hosts that
    connected before enrolment existed stay approved; their agents get a credential the next
    time they connect with the enrolment token."""
    existing = {column.name for column in db.get_columns("host")}
    columns = {
        "enrollment": TextField(default="approved"),
        "credential_hash": TextField(null=True),
        "credential_issued_at": DoubleField(null=True),
    }
    steps = [migrator.add_column("host", name, field) for name, field in columns.items()
             if name not in existing]  # fmt: skip
    if steps:
        migrate(*steps)
    db.execute_sql("CREATE INDEX IF NOT EXISTS host_enrollment ON host (enrollment)")


def _v3_retention_indexes(db: Database, migrator: SchemaMigrator) -> None:
    """The retention pass finds old rows by a range on these columns (names as peewee's
    ``create_tables`` gives them, so a fresh database has the same ones)."""
    for table, column in (("task", "finished_at"), ("host_connection", "disconnected_at")):
        if db.table_exists(table):  # else create_tables makes it, with the index
            db.execute_sql(f"CREATE INDEX IF NOT EXISTS {table}_{column} ON {table} ({column})")


# (version reached, what it changes, the step); versions are consecutive from 2.
STEPS: list[tuple[int, str, Callable[[Database, SchemaMigrator], None]]] = [
    (2, "host enrolment state and credential", _v2_enrollment),
    (3, "indexes for the retention pass", _v3_retention_indexes),
]
LATEST = STEPS[-1][0] if STEPS else 1


def upgrade(db: Database, current: int, *, record: Callable[[int], None]) -> list[int]:
    """Apply every step after ``current``; ``record(version)`` runs in each step's transaction."""
    migrator: SchemaMigrator = PostgresqlMigrator(db) if db.param == "%s" else SqliteMigrator(db)
    applied = []
    for version, what, step in STEPS:
        if version <= current:
            continue
        logger.info("upgrading the database schema to version %d: %s", version, what)
        with db.atomic():
            step(db, migrator)
            record(version)
        applied.append(version)
    return applied
