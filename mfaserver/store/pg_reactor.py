"""The login path's statements on PostgreSQL, sent by the reactor itself (issue #12).

A login with a code makes three statements: the local directory's password
read, the account read, and the replay-guard write with its audit row. Sent
through a database thread, each cost the daemon about 220-330 µs of CPU (the
hop there and back, the GIL passing between threads, psycopg's cursor);
driven by the reactor on a non-blocking libpq connection, with psycopg's
row decoding, about 50-65 µs (measured on the 2-core bench VM, 20,000
statements 64 at a time). On two cores that was the difference between a
node on PostgreSQL at 0.6 and at 1.0 of a node on SQLite. So those three go
through `ReactorPg`: two connections in libpq's non-blocking pipeline mode
whose sockets the reactor watches, statements sent as they come without
waiting for the one before, every statement prepared once per connection.
So do the audit rows, a device's poll and answer, and what the node holding a
push reads and writes when the push ends. Everything else stays on the database threads. Statements on
one connection are answered in order: one that waits for a row lock holds
those behind it, for at most the server's ``lock_timeout`` (5 s), after
which it fails alone.

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
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from mfaserver.auth.model import Account, AuditEntry, CodeUse, Device, TokenKind
from mfaserver.store.cluster import (OPEN_PUSH_SQL, PENDING_PUSHES_SQL, PUSH_COLUMNS,
                                     PushOpened, PushRow, open_push_params, push_opened)
from mfaserver.store.db import (ACCOUNT_SQL, AUDIT_INSERT, DEVICE_SQL, StoreError,
                                StoreUnavailableError, audit_row)

__all__ = ["ReactorPg", "PgLogins"]

CONNECTIONS = 2  # pipelined, statements from any number of logins share them


def _numbered(sql: str, placeholder: str = "?") -> str:
    """``?`` (or ``%s``) placeholders as libpq's ``$1``, ``$2``, ... (the statements
    hold no other ``?`` or ``%s``)."""
    parts = sql.split(placeholder)
    return "".join(part + (f"${n}" if n < len(parts) else "")
                   for n, part in enumerate(parts, start=1))


_PASSWORD_SQL = "SELECT password_hash, phone FROM users WHERE name = $1"
_ACCOUNT_SQL = _numbered(ACCOUNT_SQL)
_AUDIT_SQL = _numbered(AUDIT_INSERT)
# A device's poll and answer: the device (when not in ThreadedStore's cache) and its
# user's pending pushes.
_DEVICE_BY_ID_SQL = _numbered(DEVICE_SQL + " WHERE d.id = ?")
_PENDING_PUSHES_SQL = _numbered(PENDING_PUSHES_SQL, "%s")
_OPEN_PUSH_SQL = _numbered(OPEN_PUSH_SQL, "%s")
# As ClusterState.get_push and mark_delivered (the holder of a push that ended).
_PUSH_SQL = f"SELECT {PUSH_COLUMNS} FROM cluster_push WHERE txid = $1 AND forget_after > $2"
_DELIVERED_SQL = "UPDATE cluster_push SET delivered = 1 WHERE txid = $1 AND delivered = 0"
# ClusterState.answer_push in one statement (the function is in pg_migrations).
_ANSWER_SQL = ("SELECT * FROM cluster_answer_push($1, $2, $3, $4, $5, $6::double precision,"
               " $7::double precision)")


def _use_code_sql(set_used: str, unused: str) -> str:
    """The token update and, only if it updated a row, the failure reset and the audit
    row, as one statement (data-modifying CTEs): one round trip, one transaction.
    $1 the token, $2 the user whose failures to reset (or NULL), $3-$10 the audit
    row (`audit_row`'s order); the update's own values from $11."""
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
    rows: list[tuple] | None = None
    error: str | None = None       # the server's message, when it failed


# SQLSTATEs that mean the server is going away: the login fails closed, reported once.
_GONE = ("57P01", "57P02", "57P03")
# What a pipelined statement's results are read as, in order: the PREPARE (first use
# on a connection), the EXECUTE, then the sync point that ends it.
_PREPARE, _EXECUTE, _SYNC = "prepare", "execute", "sync"


@implementer(IReadDescriptor, IWriteDescriptor)
class _Link:
    """One connection in non-blocking pipeline mode, its socket watched by the reactor.

    Statements are sent as they come, without waiting for the previous one's
    result (libpq's pipeline mode), each followed by a sync point so that an
    error fails that statement alone. One result per reactor wake-up would cap
    a connection at the reactor's loop rate, which a busy node (device answers,
    thread hand-offs) drops to a few hundred per second; pipelined, every
    result that has arrived is read at each wake-up."""

    def __init__(self, owner: "ReactorPg", conn, raw: psycopg.Connection):
        self._owner = owner
        self.conn = conn          # the PgConnection: back-off, generation, close
        self._raw = raw
        self._pg = raw.pgconn
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()
        # The reactor watches a duplicate: libpq closes its own descriptor when the
        # connection breaks, and the reactor must still be able to unregister ours.
        self._fd = os.dup(self._pg.socket)
        self._rows = Transformer(raw)
        self._prepared: dict[str, bytes] = {}
        # (what, statement, prepared name) for every result still to come, in order.
        self._expected: collections.deque[tuple[str, _Statement, bytes]] = collections.deque()
        self.in_flight = 0        # statements sent and not yet answered
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
            while self._expected and not self._pg.is_busy():
                if not self._take(self._pg.get_result()):
                    break   # the rest has not arrived yet
            # Anything else read (a notice) is consumed and dropped.
        except psycopg.Error as e:
            self._lost(e)

    def connectionLost(self, reason):
        self._lost(psycopg.OperationalError(reason.getErrorMessage()))

    # --- statements ---

    def send(self, statement: _Statement) -> None:
        self.in_flight += 1
        try:
            name = self._prepared.get(statement.sql)
            if name is None:
                name = f"mfaserver_{len(self._prepared)}".encode()
                self._prepared[statement.sql] = name
                self._pg.send_prepare(name, statement.sql.encode())
                self._expected.append((_PREPARE, statement, name))
            self._pg.send_query_prepared(name, statement.params, result_format=1)
            self._expected.append((_EXECUTE, statement, name))
            self._pg.pipeline_sync()
            self._expected.append((_SYNC, statement, name))
            self._flush()
        except psycopg.Error as e:
            self._lost(e, statement)

    def _flush(self) -> None:
        if self._pg.flush() == 0:
            self._owner.reactor.removeWriter(self)
        else:  # the kernel took part of it: the rest when the socket is writable
            self._owner.reactor.addWriter(self)

    def _take(self, result) -> bool:
        """One result (or the None that ends a statement's results) from the server;
        False when there was nothing to take yet."""
        what, statement, name = self._expected[0]
        if what == _SYNC:
            if result is None:
                return False
            if result.status != pq.ExecStatus.PIPELINE_SYNC:
                raise psycopg.OperationalError(f"unexpected result {result.status!r}")
            self._expected.popleft()
            self.in_flight -= 1
            self._finish(statement)
            return True
        if result is None:   # the end of this PREPARE's or EXECUTE's results
            self._expected.popleft()
            return True
        status = result.status
        if status == pq.ExecStatus.FATAL_ERROR:
            if what == _PREPARE:
                self._prepared.pop(statement.sql, None)
            sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
            message = self._message(result.error_message)
            if sqlstate.startswith("08") or sqlstate in _GONE:
                raise psycopg.OperationalError(message)
            statement.error = statement.error or message
        elif status == pq.ExecStatus.PIPELINE_ABORTED:
            statement.error = statement.error or "aborted after an error"
        elif status == pq.ExecStatus.TUPLES_OK and what == _EXECUTE:
            self._rows.set_pgresult(result)
            statement.rows = self._rows.load_rows(0, result.ntuples, tuple)
        return True

    def _finish(self, statement: _Statement) -> None:
        if statement.error is not None:
            statement.done.errback(StoreError(
                f"database {self._owner.label}: {statement.error}"))
        else:
            statement.done.callback(statement.rows or [])

    def _message(self, text: bytes | None = None) -> str:
        raw = text if text is not None else self._pg.error_message
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        return lines[0] if lines else "connection lost"

    def _lost(self, error: Exception, sending: _Statement | None = None) -> None:
        """The connection broke (``sending``: while that statement was being sent):
        every statement sent and not answered fails, closed."""
        if self.closed:
            return
        unanswered = self.take_unanswered()
        if sending is not None and not any(s is sending for s in unanswered):
            unanswered.append(sending)
        self.close()
        # The threads' connections are replaced too, and the next connect backs off.
        self.conn.discard_if_broken(error)
        self.conn.close()
        self._owner.dropped(self)
        failure = StoreUnavailableError(
            f"database {self._owner.label}: {self._message(str(error).encode())}")
        for statement in unanswered:
            statement.done.errback(failure)

    def take_unanswered(self) -> list[_Statement]:
        """Closing: the statements sent and not answered (each once)."""
        unanswered = [statement for what, statement, _ in self._expected if what == _SYNC]
        self._expected.clear()
        self.in_flight = 0
        return unanswered

    def close(self) -> None:
        if self.closed:
            return
        reactor = self._owner.reactor
        reactor.removeReader(self)
        reactor.removeWriter(self)
        self.closed = True
        os.close(self._fd)
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
        self._connect_failed = False
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

    def dropped(self, link: _Link) -> None:
        if link in self._links:
            self._links.remove(link)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting:
            link = self._least_busy_link()
            # A second connection only while connecting works: after a failed
            # connect, what waits goes to the connection there is, or fails.
            grow = ((link is None and not self._connecting)
                    or (link is not None and link.in_flight and not self._connect_failed))
            if grow and not self._closed and len(self._links) + self._connecting < self._size:
                self._open()   # (connecting may finish at once and send: look again)
                continue
            if link is None:
                return
            link.send(self._waiting.popleft())

    def _least_busy_link(self) -> _Link | None:
        for link in list(self._links):
            if not link.in_flight and link.conn.stale:
                # Another connection saw the server go (a restart, a failover): reconnect.
                self._links.remove(link)
                link.close()
                link.conn.close()
        return min(self._links, key=lambda link: link.in_flight, default=None)

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
        self._connect_failed = False
        self._links.append(_Link(self, conn, raw))
        self._dispatch()

    def _not_opened(self, failure: Failure) -> None:
        self._connecting -= 1
        self._connect_failed = True
        if self._links:
            self._dispatch()
            return
        if self._connecting:
            return      # the other connect under way decides for what waits
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
            waiting.extend(link.take_unanswered())
            link.close()
            link.conn.close()
        for statement in waiting:
            statement.done.errback(StoreUnavailableError(
                f"database {self.label}: the store is closing"))


class PgLogins:
    """The statements every login makes, over `ReactorPg`: `ThreadedStore`'s
    password and account reads, its code write and audit rows; a device's
    poll and answer (the device, its user's pending pushes, the answer); and
    the reads and write of the node holding a push when the push ends. Rows
    become accounts with the store's own mapping (and seed key)."""

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
                  *audit_row(entry), use.value]
        if use.kind is TokenKind.TOTP:
            d = self._pg.query(_USE_TOTP_SQL, params + [use.drift])
        else:
            d = self._pg.query(_USE_HOTP_SQL, params)
        d.addCallback(lambda rows: (account, use if rows[0][0] == 1 else None))
        return d

    def record_audit(self, entry: AuditEntry) -> Deferred[None]:
        d = self._pg.query(_AUDIT_SQL, audit_row(entry))
        d.addCallback(lambda rows: None)
        return d

    def get_push(self, txid: str, now: float) -> Deferred[PushRow | None]:
        d = self._pg.query(_PUSH_SQL, (txid, now))
        d.addCallback(lambda rows: PushRow(*rows[0]) if rows else None)
        return d

    def answer_push(self, txid: str, user: str, verdict: str, number: str | None,
                    device_id: str, now: float, forget_after: float,
                    ) -> Deferred[tuple[str, PushRow | None]]:
        """A device's answer, as `ClusterState.answer_push` with the decision made in
        the database: ``verdict`` as given, but "deny" for an approval whose
        ``number`` is not the push's. ("unknown", None), or (outcome, the row)."""
        d = self._pg.query(_ANSWER_SQL, (txid, user, verdict, number, device_id, now,
                                         forget_after))
        d.addCallback(lambda rows: (rows[0][0], PushRow(*rows[0][1:]) if rows[0][1] else None))
        return d

    def open_push(self, **push) -> Deferred[PushOpened]:
        """`ClusterState.open_push` (same keyword arguments): the same function, sent
        by the reactor."""
        d = self._pg.query(_OPEN_PUSH_SQL, open_push_params(**push))
        d.addCallback(lambda rows: push_opened(rows[0]))
        return d

    def pending_pushes(self, user: str, now: float) -> Deferred[list[PushRow]]:
        d = self._pg.query(_PENDING_PUSHES_SQL, (user, now))
        d.addCallback(lambda rows: [PushRow(*row) for row in rows])
        return d

    def get_device(self, device_id: str) -> Deferred[Device | None]:
        d = self._pg.query(_DEVICE_BY_ID_SQL, (device_id,))
        d.addCallback(lambda rows: Device(*rows[0]) if rows else None)
        return d

    def mark_push_delivered(self, txid: str) -> Deferred[None]:
        d = self._pg.query(_DELIVERED_SQL, (txid,))
        d.addCallback(lambda rows: None)
        return d

    def close(self) -> None:
        self._pg.close()
