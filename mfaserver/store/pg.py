"""The store on PostgreSQL (issue #12): `PgStore`, the `Store` of several nodes.

`PgStore` is `Store` with another connection underneath: every method, its
SQL text and its row mapping are `Store`'s. The statements are written in SQL
both engines accept, with SQLite's ``?`` and ``:name`` placeholders;
`PgConnection` rewrites each statement once to psycopg's ``%s`` and
``%(name)s`` and then caches it. What cannot be written alike goes through
`PG` (a `mfaserver.store.db.Dialect`): the error classes, the temp schema and
the row locks.

Concurrency across nodes follows from the shared statements: the TOTP and
HOTP replay guards are single conditional UPDATEs (under READ COMMITTED a
second writer waits for the first's row lock, then re-checks the condition
on the committed row, so a step is accepted at most once); failures, bypass
and invite use are single ``UPDATE``/``DELETE ... RETURNING`` statements;
``BEGIN IMMEDIATE`` (SQLite's database-wide write lock) becomes ``BEGIN``,
and the two read-then-write transactions (token assignment, device
enrollment) lock the rows they read with ``FOR UPDATE``. Every write is
committed before its method returns (autocommit, or an explicit transaction
committed inside the method).

One psycopg connection per store, in autocommit, used by one thread at a time
like `Store`'s. A dropped connection (server restart, failover,
``pg_terminate_backend``) fails the call in progress with StoreError (fail
closed) and is discarded; the next call opens a new one, so a node recovers
without a restart. A pool (psycopg_pool, min_size 1) would add a background
thread and a check-out per call for nothing while one thread owns the store;
it fits when several threads share one store.
"""

from __future__ import annotations

import re
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import psycopg
from psycopg import conninfo as _conninfo
from psycopg.pq import TransactionStatus

from mfaserver.store.cluster import ClusterState
from mfaserver.store.db import (BUSY_TIMEOUT_MS, Dialect, Store, StoreError,
                                StoreUnavailableError, _guarded)
from mfaserver.store.pg_migrations import migrate
from mfaserver.store.pg_reactor import PgLogins, ReactorPg

__all__ = ["PG", "PgConnection", "PgStore"]

# The oldest PostgreSQL accepted (the cluster's triggers need 11; 13 was the oldest one
# its developers still maintained when this was written).
MIN_SERVER_VERSION = 130000
CONNECT_TIMEOUT = 5  # seconds; unless the DSN says otherwise
CONNECTION_DEFAULTS = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms: sent data unacknowledged this long ends the connection
}
# Server-side bounds on one statement and on a transaction left idle (a node that
# died inside one must not hold its row locks).
STATEMENT_TIMEOUT_MS = 60_000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30_000
RECONNECT_MIN = 0.25  # seconds without a new connect attempt after one failed ...
RECONNECT_MAX = 2.0   # ... doubling up to this
# A statement that waits longer for a row lock fails with StoreError, as a SQLite
# write fails after its busy timeout: the login path rejects rather than hangs.
LOCK_TIMEOUT_MS = BUSY_TIMEOUT_MS
# pg_advisory_xact_lock key serialising directory syncs: "mfa" "syn".
SYNC_LOCK = 0x6D6661_73796E


def _is_duplicate(error: Exception, table: str, column: str) -> bool:
    # The unique indexes are named table_column (users_name, tokens_serial).
    return (isinstance(error, psycopg.errors.UniqueViolation)
            and error.diag.constraint_name == f"{table}_{column}")


PG = Dialect(
    error=psycopg.Error,
    integrity_error=psycopg.errors.IntegrityError,
    temp_schema="pg_temp",
    lock_rows=" FOR UPDATE OF {}",
    is_duplicate=_is_duplicate,
    serialise_sync=f"SELECT pg_advisory_xact_lock({SYNC_LOCK:d})",
    begin_snapshot="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    after_explicit_ids=("SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        " coalesce(max(id), 0) + 1, false) FROM {table}"),
)

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@lru_cache(maxsize=512)
def to_postgresql(sql: str) -> str:
    """A shared statement in psycopg's placeholder style (the statements hold no ``%``)."""
    if sql == "BEGIN IMMEDIATE":
        # Row locks (FOR UPDATE) and single-statement writes do what SQLite's
        # database-wide write lock did.
        return "BEGIN"
    return _NAMED.sub(r"%(\1)s", sql.replace("?", "%s"))


DSN_HELP = ("not a libpq connection string (key=value pairs, values with spaces in "
            "single quotes, or a postgresql:// URI with % written %25)")


