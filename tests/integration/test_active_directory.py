"""`LdapDirectory` against a real Active Directory: a Samba AD DC on 127.0.0.1.

The domain is provisioned once per test session (tests/samba_ad.py says what
it holds) and started once for this module, over LDAPS with a CA made for the
test. What Samba answers for each refused bind is pinned in
`test_samba_answers_simple_binds_with_the_ad_error_codes`, so a change in
Samba shows up there rather than as a puzzling directory failure.
"""

from __future__ import annotations

import ssl
from dataclasses import replace

import ldap3
import pytest
import pytest_twisted
from twisted.internet import defer

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Reason
from mfaserver.config import LdapConfig
from mfaserver.directory.libldap import LibldapDirectory as LdapDirectory

# tests/ is on sys.path: pytest's default "prepend" import mode inserts the folder above
# the "integration" package (tests/ itself has no __init__.py).
from samba_ad import (ALICE_MOBILE, BASE_DN, DOMAIN, PASSWORDS, SERVICE_DN, SERVICE_PASSWORD,
                      USERS_DN, VPN_TEAM_DN, VPN_USERS_DN, SambaUnavailable, provision, start_dc,
                      write_certificates)

pytestmark = pytest.mark.integration

VPN_USERS = VPN_USERS_DN.lower()
VPN_TEAM = VPN_TEAM_DN.lower()


@pytest.fixture(scope="session")
def samba_template(tmp_path_factory):
    """The provisioned, populated domain (about 15 s): made once per session, copied per module."""
    try:
        return provision(tmp_path_factory.mktemp("samba-template"))
    except SambaUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def samba_dc(samba_template, tmp_path_factory):
    """A running copy of the domain; stopped after the module so ports 389/636 are free again."""
    try:
        dc = start_dc(samba_template, tmp_path_factory.mktemp("samba-dc"))
    except SambaUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    yield dc
    dc.stop()


@pytest.fixture
def config(samba_dc) -> LdapConfig:
    return LdapConfig(
        servers=(samba_dc.url,),
        base_dn=BASE_DN,
        bind_dn=SERVICE_DN,
        bind_password=SERVICE_PASSWORD,
        ca_file=samba_dc.ca_file,
        user_filter="(sAMAccountName={username})",
        username_attribute="sAMAccountName",
        phone_attribute="mobile",
        active_directory=True,
        ad_domain=DOMAIN,
        timeout=10.0,
        pool_size=2,
    )


async def authenticate(config: LdapConfig, username: str, password: str,
                       groups: tuple[str, ...] = ()):
    """Start a directory, authenticate once, stop it; returns the Principal."""
    from twisted.internet import reactor

    directory = LdapDirectory(config, reactor, groups=groups)
    await defer.maybeDeferred(directory.start)
    try:
        return await directory.authenticate(username, password)
    finally:
        await defer.maybeDeferred(directory.stop)


async def refusal(config: LdapConfig, username: str, password: str) -> InvalidCredentials:
    with pytest.raises(InvalidCredentials) as info:
        await authenticate(config, username, password)
    return info.value


@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")  # inside ldap3
def test_samba_answers_simple_binds_with_the_ad_error_codes(samba_dc):
    """The fixture itself: Samba refuses binds the way Windows AD does (data NNN in the message)."""
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(samba_dc.ca_file))
    server = ldap3.Server(samba_dc.url, tls=tls, connect_timeout=10)

    def bind(who: str, password: str) -> str:
        connection = ldap3.Connection(server, who, password)
        try:
            return "ok" if connection.bind() else connection.result["message"]
        finally:
            connection.unbind()

    assert bind(f"CN=alice,{USERS_DN}", PASSWORDS["alice"]) == "ok"
    assert bind("alice@example.org", PASSWORDS["alice"]) == "ok"
    assert bind(f"{DOMAIN}\\alice", PASSWORDS["alice"]) == "ok"
    for user, password, data in [("alice", "wrong", "52e"), ("bob", PASSWORDS["bob"], "533"),
                                 ("carol", PASSWORDS["carol"], "773"),
                                 ("dave", PASSWORDS["dave"], "701"),
                                 ("frank", PASSWORDS["frank"], "532")]:
        message = bind(f"CN={user},{USERS_DN}", password)
        assert message == ("80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext "
                           f"error, data {data}, v1db1"), user
    # Plain LDAP refuses simple binds: Samba's "ldap server require strong auth" default.
    plain = ldap3.Connection(ldap3.Server(samba_dc.plain_url), "alice@example.org",
                             PASSWORDS["alice"])
    assert not plain.bind()
    assert plain.result["message"] == "BindSimple: Transport encryption required."


@pytest.mark.parametrize("typed", ["alice", "alice@example.org", "EXAMPLE\\alice",
                                   "example\\alice", "ALICE"])
