"""`mfaserver.store.pg_reactor`: the login path's statements driven by the reactor on
non-blocking libpq connections, against a real PostgreSQL.

The `AccountStore` contract runs again over a `ThreadedStore` whose password read,
account read and code write go through `PgLogins`. The reactor is `PollingReactor`:
the real sockets, polled by the test until the Deferred it waits for has fired, so
these tests stay synchronous and need no global reactor.
"""

from __future__ import annotations

import select
import socket
import time

import psycopg
import pytest

import test_store
from mfaserver.auth.model import AuditEntry, CodeUse, Device, TokenKind
from mfaserver.store import StoreError
from mfaserver.store.db import StoreUnavailableError
from mfaserver.store.pg import PgConnection, PgStore
from mfaserver.store.pg_reactor import PgLogins, ReactorPg
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import run_now

from . import test_pg_store

NOW = test_store.NOW


class PollingReactor:
    """What `ReactorPg` uses of a reactor, over select(), pumped by the test."""

    def __init__(self):
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)

    def addWriter(self, writer):
        self.writers.add(writer)

    def removeWriter(self, writer):
        self.writers.discard(writer)

    def pump(self, until=lambda: False, seconds: float = 10.0) -> None:
        """Serve the sockets until ``until()`` or ``seconds`` have passed."""
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            readers = [r for r in self.readers if r.fileno() >= 0]
            writers = [w for w in self.writers if w.fileno() >= 0]
            if not readers and not writers:
                return
            ready_r, ready_w, _ = select.select(readers, writers, [], 0.05)
            for w in ready_w:
                w.doWrite()
            for r in ready_r:
                if r in self.readers:
                    r.doRead()

    def settle(self, d) -> list:
        """Pump until ``d`` has its result (not only fired and paused, waiting for
        another); [that result] then, or [] after 10 s."""
        box: list = []

        def keep(result):
            box.append(result)
            return result
        d.addBoth(keep)
        self.pump(lambda: box)
        return box

    def result(self, d):
        """Pump until ``d`` has its result; that result (a failure is raised)."""
        box = self.settle(d)
        assert box, "no answer from the database within 10 s"
        d.addErrback(lambda _: None)
        value = box[0]
        if hasattr(value, "raiseException"):
            value.raiseException()
        return value


class ReactorPgAccountStoreTests(test_pg_store.PgThreadedStoreTests):
    """The `AccountStore` contract with the login path on `PgLogins`."""

    def setUp(self):
        super().setUp()
        self.reactor = PollingReactor()
        logins = self.db.reactor_logins(self.reactor, run_now)
        self.addCleanup(logins.close)
        self.store = ThreadedStore(self.db, run_now, logins=logins)

    def successResultOf(self, deferred):
        self.reactor.settle(deferred)
        return super().successResultOf(deferred)


@pytest.fixture
def db(postgres_database, tmp_path):
    store = PgStore.open(postgres_database, tmp_path / "seed.key")
    yield store
    store.close()


@pytest.fixture
def reactor():
    return PollingReactor()


@pytest.fixture
def pg(db, reactor):
    """A ReactorPg of its own (two connections) on the test's database."""
    logins = db.reactor_logins(reactor, run_now)
    yield logins._pg
    logins.close()


