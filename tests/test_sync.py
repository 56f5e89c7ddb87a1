"""Directory sync: Store.sync_users, phone numbers, and run_sync and ``mfaserver sync``
on fake directories. Against a real slapd: tests/integration/test_sync.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli_setup import (
    ALICE_PHONE, BOB_PHONE, DAY, NOW, invoke_sync, sync_many_users, write_config,
)
from mfaserver.auth.model import TokenKind
from mfaserver.cli.main import cli
from mfaserver.config import LdapConfig, SyncConfig, load_config
from mfaserver.directory.sync import (
    DirectoryUser,
    InvalidPhoneNumber,
    SyncError,
    normalise_phone,
    prepare_entries,
    run_sync,
    sync_filter,
)
from mfaserver.store import NewToken, Store
from mfaserver.store.db import SyncResult


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "state" / "db.sqlite", tmp_path / "state" / "seed.key")
    yield s
    s.close()


def states(store) -> dict[str, tuple]:
    """name -> (source, phone, disabled_since) for every user."""
    return {u.name: (u.source, u.phone, u.disabled_since) for u in store.list_users()}


# --- Store.sync_users ---


def test_new_directory_users_are_added_as_ldap_users_without_password(store):
    result = store.sync_users([("alice", ALICE_PHONE), ("bob", None)], now=NOW, keep_days=30)
    assert result == SyncResult(added=2)
    assert states(store) == {"alice": ("ldap", ALICE_PHONE, None), "bob": ("ldap", None, None)}
    assert not store.get_user("alice").has_password
    assert store.get_user("alice").created == NOW


def test_changed_phones_are_updated_and_the_rest_counted_unchanged(store):
    store.sync_users([("alice", ALICE_PHONE), ("bob", None), ("carol", None)],
                     now=NOW, keep_days=30)
    result = store.sync_users([("alice", BOB_PHONE), ("bob", BOB_PHONE), ("carol", None)],
                              now=NOW + 1, keep_days=30)
    assert result == SyncResult(updated=2, unchanged=1)
    assert store.get_user("alice").phone == BOB_PHONE
    # A phone gone from the directory is cleared.
    assert store.sync_users([("alice", None), ("bob", BOB_PHONE), ("carol", None)],
                            now=NOW + 2, keep_days=30) == SyncResult(updated=1, unchanged=2)
    assert store.get_user("alice").phone is None


def test_user_gone_from_the_directory_is_disabled_once_and_refused_at_login(store):
    store.sync_users([("alice", ALICE_PHONE), ("bob", None)], now=NOW, keep_days=30)
    assert store.sync_users([("bob", None)], now=NOW + DAY, keep_days=30) == SyncResult(
        disabled=1, unchanged=1)
    assert states(store)["alice"] == ("ldap", ALICE_PHONE, NOW + DAY)
    assert store.load_account("alice").blocked
    assert not store.load_account("bob").blocked
    # Still gone: the first disabling time is kept (it starts the keep_days clock).
    assert store.sync_users([("bob", None)], now=NOW + 2 * DAY, keep_days=30) == SyncResult(
        unchanged=1)
    assert store.get_user("alice").disabled_since == NOW + DAY


def test_returning_user_is_reenabled_with_the_directory_phone(store):
    store.sync_users([("alice", ALICE_PHONE)], now=NOW, keep_days=30)
    store.sync_users([], now=NOW + DAY, keep_days=30)
    result = store.sync_users([("alice", BOB_PHONE)], now=NOW + 2 * DAY, keep_days=30)
    assert result == SyncResult(reenabled=1)
    assert states(store) == {"alice": ("ldap", BOB_PHONE, None)}
    assert not store.load_account("alice").blocked


def test_disabled_user_is_removed_with_tokens_after_keep_days(store):
    store.sync_users([("alice", None), ("bob", None)], now=NOW, keep_days=30)
    token = NewToken(kind=TokenKind.TOTP, secret=b"1" * 20, serial="T-ALICE")
    store.add_token("alice", token, now=NOW)
    store.sync_users([("bob", None)], now=NOW, keep_days=30)
    just_before = store.sync_users([("bob", None)], now=NOW + 30 * DAY - 1, keep_days=30)
    assert just_before == SyncResult(unchanged=1)
    assert store.get_user("alice") is not None
    assert store.sync_users([("bob", None)], now=NOW + 30 * DAY, keep_days=30) == SyncResult(
        removed=1, unchanged=1)
    assert store.get_user("alice") is None
    assert store.list_unassigned_tokens() == []  # the token went with its user
    assert store._conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0


def test_keep_days_zero_removes_at_the_next_sync(store):
    store.sync_users([("alice", None)], now=NOW, keep_days=0)
    assert store.sync_users([], now=NOW + 1, keep_days=0) == SyncResult(disabled=1)
    assert store.sync_users([], now=NOW + 2, keep_days=0) == SyncResult(removed=1)
    assert store.list_users() == []


def test_local_users_are_never_changed_and_a_name_clash_is_a_conflict(store):
    store.add_user("alice", password_hash="$scrypt$x", phone=ALICE_PHONE, now=NOW)
    store.add_user("carol", password_hash="$scrypt$x", phone=None, now=NOW)
    result = store.sync_users([("alice", BOB_PHONE), ("bob", None)], now=NOW + 1, keep_days=0)
    assert result == SyncResult(added=1, conflicts=("alice",))
    assert states(store) == {
        "alice": ("local", ALICE_PHONE, None),    # phone not taken from the directory
        "bob": ("ldap", None, None),
        "carol": ("local", None, None),           # not in the directory, not disabled
    }
    for now in (NOW + 2, NOW + 3):
        store.sync_users([], now=now, keep_days=0)
    assert set(states(store)) == {"alice", "carol"}


def test_dry_run_reports_the_changes_and_writes_nothing(store):
    store.sync_users([("alice", None), ("bob", None)], now=NOW, keep_days=30)
    before = states(store)
    result = store.sync_users([("bob", BOB_PHONE), ("carol", None)], now=NOW + 1,
                              keep_days=30, dry_run=True)
    assert result == SyncResult(added=1, updated=1, disabled=1)
    assert states(store) == before


def test_a_failing_sync_changes_nothing(store, monkeypatch):
    store.sync_users([("alice", None)], now=NOW, keep_days=30)
    import mfaserver.store.db as db

    def broken(conn, **kwargs):
        conn.execute("UPDATE users SET disabled_since = 1")
        raise db.sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(db, "_apply_sync", broken)
    with pytest.raises(db.StoreError, match="disk I/O error"):
        store.sync_users([], now=NOW + 1, keep_days=30)
    assert store.get_user("alice").disabled_since is None
    monkeypatch.undo()
    assert store.sync_users([("alice", None)], now=NOW + 2, keep_days=30) == SyncResult(
        unchanged=1)


def test_many_users_are_added_changed_and_disabled_in_one_sync(store):
    # tests/integration/test_sync.py does the same with 100,000 users.
    sync_many_users(store, 1000, changes=10)


# --- phone numbers and entries ---


@pytest.mark.parametrize("raw, e164", [
    ("+14155550123", "+14155550123"),
    ("+1 (415) 555-0123", "+14155550123"),
    ("  +44 20 7183 8750 ", "+442071838750"),
    ("+49 30 1234567", "+49301234567"),
    (None, None),
    ("", None),
    ("   ", None),
])
def test_phone_numbers_are_normalised_to_e164(raw, e164):
    assert normalise_phone(raw) == e164


@pytest.mark.parametrize("raw, reason", [
    ("12345", "no valid country code (write it as +CC...)"),
    ("030 1234567", "no valid country code (write it as +CC...)"),
    ("+15555550100", "not a valid number"),
    ("+1 415", "not a valid number"),
    ("call me", "not a phone number"),
    ("+1" + "2" * 30, "too long"),
])
def test_invalid_phone_numbers_say_why(raw, reason):
    with pytest.raises(InvalidPhoneNumber) as info:
        normalise_phone(raw)
    assert info.value.reason == reason
    assert str(info.value) == f"{raw!r}: {reason}"


def test_national_numbers_are_accepted_with_a_region():
    assert normalise_phone("030 1234567", "de") == "+49301234567"


def test_prepare_entries_reports_invalid_phones_and_skips_bad_names():
    entries, invalid, skipped = prepare_entries([
        DirectoryUser("alice", "+1 415 555 0123"),
        DirectoryUser("bob", "12345"),
        DirectoryUser("bad\nname", None),
        DirectoryUser("carol", None),
    ])
    assert entries == [("alice", ALICE_PHONE), ("bob", None), ("carol", None)]
    assert [p.describe() for p in invalid] == [
        "bob: '12345': no valid country code (write it as +CC...)"]
    assert [p.describe(numbers=False) for p in invalid] == [
        "bob: no valid country code (write it as +CC...)"]
    assert len(skipped) == 1 and "control characters" in skipped[0].describe()


def test_a_name_listed_twice_keeps_a_phone_only_if_both_entries_agree():
    entries, invalid, _ = prepare_entries([
        DirectoryUser("same", ALICE_PHONE), DirectoryUser("same", "+1 415 555 0123"),
        DirectoryUser("dup", ALICE_PHONE), DirectoryUser("dup", BOB_PHONE),
        DirectoryUser("dup", ALICE_PHONE),
    ])
    assert entries == [("same", ALICE_PHONE), ("dup", None)]
    assert [p.describe() for p in invalid] == [
        "dup: listed more than once in the directory with different phone numbers"]


def test_sync_filter():
    ldap = LdapConfig(servers=("ldap://127.0.0.1",), base_dn="dc=x",
                      user_filter="(&(objectClass=person)(uid={username}))")
    assert sync_filter(ldap, SyncConfig()) == "(&(objectClass=person)(uid=*))"
    assert sync_filter(ldap, SyncConfig(filter="(ou=vpn)")) == "(ou=vpn)"
    ad = LdapConfig(servers=("ldap://127.0.0.1",), base_dn="dc=x",
                    user_filter="(sAMAccountName={username})", active_directory=True)
    assert sync_filter(ad, SyncConfig()) == (
        "(&(sAMAccountName=*)(!(userAccountControl:1.2.840.113556.1.4.803:=2)))")


# --- run_sync with a fake directory ---


def fake_fetch(*users):
    def fetch(ldap, sync):
        return list(users)
    return fetch


def test_run_sync_reports_counts_and_problems(tmp_path, store):
    config = load_config(write_config(tmp_path))
    store.add_user("local", password_hash="$x", phone=None, now=NOW)
    users = [DirectoryUser("alice", "+1 415 555 0123"), DirectoryUser("bob", "12345"),
             DirectoryUser("local", None)]
    report = run_sync(config, store, NOW, fetch=fake_fetch(*users))
    assert report.summary() == (
        "sync: 3 users in the directory; added 2, updated 0, re-enabled 0, disabled 0,"
        " removed 0, unchanged 0; 1 invalid phone number; 1 conflict with local users")
    assert report.details() == [
        "invalid phone number: bob: '12345': no valid country code (write it as +CC...)",
        "conflict: local: a local user has this name; left alone",
    ]
    assert "12345" not in " ".join(report.details(numbers=False))
    assert store.get_user("alice").phone == ALICE_PHONE


def test_run_sync_refuses_an_empty_directory_unless_forced(tmp_path, store):
    config = load_config(write_config(tmp_path))
    run_sync(config, store, NOW, fetch=fake_fetch(DirectoryUser("alice")))
    with pytest.raises(SyncError, match="returned no users: refusing to disable all 1 synced"):
        run_sync(config, store, NOW + 1, fetch=fake_fetch())
    assert store.get_user("alice").disabled_since is None
    report = run_sync(config, store, NOW + 1, force=True, fetch=fake_fetch())
    assert report.result == SyncResult(disabled=1)


def test_run_sync_of_an_empty_directory_into_an_empty_store_is_fine(tmp_path, store):
    config = load_config(write_config(tmp_path))
    assert run_sync(config, store, NOW, fetch=fake_fetch()).result == SyncResult()


def test_run_sync_without_ldap_config(tmp_path, store):
    config = load_config(write_config(tmp_path, with_ldap=False))
    with pytest.raises(SyncError, match=r"\[directory.ldap\] is not configured"):
        run_sync(config, store, NOW)


def test_cli_sync_without_ldap_config_is_a_one_line_error(tmp_path):
    result = invoke_sync(write_config(tmp_path, with_ldap=False))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'mfaserver.toml'}: [directory.ldap] is not configured:"
        " nothing to sync from"]


def test_user_show_tells_a_disabled_directory_user(tmp_path):
    config = write_config(tmp_path, with_ldap=False)
    with Store.open(tmp_path / "state" / "mfaserver.sqlite3", tmp_path / "state" / "seed.key") as s:
        s.sync_users([("gone", None)], now=1000.0, keep_days=30)
        s.sync_users([("other", None)], now=2000.0, keep_days=30)
    out = CliRunner().invoke(cli, ["-c", str(config), "user", "show", "gone"]).output
    assert "disabled (left the directory" in out and "source:" in out and "ldap" in out