def check_dsn(dsn: str) -> dict:
    """The parameters of the libpq connection string ``dsn``; ValueError with a fixed
    message if it does not parse. libpq's own messages quote parts of the string,
    which may be the password, so they are never repeated."""
    try:
        params = _conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        raise ValueError(DSN_HELP) from None
    if not params:
        raise ValueError("is empty")
    return params


def _out_of_reach(error: Exception) -> bool:
    """Whether ``error`` says the server cannot be used now (no connection, shutting
    down, starting, read-only standby after a failover) rather than this statement
    failed (a lock wait, a serialization failure, a full disk: OperationalErrors too)."""
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = getattr(getattr(error, "diag", None), "sqlstate", None) or ""
    # None: raised by the client (refused, not connected); 08: connection exception;
    # 57P01-57P03: admin/crash shutdown, cannot connect now; 25006: read-only.
    return (not state or state.startswith("08") or state in ("57P01", "57P02", "57P03")
            or state == "25006")


def describe(dsn: str) -> str:
    """The DSN for messages: host, port and database, never the password."""
    try:
        params = _conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "PostgreSQL (unparsable DSN)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    return f"postgresql://{host}:{port}/{params.get('dbname') or ''}"


class _Server:
    """What the connections to one server (one node's database threads) share.

    After a failed connect, every call fails at once until ``retry_at``
    (RECONNECT_MIN doubling up to RECONNECT_MAX seconds) instead of each trying,
    and perhaps waiting connect_timeout for, an unreachable server. A lost
    connection moves ``generation`` on: the others, idle meanwhile, are likely
    dead too (a restart or failover drops them all), so each is replaced before
    its next statement rather than failing a login on it.
    """

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.lock = threading.Lock()
        self.generation = 0
        self.backoff = 0.0
        self.retry_at = 0.0
        self.last_error = ""

    def connect_failed(self, error: Exception) -> None:
        with self.lock:
            self.backoff = min(RECONNECT_MAX, max(RECONNECT_MIN, 2 * self.backoff))
            self.retry_at = self.clock() + self.backoff
            self.last_error = (str(error).strip().splitlines() or ["connect failed"])[0]

    def connected(self) -> None:
        with self.lock:
            self.backoff = 0.0
            self.retry_at = 0.0

    def connection_lost(self) -> None:
        with self.lock:
            self.generation += 1


class PgConnection:
    """The part of sqlite3.Connection's interface `Store` uses, over psycopg.

    Connects on first use and again after `discard_if_broken` found the
    connection dead (see `_Server` for the back-off and the generation).
    """

    def __init__(self, dsn: str, clock: Callable[[], float] = time.monotonic,
                 server: _Server | None = None):
        self._dsn = dsn
        params = _conninfo.conninfo_to_dict(dsn)
        # Unless the DSN says otherwise: a server that vanishes without closing the
        # connection (powered off, partitioned, a failover leaving half-open sockets)
        # is noticed within seconds, not after the kernel's ~15 minutes of retries,
        # so calls fail over to "try later" and to the next host.
        for name, value in CONNECTION_DEFAULTS.items():
            params.setdefault(name, value)
        self._conninfo = _conninfo.make_conninfo(**params)
        self._raw: psycopg.Connection | None = None
        self._server = server or _Server(clock)
        self._generation = -1

    def connection(self) -> psycopg.Connection:
        """The open psycopg connection (autocommit), connecting if there is none.

        Raises psycopg.OperationalError without trying while the back-off of a
        failed connect runs."""
        raw = self._raw
        server = self._server
        if (raw is not None and self._generation != server.generation
                and raw.info.transaction_status == TransactionStatus.IDLE):
            self._raw = None
            raw.close()
            raw = None
        if raw is None:
            if server.clock() < server.retry_at:
                raise psycopg.OperationalError(f"not connected ({server.last_error})")
            generation = server.generation
            try:
                raw = psycopg.connect(self._conninfo, autocommit=True)
            except psycopg.OperationalError as e:
                server.connect_failed(e)
                raise
            server.connected()
            self._generation = generation
            try:
                raw.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS:d}")
                raw.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS:d}")
                raw.execute("SET idle_in_transaction_session_timeout = "
                            f"{IDLE_IN_TRANSACTION_TIMEOUT_MS:d}")
                # Each statement planned for the table as it is now. The cluster_*
                # tables grow from empty to thousands of rows within seconds, faster
                # than autovacuum's analyze follows: a generic plan of a prepared
                # statement made while a table was near empty (a sequential scan)
                # stayed, and made every push login's lookup by login key a scan
                # of all pending rows (2.7 ms each at 5,000 pending).
                raw.execute("SET plan_cache_mode = force_custom_plan")
            except BaseException:
                raw.close()
                raise
            self._raw = raw
        return raw

    @property
    def stale(self) -> bool:
        """Another connection to this server was lost since this one was opened (a
        failover may have moved the server): to be replaced when next idle."""
        return self._generation != self._server.generation

    def execute(self, sql: str, params=None) -> psycopg.Cursor:
        """Run one shared statement; the cursor holds its rows and rowcount."""
        return self.connection().execute(to_postgresql(sql), params or None)

    def executemany(self, sql: str, params_seq) -> None:
        """Run one shared statement once per parameter set."""
        with self.connection().cursor() as cursor:
            cursor.executemany(to_postgresql(sql), params_seq)

    @property
    def in_transaction(self) -> bool:
        """A transaction is open (or failed and awaits ROLLBACK) on a live connection."""
        raw = self._raw
        return raw is not None and raw.info.transaction_status in (
            TransactionStatus.INTRANS, TransactionStatus.INERROR)

    def discard_if_broken(self, error: Exception | None = None) -> bool:
        """After ``error``: forget a dead connection, or one to a server that cannot
        serve now (the next call opens a new one, to the next host of the DSN after
        a failover), and end a failed transaction left open. True if it was dropped."""
        raw = self._raw
        if raw is None:
            return False
        if raw.broken or raw.closed or (error is not None and _out_of_reach(error)):
            self._raw = None
            raw.close()
            self._server.connection_lost()
            return True
        if self.in_transaction:
            try:
                raw.execute("ROLLBACK")
            except psycopg.Error:
                self._raw = None
                raw.close()
        return False

    def another(self) -> "PgConnection":
        """A new connection to the same server (made on its first use)."""
        return PgConnection(self._dsn, server=self._server)

    def close(self) -> None:
        """Close the connection if open; the next use would open a new one."""
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()


