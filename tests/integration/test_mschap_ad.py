"""MS-CHAPv2 against Active Directory without NPS, for real: Samba's ntlm_auth
against the suite's Samba AD DC, with the DC's own winbindd (issue 11, part 2).

This is how FreeRADIUS on a Samba DC checks MS-CHAPv2: no separate domain
member; the DC runs winbindd (``server services = ldap, winbindd``) and
allows MS-CHAPv2 (``ntlm auth = mschapv2-and-ntlmv2-only``), and ntlm_auth
on the same machine asks it. A member server joined with ``net ads join``
would need the DC's Kerberos, DNS and RPC services on their fixed ports,
which the suite's LDAP-only DC does not run. winbindd listens on the
compiled-in /run/samba/winbindd (libwbclient looks nowhere else), so this
module starts its own DC, like test_active_directory does, one at a time.

The NAS computes MS-CHAPv2 itself and checks the MS-CHAP2-Success and the
MPPE keys, which mfaserver derives from ntlm_auth's NT_KEY.
"""

from __future__ import annotations

import shutil

import pytest

from samba_ad import PASSWORDS, SambaUnavailable, provision, start_dc
from mfaserver.radius import codec
from mschap import MsChapLogin

from .conftest import start_daemon, stop_daemon
from .test_mschap_e2e import NasLogin
from .test_push_e2e import enroll, push_config

pytestmark = pytest.mark.integration

NTLM_AUTH = "/usr/bin/ntlm_auth"


@pytest.fixture(scope="module")
def winbind_dc(tmp_path_factory):
    if shutil.which(NTLM_AUTH) is None:
        pytest.fail("ntlm_auth is missing: run scripts/setup-env, which installs winbind")
    try:
        template = provision(tmp_path_factory.mktemp("mschap-samba-template"))
        dc = start_dc(template, tmp_path_factory.mktemp("mschap-samba-dc"), winbind=True)
    except SambaUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    yield dc
    dc.stop()


@pytest.fixture
def daemon(tmp_path, winbind_dc):
    from ldap_server import free_tcp_port
    d = start_daemon(tmp_path, push_config(free_tcp_port()) + f"""
[directory.ad]
mschap = "ntlm_auth"
domain = "EXAMPLE"
config_file = "{winbind_dc.path / 'etc' / 'smb.conf'}"
timeout = 20
""")
    for name in ("alice", "bob", "frank"):
        d.cli("user", "add", name, "--no-password")
    yield d
    stop_daemon(d)


def test_ad_password_then_push_gives_success_and_keys(daemon, tmp_path):
    phone = enroll(daemon, tmp_path, "alice")
    login = MsChapLogin.new("alice", PASSWORDS["alice"])
    nas = NasLogin(daemon, login, user_name="EXAMPLE\\alice")
    phone.run("approve", phone.wait_for_transaction(seconds=30)["txid"])
    nas.accepted()


def test_ad_refusals_reject_without_a_push_and_say_why(daemon, tmp_path):
    phone = enroll(daemon, tmp_path, "alice")
    reply = NasLogin(daemon, MsChapLogin.new("alice", "not-her-password")).reply()
    assert reply.code == codec.ACCESS_REJECT
    assert phone.pending() == []
    reply = NasLogin(daemon, MsChapLogin.new("bob", PASSWORDS["bob"])).reply()
    assert (reply.code, b"disabled" in reply.get(codec.REPLY_MESSAGE)) == (
        codec.ACCESS_REJECT, True)
    reply = NasLogin(daemon, MsChapLogin.new("frank", PASSWORDS["frank"])).reply()
    assert (reply.code, b"expired" in reply.get(codec.REPLY_MESSAGE)) == (
        codec.ACCESS_REJECT, True)
    log = daemon.cli("log").stdout
    assert "account_disabled" in log and "password_expired" in log
