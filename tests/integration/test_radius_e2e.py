"""End to end: the real daemon on 127.0.0.1, radclient as the NAS, a real SQLite file.

Users and tokens are created with the CLI while the daemon runs, which also
shows that admin changes take effect without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import socket
import struct
import time

import pytest

from mfaserver.factors import oath
from mfaserver.radius import codec
from mfaserver.testing import access_request, status_server

from .conftest import SECRET, start_daemon, stop_daemon

pytestmark = pytest.mark.integration

SEED = bytes(range(1, 21))
SEED_B32 = base64.b32encode(SEED).decode()


def code_now(offset: int = 0, seed: bytes = SEED) -> str:
    return oath.hotp(seed, oath.totp_step(time.time()) + offset)


def fresh_code(daemon, user: str) -> str:
    """A code for ``user``'s token that has not been used yet (waits for a new step if needed)."""
    used = daemon.used.setdefault(user, set())
    for offset in (0, 1, -1):
        step = oath.totp_step(time.time()) + offset
        if step not in used and all(step > u for u in used):
            used.add(step)
            return oath.hotp(SEED, step)
    time.sleep(30 - time.time() % 30 + 0.1)
    return fresh_code(daemon, user)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("e2e"))
    d.used = {}
    yield d
    stop_daemon(d)


_counter = iter(range(10_000))


@pytest.fixture
def user(daemon):
    """A new user with password 'pw-<name>' and a TOTP token with SEED."""
    name = f"user{next(_counter)}"
    daemon.cli("user", "add", name, "--password-stdin", input=f"pw-{name}\n")
    daemon.cli("token", "add", name, "--type", "totp", "--secret", SEED_B32, "--no-qr")
    return name


def test_password_and_code_in_one_field_is_accepted(daemon, user):
    reply = daemon.login(user, f"pw-{user},{fresh_code(daemon, user)}")
    assert reply.code == "Access-Accept", reply.output
    assert "Message-Authenticator" in reply.attributes


def test_challenge_and_state_round_trip(daemon, user):
    challenge = daemon.login(user, f"pw-{user}")
    assert challenge.code == "Access-Challenge", challenge.output
    assert "code" in challenge.get("Reply-Message")
    state = challenge.get("State")
    assert state.startswith("0x") and len(state) >= 2 + 32
    reply = daemon.login(user, fresh_code(daemon, user), f"State = {state}")
    assert reply.code == "Access-Accept", reply.output
    again = daemon.login(user, code_now(1), f"State = {state}")
    assert again.code == "Access-Reject"


def test_wrong_password_is_rejected_with_a_generic_message(daemon, user):
    wrong = daemon.login(user, f"nope,{code_now()}")
    unknown = daemon.login("nobody-here", f"nope,{code_now()}")
    assert wrong.code == unknown.code == "Access-Reject"
    assert wrong.get("Reply-Message") == unknown.get("Reply-Message")


def test_wrong_code_is_rejected(daemon, user):
    reply = daemon.login(user, f"pw-{user},{'%06d' % ((int(code_now()) + 1) % 10**6)}")
    assert reply.code == "Access-Reject"


def test_replayed_code_is_rejected(daemon, user):
    code = fresh_code(daemon, user)
    assert daemon.login(user, f"pw-{user},{code}").code == "Access-Accept"
    reply = daemon.login(user, f"pw-{user},{code}")
    assert reply.code == "Access-Reject"
    assert "already used" in reply.get("Reply-Message")


def test_ten_wrong_codes_lock_the_user_and_unblock_clears_it(daemon, user):
    for _ in range(10):
        assert daemon.login(user, f"pw-{user},000000").code == "Access-Reject"
    locked = daemon.login(user, f"pw-{user},{fresh_code(daemon, user)}")
    assert locked.code == "Access-Reject"
    assert "Too many" in locked.get("Reply-Message")
    daemon.cli("user", "unblock", user)
    assert daemon.login(user, f"pw-{user},{fresh_code(daemon, user)}").code == "Access-Accept"


def test_blocked_user_is_rejected(daemon, user):
    daemon.cli("user", "block", user)
    reply = daemon.login(user, f"pw-{user},{fresh_code(daemon, user)}")
    assert reply.code == "Access-Reject"
    assert "blocked" in reply.get("Reply-Message")


def test_bypass_lets_the_next_login_through_on_the_password(daemon, user):
    daemon.cli("bypass", user, "--minutes", "5")
    assert daemon.login(user, f"pw-{user}").code == "Access-Accept"
    assert daemon.login(user, f"pw-{user}").code == "Access-Challenge"


