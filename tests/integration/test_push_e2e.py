"""End to end: radclient -> daemon, held open until the reference authenticator answers.

The daemon, radclient and `mfaserver authenticator` are separate processes
talking over 127.0.0.1 (UDP for RADIUS, HTTP for the device API), as a VPN
gateway, the server and a phone would.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import pytest_twisted

from ldap_server import free_tcp_port
from mfaserver.radius import codec
from mfaserver.testing import access_request

from .conftest import MFASERVER, SECRET, parse_radclient, start_daemon, stop_daemon

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


def push_config(web_port: int, *, number_matching: bool = False, timeout: int = 20,
                notify: str = "none") -> str:
    return f"""timeout = {timeout}

[web]
listen = "127.0.0.1"
port = {web_port}
public_url = "http://127.0.0.1:{web_port}"

[push]
notify = "{notify}"
number_matching = {str(number_matching).lower()}
"""


class Phone:
    """The reference authenticator of one user, run as the CLI."""

    def __init__(self, store: Path):
        self.store = store

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*MFASERVER, "authenticator", *args, "--store", str(self.store)],
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"authenticator {args} failed: {result.stdout}{result.stderr}")
        return result

    def pending(self) -> list[dict]:
        """Rows of `authenticator pending`: txid, client, number, user."""
        out = self.run("pending").stdout
        rows = []
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 4:
                rows.append({"txid": fields[0], "client": fields[1], "number": fields[2],
                             "user": fields[3]})
        return rows

    def wait_for_transaction(self, seconds: float = 15) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rows = self.pending()
            if rows:
                return rows[0]
            time.sleep(0.1)
        raise AssertionError("no transaction reached the device")


def enroll(daemon, tmp_path: Path, user: str, notify: tuple[str, ...] = ()) -> Phone:
    out = daemon.cli("device", "enroll", user, "--no-qr").stdout
    url = re.search(r"http://\S+/v1/enroll/\S+", out).group(0)
    phone = Phone(tmp_path / f"{user}-phone.json")
    subprocess.run([*MFASERVER, "authenticator", "enroll", url, "--store", str(phone.store),
                    *notify], check=True, capture_output=True, timeout=60)
    return phone


class Login:
    """A radclient login running in the background (it waits for the push)."""

    def __init__(self, daemon, user: str, password: str, *extra: str, timeout: int = 30):
        pairs = [f'User-Name = "{user}"', f'User-Password = "{password}"',
                 "Message-Authenticator = 0x00", *extra]
        self.proc = subprocess.Popen(
            ["radclient", "-x", "-r", "1", "-t", str(timeout), f"127.0.0.1:{daemon.port}",
             "auth", SECRET], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.proc.stdin.write(",".join(pairs))
        self.proc.stdin.close()

    def reply(self, timeout: float = 60):
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        return parse_radclient(out)


@pytest.fixture
def web_port():
    return free_tcp_port()


@pytest.fixture
def daemon(tmp_path, web_port):
    d = start_daemon(tmp_path, push_config(web_port))
    d.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
    yield d
    stop_daemon(d)


@pytest.fixture
def phone(daemon, tmp_path):
    return enroll(daemon, tmp_path, "alice")


def test_push_approved_on_the_device_accepts_the_held_login(daemon, phone):
    login = Login(daemon, "alice", PASSWORD, 'Calling-Station-Id = "203.0.113.7"')
    txn = phone.wait_for_transaction()
    assert (txn["client"], txn["user"], txn["number"]) == ("nas", "alice", "-")
    phone.run("approve", txn["txid"])
    assert login.reply().code == "Access-Accept"
    log = daemon.cli("log", "--user", "alice").stdout
    assert "push" in log and "accept" in log


def test_push_denied_rejects_with_a_message(daemon, phone):
    login = Login(daemon, "alice", PASSWORD + ",push")
    phone.run("deny", phone.wait_for_transaction()["txid"])
    reply = login.reply()
    assert reply.code == "Access-Reject"
    assert "denied" in reply.get("Reply-Message")
    # A denial is not a block: the next login pushes again.
    login = Login(daemon, "alice", PASSWORD)
    phone.run("approve", phone.wait_for_transaction()["txid"])
    assert login.reply().code == "Access-Accept"


def test_fraud_report_rejects_and_blocks_the_user(daemon, phone):
    login = Login(daemon, "alice", PASSWORD)
    phone.run("fraud", phone.wait_for_transaction()["txid"], "--yes")
    reply = login.reply()
    assert reply.code == "Access-Reject"
    assert "blocked" in reply.get("Reply-Message")
    assert "blocked" in daemon.cli("user", "show", "alice").stdout
    # Blocked: rejected at once, and no push is sent.
    assert daemon.login("alice", PASSWORD).code == "Access-Reject"
    assert phone.pending() == []
    log = daemon.wait_for_log("FRAUD reported by alice")
    assert "FRAUD reported by alice" in log
    daemon.cli("user", "unblock", "alice")
    login = Login(daemon, "alice", PASSWORD)
    phone.run("approve", phone.wait_for_transaction()["txid"])
    assert login.reply().code == "Access-Accept"


def test_unanswered_push_times_out_and_a_late_answer_is_refused(tmp_path, web_port):
    daemon = start_daemon(tmp_path, push_config(web_port, timeout=5))
    try:
        daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        phone = enroll(daemon, tmp_path, "alice")
        started = time.monotonic()
        login = Login(daemon, "alice", PASSWORD)
        txid = phone.wait_for_transaction()["txid"]
        reply = login.reply()
        assert reply.code == "Access-Reject"
        assert "No answer in time" in reply.get("Reply-Message")
        assert 4.5 <= time.monotonic() - started < 15
        late = phone.run("approve", txid, check=False)
        assert late.returncode != 0
        assert "expired" in late.stderr and "410" in late.stderr
        log = daemon.cli("log", "--user", "alice").stdout
        assert "late_approve" in log
    finally:
        stop_daemon(daemon)


def test_retransmissions_and_repeated_logins_during_a_push_send_one_push(daemon, phone,
                                                                          tmp_path):
    # Two different Access-Requests for the same login (user, NAS,
    # Calling-Station-Id): a NAS that retries with a new Identifier.
    first = Login(daemon, "alice", PASSWORD, 'Calling-Station-Id = "198.51.100.9"')
    txn = phone.wait_for_transaction()
    second = Login(daemon, "alice", PASSWORD, 'Calling-Station-Id = "198.51.100.9"')
    # And byte-identical retransmissions of a third copy, from one port.
    data, _ = access_request(SECRET.encode(), "alice", PASSWORD, identifier=77,
                             extra=[(codec.CALLING_STATION_ID, b"198.51.100.9")])
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(3):
        sock.sendto(data, ("127.0.0.1", daemon.port))
    time.sleep(0.5)
    assert [row["txid"] for row in phone.pending()] == [txn["txid"]]
    phone.run("approve", txn["txid"])
    assert first.reply().code == "Access-Accept"
    assert second.reply().code == "Access-Accept"
    sock.settimeout(5)
    reply = sock.recv(4096)
    assert reply[0] == codec.ACCESS_ACCEPT
    sock.close()
    assert phone.pending() == []
    log = daemon.log_text()
    assert log.count("device") >= 1


def test_number_matching_right_and_wrong(tmp_path, web_port):
    daemon = start_daemon(tmp_path, push_config(web_port, number_matching=True))
    try:
        daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        phone = enroll(daemon, tmp_path, "alice")
        # Right number, typed at the VPN prompt; approved in the app (with it).
        challenge = daemon.login("alice", PASSWORD)
        assert challenge.code == "Access-Challenge"
        assert "number" in challenge.get("Reply-Message")
        txn = phone.wait_for_transaction()
        assert re.fullmatch(r"[1-9][0-9]", txn["number"])
        phone.run("approve", txn["txid"], "--number", txn["number"])
        state = challenge.get("State")
        answer = daemon.login("alice", txn["number"], f"State = {state}")
        assert answer.code == "Access-Accept"

        # Wrong number at the prompt: rejected, and the transaction is closed.
        challenge = daemon.login("alice", PASSWORD)
        txn = phone.wait_for_transaction()
        wrong = "10" if txn["number"] != "10" else "11"
        answer = daemon.login("alice", wrong, f"State = {challenge.get('State')}")
        assert answer.code == "Access-Reject"
        assert "Wrong number" in answer.get("Reply-Message")
        late = phone.run("approve", txn["txid"], check=False)
        assert late.returncode != 0 and "410" in late.stderr

        # Number typed first, approval after: the State request is held.
        challenge = daemon.login("alice", PASSWORD)
        txn = phone.wait_for_transaction()
        login = Login(daemon, "alice", txn["number"], f"State = {challenge.get('State')}")
        time.sleep(0.5)
        phone.run("approve", txn["txid"])
        assert login.reply().code == "Access-Accept"

        # A wrong number sent by the app is a denial.
        challenge = daemon.login("alice", PASSWORD)
        txn = phone.wait_for_transaction()
        wrong = "10" if txn["number"] != "10" else "11"
        phone.run("approve", txn["txid"], "--number", wrong)
        answer = daemon.login("alice", txn["number"], f"State = {challenge.get('State')}")
        assert answer.code == "Access-Reject"
    finally:
        stop_daemon(daemon)


class _WakeSink(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append((self.path, self.headers.get("Content-Type"), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("kind", ["ntfy", "webhook"])
def test_wake_up_notification_is_sent_once_per_login(tmp_path, web_port, kind):
    _WakeSink.received = []
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _WakeSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    daemon = start_daemon(tmp_path, push_config(web_port, notify=kind))
    try:
        daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        topic = f"http://127.0.0.1:{sink.server_port}/Zk3pQ9vXc4pLr8sWz1dA"
        phone = enroll(daemon, tmp_path, "alice", (f"--notify-{kind}", topic))
        login = Login(daemon, "alice", PASSWORD)
        second = Login(daemon, "alice", PASSWORD)
        txn = phone.wait_for_transaction()
        time.sleep(0.5)
        phone.run("approve", txn["txid"])
        assert login.reply().code == "Access-Accept"
        assert second.reply().code == "Access-Accept"
        deadline = time.monotonic() + 5  # best effort, sent beside the login
        while not _WakeSink.received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate would come right after
        assert len(_WakeSink.received) == 1, daemon.log_text()[-3000:]
        path, content_type, body = _WakeSink.received[0]
        assert path == "/Zk3pQ9vXc4pLr8sWz1dA"
        if kind == "ntfy":
            assert body == b"A sign-in needs you"
        else:
            assert json.loads(body) == {"type": "wake"}
        # Nothing about the sign-in leaks into the wake-up.
        assert b"alice" not in body and txn["txid"].encode() not in body
    finally:
        stop_daemon(daemon)
        sink.shutdown()


def test_device_list_and_delete(daemon, phone):
    out = daemon.cli("device", "list", "alice").stdout
    device_id = out.splitlines()[1].split()[0]
    daemon.cli("device", "delete", "alice", device_id)
    assert "no devices" in daemon.cli("device", "list", "alice").stdout
    # Without a device a bare password is refused (no other factor enrolled).
    assert daemon.login("alice", PASSWORD).code == "Access-Reject"
    # And the deleted device can no longer poll (the daemon notices within a second).
    time.sleep(1.2)
    result = phone.run("pending", check=False)
    assert result.returncode != 0 and "401" in result.stderr


SEED_B32 = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def totp_now() -> str:
    import pyotp
    return pyotp.TOTP(SEED_B32).now()


def test_user_default_method_overrides_the_server_default(daemon, phone):
    daemon.cli("token", "add", "alice", "--type", "totp", "--secret", SEED_B32, "--no-qr")
    # Server default push: a bare password pushes.
    login = Login(daemon, "alice", PASSWORD)
    phone.run("approve", phone.wait_for_transaction()["txid"])
    assert login.reply().code == "Access-Accept"
    # The user's own default, totp: a bare password asks for the code, no push.
    daemon.cli("user", "set-default", "alice", "totp")
    assert "totp" in daemon.cli("user", "show", "alice").stdout
    challenge = daemon.login("alice", PASSWORD)
    assert challenge.code == "Access-Challenge"
    assert "code" in challenge.get("Reply-Message")
    assert phone.pending() == []
    answer = daemon.login("alice", totp_now(), f"State = {challenge.get('State')}")
    assert answer.code == "Access-Accept"
    # password,push still pushes.
    login = Login(daemon, "alice", PASSWORD + ",push")
    phone.run("approve", phone.wait_for_transaction()["txid"])
    assert login.reply().code == "Access-Accept"


def test_challenge_menu_offers_the_methods(tmp_path, web_port):
    daemon = start_daemon(tmp_path, "challenge_menu = true\n" + push_config(web_port))
    try:
        daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        daemon.cli("token", "add", "alice", "--type", "totp", "--secret", SEED_B32, "--no-qr")
        phone = enroll(daemon, tmp_path, "alice")
        menu = daemon.login("alice", PASSWORD)
        assert menu.code == "Access-Challenge"
        assert "1 for push to your app" in menu.get("Reply-Message")
        assert "code" in menu.get("Reply-Message")
        assert phone.pending() == []
        # Choosing 1 pushes and holds the State request until approved.
        login = Login(daemon, "alice", "1", f"State = {menu.get('State')}")
        phone.run("approve", phone.wait_for_transaction()["txid"])
        assert login.reply().code == "Access-Accept"
        # Or a code at the menu.
        menu = daemon.login("alice", PASSWORD)
        answer = daemon.login("alice", totp_now(), f"State = {menu.get('State')}")
        assert answer.code == "Access-Accept"
    finally:
        stop_daemon(daemon)


def test_shutdown_with_a_push_pending_exits_cleanly_without_a_reply(tmp_path, web_port):
    daemon = start_daemon(tmp_path, push_config(web_port))
    daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
    phone = enroll(daemon, tmp_path, "alice")
    login = Login(daemon, "alice", PASSWORD, timeout=5)
    phone.wait_for_transaction()
    started = time.monotonic()
    assert stop_daemon(daemon) == 0
    assert time.monotonic() - started < 5
    # Abandoned, not answered: the NAS gets no reply (and would try another server).
    assert login.reply().code is None
    assert "Traceback" not in daemon.log_text()


# --- The device API refuses what a phone did not sign, as a black box ---------------------

def _device(phone: Phone):
    """The device id, private key and base URL from the reference authenticator's store."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    data = json.loads(phone.store.read_text())
    return data["device_id"], load_pem_private_key(data["private_key"].encode(), None), \
        data["base_url"]


