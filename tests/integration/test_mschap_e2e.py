"""End to end MS-CHAPv2 with a push (issue 11, part 2): a NAS that speaks MS-CHAPv2
(this test, computing it as a VPN client does) -> the daemon -> a real FreeRADIUS
with ``mschap`` and a users file; the push answered by the reference authenticator.

The test client checks the MS-CHAP2-Success authenticator response it gets back
and decrypts the MPPE keys with its own secret and Request Authenticator.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

import freeradius_server
from mfaserver.radius import codec
from mschap import MsChapLogin

from .conftest import SECRET, start_daemon, stop_daemon
from .test_push_e2e import enroll, push_config

pytestmark = pytest.mark.integration

UPSTREAM_SECRET = b"upstream-shared-secret-0123456789"
NAS_SECRET = SECRET.encode()


class NasLogin:
    """One MS-CHAPv2 Access-Request sent from its own socket; the reply awaited in a thread."""

    def __init__(self, daemon, login: MsChapLogin, *, timeout: float = 40,
                 user_name: str | None = None):
        self.login = login
        self.authenticator = os.urandom(16)
        attributes = [(codec.USER_NAME, (user_name or login.username).encode()),
                      codec.vsa(311, codec.MS_CHAP_CHALLENGE, login.authenticator_challenge),
                      codec.vsa(311, codec.MS_CHAP2_RESPONSE, login.response_attribute())]
        self.data = codec.encode_request(codec.ACCESS_REQUEST, 42, self.authenticator,
                                         NAS_SECRET, attributes)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.address = ("127.0.0.1", daemon.port)
        self.result: codec.Packet | Exception | None = None
        self.sock.sendto(self.data, self.address)
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def retransmit(self) -> None:
        self.sock.sendto(self.data, self.address)

    def _wait(self) -> None:
        try:
            data, _ = self.sock.recvfrom(4096)
            self.result = codec.decode_response(data, NAS_SECRET, self.authenticator)
        except Exception as e:  # noqa: BLE001 - handed to the test
            self.result = e

    def reply(self) -> codec.Packet:
        self.thread.join(60)
        self.sock.close()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def accepted(self) -> tuple[codec.Packet, tuple[bytes, bytes]]:
        """The reply, checked as a VPN client and NAS would: an Access-Accept whose
        MS-CHAP2-Success proves the password and whose MPPE keys decrypt (with our
        secret and Request Authenticator) to the client's own; and the keys."""
        reply = self.reply()
        assert reply.code == codec.ACCESS_ACCEPT
        ms = _ms(reply)
        assert ms[codec.MS_CHAP2_SUCCESS] == self.login.expected_success()
        keys = tuple(codec.decrypt_salted(ms[t], NAS_SECRET, self.authenticator)
                     for t in (codec.MS_MPPE_SEND_KEY, codec.MS_MPPE_RECV_KEY))
        assert keys == self.login.server_keys()
        return reply, keys


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    # running_freeradius fails the test when freeradius is missing.
    with freeradius_server.running_freeradius(tmp_path_factory.mktemp("mschap-upstream"),
                                              UPSTREAM_SECRET) as server:
        yield server


@pytest.fixture
def daemon(tmp_path, upstream):
    from ldap_server import free_tcp_port
    web_port = free_tcp_port()
    d = start_daemon(tmp_path, push_config(web_port)
                     + freeradius_server.daemon_config(upstream, ("Class",)))
    d.cli("user", "add", "alice", "--no-password")
    d.cli("user", "add", "bob", "--no-password")
    d.cli("token", "add", "bob", "--type", "totp", "--no-qr",
          "--secret", base64.b32encode(bytes(range(20))).decode())
    yield d
    stop_daemon(d)


@pytest.fixture
def phone(daemon, tmp_path):
    return enroll(daemon, tmp_path, "alice")


def _ms(reply: codec.Packet) -> dict[int, bytes]:
    return dict(reply.vendor_attributes(311))


def test_approved_push_accepts_with_success_and_mppe_keys_for_the_nas(daemon, phone):
    login = MsChapLogin.new("alice", "alice-password")
    nas = NasLogin(daemon, login)
    txn = phone.wait_for_transaction()
    assert (txn["user"], txn["number"]) == ("alice", "-")
    # A retransmission while the login is held joins it: still one push.
    nas.retransmit()
    phone.run("approve", txn["txid"])
    reply, (send, recv) = nas.accepted()
    assert reply.get(codec.CLASS) == b"vpn-users"  # pass_through still works
    assert phone.pending() == []
    log = daemon.log_text()
    for secret in (send, recv, login.nt_response):
        assert secret.hex() not in log and secret.hex().upper() not in log


