"""The store's schema and migrations on a real PostgreSQL (issue #12, part 1).

The PostgreSQL migrations must build the same schema as the SQLite ones,
version for version, and migrate once when two nodes start together.
"""

from __future__ import annotations

import sqlite3
import threading

import psycopg
import pytest

from mfaserver.store import migrations as sqlite_migrations
from mfaserver.store import pg_migrations
from mfaserver.store.migrations import MigrationError

SQLITE_TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text",
                "BLOB": "bytea"}


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


# --- the two schemas, described alike --------------------------------------------------------

def sqlite_schema(version: int | None = None):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    if version is None:
        sqlite_migrations.migrate(conn)
    else:
        import sqlite_utils
        db = sqlite_utils.Database(conn)
        for step in sqlite_migrations.MIGRATIONS[:version]:
            step(db)
    tables = [name for name, in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    columns, indexes, keys = {}, set(), set()
    for table in tables:
        for _, name, kind, notnull, default, pk in conn.execute(f"PRAGMA table_info({table})"):
            columns[(table, name)] = (SQLITE_TYPES[kind], bool(notnull or pk),
                                      _default(default), bool(pk))
        for _, index, unique, origin, _ in conn.execute(f"PRAGMA index_list({table})"):
            if origin == "pk":
                continue
            cols = tuple(row[2] for row in conn.execute(f"PRAGMA index_info({index})"))
            indexes.add((index, table, bool(unique), cols))
        for row in conn.execute(f"PRAGMA foreign_key_list({table})"):
            keys.add((table, row[3], row[2], row[4], row[6].upper()))
    return set(tables), columns, indexes, keys


def postgres_schema(conn):
    tables = {name for name, in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " AND table_name <> 'schema_migrations'")}
    primary = {(table, column) for table, column in conn.execute(
        "SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc"
        " JOIN information_schema.key_column_usage kcu"
        "  ON kcu.constraint_name = tc.constraint_name AND kcu.table_name = tc.table_name"
        " WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = 'public'")}
    columns = {}
    for table, name, kind, nullable, default in conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = 'public'"
            " AND table_name <> 'schema_migrations'"):
        columns[(table, name)] = (kind, nullable == "NO", _default(default),
                                  (table, name) in primary)
    indexes = {(name, table, unique, tuple(cols)) for name, table, unique, cols in conn.execute(
        "SELECT i.relname, t.relname, ix.indisunique,"
        "       array_agg(a.attname::text ORDER BY k.ord)"
        " FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid"
        " JOIN pg_class t ON t.oid = ix.indrelid"
        " JOIN unnest(ix.indkey) WITH ORDINALITY AS k(attnum, ord) ON true"
        " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
        " WHERE t.relnamespace = 'public'::regnamespace AND NOT ix.indisprimary"
        "  AND t.relname <> 'schema_migrations'"
        " GROUP BY 1, 2, 3")}
    actions = {"c": "CASCADE", "a": "NO ACTION", "r": "RESTRICT", "n": "SET NULL",
               "d": "SET DEFAULT"}
    keys = {(table, column, ref_table, ref_column, actions[action])
            for table, column, ref_table, ref_column, action in conn.execute(
                "SELECT t.relname, a.attname, rt.relname, ra.attname, c.confdeltype::text"
                " FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
                " JOIN pg_class rt ON rt.oid = c.confrelid"
                " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
                " JOIN pg_attribute ra ON ra.attrelid = c.confrelid AND ra.attnum = c.confkey[1]"
                " WHERE c.contype = 'f'")}
    # The cluster's short-lived tables are PostgreSQL's alone (pg_migrations.CLUSTER_TABLES).
    tables = {t for t in tables if not t.startswith("cluster_")}
    columns = {k: v for k, v in columns.items() if not k[0].startswith("cluster_")}
    indexes = {i for i in indexes if not i[1].startswith("cluster_")}
    return tables, columns, indexes, keys


