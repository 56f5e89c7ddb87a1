"""Tests for mfaserver.store.db and migrations, on a real SQLite file."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest

from mfaserver.auth.model import Account, AuditEntry, Device, TokenKind
from mfaserver.store import (
    SCHEMA_VERSION,
    EnrollmentExpired,
    InviteExpired,
    KeyFileError,
    NewToken,
    SeedIntegrityError,
    Store,
    StoreError,
    UnknownEnrollment,
    UnknownInvite,
    UserInfo,
)
from mfaserver.store.migrations import MIGRATIONS

SEED = b"12345678901234567890"
NOW = 1_700_000_000.0


@pytest.fixture
def paths(tmp_path):
    state = tmp_path / "state"
    return state / "mfaserver.sqlite", state / "seed.key"


@pytest.fixture
def store(paths):
    s = Store.open(*paths)
    yield s
    s.close()


@pytest.fixture
def open_store(paths):
    """Opens another Store on the fixture store's database (another process, or node)."""
    return lambda: Store.open(*paths)


def raw(paths) -> sqlite3.Connection:
    """A plain connection for inspecting what the store wrote."""
    return sqlite3.connect(paths[0], isolation_level=None)


def add_alice(store, **kwargs) -> UserInfo:
    fields = {"password_hash": "$argon2id$x", "phone": "+14155550123", "now": NOW}
    fields.update(kwargs)
    return store.add_user("alice", **fields)


def totp(serial=None, secret=SEED, **kwargs) -> NewToken:
    return NewToken(kind=TokenKind.TOTP, secret=secret, serial=serial, **kwargs)


def hotp(serial=None, secret=SEED, **kwargs) -> NewToken:
    return NewToken(kind=TokenKind.HOTP, secret=secret, serial=serial, **kwargs)


# --- opening and migrations ---


def test_open_creates_private_state_dir_db_and_key(paths):
    db, key = paths
    Store.open(db, key).close()
    assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_fresh_db_is_at_latest_schema_in_wal_mode(store, paths):
    conn = raw(paths)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "tokens", "bypass", "audit"} <= tables


def test_connection_settings(store):
    conn = store._conn
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_hot_path_queries_use_indexes(store):
    plans = {
        "SELECT id FROM users WHERE name = 'a'": "users_name",
        "SELECT id FROM tokens WHERE user_id = 1": "tokens_user_id",
        "SELECT id FROM tokens WHERE serial = 'x'": "tokens_serial",
        "SELECT id FROM audit WHERE user = 'a' ORDER BY time DESC LIMIT 5": "audit_user_time",
        "SELECT id FROM audit ORDER BY time DESC, id DESC LIMIT 5": "audit_time",
    }
    for sql, index in plans.items():
        plan = " ".join(r[3] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert index in plan, (sql, plan)


def test_opening_twice_is_idempotent_and_keeps_data(paths):
    with Store.open(*paths) as first:
        add_alice(first)
        first.add_token("alice", totp("T1"), now=NOW)
    with Store.open(*paths) as second:
        assert second.get_user("alice").token_count == 1
        assert second.load_account("alice").tokens[0].secret == SEED
    assert raw(paths).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(paths):
    Store.open(*paths).close()
    raw(paths).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this mfaserver supports"):
        Store.open(*paths)


def test_open_without_create_requires_existing_db(paths):
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(*paths, create=False)
    assert not paths[0].exists()


def test_lost_key_is_not_silently_replaced(paths):
    db, key = paths
    with Store.open(db, key) as s:
        add_alice(s)
        s.add_token("alice", totp("T1"), now=NOW)
    key.unlink()
    with pytest.raises(KeyFileError, match="does not exist"):
        Store.open(db, key)
    assert not key.exists()


def test_wrong_key_file_is_refused_at_open(paths, tmp_path):
    Store.open(*paths).close()
    other = tmp_path / "other.key"
    Store.open(tmp_path / "other.sqlite", other).close()
    with pytest.raises(KeyFileError, match="does not match the database"):
        Store.open(paths[0], other)


def test_permissive_key_file_is_refused_at_open(paths):
    Store.open(*paths).close()
    os.chmod(paths[1], 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Store.open(*paths)


def test_closed_store_raises(paths):
    s = Store.open(*paths)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_user("alice")


# --- users ---


def test_add_and_get_user(store):
    info = add_alice(store)
    assert info == UserInfo(
        name="alice", phone="+14155550123", blocked=False, failures=0, locked_until=None,
        has_password=True, created=NOW, token_count=0,
    )
    assert store.get_user("alice") == info
    assert store.get_user("bob") is None


def test_names_are_exact_match(store):
    add_alice(store)
    assert store.get_user("Alice") is None
    assert store.get_user("alice ") is None
    store.add_user("Alice", password_hash=None, phone=None, now=NOW)
    assert store.get_user("Alice").has_password is False


def test_duplicate_user(store):
    add_alice(store)
    with pytest.raises(StoreError, match="^user 'alice' already exists$"):
        add_alice(store)


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "must not be empty"),
        ("a" * 254, "too long"),
        ("é" * 127, "too long"),  # 254 UTF-8 bytes
        ("al\nice", "control characters"),
        ("al\x00ice", "control characters"),
        ("al\x85ice", "control characters"),
        ("\ud800", "not valid Unicode"),
    ],
)
def test_invalid_user_names(store, name, message):
    with pytest.raises(StoreError, match=message):
        store.add_user(name, password_hash=None, phone=None, now=NOW)