def _backends(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid != pg_backend_pid() AND query LIKE '%users%'")]


def _terminate(dsn: str, pids: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_rows_come_back_decoded(pg, reactor):
    rows = reactor.result(pg.query("SELECT $1::text, $2::bigint, $3::double precision, $4::text",
                                   ("ä", 2 ** 40, 0.1, None)))
    assert rows == [("ä", 2 ** 40, 0.1, None)]


def test_a_statement_error_is_a_store_error_and_the_connection_stays(pg, reactor):
    with pytest.raises(StoreError, match="division by zero") as info:
        reactor.result(pg.query("SELECT 1 / $1::integer", (0,)))
    assert not isinstance(info.value, StoreUnavailableError)
    assert reactor.result(pg.query("SELECT 1 / $1::integer", (1,))) == [(1,)]
    assert len(pg._links) == 1


def test_statements_queue_for_the_two_connections(pg, reactor):
    waits = [pg.query("SELECT $1::integer, pg_sleep(0.05)", (i,)) for i in range(6)]
    assert [reactor.result(d)[0][0] for d in waits] == list(range(6))
    assert len(pg._links) == 2


def test_a_connection_killed_mid_statement_fails_closed_then_a_new_one_serves(
        pg, reactor, postgres_database):
    reactor.result(pg.query("SELECT count(*) FROM users", ()))
    d = pg.query("SELECT pg_sleep(5), count(*) FROM users", ())
    reactor.pump(seconds=0.2)
    _terminate(postgres_database, _backends(postgres_database))
    with pytest.raises(StoreUnavailableError, match="terminat"):
        reactor.result(d)
    assert reactor.result(pg.query("SELECT count(*) FROM users", ())) == [(0,)]


def test_an_idle_connection_killed_is_noticed_and_replaced(pg, reactor, postgres_database):
    reactor.result(pg.query("SELECT count(*) FROM users", ()))
    _terminate(postgres_database, _backends(postgres_database))
    reactor.pump(lambda: not pg._links, seconds=5)
    assert pg._links == []
    assert reactor.result(pg.query("SELECT count(*) FROM users", ())) == [(0,)]


def test_an_unreachable_server_fails_closed_at_once(reactor):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = ReactorPg(reactor, lambda: PgConnection(f"host=127.0.0.1 port={port} dbname=x"),
                   run_now, "test")
    with pytest.raises(StoreUnavailableError, match="database test"):
        reactor.result(pg.query("SELECT 1", ()))
    # The back-off: the next statement fails without waiting for a connect.
    with pytest.raises(StoreUnavailableError):
        reactor.result(pg.query("SELECT 1", ()))


def test_close_fails_what_waits(pg, reactor):
    running = pg.query("SELECT pg_sleep(5)", ())
    reactor.pump(seconds=0.1)
    pg.close()
    with pytest.raises(StoreUnavailableError, match="closing"):
        reactor.result(running)
    with pytest.raises(StoreError, match="closed"):
        pg.query("SELECT 1", ())


def test_a_code_is_used_once_across_two_nodes(db, open_other_node, reactor):
    test_store.add_alice(db)
    token_id = db.add_token("alice", test_store.totp(), now=NOW).id
    nodes = [db.reactor_logins(reactor, run_now), open_other_node().reactor_logins(
        reactor, run_now)]

    def plan(node_name):
        def f(account):
            entry = AuditEntry(NOW, "alice", node_name, None, None, "totp", "accept", "ok")
            return CodeUse(token_id, TokenKind.TOTP, 5000), entry
        return f
    both = [node.load_and_use_code("alice", plan(f"node{i}")) for i, node in enumerate(nodes)]
    used = [reactor.result(d)[1] for d in both]
    assert sum(u is not None for u in used) == 1
    assert [e.client for e in db.recent_audit()] in (["node0"], ["node1"])
    for node in nodes:
        node.close()


def test_a_row_lock_held_too_long_is_a_store_error(db, reactor, postgres_database,
                                                   monkeypatch):
    import mfaserver.store.pg as pg_module
    monkeypatch.setattr(pg_module, "LOCK_TIMEOUT_MS", 200)
    test_store.add_alice(db)
    token_id = db.add_token("alice", test_store.totp(), now=NOW).id
    logins = PgLogins(ReactorPg(reactor, db._conn.another, run_now, "test"), db)
    entry = AuditEntry(NOW, "alice", "bench", None, None, "totp", "accept", "ok")
    with psycopg.connect(postgres_database, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("SELECT 1 FROM tokens WHERE id = %s FOR UPDATE", (token_id,))
        with pytest.raises(StoreError, match="lock timeout"):
            reactor.result(logins.load_and_use_code(
                "alice", lambda account: (CodeUse(token_id, TokenKind.TOTP, 7), entry)))
        other.execute("ROLLBACK")
    assert reactor.result(logins.load_and_use_code(
        "alice", lambda account: (CodeUse(token_id, TokenKind.TOTP, 7), entry)))[1] is not None
    assert len(db.recent_audit()) == 1
    logins.close()


@pytest.fixture
def open_other_node(postgres_database, tmp_path):
    opened = []

    def open_():
        store = PgStore.open(postgres_database, tmp_path / "seed.key")
        opened.append(store)
        return store
    yield open_
    for store in opened:
        store.close()


def test_pipelined_statements_answer_in_order_and_an_error_fails_only_its_own(pg, reactor):
    waits = [pg.query("SELECT 10 / $1::integer", (d,)) for d in (1, 2, 0, 5, 10)]
    assert pg._links and max(link.in_flight for link in pg._links) > 1
    answers = []
    for d in waits:
        try:
            answers.append(reactor.result(d)[0][0])
        except StoreError as e:
            answers.append("division by zero" in str(e))
    assert answers == [10, 5, True, 2, 1]


def _push(store, txid: str, user: str, *, number=None, now=NOW, timeout=60.0, station=""):
    return store.open_push(
        txid=txid, login_key=f"{user}|nas|{station}", user=user, client="nas", nas_ip=None,
        calling_station_id=station or None, now=now, timeout=timeout, number=number,
        node="a", late_window=30.0, max_per_user=3, max_total=100, rate=None)


def test_a_device_answer_in_one_statement_keeps_answer_pushs_rules(db, reactor,
                                                                   postgres_database):
    logins = db.reactor_logins(reactor, run_now)
    _push(db, "t1", "alice")
    _push(db, "t2", "bob", number="42")
    _push(db, "t3", "carol", number="17")
    _push(db, "t4", "dave", timeout=5.0)

    def answer(txid, user, verdict="approve", number=None, now=NOW + 1):
        return reactor.result(logins.answer_push(txid, user, verdict, number, "dev", now,
                                                 now + 30))

    with psycopg.connect(postgres_database, autocommit=True) as listen:
        listen.execute("LISTEN mfaserver")
        assert answer("t1", "mallory") == ("unknown", None)
        assert answer("nope", "alice") == ("unknown", None)
        outcome, row = answer("t1", "alice")
        assert (outcome, row.state, row.verdict, row.answered_by) == (
            "answered", "answered", "approve", "dev")
        assert answer("t1", "alice", "deny")[0] == "already"
        assert answer("t2", "bob", number="41")[1].verdict == "deny"   # the wrong number
        assert answer("t3", "carol", number="17")[1].verdict == "approve"
        assert answer("t4", "dave", now=NOW + 6)[0] == "expired"
        listen.execute("SELECT 1")
        heard = [n.payload for n in listen.notifies(timeout=0.5, stop_after=3)]
    assert heard == ["ended t1", "ended t2", "ended t3"]
    assert db.get_push("t1", NOW + 2).verdict == "approve"
    assert db.get_push("t4", NOW + 6).state == "pending"   # expired: nothing written
    logins.close()


def test_a_statement_that_cannot_be_sent_fails_closed(pg, reactor):
    reactor.result(pg.query("SELECT 1", ()))
    [link] = pg._links
    link._pg.finish()               # the connection is gone under the link
    with pytest.raises(StoreUnavailableError):
        reactor.result(pg.query("SELECT 1", ()))
    assert reactor.result(pg.query("SELECT 2", ())) == [(2,)]   # on a new connection


def test_a_devices_poll_reads_what_the_threads_read(db, reactor):
    """The device and its user's pending pushes, as `Store.get_device` and
    `ClusterState.pending_pushes` give them."""
    logins = db.reactor_logins(reactor, run_now)
    db.add_user("alice", password_hash=None, phone=None, now=NOW)
    db.add_enrollment("alice", "a" * 64, NOW + 600, now=NOW)
    db.enroll_device("a" * 64, Device(id="dev1", user="", public_key="ed25519:x",
                                      notify_type="ntfy", notify_url="https://ntfy.example/t"),
                     now=NOW)
    device = reactor.result(logins.get_device("dev1"))
    assert device == db.get_device("dev1") and device.user == "alice"
    assert reactor.result(logins.get_device("nope")) is None

    _push(db, "t2", "alice", now=NOW + 1, station="b")
    _push(db, "t1", "alice", now=NOW, station="a")   # opened first, listed first
    _push(db, "t3", "bob")
    _push(db, "t4", "alice", timeout=0.5, station="c")   # expired by NOW + 1
    rows = reactor.result(logins.pending_pushes("alice", NOW + 1))
    assert [row.txid for row in rows] == ["t1", "t2"]
    assert rows == db.pending_pushes("alice", NOW + 1)
    assert reactor.result(logins.pending_pushes("nobody", NOW)) == []
    logins.close()
