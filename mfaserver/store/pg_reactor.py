"""The login path's statements on PostgreSQL, sent by the reactor itself (issue #12).

A login with a code makes three statements: the local directory's password
read, the account read, and the replay-guard write with its audit row. Sent
through a database thread, each cost the daemon about 220-330 µs of CPU (the
hop there and back, the GIL passing between threads, psycopg's cursor);
driven by the reactor on a non-blocking libpq connection, with psycopg's
row decoding, about 50-65 µs (measured on the 2-core bench VM, 20,000
statements 64 at a time). On two cores that was the difference between a
node on PostgreSQL at 0.6 and at 0.8 of a node on SQLite. So those three go
through `ReactorPg`: two connections in libpq's non-blocking mode whose
sockets the reactor watches, one statement at a time each, every statement
prepared once per connection. Everything else stays on the database threads.

Connections are opened on a database thread (connecting blocks: DNS, TLS) by
`PgConnection`, so they have the DSN defaults, the server-side timeouts, the
connect back-off and the failover generation of the threads' connections,
and are then handed to the reactor. A statement on a connection that is lost
fails with StoreUnavailableError (the login fails closed) and the connection
is dropped; the next statement opens a new one. A connection is replaced when
idle after any other connection to the server was lost (a failover to the
next host of the DSN).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Sequence

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from mfaserver.auth.model import Account, CodeUse, TokenKind
from mfaserver.store.db import ACCOUNT_SQL, StoreError, StoreUnavailableError

__all__ = ["ReactorPg", "PgLogins"]

CONNECTIONS = 2  # the login path's statements are short: two keep both cores' worth busy


def _numbered(sql: str) -> str:
    """``?`` placeholders as libpq's ``$1``, ``$2``, ... (the statements hold no other ``?``)."""
    parts = sql.split("?")
    return "".join(part + (f"${n}" if n < len(parts) else "")
                   for n, part in enumerate(parts, start=1))


_PASSWORD_SQL = "SELECT password_hash, phone FROM users WHERE name = $1"
_ACCOUNT_SQL = _numbered(ACCOUNT_SQL)


def _use_code_sql(set_used: str, unused: str) -> str:
    """The token update and, only if it updated a row, the failure reset and the audit
    row, as one statement (data-modifying CTEs): one round trip, one transaction.
    $1 the token, $2 the user whose failures to reset (or NULL), $3-$10 the audit
    row; the update's own values from $11."""
    return f"""
    WITH used AS (
        UPDATE tokens SET {set_used} WHERE id = $1 AND {unused} RETURNING id),
    cleared AS (
        UPDATE users SET failures = 0
        WHERE name = $2 AND failures != 0 AND EXISTS (SELECT 1 FROM used)),
    logged AS (
        INSERT INTO audit (time, "user", client, nas_ip, calling_station_id, factor,
                           outcome, reason)
        SELECT $3::double precision, $4::text, $5::text, $6::text, $7::text, $8::text,
               $9::text, $10::text
        FROM used)
    SELECT count(*) FROM used"""


# The same conditions as Store's _USE_TOTP_STEP ($11 the step, $12 the drift) and
# _USE_HOTP_COUNTER ($11 the counter matched).
_USE_TOTP_SQL = _use_code_sql(
    "last_step = $11, drift = $12", "kind = 'totp' AND (last_step IS NULL OR last_step < $11)")
_USE_HOTP_SQL = _use_code_sql("counter = $11 + 1", "kind = 'hotp' AND counter <= $11")


def _text(value) -> bytes | None:
    """A parameter in PostgreSQL's text format (the statements' own casts type it)."""
    if value is None:
        return None
    if isinstance(value, float):
        return repr(value).encode()   # shortest exact form: read back as the same double
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return str(value).encode("utf-8")
    raise TypeError(f"no text form for {type(value).__name__}")


@dataclass
class _Statement:
    sql: str
    params: list[bytes | None]
    done: Deferred


# SQLSTATEs that mean the server is going away: the login fails closed, reported once.
_GONE = ("57P01", "57P02", "57P03")