def test_longest_and_unicode_names_are_accepted(store):
    store.add_user("a" * 253, password_hash=None, phone=None, now=NOW)
    store.add_user("jürgen.müller@example.com", password_hash=None, phone=None, now=NOW)
    assert store.get_user("jürgen.müller@example.com") is not None


@pytest.mark.parametrize("phone", ["4155550123", "+0123", "+1 415 555", "+1234567890123456", ""])
def test_phone_must_be_e164(store, phone):
    with pytest.raises(StoreError, match="E.164"):
        store.add_user("alice", password_hash=None, phone=phone, now=NOW)
    add_alice(store)
    with pytest.raises(StoreError, match="E.164"):
        store.set_phone("alice", phone)


def test_list_users_ordered_by_name_with_token_counts(store):
    for name in ["carol", "alice", "bob"]:
        store.add_user(name, password_hash=None, phone=None, now=NOW)
    store.add_token("bob", totp(), now=NOW)
    store.add_token("bob", hotp(), now=NOW)
    users = store.list_users()
    assert [u.name for u in users] == ["alice", "bob", "carol"]
    assert [u.token_count for u in users] == [0, 2, 0]


def test_list_users_empty(store):
    assert store.list_users() == []


def test_set_password_and_phone(store):
    store.add_user("alice", password_hash=None, phone=None, now=NOW)
    store.set_password("alice", "$argon2id$new")
    store.set_phone("alice", "+442071838750")
    info = store.get_user("alice")
    assert info.has_password and info.phone == "+442071838750"
    store.set_phone("alice", None)
    assert store.get_user("alice").phone is None
    assert store._conn.execute("SELECT password_hash FROM users").fetchone()[0] == "$argon2id$new"
    with pytest.raises(StoreError, match="must not be empty"):
        store.set_password("alice", "")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_password("bob", "h"),
        lambda s: s.set_phone("bob", None),
        lambda s: s.set_blocked("bob", True),
        lambda s: s.set_blocked("bob", False),
        lambda s: s.delete_user("bob"),
        lambda s: s.add_token("bob", totp(), now=NOW),
        lambda s: s.list_tokens("bob"),
        lambda s: s.delete_token("bob", "T1"),
        lambda s: s.assign_token("T1", "bob"),
        lambda s: s.add_bypass("bob", NOW + 60),
    ],
)
def test_unknown_user_errors(store, call):
    with pytest.raises(StoreError, match="^no such user 'bob'$"):
        call(store)


