"""`PgStore` on a real PostgreSQL (issue #12, part 1): the store's own tests and the
`AccountStore` contract run again over PostgreSQL, then what only several nodes on one
database can show: two nodes racing for one TOTP step, and a connection killed under a
node.

The tests of tests/test_store.py that need nothing but a store (``store``, and
``open_store`` for a second node) are taken as they are; those that look at SQLite
itself (its PRAGMAs, query plans, files, error texts) stay there, and the ones among
them that matter on PostgreSQL too have a version below.
"""

from __future__ import annotations

import inspect
import threading

import psycopg
import pytest

import test_store
import test_store_contract as contract
from mfaserver.auth.model import AuditEntry, CodeUse, Device, TokenKind
from mfaserver.store import (EnrollmentExpired, KeyFileError, SeedIntegrityError, StoreError,
                             load_or_create_key)
from mfaserver.store.pg import PgStore
from mfaserver.store.pg_migrations import SCHEMA_VERSION
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import run_now

NOW = test_store.NOW
SEED = test_store.SEED

# Tests of tests/test_store.py about SQLite itself, not the store's behaviour.
SQLITE_ONLY = {
    "test_connection_settings",            # PRAGMAs
    "test_hot_path_queries_use_indexes",   # EXPLAIN QUERY PLAN
    "test_clear_failures",                 # sqlite3's total_changes
    "test_database_errors_become_store_errors",  # SQLite's message
}


def _shared_tests():
    """The test functions of test_store that take only ``store``/``open_store``."""
    for name, test in vars(test_store).items():
        if not name.startswith("test_") or name in SQLITE_ONLY or not callable(test):
            continue
        params = set(inspect.signature(test).parameters)
        for mark in getattr(test, "pytestmark", ()):
            if mark.name == "parametrize":
                params -= {p.strip() for p in mark.args[0].split(",")}
        if params <= {"store", "open_store"}:
            yield name, test


globals().update(_shared_tests())


@pytest.fixture
def key_path(tmp_path):
    return tmp_path / "seed.key"


@pytest.fixture
def open_store(postgres_database, key_path):
    """Opens another PgStore (another node) on the test's database."""
    return lambda: PgStore.open(postgres_database, key_path)


@pytest.fixture
def store(open_store):
    s = open_store()
    yield s
    s.close()


def raw(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


class PgThreadedStoreTests(contract.ThreadedStoreTests):
    """The `AccountStore` contract over a `ThreadedStore` on a `PgStore`."""

    @pytest.fixture(autouse=True)
    def _database(self, postgres_database, tmp_path):
        self.dsn, self.key = postgres_database, tmp_path / "seed.key"

    def setUp(self):
        self.db = PgStore.open(self.dsn, self.key)
        self.addCleanup(self.db.close)
        self.store = ThreadedStore(self.db, run_now)


# --- opening, the seed key -----------------------------------------------------------------

def test_open_migrates_and_seals_a_key_check(postgres_database, key_path):
    PgStore.open(postgres_database, key_path).close()
    with raw(postgres_database) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] \
            == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM meta WHERE name = 'key_check'"
                            ).fetchone()[0] == 1
    assert key_path.exists()


def test_wrong_key_file_is_refused_at_open(postgres_database, key_path, tmp_path):
    PgStore.open(postgres_database, key_path).close()
    other = tmp_path / "other.key"
    load_or_create_key(other, create=True)
    with pytest.raises(KeyFileError, match="does not match the database"):
        PgStore.open(postgres_database, other)


def test_lost_key_is_not_silently_replaced(store, postgres_database, key_path):
    key_path.unlink()
    with pytest.raises(KeyFileError, match="does not exist"):
        PgStore.open(postgres_database, key_path)
    assert not key_path.exists()


def test_an_unreachable_database_fails_open_with_store_error(postgres_database, key_path):
    dsn = psycopg.conninfo.make_conninfo(postgres_database, dbname="no_such_database")
    with pytest.raises(StoreError, match="cannot open database postgresql://127.0.0.1:"
                                         r"\d+/no_such_database") as info:
        PgStore.open(dsn, key_path)
    assert "password" not in str(info.value)


