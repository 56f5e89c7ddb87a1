"""End to end with an LDAP directory: radclient -> daemon -> real slapd, TOTP from the store."""

from __future__ import annotations

import base64
import time

import pytest

import ldap_server
from mfaserver.factors import oath

from .conftest import start_daemon, stop_daemon

pytestmark = pytest.mark.integration

SEED = bytes(range(30, 50))
SEED_B32 = base64.b32encode(SEED).decode()
ADMIN = "user001"       # in vpn-users and admins
MEMBER = "user050"      # in vpn-users only
OUTSIDER = "user150"    # in no group


def ldap_config(slapd, extra: str = "") -> str:
    return f"""
[directory]
backend = "ldap"

[directory.ldap]
servers = ["{slapd.url}"]
bind_dn = "{ldap_server.SERVICE_DN}"
bind_password = "{ldap_server.SERVICE_PASSWORD}"
base_dn = "{ldap_server.BASE_DN}"
required_group = "{ldap_server.VPN_GROUP}"
timeout = 3
{extra}

[[radius.reply]]
group = "{ldap_server.ADMINS_GROUP}"
attributes = {{ Filter-Id = "admins", Class = "vpn-admin" }}
"""


def password(name: str) -> str:
    return ldap_server.user_password(int(name[4:]))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, slapd):
    d = start_daemon(tmp_path_factory.mktemp("ldap-e2e"), ldap_config(slapd))
    for name in (ADMIN, MEMBER, OUTSIDER):
        d.cli("user", "add", name, "--no-password")
        d.cli("token", "add", name, "--type", "totp", "--secret", SEED_B32, "--no-qr")
    d.used = {}
    yield d
    stop_daemon(d)


def fresh_code(daemon, user: str) -> str:
    """A TOTP code newer than any this user has used (waits for the next step if needed)."""
    last = daemon.used.get(user, -1)
    for offset in (0, 1):
        step = oath.totp_step(time.time()) + offset
        if step > last:
            daemon.used[user] = step
            return oath.hotp(SEED, step)
    time.sleep(30 - time.time() % 30 + 0.1)
    return fresh_code(daemon, user)


def test_ldap_password_and_code_accepts_with_group_reply_attributes(daemon):
    reply = daemon.login(ADMIN, f"{password(ADMIN)},{fresh_code(daemon, ADMIN)}")
    assert reply.code == "Access-Accept", reply.output
    assert reply.get("Filter-Id") == "admins"
    assert reply.get("Class") in ("vpn-admin", "0x76706e2d61646d696e")


def test_member_of_no_reply_group_gets_no_reply_attributes(daemon):
    reply = daemon.login(MEMBER, f"{password(MEMBER)},{fresh_code(daemon, MEMBER)}")
    assert reply.code == "Access-Accept", reply.output
    assert reply.get("Filter-Id") is None


def test_challenge_flow_with_the_ldap_password(daemon):
    challenge = daemon.login(MEMBER, password(MEMBER))
    assert challenge.code == "Access-Challenge", challenge.output
    reply = daemon.login(MEMBER, fresh_code(daemon, MEMBER), f"State = {challenge.get('State')}")
    assert reply.code == "Access-Accept", reply.output


def test_wrong_ldap_password_is_rejected(daemon):
    reply = daemon.login(MEMBER, f"not-the-password,{oath.hotp(SEED, oath.totp_step(time.time()))}")
    assert reply.code == "Access-Reject"
    assert reply.get("Reply-Message") == "Authentication failed."


def test_user_outside_the_required_group_is_rejected(daemon):
    reply = daemon.login(OUTSIDER, f"{password(OUTSIDER)},{fresh_code(daemon, OUTSIDER)}")
    assert reply.code == "Access-Reject"
    assert "not allowed" in reply.get("Reply-Message")
    assert "not_in_group" in daemon.cli("log", "--user", OUTSIDER, "--limit", "1").stdout


def test_injection_in_the_user_name_matches_nobody(daemon):
    for name in ("*", "user0*", "*)(uid=*"):
        reply = daemon.login(name, f"{password(ADMIN)},123456")
        assert reply.code == "Access-Reject"
    assert daemon.alive()


def test_periodic_sync_imports_directory_users_into_the_store(tmp_path, slapd):
    d = start_daemon(tmp_path, ldap_config(slapd, "") + "\n[directory.sync]\ninterval = 1\n")
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            shown = d.cli("user", "show", "user299", check=False)
            if shown.returncode == 0 and "directory sync" in d.log_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the sync never imported user299: " + d.log_text())
    finally:
        assert stop_daemon(d) == 0
