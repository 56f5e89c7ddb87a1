"""``mfaserver sync`` against a real slapd, and the store's sync at full scale.

The CLI runs in-process (click's CliRunner); ldap3 talks to slapd, to
servers that hang and to ports where nothing listens. The sync logic on
fake directories is tested in tests/test_sync.py.
"""

from __future__ import annotations

import ldap3
import pytest

import ldap_server
from cli_setup import (
    ALICE_PHONE, BOB_PHONE, DAY, NOW, invoke_sync, sync_many_users, write_config,
)
from mfaserver.config import load_config
from mfaserver.directory.sync import SyncError, run_sync
from mfaserver.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "state" / "db.sqlite", tmp_path / "state" / "seed.key")
    yield s
    s.close()


def test_a_hundred_thousand_users(store):
    # Next run: 1000 left, 1000 new, 1000 changed numbers.
    sync_many_users(store, 100_000, changes=1000)


def test_fetch_failure_names_every_server(tmp_path, store):
    urls = (ldap_server.dead_url(), ldap_server.dead_url())
    config = load_config(write_config(tmp_path, servers=urls,
                                      ldap_extra="timeout = 2\nallow_plaintext = true"))
    with pytest.raises(SyncError) as info:
        run_sync(config, store, NOW)
    message = str(info.value)
    assert message.startswith("cannot read users from LDAP: ")
    assert all(url in message for url in urls) and "\n" not in message


# --- against a real slapd ---


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


def test_sync_imports_the_directory_then_disables_a_deleted_user(tmp_path, own_slapd):
    set_mobile(own_slapd, 1, "+1 (415) 555-0123")
    set_mobile(own_slapd, 2, "12345")
    config_path = slapd_config(tmp_path, [own_slapd.url])

    result = invoke_sync(config_path)
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
    result = invoke_sync(config_path, now=NOW + DAY)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        "sync: 302 users in the directory; added 0, updated 1, re-enabled 0, disabled 1,"
        " removed 0, unchanged 300; 2 invalid phone numbers")
    with open_store(config_path) as store:
        assert store.get_user("user005").disabled_since == NOW + DAY
        assert store.load_account("user005").blocked
        assert store.get_user("user003").phone == BOB_PHONE


def test_sync_refuses_when_ldap_is_down_and_disables_nothing(tmp_path, own_slapd):
    config_path = slapd_config(tmp_path, [own_slapd.url])
    assert invoke_sync(config_path).exit_code == 0
    dead = ldap_server.dead_url()
    down = slapd_config(tmp_path, [dead])
    result = invoke_sync(down, now=NOW + DAY)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read users from LDAP: {dead}:")
    own_slapd.stop()
    result = invoke_sync(config_path, now=NOW + DAY)
    assert result.exit_code == 1 and "cannot read users from LDAP" in result.stderr
    with open_store(config_path) as store:
        assert [u for u in store.list_users() if u.disabled_since is not None] == []


def test_sync_fails_over_to_the_next_server(tmp_path, slapd):
    config_path = slapd_config(tmp_path, [ldap_server.dead_url(), slapd.url])
    result = invoke_sync(config_path)
    assert result.exit_code == 0, result.output
    assert "added 302" in result.stdout


def test_sync_refuses_a_filter_matching_nobody_unless_forced(tmp_path, slapd):
    config_path = slapd_config(tmp_path, [slapd.url])
    assert invoke_sync(config_path).exit_code == 0
    nobody = slapd_config(tmp_path, [slapd.url], sync_extra='filter = "(uid=nobody)"')
    result = invoke_sync(nobody, now=NOW + 1)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: the directory returned no users: refusing to disable all 302 synced users"
        " (check base_dn and the sync filter, or use --force)"]
    result = invoke_sync(nobody, "--force", "--dry-run", now=NOW + 1)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sync (dry run, nothing changed): 0 users in the directory;"
                                    " added 0, updated 0, re-enabled 0, disabled 302,")
    with open_store(config_path) as store:
        assert all(u.disabled_since is None for u in store.list_users())


@pytest.mark.parametrize("scheme", ["ldaps", "starttls"])
def test_sync_over_tls_checks_the_certificate_against_ca_file(tmp_path, slapd, ldap_certs,
                                                             scheme):
    url, tls = (slapd.ldaps_url, "") if scheme == "ldaps" else (slapd.url, "start_tls = true")
    bad = slapd_config(tmp_path, [url],
                       ldap_extra=f'ca_file = "{ldap_certs.other_ca_file}"\n{tls}')
    result = invoke_sync(bad)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot read users from LDAP: {url}: ")
    good = slapd_config(tmp_path, [url], ldap_extra=f'ca_file = "{ldap_certs.ca_file}"\n{tls}')
    result = invoke_sync(good)
    assert result.exit_code == 0, result.output
    assert "added 302" in result.stdout


def test_sync_refuses_a_certificate_for_another_host(tmp_path, slapd_wrong_name, ldap_certs):
    config_path = slapd_config(tmp_path, [slapd_wrong_name.ldaps_url],
                               ldap_extra=f'ca_file = "{ldap_certs.ca_file}"')
    result = invoke_sync(config_path)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: cannot read users from LDAP: {slapd_wrong_name.ldaps_url}: connect failed:"
        " the server's certificate is not valid for its host name"]


def test_dry_run_on_a_fresh_install_creates_no_database(tmp_path, slapd):
    config_path = slapd_config(tmp_path, [slapd.url])
    result = invoke_sync(config_path, "--dry-run")
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "state").exists()


def add_people(slapd, count: int) -> None:
    with root_connection(slapd) as conn:
        for i in range(count):
            uid = f"extra{i:03d}"
            conn.add(f"uid={uid},{ldap_server.PEOPLE_DN}", ["inetOrgPerson"],
                     {"uid": uid, "cn": uid, "sn": uid})


def test_a_search_cut_short_by_a_size_limit_fails_and_changes_nothing(tmp_path, own_slapd):
    config_path = slapd_config(tmp_path, [own_slapd.url])
    assert invoke_sync(config_path).exit_code == 0
    # slapd gives the service account at most 500 entries, paged or not; a
    # sync that took those for the whole directory would disable the rest.
    add_people(own_slapd, 400)
    result = invoke_sync(config_path, now=NOW + 1)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: cannot read users from LDAP: {own_slapd.url}: search failed:"
        " sizeLimitExceeded after 500 entries, not the whole directory"]
    with open_store(config_path) as store:
        assert store.count_users() == 302
        assert all(u.disabled_since is None for u in store.list_users())


def test_sync_pages_through_a_large_directory(tmp_path, own_slapd, monkeypatch):
    from mfaserver.directory import sync

    monkeypatch.setattr(sync, "PAGE_SIZE", 100)
    add_people(own_slapd, 400)
    config_path = write_config(tmp_path, servers=[own_slapd.url], ldap_extra=f"""\
bind_dn = "{ldap_server.ROOT_DN}"
bind_password = "{ldap_server.ROOT_PASSWORD}"
""")
    result = invoke_sync(config_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sync: 703 users in the directory; added 702,")


def test_sync_gives_up_on_a_hung_server_and_uses_the_next(tmp_path, slapd, hung_ldap):
    config_path = slapd_config(tmp_path, [hung_ldap.url, slapd.url], timeout=1)
    result = invoke_sync(config_path)
    assert result.exit_code == 0, result.output
    assert "added 302" in result.stdout
    assert hung_ldap.connections == 1