def test_block_and_unblock_clears_failures_and_lock(store):
    add_alice(store)
    store.register_failure("alice", now=NOW, threshold=5, lock_seconds=60)
    store.register_failure("alice", now=NOW, threshold=2, lock_seconds=60)
    store.register_failure("alice", now=NOW, threshold=5, lock_seconds=60)
    store.set_blocked("alice", True)
    info = store.get_user("alice")
    assert info.blocked and info.failures == 1 and info.locked_until == NOW + 60
    store.set_blocked("alice", False)
    info = store.get_user("alice")
    assert not info.blocked and info.failures == 0 and info.locked_until is None


def test_delete_user_cascades_tokens_and_bypass_but_keeps_audit(store, paths):
    add_alice(store)
    store.add_user("bob", password_hash=None, phone=None, now=NOW)
    store.add_token("alice", totp("A1"), now=NOW)
    store.add_token("bob", totp("B1"), now=NOW)
    store.add_bypass("alice", NOW + 60)
    store.record_audit(AuditEntry(NOW, "alice", "vpn", None, None, "totp", "accept", "ok"))
    store.delete_user("alice")
    conn = raw(paths)
    assert store.get_user("alice") is None
    assert store.load_account("alice") is None
    assert [r[0] for r in conn.execute("SELECT serial FROM tokens")] == ["B1"]
    assert conn.execute("SELECT count(*) FROM bypass").fetchone()[0] == 0
    assert len(store.recent_audit(user="alice")) == 1


# --- tokens ---


def test_add_token_generates_serial_and_round_trips(store):
    add_alice(store)
    token = store.add_token("alice", totp(), now=NOW)
    assert token.serial.startswith("TOTP-") and len(token.serial) == 13
    int(token.serial[5:], 16)
    assert token.user == "alice" and token.secret == SEED and token.kind is TokenKind.TOTP
    assert token.last_step is None and token.drift == 0
    assert store.list_tokens("alice") == [token]
    hotp_token = store.add_token("alice", hotp(counter=7, digits=8, algorithm="SHA256"), now=NOW)
    assert hotp_token.serial.startswith("HOTP-")
    assert (hotp_token.counter, hotp_token.digits, hotp_token.algorithm) == (7, 8, "sha256")
    assert store.list_tokens("alice") == [token, hotp_token]


def test_generated_serials_are_unique(store):
    serials = {store.add_token(None, totp(), now=NOW).serial for _ in range(200)}
    assert len(serials) == 200


def test_duplicate_serial(store):
    add_alice(store)
    store.add_token("alice", totp("X"), now=NOW)
    with pytest.raises(StoreError, match="^token serial 'X' already exists$"):
        store.add_token(None, hotp("X"), now=NOW)


@pytest.mark.parametrize(
    "token, message",
    [
        (NewToken(kind="sms", secret=SEED), "unknown token kind"),
        (totp(secret=b""), "secret must be non-empty"),
        (totp(digits=5), "digits"),
        (totp(digits=9), "digits"),
        (totp(period=0), "period"),
        (totp(algorithm="md5"), "algorithm"),
        (hotp(counter=-1), "counter"),
        (totp(serial=""), "serial must not be empty"),
        (totp(serial="a\tb"), "control characters"),
        (totp(serial="s" * 129), "too long"),
    ],
)
def test_invalid_tokens(store, token, message):
    with pytest.raises(StoreError, match=message):
        store.add_token(None, token, now=NOW)


def test_new_token_repr_hides_secret():
    assert repr(SEED) not in repr(totp())