@implementer(IReadDescriptor, IWriteDescriptor)
class _Link:
    """One connection in non-blocking mode, its socket watched by the reactor."""

    def __init__(self, owner: "ReactorPg", conn, raw: psycopg.Connection):
        self._owner = owner
        self.conn = conn          # the PgConnection: back-off, generation, close
        self._raw = raw
        self._pg = raw.pgconn
        self._pg.nonblocking = 1
        self._fd = self._pg.socket
        self._rows = Transformer(raw)
        self._prepared: dict[str, bytes] = {}
        self.statement: _Statement | None = None
        self._preparing: bytes | None = None   # the name being prepared
        self._results: list[pq.abc.PGresult] = []
        self.closed = False
        owner.reactor.addReader(self)

    # --- the reactor's side ---

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def logPrefix(self) -> str:
        return "postgresql"

    def doWrite(self):
        try:
            self._flush()
        except psycopg.Error as e:
            self._lost(e)

    def doRead(self):
        try:
            self._pg.consume_input()
            if self._pg.status == pq.ConnStatus.BAD:
                raise psycopg.OperationalError(self._message())
            while self.statement is not None and not self._pg.is_busy():
                result = self._pg.get_result()
                if result is None:
                    self._complete()
                else:
                    self._results.append(result)
            # Anything else read while idle (a notice) is consumed and dropped.
        except psycopg.Error as e:
            self._lost(e)

    def connectionLost(self, reason):
        self._lost(psycopg.OperationalError(reason.getErrorMessage()))

    # --- statements ---

    def send(self, statement: _Statement) -> None:
        self.statement = statement
        try:
            self._send()
        except psycopg.Error as e:
            self._lost(e)

    def _send(self) -> None:
        statement = self.statement
        name = self._prepared.get(statement.sql)
        if name is None:
            self._preparing = f"mfaserver_{len(self._prepared)}".encode()
            self._pg.send_prepare(self._preparing, statement.sql.encode())
        else:
            self._preparing = None
            self._pg.send_query_prepared(name, statement.params, result_format=1)
        self._flush()

    def _flush(self) -> None:
        if self._pg.flush() == 0:
            self._owner.reactor.removeWriter(self)
        else:  # the kernel took part of it: the rest when the socket is writable
            self._owner.reactor.addWriter(self)

    def _complete(self) -> None:
        results, self._results = self._results, []
        statement = self.statement
        failed = next((r for r in results if r.status == pq.ExecStatus.FATAL_ERROR), None)
        if failed is not None:
            self.statement = None
            sqlstate = (failed.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
            message = self._message(failed.error_message)
            if sqlstate.startswith("08") or sqlstate in _GONE:
                self._lost(psycopg.OperationalError(message), statement)
                return
            statement.done.errback(StoreError(f"database {self._owner.label}: {message}"))
            self._owner.idle(self)
            return
        if self._preparing is not None:
            self._prepared[statement.sql] = self._preparing
            try:
                self._send()
            except psycopg.Error as e:
                self._lost(e)
            return
        self.statement = None
        rows: list[tuple] = []
        for result in results:
            if result.status == pq.ExecStatus.TUPLES_OK:
                self._rows.set_pgresult(result)
                rows = self._rows.load_rows(0, result.ntuples, tuple)
        statement.done.callback(rows)
        self._owner.idle(self)

    def _message(self, text: bytes | None = None) -> str:
        raw = text if text is not None else self._pg.error_message
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        return lines[0] if lines else "connection lost"

    def _lost(self, error: Exception, statement: _Statement | None = None) -> None:
        statement = statement or self.statement
        self.statement = None
        self.close()
        # The threads' connections are replaced too, and the next connect backs off.
        self.conn.discard_if_broken(error)
        self.conn.close()
        self._owner.dropped(self)
        if statement is not None:
            statement.done.errback(StoreUnavailableError(
                f"database {self._owner.label}: {self._message(str(error).encode())}"))

    def close(self) -> None:
        if self.closed:
            return
        reactor = self._owner.reactor
        reactor.removeReader(self)
        reactor.removeWriter(self)
        self.closed = True
        try:
            self._raw.close()
        except psycopg.Error:
            pass


class ReactorPg:
    """A few non-blocking connections, driven by the reactor; see the module docstring.

    ``new_connection()`` gives an unopened `PgConnection`; ``run_on_thread(f)``
    runs ``f`` on a database thread (where it connects)."""

    def __init__(self, reactor, new_connection: Callable[[], object],
                 run_on_thread: Callable[..., Deferred], label: str, *,
                 size: int = CONNECTIONS):
        self.reactor = reactor
        self.label = label
        self._new_connection = new_connection
        self._run_on_thread = run_on_thread
        self._size = size
        self._links: list[_Link] = []
        self._connecting = 0
        self._waiting: collections.deque[_Statement] = collections.deque()
        self._closed = False

    def query(self, sql: str, params: Sequence) -> Deferred[list[tuple]]:
        """Run ``sql`` ($n placeholders) with ``params``; fires with its rows (decoded
        by psycopg), or fails with StoreError, StoreUnavailableError when the
        database is out of reach."""
        if self._closed:
            raise StoreError("the store is closed")
        statement = _Statement(sql, [_text(p) for p in params], Deferred())
        self._waiting.append(statement)
        self._dispatch()
        return statement.done

    def idle(self, link: _Link) -> None:
        self._dispatch()

    def dropped(self, link: _Link) -> None:
        if link in self._links:
            self._links.remove(link)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting:
            link = self._free_link()
            if link is None:
                if len(self._links) + self._connecting < self._size and not self._closed:
                    self._open()
                return
            link.send(self._waiting.popleft())

    def _free_link(self) -> _Link | None:
        for link in list(self._links):
            if link.statement is not None:
                continue
            if link.conn.stale:  # another connection saw the server go: reconnect
                self._links.remove(link)
                link.close()
                link.conn.close()
                continue
            return link
        return None

    def _open(self) -> None:
        self._connecting += 1
        conn = self._new_connection()
        d = self._run_on_thread(conn.connection)
        d.addCallbacks(self._opened, self._not_opened, callbackArgs=(conn,))

    def _opened(self, raw: psycopg.Connection, conn) -> None:
        self._connecting -= 1
        if self._closed:
            conn.close()
            return
        self._links.append(_Link(self, conn, raw))
        self._dispatch()

    def _not_opened(self, failure: Failure) -> None:
        self._connecting -= 1
        if self._links or self._connecting:
            self._dispatch()
            return
        # Nothing to run them on: fail closed now rather than queue behind the back-off.
        waiting, self._waiting = self._waiting, collections.deque()
        message = failure.getErrorMessage().strip().splitlines()
        error = StoreUnavailableError(
            f"database {self.label}: {message[0] if message else 'cannot connect'}")
        for statement in waiting:
            statement.done.errback(error)

    def close(self) -> None:
        """Close the connections; statements in flight or waiting fail (closed)."""
        self._closed = True
        links, self._links = self._links, []
        waiting, self._waiting = self._waiting, collections.deque()
        for link in links:
            statement, link.statement = link.statement, None
            link.close()
            link.conn.close()
            if statement is not None:
                waiting.append(statement)
        for statement in waiting:
            statement.done.errback(StoreUnavailableError(
                f"database {self.label}: the store is closing"))


class PgLogins:
    """`ThreadedStore`'s login-path reads and its code write over `ReactorPg`;
    rows become accounts with the store's own mapping (and seed key)."""

    def __init__(self, pg: ReactorPg, store):
        self._pg = pg
        self._store = store

    def lookup_password(self, name: str) -> Deferred[tuple[str | None, str | None] | None]:
        d = self._pg.query(_PASSWORD_SQL, (name,))
        d.addCallback(lambda rows: tuple(rows[0]) if rows else None)
        return d

    def load_account(self, name: str) -> Deferred[Account | None]:
        d = self._pg.query(_ACCOUNT_SQL, (name,))
        d.addCallback(self._store.account_from_rows)
        return d

    def load_and_use_code(self, name: str, plan) -> Deferred[tuple[Account | None,
                                                                   CodeUse | None]]:
        d = self.load_account(name)
        d.addCallback(self._use_planned, plan)
        return d

    def _use_planned(self, account: Account | None, plan):
        planned = plan(account)
        if planned is None:
            return account, None
        use, entry = planned
        params = [use.token_id, account.name if account.failures else None,
                  entry.time, entry.user, entry.client, entry.nas_ip,
                  entry.calling_station_id, entry.factor, entry.outcome, entry.reason,
                  use.value]
        if use.kind is TokenKind.TOTP:
            d = self._pg.query(_USE_TOTP_SQL, params + [use.drift])
        else:
            d = self._pg.query(_USE_HOTP_SQL, params)
        d.addCallback(lambda rows: (account, use if rows[0][0] == 1 else None))
        return d

    def close(self) -> None:
        self._pg.close()