@pytest_twisted.ensureDeferred
async def test_account_name_upn_and_down_level_name_log_in_as_the_account_name(config, typed):
    principal = await authenticate(config, typed, PASSWORDS["alice"])
    assert principal.username == "alice"
    assert principal.phone == ALICE_MOBILE


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_bad_password(config):
    assert (await refusal(config, "alice", "Not-Her-Passw0rd")).reason == Reason.BAD_PASSWORD


@pytest_twisted.ensureDeferred
async def test_wrong_password_by_upn_is_bad_password(config):
    refused = await refusal(config, "alice@example.org", "Not-Her-Passw0rd")
    assert refused.reason == Reason.BAD_PASSWORD


@pytest_twisted.ensureDeferred
async def test_empty_password_is_refused_not_an_anonymous_bind(config):
    with pytest.raises(InvalidCredentials):
        await authenticate(config, "alice", "")


@pytest_twisted.ensureDeferred
async def test_disabled_account_is_account_disabled(config):
    refused = await refusal(config, "bob", PASSWORDS["bob"])
    assert refused.reason == Reason.ACCOUNT_DISABLED


@pytest_twisted.ensureDeferred
async def test_password_to_change_at_next_logon_is_must_change_password(config):
    # Samba answers pwdLastSet=0 with data 773, as Windows does.
    refused = await refusal(config, "carol", PASSWORDS["carol"])
    assert refused.reason == Reason.MUST_CHANGE_PASSWORD


@pytest_twisted.ensureDeferred
async def test_expired_account_is_account_expired(config):
    refused = await refusal(config, "dave", PASSWORDS["dave"])
    assert refused.reason == Reason.ACCOUNT_EXPIRED


@pytest_twisted.ensureDeferred
async def test_password_older_than_the_maximum_age_is_password_expired(config):
    refused = await refusal(config, "frank", PASSWORDS["frank"])
    assert refused.reason == Reason.PASSWORD_EXPIRED


@pytest_twisted.ensureDeferred
async def test_locked_out_account_is_account_locked_even_with_the_right_password(config):
    # erin's password settings object locks her out after two bad passwords.
    for _ in range(2):
        assert (await refusal(config, "erin", "Not-Her-Passw0rd")).reason == Reason.BAD_PASSWORD
    refused = await refusal(config, "erin", PASSWORDS["erin"])
    assert refused.reason == Reason.ACCOUNT_LOCKED


@pytest_twisted.ensureDeferred
async def test_unknown_user_is_unknown_user(config):
    with pytest.raises(UnknownUser):
        await authenticate(config, "nobody", "Whatever-Passw0rd")


@pytest_twisted.ensureDeferred
async def test_down_level_name_of_another_domain_is_unknown(config):
    with pytest.raises(UnknownUser):
        await authenticate(config, "OTHERDOMAIN\\alice", PASSWORDS["alice"])


@pytest_twisted.ensureDeferred
async def test_upn_of_another_domain_is_unknown(config):
    with pytest.raises(UnknownUser):
        await authenticate(config, "alice@other.example", PASSWORDS["alice"])


@pytest_twisted.ensureDeferred
async def test_member_through_a_nested_group_passes_the_required_group(config):
    principal = await authenticate(replace(config, required_group=VPN_USERS),
                                   "EXAMPLE\\alice", PASSWORDS["alice"])
    assert principal.username == "alice"


@pytest_twisted.ensureDeferred
async def test_user_outside_the_required_group_is_not_in_group(config):
    refused = await refusal(replace(config, required_group=VPN_USERS), "grace", PASSWORDS["grace"])
    assert refused.reason == Reason.NOT_IN_GROUP


@pytest_twisted.ensureDeferred
async def test_wrong_password_of_a_user_outside_the_group_is_still_bad_password(config):
    refused = await refusal(replace(config, required_group=VPN_USERS), "grace", "Not-Her-Passw0rd")
    assert refused.reason == Reason.BAD_PASSWORD


@pytest_twisted.ensureDeferred
async def test_principal_lists_direct_and_nested_configured_groups(config):
    principal = await authenticate(config, "alice", PASSWORDS["alice"],
                                   groups=(VPN_USERS, VPN_TEAM))
    assert principal.groups == frozenset({VPN_USERS, VPN_TEAM})
    other = await authenticate(config, "grace", PASSWORDS["grace"], groups=(VPN_USERS, VPN_TEAM))
    assert other.groups == frozenset()


@pytest_twisted.ensureDeferred
async def test_server_certificate_from_another_ca_is_not_trusted(config, tmp_path):
    other_ca = write_certificates(tmp_path / "other")
    with pytest.raises(DirectoryUnavailable):
        await authenticate(replace(config, ca_file=other_ca), "alice", PASSWORDS["alice"])