def test_seeds_are_not_stored_in_plaintext(store, paths):
    add_alice(store)
    store.add_token("alice", totp("T1"), now=NOW)
    store.add_token("alice", hotp("H1", secret=b"another secret seed!"), now=NOW)
    for (blob,) in raw(paths).execute("SELECT secret FROM tokens"):
        assert SEED not in blob and b"another secret seed!" not in blob
        assert blob[:1] == b"\x01"
    for name in os.listdir(paths[0].parent):
        assert SEED not in (paths[0].parent / name).read_bytes()


def test_unassigned_tokens_and_assign(store):
    add_alice(store)
    store.add_user("bob", password_hash=None, phone=None, now=NOW)
    store.add_token(None, totp("U2"), now=NOW)
    store.add_token(None, hotp("U1"), now=NOW)
    assert [t.serial for t in store.list_unassigned_tokens()] == ["U1", "U2"]
    assert all(t.user is None and t.secret == SEED for t in store.list_unassigned_tokens())
    store.assign_token("U1", "alice")
    store.assign_token("U1", "alice")  # same holder: no-op
    assert [t.serial for t in store.list_unassigned_tokens()] == ["U2"]
    assert [(t.serial, t.user) for t in store.list_tokens("alice")] == [("U1", "alice")]
    assert store.load_account("alice").tokens[0].secret == SEED
    with pytest.raises(StoreError, match="^token 'U1' is already assigned to user 'alice'$"):
        store.assign_token("U1", "bob")
    with pytest.raises(StoreError, match="^no token 'NOPE'$"):
        store.assign_token("NOPE", "bob")


def test_delete_token(store):
    add_alice(store)
    store.add_user("bob", password_hash=None, phone=None, now=NOW)
    store.add_token("alice", totp("A1"), now=NOW)
    store.add_token(None, totp("U1"), now=NOW)
    with pytest.raises(StoreError, match="^no token 'A1' for user 'bob'$"):
        store.delete_token("bob", "A1")
    store.delete_token("alice", "A1")
    assert store.list_tokens("alice") == []
    with pytest.raises(StoreError, match="^no token 'A1' for user 'alice'$"):
        store.delete_token("alice", "A1")
    with pytest.raises(StoreError, match="^no unassigned token 'A1'$"):
        store.delete_token(None, "A1")
    store.delete_token(None, "U1")
    assert store.list_unassigned_tokens() == []


def test_resync_hotp_and_totp(store):
    add_alice(store)
    h = store.add_token("alice", hotp("H"), now=NOW)
    t = store.add_token("alice", totp("T"), now=NOW)
    store.set_hotp_counter(h.id, 42)
    store.set_totp_sync(t.id, drift=-2, last_step=1000)
    tokens = {tok.serial: tok for tok in store.load_account("alice").tokens}
    assert tokens["H"].counter == 42
    assert (tokens["T"].drift, tokens["T"].last_step) == (-2, 1000)
    with pytest.raises(StoreError, match=f"^no HOTP token with id {t.id}$"):
        store.set_hotp_counter(t.id, 1)
    with pytest.raises(StoreError, match=f"^no TOTP token with id {h.id}$"):
        store.set_totp_sync(h.id, 0, 1)
    with pytest.raises(StoreError, match="no HOTP token with id 999"):
        store.set_hotp_counter(999, 1)
    with pytest.raises(StoreError, match="out of range"):
        store.set_hotp_counter(h.id, -1)


# --- login path ---


def test_load_account(store):
    add_alice(store)
    a = store.add_token("alice", totp("A"), now=NOW)
    b = store.add_token("alice", hotp("B", secret=b"B" * 20), now=NOW)
    store.add_token(None, totp("U"), now=NOW)
    assert store.load_account("alice") == Account(
        name="alice", phone="+14155550123", blocked=False, failures=0, locked_until=None,
        tokens=(a, b), has_password=True,
    )
    assert store.load_account("bob") is None