def _http(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _answer(base, device_id, key, txid, decision="approve", timestamp=None, sign_txid=None):
    from mfaserver.factors import push_protocol as proto
    timestamp = int(time.time()) if timestamp is None else timestamp
    signature = proto.sign(key, proto.answer_message(device_id, sign_txid or txid, decision,
                                                     timestamp))
    return _http("POST", f"{base}/v1/transactions/{txid}",
                 {"device_id": device_id, "decision": decision, "timestamp": timestamp,
                  "signature": signature})


def test_forged_replayed_stale_and_wrong_device_requests_are_refused(daemon, phone, tmp_path):
    from mfaserver.factors import push_protocol as proto
    daemon.cli("user", "add", "mallory", "--password-stdin", input="mallory's password\n")
    mallory = enroll(daemon, tmp_path, "mallory")
    device_id, key, base = _device(phone)
    mallory_id, mallory_key, _ = _device(mallory)
    login = Login(daemon, "alice", PASSWORD)
    txid = phone.wait_for_transaction()["txid"]

    # Forged: signed by a key that is not the device's.
    assert _answer(base, device_id, proto.generate_device_key(), txid)[0] == 401
    # Signed for another transaction.
    assert _answer(base, device_id, key, txid, sign_txid="T0pQ9rS8uV7wX6yZ5aB4cA")[0] == 401
    # Stale: a timestamp ten minutes old.
    status, body = _answer(base, device_id, key, txid, timestamp=int(time.time()) - 600)
    assert (status, body["error"]) == (401, "stale_timestamp")
    # Wrong device: mallory's own, valid device answering alice's sign-in.
    status, body = _answer(base, mallory_id, mallory_key, txid)
    assert (status, body["error"]) == (404, "not_found")
    # A replayed poll (same nonce) is refused.
    now = int(time.time())
    nonce = proto.new_nonce()
    headers = {"X-MFA-Timestamp": str(now), "X-MFA-Nonce": nonce,
               "X-MFA-Signature": proto.sign(key, proto.poll_message(device_id, now, nonce))}
    url = f"{base}/v1/devices/{device_id}/transactions?wait=0"
    first = _http("GET", url, headers=headers)
    assert first[0] == 200 and [t["txid"] for t in first[1]["transactions"]] == [txid]
    assert _http("GET", url, headers=headers)[0] == 401

    # None of that touched the sign-in; the real answer completes it, once.
    assert _answer(base, device_id, key, txid)[0] == 200
    assert login.reply().code == "Access-Accept"
    status, body = _answer(base, device_id, key, txid)
    assert (status, body["error"]) == (409, "already_answered")


@pytest_twisted.ensureDeferred
async def test_fraud_alert_is_mailed_to_the_administrators(tmp_path, web_port):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from fake_smtp import FakeSmtpServer
    mail = FakeSmtpServer(reactor)
    extra = push_config(web_port) + f"""
[alerts]
gateway = "smtp"
to = ["security@example.org"]

[gateways.smtp]
host = "127.0.0.1"
port = {mail.port}
starttls = "none"
sender = "mfaserver@example.org"
"""
    daemon = await deferToThread(start_daemon, tmp_path, extra)
    try:
        await deferToThread(daemon.cli, "user", "add", "alice", "--password-stdin",
                            input=PASSWORD + "\n")
        phone = await deferToThread(enroll, daemon, tmp_path, "alice")
        login = Login(daemon, "alice", PASSWORD)
        txn = await deferToThread(phone.wait_for_transaction)
        await deferToThread(phone.run, "fraud", txn["txid"], "--yes")
        reply = await deferToThread(login.reply)
        assert reply.code == "Access-Reject"
        for _ in range(100):
            if mail.received:
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert [m.recipient for m in mail.received] == ["security@example.org"]
        message = mail.received[0].message
        assert "fraud reported by alice" in message["Subject"]
        assert "user unblock alice" in message.get_content()
    finally:
        await deferToThread(stop_daemon, daemon)
        await mail.close()
