"""Directory sync: Store.sync_users, phone numbers, run_sync, and ``mfaserver sync`` on slapd."""

from __future__ import annotations

import ldap3
import pytest
from click.testing import CliRunner

import ldap_server

from mfaserver.auth.model import TokenKind
from mfaserver.cli.common import CliState
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

NOW = 1_700_000_000.0
DAY = 86400.0
ALICE_PHONE = "+14155550123"
BOB_PHONE = "+442071838750"


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


def test_a_hundred_thousand_users(store):
    entries = [(f"user{i:06d}", f"+1415555{i % 10000:04d}") for i in range(100_000)]
    assert store.sync_users(entries, now=NOW, keep_days=30) == SyncResult(added=100_000)
    # Next run: 1000 left, 1000 new, 1000 changed numbers.
    changed = [(name, BOB_PHONE) if i < 1000 else (name, phone)
               for i, (name, phone) in enumerate(entries[1000:])]
    changed += [(f"new{i:06d}", None) for i in range(1000)]
    result = store.sync_users(changed, now=NOW + 1, keep_days=30)
    assert result == SyncResult(added=1000, updated=1000, disabled=1000, unchanged=98_000)
    assert store.count_users(source="ldap") == 101_000


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


def write_config(tmp_path, servers=("ldap://127.0.0.1:9",), ldap_extra="", sync_extra="",
                 with_ldap=True):
    path = tmp_path / "mfaserver.toml"
    text = f"""\
[server]
state_dir = "state"

[[radius.clients]]
name = "t"
address = "127.0.0.1"
secret = "0123456789abcdef0123"

[directory.sync]
keep_days = 30
{sync_extra}
"""
    if with_ldap:
        urls = ", ".join(f'"{u}"' for u in servers)
        text += f"""
[directory.ldap]
servers = [{urls}]
base_dn = "dc=example,dc=org"
{ldap_extra}
"""
    path.write_text(text)
    return path


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


def test_fetch_failure_names_every_server(tmp_path, store):
    urls = (ldap_server.dead_url(), ldap_server.dead_url())
    config = load_config(write_config(tmp_path, servers=urls,
                                      ldap_extra="timeout = 2\nallow_plaintext = true"))
    with pytest.raises(SyncError) as info:
        run_sync(config, store, NOW)
    message = str(info.value)
    assert message.startswith("cannot read users from LDAP: ")
    assert all(url in message for url in urls) and "\n" not in message


def invoke(config_path, *args, now=NOW):
    state = CliState(clock=lambda: now)
    return CliRunner().invoke(cli, ["-c", str(config_path), "sync", *args], obj=state)


def test_cli_sync_without_ldap_config_is_a_one_line_error(tmp_path):
    result = invoke(write_config(tmp_path, with_ldap=False))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'mfaserver.toml'}: [directory.ldap] is not configured:"
        " nothing to sync from"]


# --- against a real slapd ---


@pytest.fixture
def own_slapd(tmp_path, ldap_certs):
    """A fresh slapd per test: these tests change the directory, so the shared
    session ``slapd`` from conftest must not be used."""
    if not ldap_server.available():
        pytest.skip("slapd or its schema files are not installed (apt-get install slapd)")
    server = ldap_server.start_slapd(
        tmp_path / "slapd", tls=(ldap_certs.ca_file, ldap_certs.cert_file, ldap_certs.key_file))
    yield server
    server.stop()


def root_connection(slapd):
    return ldap3.Connection(slapd.url, ldap_server.ROOT_DN, ldap_server.ROOT_PASSWORD,
                            auto_bind=True, raise_exceptions=True)


def set_mobile(slapd, i: int, number: str) -> None:
    with root_connection(slapd) as conn:
        conn.modify(ldap_server.user_dn(i), {"mobile": [(ldap3.MODIFY_REPLACE, [number])]})


def slapd_config(tmp_path, servers, timeout=3, ldap_extra="", **kwargs):
    """A config file that syncs from ``servers`` as the fixture's service account."""
    return write_config(tmp_path, servers=servers, ldap_extra=f"""\
bind_dn = "{ldap_server.SERVICE_DN}"
bind_password = "{ldap_server.SERVICE_PASSWORD}"
timeout = {timeout}
{ldap_extra}""", **kwargs)


