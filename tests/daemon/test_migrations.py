"""A database written by an older dispatchd is upgraded in place, on both databases."""

from __future__ import annotations

import pytest

from daemon.store import migrations, models

V1_HOST = """CREATE TABLE host (id TEXT PRIMARY KEY, hostname TEXT NOT NULL,
    labels TEXT NOT NULL, status TEXT NOT NULL, agent_version TEXT NOT NULL,
    address TEXT NOT NULL, first_seen_at REAL NOT NULL, connected_at REAL,
    last_seen_at REAL)"""


def test_a_version_1_database_is_upgraded_and_keeps_its_rows(db_url: str) -> None:
    db = models.open_database(db_url)
    models.bind(db)
    with db.connection_context():
        db.execute_sql(V1_HOST)
        db.execute_sql("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
        db.execute_sql("INSERT INTO schema_version (id, version) VALUES (1, 1)")
        db.execute_sql(
            "INSERT INTO host VALUES ('web-1', 'web-1', '{}', 'offline', '0.1.0', '', 1.0, "
            "NULL, NULL)"
        )
    models.create_schema(db)
    models.create_schema(db)  # a second start changes nothing
    with db.connection_context():
        host = models.Host.get_by_id("web-1")
        assert (host.enrollment, host.credential_hash, host.hostname) == ("approved", None, "web-1")
        assert [row.version for row in models.SchemaVersion.select()] == [migrations.LATEST]
        assert models.AuditEvent.select().count() == 0  # tables added since exist
    db.close_all()


def test_a_database_from_a_newer_dispatchd_is_refused(db_url: str) -> None:
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    with db.connection_context():
        models.SchemaVersion.update(version=migrations.LATEST + 1).execute()
    with pytest.raises(RuntimeError, match="upgrade dispatchd"):
        models.create_schema(db)
    db.close_all()


def test_a_version_2_database_gains_the_retention_indexes(db_url: str) -> None:
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    with db.connection_context():  # as dispatchd 0.1 with schema version 2 left it
        db.execute_sql("DROP INDEX task_finished_at")
        db.execute_sql("DROP INDEX host_connection_disconnected_at")
        models.SchemaVersion.update(version=2).execute()
    models.create_schema(db)
    with db.connection_context():
        assert "task_finished_at" in {index.name for index in db.get_indexes("task")}
        assert "host_connection_disconnected_at" in {
            index.name for index in db.get_indexes("host_connection")
        }
        assert [row.version for row in models.SchemaVersion.select()] == [3]
    db.close_all()