def test_closed_store_raises(store):
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_user("alice")


# --- what test_store checks on SQLite's file, on PostgreSQL's tables ------------------------

def test_seeds_are_not_stored_in_plaintext(store, postgres_database):
    test_store.add_alice(store)
    store.add_token("alice", test_store.totp("T1"), now=NOW)
    with raw(postgres_database) as conn:
        [(blob,)] = conn.execute("SELECT secret FROM tokens").fetchall()
    assert SEED not in blob and blob[:1] == b"\x01"


def test_flipped_byte_in_stored_seed_raises_integrity_error(store, postgres_database):
    test_store.add_alice(store)
    store.add_token("alice", test_store.totp("T1"), now=NOW)
    with raw(postgres_database) as conn:
        blob = bytearray(conn.execute("SELECT secret FROM tokens").fetchone()[0])
        blob[20] ^= 0x40
        conn.execute("UPDATE tokens SET secret = %s", (bytes(blob),))
    with pytest.raises(SeedIntegrityError, match="T1"):
        store.load_account("alice")


def test_delete_user_cascades_tokens_and_bypass_but_keeps_audit(store, postgres_database):
    test_store.add_alice(store)
    store.add_token("alice", test_store.totp("A1"), now=NOW)
    store.add_bypass("alice", NOW + 60)
    store.record_audit(AuditEntry(NOW, "alice", "vpn", None, None, "totp", "accept", "ok"))
    store.delete_user("alice")
    with raw(postgres_database) as conn:
        assert conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM bypass").fetchone()[0] == 0
    assert len(store.recent_audit(user="alice")) == 1


def test_clear_failures(store):
    test_store.add_alice(store)
    store.register_failure("alice", now=NOW, threshold=5, lock_seconds=60)
    store.clear_failures("alice")
    assert store.get_user("alice").failures == 0
    store.clear_failures("nobody")


def test_database_errors_become_store_errors(store):
    store._conn.execute("DROP TABLE audit")
    with pytest.raises(StoreError, match='relation "audit" does not exist'):
        store.record_audit(test_store.entry(NOW))
    assert store.list_users() == []   # the connection is still good


def test_devices_version_changes_when_any_node_writes_devices(store, open_store,
                                                             postgres_database):
    other = open_store()
    try:
        seen = [store.devices_version()]

        def changed() -> bool:
            seen.append(store.devices_version())
            return seen[-1] != seen[-2]

        assert not changed()
        other.add_user("bob", password_hash=None, phone=None, now=NOW)
        other.record_audit(test_store.entry(NOW))
        assert not changed()   # other writes leave the device cache alone
        other.add_enrollment("bob", "b" * 64, NOW + 600, now=NOW)
        assert not changed()
        other.enroll_device("b" * 64, Device(id="dev-b", user="", public_key="ed25519:x"),
                            now=NOW)
        assert changed()
        other.add_enrollment("bob", "c" * 64, NOW + 600, now=NOW)
        other.enroll_device("c" * 64, Device(id="dev-c", user="", public_key="ed25519:y"),
                            now=NOW)
        assert changed()
        other.delete_device("bob", "dev-c")
        assert changed()
        other.delete_user("bob")   # its last device goes by the cascade
        assert changed()
        assert store.get_device("dev-b") is None
        # A transaction moves it once, however many statements it makes (a store
        # copy inserts every device in one): no row version per statement.
        with psycopg.connect(postgres_database, autocommit=True) as conn, conn.transaction():
            for n in range(3):
                conn.execute("DELETE FROM devices WHERE id = %s", (f"none{n}",))
        assert seen[-1] + 1 == store.devices_version()
    finally:
        other.close()