def open_store(config_path) -> Store:
    config = load_config(config_path)
    return Store.open(config.database_path, config.key_path, create=False)


@pytest.mark.integration
def test_sync_imports_the_directory_then_disables_a_deleted_user(tmp_path, own_slapd):
    set_mobile(own_slapd, 1, "+1 (415) 555-0123")
    set_mobile(own_slapd, 2, "12345")
    config_path = slapd_config(tmp_path, [own_slapd.url])

    result = invoke(config_path)
    assert result.exit_code == 0, result.output
    # user000..user299, "dup" (twice, one user) and "public"; user000's
    # fixture number (+1 555 ...) is not a valid number.
    assert result.stdout.splitlines() == [
        "sync: 303 users in the directory; added 302, updated 0, re-enabled 0, disabled 0,"
        " removed 0, unchanged 0; 2 invalid phone numbers",
        "invalid phone number: user000: '+15555550100': not a valid number",
        "invalid phone number: user002: '12345': no valid country code (write it as +CC...)",
    ]
    with open_store(config_path) as store:
        assert store.count_users(source="ldap") == 302
        assert store.get_user("user001").phone == ALICE_PHONE
        assert store.get_user("user000").phone is None
        assert store.get_user("user002").phone is None
        assert store.get_user("user003").source == "ldap"

    with root_connection(own_slapd) as conn:
        conn.delete(ldap_server.user_dn(5))
    set_mobile(own_slapd, 3, "+44 20 7183 8750")
    result = invoke(config_path, now=NOW + DAY)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        "sync: 302 users in the directory; added 0, updated 1, re-enabled 0, disabled 1,"
        " removed 0, unchanged 300; 2 invalid phone numbers")
    with open_store(config_path) as store:
        assert store.get_user("user005").disabled_since == NOW + DAY
        assert store.load_account("user005").blocked
        assert store.get_user("user003").phone == BOB_PHONE


@pytest.mark.integration
def test_sync_refuses_when_ldap_is_down_and_disables_nothing(tmp_path, own_slapd):
    config_path = slapd_config(tmp_path, [own_slapd.url])
    assert invoke(config_path).exit_code == 0
    dead = ldap_server.dead_url()
    down = slapd_config(tmp_path, [dead])
    result = invoke(down, now=NOW + DAY)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read users from LDAP: {dead}:")
    own_slapd.stop()
    result = invoke(config_path, now=NOW + DAY)
    assert result.exit_code == 1 and "cannot read users from LDAP" in result.stderr
    with open_store(config_path) as store:
        assert [u for u in store.list_users() if u.disabled_since is not None] == []


@pytest.mark.integration
def test_sync_fails_over_to_the_next_server(tmp_path, slapd):
    config_path = slapd_config(tmp_path, [ldap_server.dead_url(), slapd.url])
    result = invoke(config_path)
    assert result.exit_code == 0, result.output
    assert "added 302" in result.stdout


@pytest.mark.integration
def test_sync_refuses_a_filter_matching_nobody_unless_forced(tmp_path, slapd):
    config_path = slapd_config(tmp_path, [slapd.url])
    assert invoke(config_path).exit_code == 0
    nobody = slapd_config(tmp_path, [slapd.url], sync_extra='filter = "(uid=nobody)"')
    result = invoke(nobody, now=NOW + 1)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: the directory returned no users: refusing to disable all 302 synced users"
        " (check base_dn and the sync filter, or use --force)"]
    result = invoke(nobody, "--force", "--dry-run", now=NOW + 1)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sync (dry run, nothing changed): 0 users in the directory;"
                                    " added 0, updated 0, re-enabled 0, disabled 302,")
    with open_store(config_path) as store:
        assert all(u.disabled_since is None for u in store.list_users())


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["ldaps", "starttls"])
def test_sync_over_tls_checks_the_certificate_against_ca_file(tmp_path, slapd, ldap_certs,
                                                             scheme):
    url, tls = (slapd.ldaps_url, "") if scheme == "ldaps" else (slapd.url, "start_tls = true")
    bad = slapd_config(tmp_path, [url],
                       ldap_extra=f'ca_file = "{ldap_certs.other_ca_file}"\n{tls}')
    result = invoke(bad)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot read users from LDAP: {url}: ")
    good = slapd_config(tmp_path, [url], ldap_extra=f'ca_file = "{ldap_certs.ca_file}"\n{tls}')
    result = invoke(good)
    assert result.exit_code == 0, result.output
    assert "added 302" in result.stdout