def test_chap_gets_a_reject_saying_pap_is_required(daemon, user):
    reply = daemon.radclient(f'User-Name = "{user}", CHAP-Password = "pw-{user}", '
                             'Message-Authenticator = 0x00')
    assert reply.code == "Access-Reject"
    assert "PAP" in reply.get("Reply-Message")


def test_missing_message_authenticator_is_dropped(daemon, user):
    reply = daemon.radclient(f'User-Name = "{user}", User-Password = "pw-{user}"', timeout=1)
    assert reply.code is None
    assert daemon.alive()


def test_wrong_secret_is_dropped(daemon, user):
    reply = daemon.radclient(f'User-Name = "{user}", User-Password = "pw-{user}", '
                             'Message-Authenticator = 0x00', secret="not-the-secret", timeout=1)
    assert reply.code is None
    assert daemon.alive()


def test_unknown_client_is_dropped(daemon, user):
    data, _ = access_request(SECRET.encode(), user, f"pw-{user}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(1)
        s.sendto(data, ("127.0.0.1", daemon.port))
        with pytest.raises(socket.timeout):
            s.recv(4096)
    assert daemon.alive()


def test_status_server_is_answered_by_radclient(daemon):
    reply = daemon.radclient("Message-Authenticator = 0x00", kind="status")
    assert reply.code == "Access-Accept", reply.output


def test_status_server_without_message_authenticator_is_dropped(daemon):
    data, _ = status_server(SECRET.encode(), message_authenticator=False)
    assert daemon.send_raw(data) is None


def test_retransmission_gets_byte_identical_reply(daemon, user):
    data, auth = access_request(SECRET.encode(), user, f"pw-{user},{fresh_code(daemon, user)}")
    first, second = daemon.send_repeatedly(data, 2, wait=5)
    assert first == second
    assert codec.decode_response(first, SECRET.encode(), auth).code == codec.ACCESS_ACCEPT


def test_every_reply_type_has_message_authenticator_first_and_valid(daemon, user):
    secret = SECRET.encode()
    cases = [f"pw-{user},{fresh_code(daemon, user)}", f"pw-{user}", "wrong"]
    codes = set()
    for password in cases:
        data, auth = access_request(secret, user, password)
        reply = codec.decode_response(daemon.send_raw(data, wait=5), secret, auth)
        assert reply.attributes[0][0] == codec.MESSAGE_AUTHENTICATOR
        codes.add(reply.code)
    data, auth = status_server(secret)
    reply = codec.decode_response(daemon.send_raw(data), secret, auth)
    assert reply.attributes[0][0] == codec.MESSAGE_AUTHENTICATOR
    assert codes == {codec.ACCESS_ACCEPT, codec.ACCESS_CHALLENGE, codec.ACCESS_REJECT}


def test_proxy_states_are_echoed_in_order(daemon, user):
    data, auth = access_request(SECRET.encode(), user, "wrong",
                                extra=[(codec.PROXY_STATE, b"one"), (codec.PROXY_STATE, b"two")])
    reply = codec.decode_response(daemon.send_raw(data, wait=5), SECRET.encode(), auth)
    assert reply.get_all(codec.PROXY_STATE) == [b"one", b"two"]


def test_message_authenticator_placed_last_is_accepted(daemon, user):
    secret = SECRET.encode()
    auth = os.urandom(16)
    body = b"".join(bytes((t, len(v) + 2)) + v for t, v in [
        (codec.USER_NAME, user.encode()),
        (codec.USER_PASSWORD, codec.encrypt_password(b"wrong", secret, auth)),
        (codec.MESSAGE_AUTHENTICATOR, bytes(16))])
    data = bytearray(struct.pack("!BBH", codec.ACCESS_REQUEST, 9, 20 + len(body)) + auth + body)
    data[-16:] = hmac.new(secret, bytes(data), hashlib.md5).digest()
    reply = daemon.send_raw(bytes(data), wait=5)
    assert codec.decode_response(reply, secret, auth).code == codec.ACCESS_REJECT


def _malformed_packets(user: str) -> dict[str, bytes]:
    secret = SECRET.encode()
    good, _ = access_request(secret, user, "x")
    flipped = bytearray(good)
    flipped[-1] ^= 1  # last byte of the (first) Message-Authenticator? no: of User-Password
    ma_flipped = bytearray(good)
    ma_flipped[20 + 2 + 3] ^= 0x01  # inside the Message-Authenticator value (first attribute)
    vsa_zero = codec.encode_request(codec.ACCESS_REQUEST, 3, os.urandom(16), secret, [
        (codec.USER_NAME, b"u"), (codec.USER_PASSWORD, bytes(16)),
        (codec.VENDOR_SPECIFIC, b"\x00\x00\x00\x09" + b"\x01\x00" + b"abc")])
    return {
        "too short": good[:19],
        "length larger than datagram": good[:2] + (len(good) + 10).to_bytes(2, "big") + good[4:],
        "length below 20": good[:2] + (19).to_bytes(2, "big") + good[4:],
        "accounting request on the auth port": bytes([4]) + good[1:],
        "access-accept sent to the server": bytes([2]) + good[1:],
        "user-password tampered (m-a fails)": bytes(flipped),
        "m-a bit flipped": bytes(ma_flipped),
        "vsa sub-attribute of length 0 (pyrad hang)": vsa_zero,
        "attribute length 0": good[:20] + b"\x01\x00" + good[22:],
        "attribute length 1": good[:20] + b"\x01\x01" + good[22:],
        "user-name claims 10 bytes, 2 present": good[:2] + (24).to_bytes(2, "big")
        + good[4:20] + b"\x01\x0ahi",
        "1,000 two-byte attributes": good[:2] + (20 + 2000 % 4096).to_bytes(2, "big")
        + good[4:20] + b"\x21\x02" * 1000,
        "65 KB datagram with a bad length": good[:2] + b"\xff\xff" + good[4:] + bytes(60000),
        "random bytes": os.urandom(300),
        "empty": b"",
    }


def test_malformed_packets_are_dropped_and_the_daemon_keeps_answering(daemon, user):
    for name, data in _malformed_packets(user).items():
        assert daemon.send_raw(data, wait=0.3) is None, name
        assert daemon.alive(), f"daemon stopped answering after: {name}"


def test_padding_after_the_length_field_is_ignored(daemon, user):
    data, auth = access_request(SECRET.encode(), user, "wrong")
    reply = daemon.send_raw(data + b"\x00\x01\x02", wait=5)
    assert codec.decode_response(reply, SECRET.encode(), auth).code == codec.ACCESS_REJECT


def test_user_password_of_bad_length_is_dropped(daemon, user):
    secret = SECRET.encode()
    for hidden in (b"12345", b"x" * 17, b"x" * 144):
        data = codec.encode_request(codec.ACCESS_REQUEST, 4, os.urandom(16), secret,
                                    [(codec.USER_NAME, user.encode()),
                                     (codec.USER_PASSWORD, hidden)])
        assert daemon.send_raw(data, wait=0.3) is None
    assert daemon.alive()


def test_empty_password_is_rejected(daemon, user):
    data, auth = access_request(SECRET.encode(), user, "")
    reply = codec.decode_response(daemon.send_raw(data, wait=5), SECRET.encode(), auth)
    assert reply.code == codec.ACCESS_REJECT


def test_audit_log_lists_decisions_newest_first(daemon, user):
    daemon.login(user, "wrong")
    daemon.login(user, f"pw-{user},{fresh_code(daemon, user)}")
    lines = daemon.cli("log", "--user", user, "--limit", "5").stdout.strip().splitlines()
    assert "accept" in lines[0] and "reject" in lines[1]
    assert "nas" in lines[0]


def test_no_password_code_or_secret_in_the_daemon_log(daemon, user):
    code = fresh_code(daemon, user)
    daemon.login(user, f"pw-{user},{code}")
    challenge = daemon.login(user, f"pw-{user}")
    text = daemon.wait_for_log(f"challenge {user}")
    assert f"pw-{user}" not in text
    assert code not in text
    assert SECRET not in text
    assert challenge.get("State")[2:] not in text.lower()
    assert user in text  # the log is not simply empty


def test_sighup_reloads_clients_without_a_restart(tmp_path):
    d = start_daemon(tmp_path)
    try:
        new_secret = "a-rotated-shared-secret-9876543210"
        d.config_path.write_text(d.config_path.read_text().replace(SECRET, new_secret))
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while time.time() < deadline:
            if d.radclient("Message-Authenticator = 0x00", kind="status",
                           secret=new_secret, timeout=1).code == "Access-Accept":
                break
        else:
            pytest.fail("the new secret never worked: " + d.log_text())
        assert not d.alive()  # the old secret is gone
        d.config_path.write_text("this is [not toml")
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert d.radclient("Message-Authenticator = 0x00", kind="status",
                           secret=new_secret).code == "Access-Accept"
        assert "reload failed" in d.log_text()
    finally:
        assert stop_daemon(d) == 0


def test_web_listener_serves_health_while_radius_runs(tmp_path):
    import json
    import urllib.request

    from ldap_server import free_tcp_port
    port = free_tcp_port()
    d = start_daemon(tmp_path, f"\n[web]\nport = {port}\n")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert json.load(response) == {"status": "ok"}
        assert d.alive()
    finally:
        assert stop_daemon(d) == 0
