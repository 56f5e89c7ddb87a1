"""The store's database out of reach (issue #12): fail closed, say so once, reconnect.

`ThreadedStore` logs the outage once and its end once; the pipeline rejects
with "try later" and no traceback; `PerThreadStore` gives each database
thread its own store; `PgConnection` backs off after a failed connect (no
PostgreSQL needed: psycopg.connect is replaced).
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mfaserver.store.db import StoreUnavailableError
from mfaserver.store.pg import RECONNECT_MAX, RECONNECT_MIN, PgConnection
from mfaserver.store.threaded import PerThreadStore, ThreadedStore


class FlakyStore:
    """A store whose database is down while ``down`` is set."""

    def __init__(self):
        self.down = False

    def load_account(self, name):
        if self.down:
            raise StoreUnavailableError("database postgresql://db:5432/mfa: connection refused")
        return None

    def record_audits(self, entries):
        self.load_account("x")


def run_now(f, *args, **kwargs):
    try:
        return defer.succeed(f(*args, **kwargs))
    except Exception:
        return defer.fail(Failure())


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def messages(events, namespace="mfaserver.store"):
    return [e["log_format"] for e in events if e.get("log_namespace") == namespace]


def test_an_outage_is_logged_once_and_its_end_once(events):
    store = FlakyStore()
    threaded = ThreadedStore(store, run_now)
    store.down = True
    for _ in range(5):
        failures = []
        threaded.load_account("alice").addErrback(failures.append)
        assert failures and failures[0].check(StoreUnavailableError)
    audit = []
    threaded.record_audit(object()).addErrback(audit.append)
    assert audit and audit[0].check(StoreUnavailableError)
    assert threaded.unavailable
    store.down = False
    threaded.load_account("alice")
    threaded.load_account("alice")
    assert not threaded.unavailable
    logged = messages(events)
    assert len(logged) == 2
    assert logged[0].startswith("store unavailable") and logged[1] == "store available again"


def test_other_store_errors_are_not_an_outage(events):
    class Broken:
        def load_account(self, name):
            raise ValueError("a bug")
    threaded = ThreadedStore(Broken(), run_now)
    threaded.load_account("alice").addErrback(lambda f: None)
    assert not threaded.unavailable
    assert messages(events) == []


def test_each_thread_gets_its_own_store_and_close_closes_them_all():
    opened = []

    class One:
        closed = False

        def which(self):
            return self

        def close(self):
            self.closed = True

    def open_one():
        opened.append(One())
        return opened[-1]

    stores = PerThreadStore(open_one)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append((stores.which(), stores.which())))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 3
    assert all(first is second for first, second in seen)  # one store per thread, kept
    assert {id(first) for first, _ in seen} == {id(s) for s in opened}
    stores.close()
    assert all(s.closed for s in opened)


def test_a_failed_connect_is_not_retried_before_its_back_off(monkeypatch):
    now = [100.0]
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(now[0])
        raise psycopg.OperationalError("connection refused")
    monkeypatch.setattr(psycopg, "connect", refuse)
    conn = PgConnection("host=127.0.0.1 dbname=x", clock=lambda: now[0])
    sibling = conn.another()
    with pytest.raises(psycopg.OperationalError):
        conn.connection()
    for c in (conn, sibling):  # the back-off is the server's, for every connection
        with pytest.raises(psycopg.OperationalError, match="not connected"):
            c.connection()
    assert attempts == [100.0]
    now[0] += RECONNECT_MIN
    with pytest.raises(psycopg.OperationalError, match="connection refused"):
        sibling.connection()
    assert len(attempts) == 2
    # Each wait doubles, up to RECONNECT_MAX: a connection tried a moment before the
    # wait ends does not try.
    waits = []
    for _ in range(5):
        wait = conn._server.retry_at - now[0]
        waits.append(wait)
        now[0] += wait - 0.01
        with pytest.raises(psycopg.OperationalError, match="not connected"):
            conn.connection()
        now[0] += 0.01
        with pytest.raises(psycopg.OperationalError, match="connection refused"):
            conn.connection()
    assert waits == [2 * RECONNECT_MIN, 4 * RECONNECT_MIN, RECONNECT_MAX, RECONNECT_MAX,
                     RECONNECT_MAX]


def test_an_unparsable_dsn_is_refused_without_repeating_it(tmp_path):
    from mfaserver.store import StoreError
    from mfaserver.store.pg import PgStore
    for dsn in ("host=db password=s3cret-pw secret=x", "postgresql://mfa:50%s3cret-pw@db/m"):
        with pytest.raises(StoreError) as info:
            PgStore.open(dsn, tmp_path / "seed.key")
        assert "s3cret" not in str(info.value)
        assert "not a libpq connection string" in str(info.value)