def test_a_directory_sync_runs_on_postgresql(store):
    store.add_user("carol", password_hash=None, phone=None, now=NOW)
    result = store.sync_users([("alice", "+14155550123"), ("bob", None), ("carol", None)],
                              now=NOW, keep_days=0)
    assert (result.added, result.conflicts) == (2, ("carol",))
    result = store.sync_users([("alice", "+14155550124")], now=NOW + 1, keep_days=0)
    assert (result.updated, result.disabled) == (1, 1)
    result = store.sync_users([("alice", "+14155550124")], now=NOW + 2, keep_days=0,
                              dry_run=True)
    assert (result.unchanged, result.removed) == (1, 1)
    assert store.get_user("bob") is not None   # the dry run wrote nothing


# --- several nodes on one database ---------------------------------------------------------

def in_parallel(nodes, rounds: int, attempt) -> list[list]:
    """Run ``attempt(i, node, round)`` for every round on every node, each node in its
    own thread and all of them starting each round together; close the nodes and
    return each node's results (any exception in a thread fails the test)."""
    barrier = threading.Barrier(len(nodes))
    results = [[] for _ in nodes]
    errors = []

    def run(i):
        try:
            for r in range(rounds):
                barrier.wait(30)
                results[i].append(attempt(i, nodes[i], r))
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for n in nodes:
        n.close()
    assert errors == []
    return results


def test_nodes_racing_for_one_totp_step_accept_it_once(store, open_store):
    """Four nodes try every step at once through the login path's one-trip write; each
    step is accepted by exactly one, and only its audit row is written."""
    test_store.add_alice(store)
    token_id = store.add_token("alice", test_store.totp(), now=NOW).id
    rounds = 150

    def attempt(i, node, r):
        entry = AuditEntry(NOW + r, "alice", f"node{i}", None, None, "totp", "accept", "ok")
        return node.use_code_and_audit(CodeUse(token_id, TokenKind.TOTP, 1000 + r), entry)
    results = in_parallel([open_store() for _ in range(4)], rounds, attempt)
    assert [sum(accepted) for accepted in zip(*results)] == [1] * rounds
    assert len(store.recent_audit(limit=10 * rounds)) == rounds
    assert store.load_account("alice").tokens[0].last_step == 1000 + rounds - 1


def test_an_enrollment_token_enrolls_one_device_across_nodes(store, open_store):
    test_store.add_alice(store)
    rounds = 20
    for r in range(rounds):
        store.add_enrollment("alice", f"{r:064x}", NOW + 600, now=NOW)

    def attempt(i, node, r):
        try:
            node.enroll_device(f"{r:064x}", Device(id=f"d{r}-{i}", user="",
                                                   public_key="ed25519:x"), now=NOW)
            return True
        except EnrollmentExpired:
            return False
    results = in_parallel([open_store() for _ in range(4)], rounds, attempt)
    assert [sum(enrolled) for enrolled in zip(*results)] == [1] * rounds
    assert len(store.list_devices("alice")) == rounds


def _kill_other_sessions(dsn: str) -> int:
    with raw(dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS killed"
        ).fetchone()[0]


def test_a_killed_connection_fails_one_call_closed_and_the_next_reconnects(
        store, postgres_database):
    test_store.add_alice(store)
    token_id = store.add_token("alice", test_store.totp(), now=NOW).id
    assert _kill_other_sessions(postgres_database) == 1
    with pytest.raises(StoreError, match="^database postgresql://127.0.0.1:"):
        store.use_totp_step(token_id, 1, 0)
    assert store.use_totp_step(token_id, 1, 0) is True
    # The same inside the login path's transaction: nothing half-written.
    assert _kill_other_sessions(postgres_database) == 1
    entry = test_store.entry(NOW)
    with pytest.raises(StoreError):
        store.use_code_and_audit(CodeUse(token_id, TokenKind.TOTP, 2), entry)
    assert store.recent_audit() == []
    assert store.use_code_and_audit(CodeUse(token_id, TokenKind.TOTP, 2), entry) is True
    assert len(store.recent_audit()) == 1