def test_wrong_password_is_rejected_without_a_push(daemon, phone):
    reply = NasLogin(daemon, MsChapLogin.new("alice", "wrong-password")).reply()
    assert reply.code == codec.ACCESS_REJECT
    assert _ms(reply) == {}
    assert phone.pending() == []
    assert "bad_password" in daemon.cli("log", "--user", "alice").stdout


def test_denied_push_rejects(daemon, phone):
    nas = NasLogin(daemon, MsChapLogin.new("alice", "alice-password"))
    phone.run("deny", phone.wait_for_transaction()["txid"])
    reply = nas.reply()
    assert reply.code == codec.ACCESS_REJECT
    assert b"denied" in reply.get(codec.REPLY_MESSAGE)
    assert _ms(reply) == {}


def test_a_user_with_only_a_code_factor_is_refused_with_a_message(daemon):
    reply = NasLogin(daemon, MsChapLogin.new("bob", "bob-password")).reply()
    assert reply.code == codec.ACCESS_REJECT
    assert b"cannot ask for a code" in reply.get(codec.REPLY_MESSAGE)


def test_mschapv1_eap_and_leap_are_refused_with_a_log_line(daemon):
    cases = [
        ("mschapv1", [codec.vsa(311, codec.MS_CHAP_CHALLENGE, bytes(8)),
                      codec.vsa(311, codec.MS_CHAP_RESPONSE, bytes(50))]),
        ("eap", [(codec.EAP_MESSAGE, b"\x02\x01\x00\x0a\x01alice")]),
        ("leap", [(codec.EAP_MESSAGE, b"\x02\x02\x00\x0a\x11\x01\x00\x08" + bytes(2))]),
    ]
    for protocol, attributes in cases:
        authenticator = os.urandom(16)
        data = codec.encode_request(codec.ACCESS_REQUEST, 9, authenticator, NAS_SECRET,
                                    [(codec.USER_NAME, b"alice"), *attributes])
        raw = daemon.send_raw(data, wait=3)
        reply = codec.decode_response(raw, NAS_SECRET, authenticator)
        assert reply.code == codec.ACCESS_REJECT
        assert f"refused a {protocol} login" in daemon.wait_for_log(f"refused a {protocol} login")


# --- Active Directory without NPS: ntlm_auth ---------------------------------------------------

def standin_ntlm_auth(directory: Path, users: dict) -> Path:
    """An executable speaking ntlm_auth's --request-nt-key interface (tests/ntlm_auth_standin.py)."""
    (directory / "users.json").write_text(json.dumps(users))
    script = Path(__file__).parent.parent / "ntlm_auth_standin.py"
    wrapper = directory / "ntlm_auth"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" '
                       f'"{directory / "users.json"}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def ntlm_daemon(tmp_path):
    from ldap_server import free_tcp_port
    ntlm_auth = standin_ntlm_auth(tmp_path, {"alice": "alice-ad-password",
                                             "erin": {"password": "erin-pw",
                                                      "status": "c0000071"}})
    d = start_daemon(tmp_path, push_config(free_tcp_port()) + f"""
[directory.ad]
mschap = "ntlm_auth"
ntlm_auth = "{ntlm_auth}"
domain = "EXAMPLE"
""")
    d.cli("user", "add", "alice", "--no-password")
    d.cli("user", "add", "erin", "--no-password")
    d.ntlm_args = tmp_path / "users.json.args"
    yield d
    stop_daemon(d)


def test_ntlm_auth_checks_the_response_and_the_push_completes_it(ntlm_daemon, tmp_path):
    phone = enroll(ntlm_daemon, tmp_path, "alice")
    # RFC 2759: the client hashes the name without its domain, the NAS sends it whole.
    login = MsChapLogin.new("alice", "alice-ad-password")
    nas = NasLogin(ntlm_daemon, login, user_name="EXAMPLE\\alice")
    phone.run("approve", phone.wait_for_transaction()["txid"])
    nas.accepted()
    args = json.loads(ntlm_daemon.ntlm_args.read_text())
    assert "--username=alice" in args and "--domain=EXAMPLE" in args


def test_ntlm_auth_refusals_reject_without_a_push(ntlm_daemon, tmp_path):
    phone = enroll(ntlm_daemon, tmp_path, "alice")
    reply = NasLogin(ntlm_daemon, MsChapLogin.new("alice", "wrong")).reply()
    assert reply.code == codec.ACCESS_REJECT
    reply = NasLogin(ntlm_daemon, MsChapLogin.new("erin", "erin-pw")).reply()
    assert reply.code == codec.ACCESS_REJECT
    assert b"expired" in reply.get(codec.REPLY_MESSAGE)
    assert phone.pending() == []