def test_get_password_for_the_local_directory(store):
    add_alice(store)
    store.add_user("nopass", password_hash=None, phone=None, now=NOW)
    assert store.get_password("alice") == ("$argon2id$x", "+14155550123")
    assert store.get_password("nopass") == (None, None)
    assert store.get_password("ghost") is None


def test_load_account_without_tokens(store):
    store.add_user("alice", password_hash=None, phone=None, now=NOW)
    assert store.load_account("alice") == Account(
        name="alice", phone=None, blocked=False, failures=0, locked_until=None,
        tokens=(), has_password=False,
    )


def test_flipped_byte_in_stored_seed_raises_integrity_error(store, paths):
    add_alice(store)
    store.add_token("alice", totp("T1"), now=NOW)
    conn = raw(paths)
    blob = bytearray(conn.execute("SELECT secret FROM tokens").fetchone()[0])
    blob[20] ^= 0x40
    conn.execute("UPDATE tokens SET secret = ?", (bytes(blob),))
    with pytest.raises(SeedIntegrityError, match="T1"):
        store.load_account("alice")
    with pytest.raises(SeedIntegrityError):
        store.list_tokens("alice")


def test_seed_moved_to_another_token_raises_integrity_error(store, paths):
    add_alice(store)
    store.add_token("alice", totp("T1", secret=b"attacker-known-seed!"), now=NOW)
    store.add_token("alice", totp("T2"), now=NOW)
    raw(paths).execute(
        "UPDATE tokens SET secret = (SELECT secret FROM tokens WHERE serial = 'T1')"
        " WHERE serial = 'T2'"
    )
    with pytest.raises(SeedIntegrityError, match="T2"):
        store.load_account("alice")


def test_use_totp_step_is_a_replay_guard(store):
    add_alice(store)
    t = store.add_token("alice", totp(), now=NOW)
    assert store.use_totp_step(t.id, 1000, 1) is True
    assert store.use_totp_step(t.id, 1000, 1) is False  # same code again
    assert store.use_totp_step(t.id, 999, 0) is False   # an older code
    account = store.load_account("alice")
    assert (account.tokens[0].last_step, account.tokens[0].drift) == (1000, 1)
    assert store.use_totp_step(t.id, 1001, 0) is True


def test_use_totp_step_rejects_hotp_and_unknown_tokens(store):
    add_alice(store)
    h = store.add_token("alice", hotp(), now=NOW)
    assert store.use_totp_step(h.id, 1, 0) is False
    assert store.use_totp_step(12345, 1, 0) is False


def test_use_hotp_counter(store):
    add_alice(store)
    h = store.add_token("alice", hotp(counter=5), now=NOW)
    assert store.use_hotp_counter(h.id, 7) is True       # look-ahead match
    assert store.load_account("alice").tokens[0].counter == 8
    assert store.use_hotp_counter(h.id, 7) is False      # replay
    assert store.use_hotp_counter(h.id, 6) is False      # skipped-over counter
    assert store.use_hotp_counter(h.id, 8) is True
    t = store.add_token("alice", totp(), now=NOW)
    assert store.use_hotp_counter(t.id, 100) is False


def _race(open_store, rounds, attempt):
    """Run ``attempt(store, round)`` in two threads on two Stores; return both results."""
    stores = [open_store(), open_store()]
    barrier = threading.Barrier(2)
    results = [[None] * rounds, [None] * rounds]
    errors = []

    def worker(i):
        try:
            for r in range(rounds):
                barrier.wait()
                results[i][r] = attempt(stores[i], r)
        except BaseException as e:  # surfaced below; a thread cannot fail the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for s in stores:
        s.close()
    assert not errors, errors
    return list(zip(*results))


def test_concurrent_use_of_same_totp_step_succeeds_exactly_once(store, open_store):
    add_alice(store)
    token_id = store.add_token("alice", totp(), now=NOW).id
    outcomes = _race(open_store, 200, lambda s, r: s.use_totp_step(token_id, 5000 + r, 0))
    assert all(sorted(pair) == [False, True] for pair in outcomes), outcomes