def _default(value: str | None) -> str | None:
    """A column default without PostgreSQL's cast (``'local'::text`` is ``'local'``)."""
    if value is None:
        return None
    return value.split("::")[0]


# --- tests -----------------------------------------------------------------------------------

def test_migrations_build_the_sqlite_schema_on_postgresql(postgres_database):
    with connect(postgres_database) as conn:
        assert pg_migrations.schema_version(conn) == 0
        assert pg_migrations.migrate(conn) == pg_migrations.SCHEMA_VERSION
        assert pg_migrations.schema_version(conn) == pg_migrations.SCHEMA_VERSION
        got = postgres_schema(conn)
        versions = [v for v, in conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version")]
    want = sqlite_schema()
    assert got[0] == want[0]
    assert got[1] == want[1]
    assert got[2] == want[2]
    assert got[3] == want[3]
    assert versions == list(range(1, pg_migrations.SCHEMA_VERSION + 1))


def test_every_version_matches_sqlite_and_upgrades_step_by_step(postgres_database, monkeypatch):
    """An older database (each released version) upgrades to the current schema."""
    with connect(postgres_database) as conn:
        for version in range(1, pg_migrations.SCHEMA_VERSION + 1):
            monkeypatch.setattr(pg_migrations, "SCHEMA_VERSION", version)
            assert pg_migrations.migrate(conn) == version
            assert postgres_schema(conn) == sqlite_schema(version)


def test_two_nodes_starting_together_migrate_once(postgres_database):
    barrier = threading.Barrier(4)
    results, errors = [], []

    def node():
        try:
            with connect(postgres_database) as conn:
                barrier.wait(10)
                results.append(pg_migrations.migrate(conn))
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=node) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == [pg_migrations.SCHEMA_VERSION] * 4
    with connect(postgres_database) as conn:
        rows = conn.execute("SELECT version, count(*) FROM schema_migrations"
                            " GROUP BY version ORDER BY version").fetchall()
        assert rows == [(v, 1) for v in range(1, pg_migrations.SCHEMA_VERSION + 1)]


def test_a_current_schema_starts_without_waiting_for_the_lock(postgres_database):
    with connect(postgres_database) as conn:
        pg_migrations.migrate(conn)
    with connect(postgres_database) as holder, connect(postgres_database) as conn:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (pg_migrations.MIGRATION_LOCK,))
        conn.execute("SET statement_timeout = '2s'")  # a wait for the lock fails the test
        assert pg_migrations.migrate(conn) == pg_migrations.SCHEMA_VERSION
        holder.execute("ROLLBACK")


def test_a_newer_database_is_refused(postgres_database):
    with connect(postgres_database) as conn:
        pg_migrations.migrate(conn)
        conn.execute("INSERT INTO schema_migrations (version, applied) VALUES (%s, 0)",
                     (pg_migrations.SCHEMA_VERSION + 1,))
        with pytest.raises(MigrationError, match="newer than this mfaserver supports"):
            pg_migrations.migrate(conn)


def test_a_failing_step_leaves_the_previous_schema(postgres_database, monkeypatch):
    with connect(postgres_database) as conn:
        monkeypatch.setattr(pg_migrations, "SCHEMA_VERSION", 2)
        pg_migrations.migrate(conn)
        broken = pg_migrations.MIGRATIONS[:2] + [
            "CREATE TABLE half_done (x BIGINT); SELECT no_such_function()"]
        monkeypatch.setattr(pg_migrations, "MIGRATIONS", broken)
        monkeypatch.setattr(pg_migrations, "SCHEMA_VERSION", 3)
        with pytest.raises(psycopg.errors.UndefinedFunction):
            pg_migrations.migrate(conn)
        assert pg_migrations.schema_version(conn) == 2
        assert conn.execute("SELECT to_regclass('half_done')").fetchone()[0] is None