class PgStore(ClusterState, Store):
    """`Store` on PostgreSQL; see the module docstring. Open with `PgStore.open`."""

    _dialect = PG

    @classmethod
    def open(cls, dsn: str, key_path: Path, *, create: bool = True) -> "PgStore":
        """Connect to ``dsn`` (libpq syntax), apply migrations and load the seed key.

        As `Store.open`: StoreError for database problems, KeyFileError for key
        problems, including a key that does not match the database; with
        ``create``, a key file is created only for a database that never had
        one. The database itself must exist.
        """
        try:
            check_dsn(dsn)
        except ValueError as e:
            raise StoreError(f"PostgreSQL DSN: {e}") from None
        label = describe(dsn)
        conn = PgConnection(dsn)
        def prepare(conn: PgConnection) -> None:
            raw = conn.connection()
            if raw.info.server_version < MIN_SERVER_VERSION:
                raise StoreError(f"database {label}: PostgreSQL 13 or newer is needed "
                                 f"(this server is {raw.info.server_version // 10000})")
            migrate(raw)
        return cls._opened(conn, label, Path(key_path), prepare, create=create)

    def another(self) -> "PgStore":
        """The same store on a connection of its own (for another database thread),
        with this one's schema check and seed key: nothing is opened until it is used."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the store is closed")
            return type(self)(self._conn.another(), self._cipher, self._path)

    def reactor_logins(self, reactor, run_on_thread):
        """The login path's statements sent by ``reactor`` itself on connections of
        their own (`mfaserver.store.pg_reactor.PgLogins`), opened on a database
        thread through ``run_on_thread``."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the store is closed")
            conn = self._conn
        return PgLogins(ReactorPg(reactor, conn.another, run_on_thread, self._path), self)

    @staticmethod
    def _message(error: Exception) -> str:
        # psycopg's messages may carry DETAIL/HINT lines; StoreError's is one line.
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__

    def _failure(self, error: Exception) -> StoreError:
        lost = self._conn.discard_if_broken(error)
        if lost or _out_of_reach(error):
            return StoreUnavailableError(f"database {self._path}: {self._message(error)}")
        return super()._failure(error)

    def close(self) -> None:
        """Close the connection; later calls raise StoreError. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    @_guarded
    def devices_version(self) -> int:
        """Changes when a transaction that writes to ``devices`` commits, on any node or
        from any admin command: a counter kept by a trigger (pg_migrations'
        ``cluster_devices_changed``). Not "any commit": on a busy cluster something
        commits every millisecond, and the device cache would never be used."""
        return self._conn.execute("SELECT n FROM cluster_devices_version").fetchone()[0]