def test_concurrent_use_of_same_hotp_counter_succeeds_exactly_once(store, open_store):
    add_alice(store)
    token_id = store.add_token("alice", hotp(), now=NOW).id
    outcomes = _race(open_store, 200, lambda s, r: s.use_hotp_counter(token_id, r))
    assert all(sorted(pair) == [False, True] for pair in outcomes), outcomes


def test_concurrent_bypass_is_consumed_once(store, open_store):
    add_alice(store)
    # The fixture store re-arms the bypass between rounds, like the CLI would.
    rounds = 50
    stores = [open_store(), open_store()]
    barrier = threading.Barrier(3)
    results = [[], []]

    def worker(i):
        for _ in range(rounds):
            barrier.wait()
            barrier.wait()
            results[i].append(stores[i].consume_bypass("alice", now=NOW))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(rounds):
        barrier.wait()
        store.add_bypass("alice", NOW + 60)
        barrier.wait()
    for thread in threads:
        thread.join()
    for s in stores:
        s.close()
    assert all(sorted(pair) == [False, True] for pair in zip(*results))


def test_register_failure_locks_at_threshold_and_resets(store):
    add_alice(store)
    kwargs = {"threshold": 3, "lock_seconds": 300}
    assert store.register_failure("alice", now=NOW, **kwargs) == (1, None)
    assert store.register_failure("alice", now=NOW + 1, **kwargs) == (2, None)
    assert store.register_failure("alice", now=NOW + 2, **kwargs) == (0, NOW + 302)
    info = store.get_user("alice")
    assert (info.failures, info.locked_until) == (0, NOW + 302)
    assert store.load_account("alice").locked_until == NOW + 302
    # The old lock stays visible until the next lock replaces it; the caller compares times.
    assert store.register_failure("alice", now=NOW + 400, **kwargs) == (1, NOW + 302)


def test_register_failure_unknown_user_and_bad_threshold(store):
    assert store.register_failure("ghost", now=NOW, threshold=3, lock_seconds=1) == (0, None)
    with pytest.raises(StoreError, match="threshold"):
        store.register_failure("ghost", now=NOW, threshold=0, lock_seconds=1)


def test_concurrent_failures_are_all_counted(store, open_store):
    add_alice(store)
    _race(open_store, 100, lambda s, r: s.register_failure(
        "alice", now=NOW, threshold=1000, lock_seconds=1))
    assert store.get_user("alice").failures == 200


def test_clear_failures(store):
    add_alice(store)
    store.register_failure("alice", now=NOW, threshold=5, lock_seconds=60)
    store.clear_failures("alice")
    assert store.get_user("alice").failures == 0
    before = store._conn.total_changes
    store.clear_failures("alice")
    store.clear_failures("nobody")
    assert store._conn.total_changes == before  # nothing written


def test_bypass_is_single_use(store):
    add_alice(store)
    store.add_bypass("alice", NOW + 60)
    assert store.consume_bypass("alice", now=NOW) is True
    assert store.consume_bypass("alice", now=NOW) is False
    assert store.consume_bypass("nobody", now=NOW) is False


def test_expired_bypass_is_refused_and_removed(store, paths):
    add_alice(store)
    store.add_bypass("alice", NOW)
    assert store.consume_bypass("alice", now=NOW) is False  # expires is exclusive
    assert raw(paths).execute("SELECT count(*) FROM bypass").fetchone()[0] == 0


def test_add_bypass_replaces(store):
    add_alice(store)
    store.add_bypass("alice", NOW - 10)
    store.add_bypass("alice", NOW + 10)
    assert store.consume_bypass("alice", now=NOW) is True


# --- audit ---


