"""SIGHUP on the running daemon, section by section: what reloads live takes effect for the
next login, logins go on meanwhile, and a key that needs a restart is named in the log."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import ldap_server
from mfaserver.factors import oath
from mfaserver.factors.push import MSG_MATCH_NUMBER

from ldap_server import free_tcp_port

from .conftest import SECRET, free_udp_port, start_daemon, stop_daemon
from .test_push_e2e import enroll

pytestmark = pytest.mark.integration

SEED = bytes(range(60, 80))
SEED_B32 = base64.b32encode(SEED).decode()
NEWCOMER = "newcomer"
NEWCOMER_PASSWORD = "newcomer-secret"


def reload(daemon) -> str:
    """SIGHUP the daemon; the log once it says it has reloaded once more."""
    before = daemon.log_text().count("configuration reloaded")
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = daemon.log_text()
        if text.count("configuration reloaded") > before:
            return text
        time.sleep(0.05)
    raise AssertionError("no reload logged: " + daemon.log_text())


def rewrite(daemon, old: str, new: str) -> None:
    text = daemon.config_path.read_text()
    assert old in text
    daemon.config_path.write_text(text.replace(old, new))


def code_after(used: int) -> tuple[int, str]:
    """A TOTP step newer than ``used`` and its code (waits for the next step if needed)."""
    while True:
        step = oath.totp_step(time.time())
        if step > used:
            return step, oath.hotp(SEED, step)
        time.sleep(30 - time.time() % 30 + 0.1)


def ldap_section(url: str) -> str:
    return f"""
[directory]
backend = "ldap"

[directory.ldap]
servers = ["{url}"]
bind_dn = "{ldap_server.SERVICE_DN}"
bind_password = "{ldap_server.SERVICE_PASSWORD}"
base_dn = "{ldap_server.BASE_DN}"
timeout = 3
"""


@pytest.fixture(scope="module")
def second_slapd(tmp_path_factory):
    """A second slapd that alone knows the user ``newcomer``."""
    if not ldap_server.available():
        pytest.skip("slapd is not installed")
    server = ldap_server.start_slapd(tmp_path_factory.mktemp("slapd-second"))
    entry = (f"dn: uid={NEWCOMER},{ldap_server.PEOPLE_DN}\n"
             "objectClass: inetOrgPerson\n"
             f"uid: {NEWCOMER}\ncn: {NEWCOMER}\nsn: {NEWCOMER}\n"
             f"userPassword: {ldap_server.ssha(NEWCOMER_PASSWORD)}\n")
    subprocess.run(["ldapadd", "-x", "-H", server.url, "-D", ldap_server.ROOT_DN,
                    "-w", ldap_server.ROOT_PASSWORD], input=entry, text=True, check=True,
                   capture_output=True)
    yield server
    server.stop()


def test_pointing_the_ldap_directory_at_another_server_applies_on_sighup(tmp_path, slapd,
                                                                        second_slapd):
    d = start_daemon(tmp_path, ldap_section(slapd.url))
    try:
        d.cli("user", "add", NEWCOMER, "--no-password")
        d.cli("token", "add", NEWCOMER, "--type", "totp", "--secret", SEED_B32, "--no-qr")
        _, code = code_after(-1)
        refused = d.login(NEWCOMER, f"{NEWCOMER_PASSWORD},{code}")
        assert refused.code == "Access-Reject", refused.output

        rewrite(d, slapd.url, second_slapd.url)
        log = reload(d)
        assert "takes effect after a restart" not in log

        # The refused login never reached the code (the old server does not know
        # the user), so the same code is still unused: no wait for the next step.
        accepted = d.login(NEWCOMER, f"{NEWCOMER_PASSWORD},{code}")
        assert accepted.code == "Access-Accept", accepted.output + d.log_text()
        # The old server's workers were stopped once idle; the daemon goes on.
        assert d.alive()
    finally:
        assert stop_daemon(d) == 0


def test_a_key_that_needs_a_restart_is_named_and_everything_else_applies(tmp_path):
    d = start_daemon(tmp_path)
    try:
        new_secret = "a-rotated-shared-secret-for-reload"
        rewrite(d, f"port = {d.port}", f"port = {free_udp_port()}")
        rewrite(d, SECRET, new_secret)
        log = reload(d)
        assert "radius.port changed: takes effect after a restart" in log
        assert "1 changes need a restart" in log
        # Still on the old port, and the new secret applies there.
        assert d.radclient("Message-Authenticator = 0x00", kind="status",
                           secret=new_secret).code == "Access-Accept"
    finally:
        assert stop_daemon(d) == 0


class _SmsSink(BaseHTTPRequestHandler):
    """A webhook SMS provider: records each text."""

    received: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def sms_sink():
    _SmsSink.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SmsSink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_new_sms_gateway_applies_on_sighup(tmp_path, sms_sink):
    d = start_daemon(tmp_path, '\n[sms]\ngateway = "console"\n')
    try:
        d.cli("user", "add", "alice", "--password-stdin", "--phone", "+16502530000",
              input="pw-alice\n")
        first = d.login("alice", "pw-alice,sms")
        assert first.code == "Access-Challenge", first.output
        assert _SmsSink.received == []

        port = sms_sink.server_address[1]
        rewrite(d, '[sms]\ngateway = "console"\n', f"""[sms]