def test_a_write_waiting_too_long_for_a_row_lock_fails_closed(store, open_store,
                                                              postgres_database, monkeypatch):
    import mfaserver.store.pg as pg

    monkeypatch.setattr(pg, "LOCK_TIMEOUT_MS", 200)   # the real one (5 s) is a wall-clock wait
    slow = open_store()
    try:
        test_store.add_alice(store)
        token_id = store.add_token("alice", test_store.totp(), now=NOW).id
        with raw(postgres_database) as other:
            other.execute("BEGIN")
            other.execute("SELECT 1 FROM tokens WHERE id = %s FOR UPDATE", (token_id,))
            with pytest.raises(StoreError, match="lock timeout"):
                slow.use_totp_step(token_id, 1, 0)
            # Reads do not wait for writers.
            assert slow.load_account("alice").tokens[0].last_step is None
            other.execute("ROLLBACK")
        assert slow.use_totp_step(token_id, 1, 0) is True
    finally:
        slow.close()


def test_two_nodes_syncing_at_once_sync_one_after_the_other(store, open_store):
    entries = [(f"user{i}", None) for i in range(2000)]
    results = in_parallel([open_store() for _ in range(2)], 1, lambda i, node, r: node.sync_users(
        entries, now=NOW, keep_days=30))
    assert sorted((r.added, r.unchanged) for [r] in results) == [(0, 2000), (2000, 0)]
    assert store.count_users(source="ldap") == 2000


# --- the cluster's pending count (triggers on cluster_push and cluster_calls) ------------------

def _open_push(store, n: int, *, now=NOW, timeout=60.0, max_total=1000):
    return store.open_push(
        txid=f"t{n}", login_key=f"user{n}|nas|", user=f"user{n}", client="nas", nas_ip=None,
        calling_station_id=None, now=now, timeout=timeout, number=None, node="a",
        late_window=30.0, max_per_user=1, max_total=max_total, rate=None)


def _open_call(store, n: int, *, now=NOW, max_calls=1000):
    return store.open_call(
        call_id=f"c{n}", login_key=f"caller{n}|nas|", user=f"caller{n}", client="nas",
        masked="+1 *** 0000", phone=f"+1555000{n:04d}", now=now, timeout=60.0, node="a",
        late_window=30.0, max_calls=max_calls, max_per_user=1, per_user=(1.0, 5.0),
        per_number=(1.0, 5.0))


def _counted(dsn: str) -> tuple[int, int]:
    """(the triggers' count, the pending rows counted one by one)."""
    with raw(dsn) as conn:
        return conn.execute(
            "SELECT (SELECT sum(n) FROM cluster_pending),"
            " (SELECT count(*) FROM cluster_push WHERE state = 'pending')"
            " + (SELECT count(*) FROM cluster_calls WHERE state = 'pending')").fetchone()


def test_the_pending_count_follows_every_way_a_login_ends(store, postgres_database):
    for n in range(6):
        assert _open_push(store, n).new
    for n in range(3):
        assert _open_call(store, n)[2] is True
    assert _counted(postgres_database) == (9, 9)
    store.answer_push("t0", "user0", lambda row: "approve", "d0", NOW + 1, 30.0)
    store.close_push("t1", NOW + 1, 30.0)
    store.close_user_pushes("user2", NOW + 1, 30.0)
    store.end_call("c0", "decided", "approve", NOW + 1, 30.0)
    assert _counted(postgres_database) == (5, 5)
    # Past their expiry: still counted (the limit may refuse, never admit more) until
    # the sweeper marks them; forgotten rows are deleted.
    store.sweep(NOW + 61)
    assert _counted(postgres_database) == (0, 0)
    store.sweep(NOW + 1000)
    assert _counted(postgres_database) == (0, 0)


def test_the_global_limit_counts_pushes_and_calls_of_every_node(store, open_store):
    other = open_store()
    try:
        assert _open_push(store, 0, max_total=3).new
        assert _open_call(other, 0, max_calls=3)[2] is True
        assert _open_push(other, 1, max_total=3).new
        assert _open_push(store, 2, max_total=3).refused == "global"
        assert _open_call(store, 1, max_calls=3)[3] == "global"
        store.answer_push("t0", "user0", lambda row: "approve", "d0", NOW + 1, 30.0)
        assert _open_push(other, 2, max_total=3).new
    finally:
        other.close()