def entry(time, user="alice", outcome="accept", **kwargs) -> AuditEntry:
    fields = dict(
        client="vpn", nas_ip="192.0.2.1", calling_station_id="198.51.100.7",
        factor="totp", reason="ok",
    )
    fields.update(kwargs)
    return AuditEntry(time=time, user=user, outcome=outcome, **fields)


def test_audit_newest_first_with_user_filter_and_limit(store):
    store.record_audit(entry(NOW + 1, "alice"))
    store.record_audit(entry(NOW + 3, "bob", outcome="reject", reason="bad_code"))
    store.record_audit(entry(NOW + 2, "alice", nas_ip=None, calling_station_id=None))
    store.record_audit(entry(NOW + 3, "alice", factor="bypass", reason="bypass"))
    newest = store.recent_audit()
    assert [(e.time, e.user) for e in newest] == [
        (NOW + 3, "alice"), (NOW + 3, "bob"), (NOW + 2, "alice"), (NOW + 1, "alice"),
    ]
    assert newest[0].id == 4 and newest[0].factor == "bypass"
    assert newest[1] == AuditEntry(
        time=NOW + 3, user="bob", client="vpn", nas_ip="192.0.2.1",
        calling_station_id="198.51.100.7", factor="totp", outcome="reject",
        reason="bad_code", id=2,
    )
    assert [e.time for e in store.recent_audit(user="alice")] == [NOW + 3, NOW + 2, NOW + 1]
    assert store.recent_audit(user="alice", limit=1)[0].id == 4
    assert store.recent_audit(user="carol") == []
    assert store.recent_audit(limit=0) == []


def test_purge_audit(store, monkeypatch):
    import mfaserver.store.db as db

    monkeypatch.setattr(db, "_PURGE_BATCH", 3)  # exercise several batches
    for i in range(10):
        store.record_audit(entry(NOW + i))
    assert store.purge_audit(before=NOW + 7) == 7
    assert [e.time for e in store.recent_audit()] == [NOW + 9, NOW + 8, NOW + 7]
    assert store.purge_audit(before=NOW) == 0


def test_database_errors_become_store_errors(store):
    store._conn.execute("DROP TABLE audit")
    with pytest.raises(StoreError, match="no such table: audit"):
        store.record_audit(entry(NOW))


def test_write_blocked_by_another_writer_fails_closed(store, paths):
    add_alice(store)
    token_id = store.add_token("alice", totp(), now=NOW).id
    # Fail at once: the real busy timeout (5 s) is a wall-clock wait.
    store._conn.execute("PRAGMA busy_timeout = 0")
    other = raw(paths)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            store.use_totp_step(token_id, 1, 0)
        # Reads still work under WAL while another process writes.
        assert store.load_account("alice").tokens[0].last_step is None
    finally:
        other.execute("ROLLBACK")
    assert store.use_totp_step(token_id, 1, 0) is True


# --- directory sync columns (schema v2) ---


def test_v1_database_is_migrated_keeping_users_as_local(paths):
    import sqlite_utils

    db, key = paths
    db.parent.mkdir(mode=0o700)
    conn = sqlite3.connect(db, isolation_level=None)
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO users (name, phone, blocked, failures, created)"
                 " VALUES ('alice', NULL, 0, 0, 1.0)")
    conn.close()
    with Store.open(db, key) as s:
        info = s.get_user("alice")
        assert (info.source, info.disabled_since) == ("local", None)
        assert not s.load_account("alice").blocked
    assert raw(paths).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_new_users_are_local_and_enabled(store):
    info = add_alice(store)
    assert (info.source, info.disabled_since) == ("local", None)
    assert store.get_user("alice") == info
    assert store.count_users() == 1
    assert store.count_users(source="local") == 1
    assert store.count_users(source="ldap") == 0