gateway = "http"

[gateways.http]
url = "http://127.0.0.1:{port}/sms"
""")
        reload(d)
        second = d.login("alice", "pw-alice,sms")
        assert second.code == "Access-Challenge", second.output
        assert [m["to"] for m in _SmsSink.received] == ["+16502530000"]
        code = "".join(c for c in _SmsSink.received[0]["text"].split(".")[0] if c.isdigit())
        state = second.get("State")
        accepted = d.radclient(",".join([
            'User-Name = "alice"', f'User-Password = "{code}"', f"State = {state}",
            "Message-Authenticator = 0x00"]))
        assert accepted.code == "Access-Accept", accepted.output
    finally:
        assert stop_daemon(d) == 0


def test_push_settings_apply_on_sighup(tmp_path):
    web_port = free_tcp_port()
    # Two logins of alice may be pending: the first stays held after radclient gives up.
    d = start_daemon(tmp_path, f"""max_pending_per_user = 2

[web]
port = {web_port}
public_url = "http://127.0.0.1:{web_port}"
""")
    try:
        d.cli("user", "add", "alice", "--password-stdin", input="pw-alice\n")
        enroll(d, tmp_path, "alice")
        # Push without number matching: the login is held, so no reply comes in time.
        held = d.radclient('User-Name = "alice",User-Password = "pw-alice",'
                           'Calling-Station-Id = "198.51.100.8",Message-Authenticator = 0x00',
                           timeout=1, retries=1)
        assert held.code is None, held.output

        rewrite(d, "[web]", "[push]\nnumber_matching = true\n\n[web]")
        reload(d)
        matching = d.login("alice", "pw-alice", 'Calling-Station-Id = "198.51.100.9"')
        assert (matching.code, matching.get("Reply-Message")) == (
            "Access-Challenge", MSG_MATCH_NUMBER), matching.output
    finally:
        assert stop_daemon(d) == 0


def test_mfa_settings_apply_on_sighup(tmp_path):
    d = start_daemon(tmp_path)
    try:
        d.cli("user", "add", "alice", "--password-stdin", input="pw-alice\n")
        d.cli("token", "add", "alice", "--type", "totp", "--secret", SEED_B32, "--no-qr")
        asked = d.login("alice", "pw-alice")
        assert asked.code == "Access-Challenge", asked.output
        rewrite(d, "challenge = true", "challenge = false")
        reload(d)
        refused = d.login("alice", "pw-alice")
        assert (refused.code, refused.get("Reply-Message")) == (
            "Access-Reject", "Enter your password followed by ',' and your code."), refused.output
    finally:
        assert stop_daemon(d) == 0
