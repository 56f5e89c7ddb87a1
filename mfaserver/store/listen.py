"""``LISTEN`` on a dedicated PostgreSQL connection, read by the reactor (issue #12).

Nodes of a cluster tell each other of a push answered or opened with
``NOTIFY`` in the transaction that writes it (`mfaserver.store.cluster`).
`Listener` keeps one connection per node listening on that channel: its
socket is a reactor reader, so a notification reaches ``deliver(payload)``
within milliseconds and no thread waits for it.

Connecting is blocking (libpq), so it runs on a database thread (``run``).
When the connection drops (server restart, ``pg_terminate_backend``, network)
the listener says so once in the log, reconnects with a growing pause, and
calls ``reconnected()`` once it listens again, for the caller to catch up
on what it missed. Notifications are a fast path only: the callers poll
every few seconds as well, so a missed one delays an answer, never loses it.
"""

from __future__ import annotations

import os
from typing import Callable

import psycopg
from psycopg import conninfo as _conninfo
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mfaserver.store.cluster import CHANNEL
from mfaserver.store.pg import CONNECTION_DEFAULTS

log = Logger(namespace="mfaserver.store")

RECONNECT_MIN = 0.5
RECONNECT_MAX = 10.0


def _connect_and_listen(conninfo: str) -> psycopg.Connection:
    # On a database thread.
    conn = psycopg.connect(conninfo, autocommit=True)
    try:
        conn.execute(f"LISTEN {CHANNEL}")
    except BaseException:
        conn.close()
        raise
    return conn


class Listener:
    """Keeps a connection listening on `CHANNEL` and hands each payload to ``deliver``."""

    def __init__(self, dsn: str, reactor, run: Callable[..., Deferred], *,
                 deliver: Callable[[str], None], reconnected: Callable[[], None]):
        params = _conninfo.conninfo_to_dict(dsn)
        for name, value in CONNECTION_DEFAULTS.items():
            params.setdefault(name, value)
        self._conninfo = _conninfo.make_conninfo(**params)
        self._reactor: IReactorFDSet | IReactorTime = reactor
        self._run = run
        self._deliver = deliver
        self._reconnected = reconnected
        self._conn: psycopg.Connection | None = None
        # The reactor watches a duplicate of libpq's socket: ours to close, so
        # it stays valid (and is not reused) when libpq drops the connection.
        self._fd = -1
        self._pause = RECONNECT_MIN
        self._retry = None
        self._running = False
        self._said_lost = False
        self.listening = False

    # --- the service's start and stop ---

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> None:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._drop()

    # --- the reactor reader (IReadDescriptor) ---

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "mfaserver-listen"

    def doRead(self) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as e:
            self._lost(str(e).strip() or "connection closed")
            return
        while True:
            notice = pgconn.notifies()
            if notice is None:
                break
            try:
                self._deliver(notice.extra.decode("utf-8", "replace"))
            except Exception:
                log.failure("could not handle a cluster notification")
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            self._lost("connection closed")

    def connectionLost(self, reason: Failure) -> None:
        self._lost(reason.getErrorMessage())

    # --- internals ---

    def _connect(self) -> None:
        self._retry = None
        d = self._run(_connect_and_listen, self._conninfo)
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: psycopg.Connection) -> None:
        if not self._running:
            conn.close()
            return
        try:
            self._fd = os.dup(conn.pgconn.socket)
        except (OSError, psycopg.Error) as e:
            conn.close()
            self._say_lost(str(e))
            self._again()
            return
        self._conn = conn
        self._pause = RECONNECT_MIN
        self.listening = True
        self._reactor.addReader(self)
        if self._said_lost:
            self._said_lost = False
            log.info("cluster notifications: listening again")
        self._reconnected()

    def _not_connected(self, failure: Failure) -> None:
        failure.trap(psycopg.Error)
        self._say_lost(failure.getErrorMessage())
        self._again()

    def _lost(self, why: str) -> None:
        if self._conn is None:
            return
        self._drop()
        self._say_lost(why)
        self._again()

    def _say_lost(self, why: str) -> None:
        if not self._said_lost and self._running:
            self._said_lost = True
            why = why.splitlines()[0] if why else "no connection"
            log.warn("cluster notifications: not listening ({why}); answers from other "
                     "nodes arrive by polling until the connection is back", why=why)

    def _again(self) -> None:
        if not self._running or self._retry is not None:
            return
        self._retry = self._reactor.callLater(self._pause, self._connect)
        self._pause = min(RECONNECT_MAX, self._pause * 2)

    def _drop(self) -> None:
        conn = self._conn
        self.listening = False
        if conn is None:
            return
        self._reactor.removeReader(self)
        os.close(self._fd)
        self._fd = -1
        self._conn = None
        try:
            conn.close()
        except Exception:
            pass