@pytest.mark.integration
def test_sync_refuses_a_certificate_for_another_host(tmp_path, slapd_wrong_name, ldap_certs):
    config_path = slapd_config(tmp_path, [slapd_wrong_name.ldaps_url],
                               ldap_extra=f'ca_file = "{ldap_certs.ca_file}"')
    result = invoke(config_path)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: cannot read users from LDAP: {slapd_wrong_name.ldaps_url}: connect failed:"
        " the server's certificate is not valid for its host name"]


@pytest.mark.integration
def test_dry_run_on_a_fresh_install_creates_no_database(tmp_path, slapd):
    config_path = slapd_config(tmp_path, [slapd.url])
    result = invoke(config_path, "--dry-run")
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "state").exists()


def add_people(slapd, count: int) -> None:
    with root_connection(slapd) as conn:
        for i in range(count):
            uid = f"extra{i:03d}"
            conn.add(f"uid={uid},{ldap_server.PEOPLE_DN}", ["inetOrgPerson"],
                     {"uid": uid, "cn": uid, "sn": uid})


@pytest.mark.integration
def test_a_search_cut_short_by_a_size_limit_fails_and_changes_nothing(tmp_path, own_slapd):
    config_path = slapd_config(tmp_path, [own_slapd.url])
    assert invoke(config_path).exit_code == 0
    # slapd gives the service account at most 500 entries, paged or not; a
    # sync that took those for the whole directory would disable the rest.
    add_people(own_slapd, 400)
    result = invoke(config_path, now=NOW + 1)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: cannot read users from LDAP: {own_slapd.url}: search failed:"
        " sizeLimitExceeded after 500 entries, not the whole directory"]
    with open_store(config_path) as store:
        assert store.count_users() == 302
        assert all(u.disabled_since is None for u in store.list_users())


@pytest.mark.integration
def test_sync_pages_through_a_large_directory(tmp_path, own_slapd, monkeypatch):
    from mfaserver.directory import sync

    monkeypatch.setattr(sync, "PAGE_SIZE", 100)
    add_people(own_slapd, 400)
    config_path = write_config(tmp_path, servers=[own_slapd.url], ldap_extra=f"""\
bind_dn = "{ldap_server.ROOT_DN}"
bind_password = "{ldap_server.ROOT_PASSWORD}"
""")
    result = invoke(config_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sync: 703 users in the directory; added 702,")


@pytest.mark.integration
def test_sync_gives_up_on_a_hung_server_and_uses_the_next(tmp_path, slapd, hung_ldap):
    config_path = slapd_config(tmp_path, [hung_ldap.url, slapd.url], timeout=1)
    result = invoke(config_path)
    assert result.exit_code == 0, result.output
    assert "added 302" in result.stdout
    assert hung_ldap.connections == 1


def test_user_show_tells_a_disabled_directory_user(tmp_path):
    from click.testing import CliRunner

    from mfaserver.cli.main import cli
    from mfaserver.store import Store

    config = tmp_path / "mfaserver.toml"
    config.write_text('[server]\nstate_dir = "state"\n[[radius.clients]]\nname = "t"\n'
                      'address = "127.0.0.1"\nsecret = "0123456789abcdef0123"\n')
    with Store.open(tmp_path / "state" / "mfaserver.sqlite3", tmp_path / "state" / "seed.key") as s:
        s.sync_users([("gone", None)], now=1000.0, keep_days=30)
        s.sync_users([("other", None)], now=2000.0, keep_days=30)
    out = CliRunner().invoke(cli, ["-c", str(config), "user", "show", "gone"]).output
    assert "disabled (left the directory" in out and "source:" in out and "ldap" in out