def test_disabled_user_loads_as_blocked_but_user_info_keeps_the_flags_apart(store):
    store.sync_users([("alice", None)], now=NOW, keep_days=30)
    store.sync_users([], now=NOW + 5, keep_days=30)
    info = store.get_user("alice")
    assert (info.source, info.disabled_since, info.blocked) == ("ldap", NOW + 5, False)
    assert store.load_account("alice").blocked
    # Unblocking is the admin's flag only: it does not re-enable.
    store.set_blocked("alice", False)
    assert store.load_account("alice").blocked


def test_sync_users_refuses_bad_entries_before_writing(store):
    with pytest.raises(StoreError, match="phone number must be in E.164"):
        store.sync_users([("alice", None), ("bob", "0301234567")], now=NOW, keep_days=1)
    with pytest.raises(StoreError, match="appears twice"):
        store.sync_users([("alice", None), ("alice", None)], now=NOW, keep_days=1)
    with pytest.raises(StoreError, match="must not be empty"):
        store.sync_users([("", None)], now=NOW, keep_days=1)
    with pytest.raises(StoreError, match="keep_days"):
        store.sync_users([], now=NOW, keep_days=-1)
    assert store.list_users() == []


# --- the phone side: inactive tokens, enrollment peeks, Web Push keys, invites ---

def test_an_inactive_token_is_listed_but_not_used_by_logins_until_activated(store):
    add_alice(store)
    token = store.add_token("alice", totp(serial="NEW"), now=NOW, active=False)
    assert token.active is False
    assert [t.active for t in store.list_tokens("alice")] == [False]
    assert store.load_account("alice").tokens == ()
    store.activate_token("alice", "NEW")
    assert [t.serial for t in store.load_account("alice").tokens] == ["NEW"]
    with pytest.raises(StoreError, match="no token"):
        store.activate_token("alice", "OTHER")


def test_an_enrollment_can_be_looked_at_without_using_it(store):
    add_alice(store)
    store.add_enrollment("alice", "d" * 64, NOW + 600, now=NOW)
    assert store.enrollment_user("d" * 64, now=NOW) == "alice"
    assert store.enrollment_user("d" * 64, now=NOW) == "alice"
    with pytest.raises(UnknownEnrollment):
        store.enrollment_user("e" * 64, now=NOW)
    with pytest.raises(EnrollmentExpired):
        store.enrollment_user("d" * 64, now=NOW + 600)
    store.enroll_device("d" * 64, Device(id="dev1", user="", public_key="ed25519:x"), now=NOW)
    with pytest.raises(EnrollmentExpired):
        store.enrollment_user("d" * 64, now=NOW)


def test_a_device_keeps_its_web_push_subscription_keys(store):
    add_alice(store)
    store.add_enrollment("alice", "d" * 64, NOW + 600, now=NOW)
    keys = '{"p256dh": "BPk", "auth": "c2VjcmV0"}'
    store.enroll_device("d" * 64, Device(
        id="dev1", user="", public_key="ed25519:x", notify_type="webpush",
        notify_url="https://push.example.com/send/abc", notify_keys=keys), now=NOW)
    [device] = store.list_devices("alice")
    assert (device.notify_type, device.notify_url, device.notify_keys) == (
        "webpush", "https://push.example.com/send/abc", keys)


def test_an_invite_is_used_once_and_never_after_it_expires(store):
    add_alice(store)
    store.add_invite("alice", "i" * 64, NOW + 3600, now=NOW)
    assert store.invite_user("i" * 64, now=NOW) == "alice"
    with pytest.raises(UnknownInvite):
        store.use_invite("j" * 64, now=NOW)
    assert store.use_invite("i" * 64, now=NOW + 1) == "alice"
    with pytest.raises(InviteExpired):
        store.use_invite("i" * 64, now=NOW + 2)
    with pytest.raises(InviteExpired):
        store.invite_user("i" * 64, now=NOW + 2)
    store.add_invite("alice", "k" * 64, NOW + 10, now=NOW)
    with pytest.raises(InviteExpired):
        store.use_invite("k" * 64, now=NOW + 10)
