"""The reference authenticator (``mfaserver authenticator ...``) against a strict device server.

``DeviceServer`` is a small threaded HTTP server on 127.0.0.1 that checks
every request by the rules of docs/device-api.rst with push_protocol's own
verifier: exact JSON fields, valid signatures, fresh timestamps, single-use
nonces. The CLI is synchronous, so a server thread is the simplest peer.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from mfaserver.cli.authenticator import authenticator
from mfaserver.cli.common import CliState
from mfaserver.factors import push_protocol as pp

TOKEN = pp.new_enrollment_token()
TXID = "T0pQ9rS8uV7wX6yZ5aB4cA"
OTHER_TXID = "U1qR0sT9vW8xY7zA6bC5dB"


class DeviceServer:
    """The server side of the device protocol, minimal and strict.

    ``requests`` records what arrived, ``answers`` the accepted answers;
    ``fail_next`` makes the next request fail with (status, JSON body).
    """

    def __init__(self, tls=None):
        self.tokens = {pp.token_digest(TOKEN): "alice"}
        self.devices: dict[str, object] = {}   # device id -> public key
        self.transactions: list[dict] = []
        self.answers: dict[str, dict] = {}     # txid -> accepted answer body
        self.requests: list[dict] = []
        self.fail_next: tuple[int, dict | bytes] | None = None
        self.window = pp.FreshnessWindow()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def enroll_url(self) -> str:
        return f"{self.base}/v1/enroll/{TOKEN}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # Each handler returns (status, body) and never raises on bad input.

    def enroll(self, token: str, body) -> tuple[int, dict]:
        digest = pp.token_digest(token)
        if digest not in self.tokens:
            return 404, error("not_found", "no such enrollment")
        if not isinstance(body, dict) or set(body) - {"notify"} != {
                "public_key", "timestamp", "signature"}:
            return 400, error("invalid_request", f"bad fields {sorted(body or {})}")
        notify = body.get("notify")
        if notify is not None and (
                not isinstance(notify, dict) or set(notify) != {"type", "url"}
                or notify["type"] not in ("ntfy", "webhook")
                or not notify["url"].startswith("https://")):
            return 400, error("invalid_request", "bad notify")
        try:
            key = pp.load_public_key(body["public_key"])
            message = pp.enroll_message(digest, body["public_key"], body["timestamp"])
        except ValueError as exc:
            return 400, error("invalid_request", str(exc))
        if not pp.verify(key, message, body["signature"]):
            return 401, error("unauthorized", "bad signature")
        if not pp.is_fresh(body["timestamp"], time.time()):
            return 401, error("stale_timestamp", "timestamp too far from the server's clock")
        user = self.tokens.pop(digest)
        device_id = pp.new_device_id()
        self.devices[device_id] = key
        return 201, {"device_id": device_id, "user": user}

    def poll(self, device_id: str, headers, query: dict) -> tuple[int, dict]:
        if set(query) - {"wait"} or any(len(v) != 1 for v in query.values()):
            return 400, error("invalid_request", "bad query")
        if "wait" in query and not 0 <= int(query["wait"][0]) <= 30:
            return 400, error("invalid_request", "bad wait")
        key = self.devices.get(device_id)
        try:
            timestamp = int(headers["X-MFA-Timestamp"])
            nonce = headers["X-MFA-Nonce"]
            message = pp.poll_message(device_id, timestamp, nonce)
        except (KeyError, TypeError, ValueError):
            return 400, error("invalid_request", "bad headers")
        if str(timestamp) != headers["X-MFA-Timestamp"]:
            return 400, error("invalid_request", "timestamp not canonical")
        if key is None or not pp.verify(key, message, headers.get("X-MFA-Signature", "")):
            return 401, error("unauthorized", "unauthorized")
        if not pp.is_fresh(timestamp, time.time()):
            return 401, error("stale_timestamp", "timestamp too far from the server's clock")
        if not self.window.check((device_id, nonce), timestamp, time.time()):
            return 401, error("unauthorized", "unauthorized")
        pending = [t for t in self.transactions if t["txid"] not in self.answers]
        return 200, {"transactions": pending}

    def answer(self, txid: str, body) -> tuple[int, dict]:
        fields = {"device_id", "decision", "timestamp", "signature"}
        if not isinstance(body, dict) or set(body) - {"number"} != fields:
            return 400, error("invalid_request", f"bad fields {sorted(body or {})}")
        if "number" in body and not isinstance(body["number"], str):
            return 400, error("invalid_request", "number must be a string")
        key = self.devices.get(body["device_id"])
        try:
            message = pp.answer_message(body["device_id"], txid, body["decision"],
                                        body["timestamp"])
        except ValueError as exc:
            return 400, error("invalid_request", str(exc))
        if key is None or not pp.verify(key, message, body["signature"]):
            return 401, error("unauthorized", "unauthorized")
        if not pp.is_fresh(body["timestamp"], time.time()):
            return 401, error("stale_timestamp", "timestamp too far from the server's clock")
        if txid not in {t["txid"] for t in self.transactions}:
            return 404, error("not_found", "no such transaction")
        if txid in self.answers:
            return 409, error("already_answered", "this transaction was already answered")
        self.answers[txid] = body
        return 200, {"txid": txid, "decision": body["decision"]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._dispatch(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if self.headers.get("Content-Type") != "application/json" or length > 8192:
                    self._reply(400, error("invalid_request", "not a JSON body"))
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._reply(400, error("invalid_request", "malformed JSON"))
                    return
                self._dispatch(body)

            def _dispatch(self, body):
                parts = urlsplit(self.path)
                segments = parts.path.split("/")
                with server.lock:
                    server.requests.append({"method": self.command, "path": self.path,
                                            "headers": dict(self.headers), "body": body})
                    if server.fail_next is not None:
                        status, reply = server.fail_next
                        server.fail_next = None
                    elif self.command == "POST" and segments[1:3] == ["v1", "enroll"]:
                        status, reply = server.enroll(segments[3], body)
                    elif (self.command == "GET" and segments[1:3] == ["v1", "devices"]
                          and segments[4:] == ["transactions"]):
                        status, reply = server.poll(segments[3], self.headers,
                                                    parse_qs(parts.query, keep_blank_values=True))
                    elif self.command == "POST" and segments[1:3] == ["v1", "transactions"]:
                        status, reply = server.answer(segments[3], body)
                    else:
                        status, reply = 404, error("not_found", "no such endpoint")
                self._reply(status, reply)

            def _reply(self, status, reply):
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def error(code: str, message: str) -> dict:
    return {"error": code, "message": message}


def transaction(txid=TXID, number="42", station="203.0.113.7", client="vpn"):
    now = int(time.time())
    return {"txid": txid, "user": "alice", "client": client, "nas_ip": "192.0.2.10",
            "calling_station_id": station, "created": now - 2, "expires": 1_700_000_058,
            "number": number}


@pytest.fixture
def server():
    server = DeviceServer()
    yield server
    server.stop()


def run(*args, input=None, clock=None):
    state = CliState(clock=clock) if clock else CliState()
    return CliRunner().invoke(authenticator, list(args), input=input, obj=state)


def ok(*args, **kwargs):
    result = run(*args, **kwargs)
    assert result.exit_code == 0, result.output
    return result


def fails(*args, **kwargs):
    result = run(*args, **kwargs)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exception
    return result


@pytest.fixture
def store(server, tmp_path):
    path = tmp_path / "device.json"
    ok("enroll", server.enroll_url, "--store", str(path))
    return path


def stored(path) -> dict:
    return json.loads(path.read_text())


# -- enroll ------------------------------------------------------------------


def test_enroll_writes_a_0600_store_bound_to_the_enrolled_key(server, tmp_path):
    path = tmp_path / "device.json"
    result = ok("enroll", server.enroll_url, "--store", str(path))

    document = stored(path)
    (device_id,) = server.devices
    assert result.output == f"enrolled device {device_id} for user alice\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert set(document) == {"version", "base_url", "device_id", "user", "key_type",
                             "private_key", "ca_file"}
    assert document["version"] == 1
    assert document["base_url"] == server.base
    assert document["device_id"] == device_id
    assert document["user"] == "alice"
    assert document["key_type"] == "ed25519"
    assert document["ca_file"] is None
    assert document["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(document["private_key"].encode(), None)
    assert pp.public_key_text(key) == pp.public_key_text(server.devices[device_id])
    assert "notify" not in server.requests[0]["body"]


def test_enroll_refuses_to_overwrite_a_store_and_keeps_the_token(server, store):
    before = store.read_bytes()
    result = fails("enroll", server.enroll_url, "--store", str(store))
    assert "already exists" in result.output
    assert store.read_bytes() == before
    assert len(server.requests) == 1  # only the first enrollment reached the server


def test_enroll_into_a_missing_directory_fails_before_using_the_token(server, tmp_path):
    result = fails("enroll", server.enroll_url, "--store", str(tmp_path / "no" / "d.json"))
    assert "cannot create store" in result.output
    assert server.requests == [] and server.tokens


def test_enroll_with_a_p256_key_works_end_to_end(server, tmp_path):
    path = tmp_path / "device.json"
    ok("enroll", server.enroll_url, "--store", str(path), "--key-type", "p256")
    assert stored(path)["key_type"] == "p256"
    (key,) = server.devices.values()
    assert pp.public_key_text(key).startswith("p256:")

    server.transactions.append(transaction())
    assert TXID in ok("pending", "--store", str(path)).output
    ok("approve", TXID, "--store", str(path))
    assert server.answers[TXID]["decision"] == "approve"


@pytest.mark.parametrize("option, kind", [("--notify-ntfy", "ntfy"),
                                          ("--notify-webhook", "webhook")])
def test_enroll_sends_the_notify_target(server, tmp_path, option, kind):
    url = "https://push.example.com/7Hk2mQ9vXc4pLr8sWz1d"
    ok("enroll", server.enroll_url, "--store", str(tmp_path / "d.json"), option, url)
    assert server.requests[0]["body"]["notify"] == {"type": kind, "url": url}


def test_enroll_takes_only_one_notify_target(server, tmp_path):
    result = run("enroll", server.enroll_url, "--store", str(tmp_path / "d.json"),
                 "--notify-ntfy", "https://a.example/x", "--notify-webhook", "https://b.example/y")
    assert result.exit_code == 2
    assert server.requests == [] and not (tmp_path / "d.json").exists()


def test_enroll_refusal_is_shown_and_leaves_no_store(server, tmp_path):
    path = tmp_path / "d.json"
    server.fail_next = (410, error("expired", "this enrollment URL expired or was used"))
    result = fails("enroll", server.enroll_url, "--store", str(path))
    assert ("error: server refused: expired: this enrollment URL expired or was used"
            " (HTTP 410)") in result.output
    assert not path.exists()


def test_enroll_refuses_clear_text_http_to_another_host(tmp_path):
    path = tmp_path / "d.json"
    result = fails("enroll", f"http://192.0.2.1/v1/enroll/{TOKEN}", "--store", str(path))
    assert "http" in result.output and "loopback" in result.output
    result = fails("enroll", f"http://mfa.example.com/v1/enroll/{TOKEN}", "--store", str(path))
    assert "refusing clear-text" in result.output
    assert not path.exists()


@pytest.mark.parametrize("url", [
    "https://mfa.example.com/enroll/abc",
    "https://mfa.example.com/v1/enroll/",
    "https://mfa.example.com/v1/enroll/a%0Ab",
    "https://mfa.example.com/v1/enroll/abc?x=1",
    "ftp://mfa.example.com/v1/enroll/abc",
])
def test_enroll_refuses_what_is_not_an_enrollment_url(tmp_path, url):
    fails("enroll", url, "--store", str(tmp_path / "d.json"))
    assert not (tmp_path / "d.json").exists()


def test_enroll_keeps_a_base_path_prefix(server, tmp_path):
    from mfaserver.cli.authenticator import parse_enrollment_url
    assert parse_enrollment_url("https://h.example:8443/mfa/v1/enroll/abc") == (
        "https://h.example:8443/mfa", "abc")


def test_connection_refused_is_one_line(tmp_path):
    server = DeviceServer()
    url = server.enroll_url
    server.stop()
    result = fails("enroll", url, "--store", str(tmp_path / "d.json"))
    assert result.output.startswith("error: cannot reach 127.0.0.1: ")
    assert result.output.count("\n") == 1


# -- TLS ---------------------------------------------------------------------


def test_https_with_a_ca_file_kept_in_the_store(ldap_certs, tmp_path):
    server = DeviceServer(tls=ldap_certs)
    try:
        path = tmp_path / "d.json"
        ok("enroll", server.enroll_url, "--store", str(path),
           "--ca-file", str(ldap_certs.ca_file))
        assert stored(path)["ca_file"] == str(ldap_certs.ca_file.resolve())
        assert ok("pending", "--store", str(path)).output == "no pending sign-ins\n"
    finally:
        server.stop()


def test_https_refuses_an_untrusted_certificate(ldap_certs, tmp_path):
    server = DeviceServer(tls=ldap_certs)
    try:
        path = tmp_path / "d.json"
        result = fails("enroll", server.enroll_url, "--store", str(path),
                       "--ca-file", str(ldap_certs.other_ca_file))
        assert "cannot verify the TLS certificate of 127.0.0.1" in result.output
        assert not path.exists() and server.tokens
    finally:
        server.stop()


# -- pending -----------------------------------------------------------------


def test_pending_with_nothing_says_so(server, store):
    assert ok("pending", "--store", str(store)).output == "no pending sign-ins\n"
    request = server.requests[-1]
    assert request["method"] == "GET"
    assert request["path"] == f"/v1/devices/{stored(store)['device_id']}/transactions?wait=0"


def test_pending_prints_a_table(server, store):
    server.transactions += [transaction(),
                            transaction(OTHER_TXID, number=None, station=None,
                                        client="fire wall\x1b[2J")]
    lines = ok("pending", "--store", str(store)).output.splitlines()
    assert lines[0].split() == ["TXID", "CLIENT", "NUMBER", "USER", "CALLING-STATION",
                                "EXPIRES"]
    assert lines[1].split() == [TXID, "vpn", "42", "alice", "203.0.113.7",
                                "2023-11-14T22:14:18Z"]
    assert lines[2].split() == [OTHER_TXID, "fire", "wall\\x1b[2J", "-", "alice", "-",
                                "2023-11-14T22:14:18Z"]
    assert len(lines) == 3


def test_pending_uses_a_fresh_nonce_each_time(server, store):
    for _ in range(3):
        ok("pending", "--store", str(store))
    nonces = {r["headers"]["X-MFA-Nonce"] for r in server.requests[1:]}
    assert len(nonces) == 3


def test_pending_passes_the_wait(server, store):
    ok("pending", "--store", str(store), "--wait", "5")
    assert server.requests[-1]["path"].endswith("/transactions?wait=5")
    assert run("pending", "--store", str(store), "--wait", "31").exit_code == 2


def test_a_stale_clock_gets_a_hint(server, store):
    result = fails("pending", "--store", str(store), clock=lambda: time.time() - 120)
    assert "server refused: stale_timestamp:" in result.output
    assert "(HTTP 401)" in result.output and "clock" in result.output


def test_an_error_without_json_is_shown(server, store):
    server.fail_next = (502, b"<html>bad gateway</html>")
    result = fails("pending", "--store", str(store))
    assert "server refused: Bad Gateway (HTTP 502); try again later" in result.output


def test_a_group_readable_store_is_refused(server, store):
    os.chmod(store, 0o640)
    result = fails("pending", "--store", str(store))
    assert "chmod 600" in result.output
    assert len(server.requests) == 1  # nothing signed or sent


def test_a_missing_or_broken_store_is_refused(server, tmp_path):
    assert "cannot open store" in fails("pending", "--store", str(tmp_path / "x")).output
    path = tmp_path / "bad.json"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b'{"version": 1}')
    os.close(fd)
    assert "not a valid authenticator store" in fails("pending", "--store", str(path)).output


# -- approve, deny, fraud ----------------------------------------------------


@pytest.mark.parametrize("decision", ["approve", "deny", "fraud"])
def test_answers_are_signed_and_recorded(server, store, decision):
    server.transactions.append(transaction())
    extra = ["--yes"] if decision == "fraud" else []
    result = ok(decision, TXID, "--store", str(store), *extra)
    assert result.output.endswith(f"{decision} sent for {TXID}\n")
    body = server.answers[TXID]
    assert body["decision"] == decision
    assert body["device_id"] == stored(store)["device_id"]
    assert "number" not in body


@pytest.mark.parametrize("decision", ["approve", "deny", "fraud"])
def test_the_number_is_sent_as_text(server, store, decision):
    server.transactions.append(transaction())
    extra = ["--yes"] if decision == "fraud" else []
    ok(decision, TXID, "--store", str(store), "--number", "42", *extra)
    assert server.answers[TXID]["number"] == "42"


def test_fraud_asks_first(server, store):
    server.transactions.append(transaction())
    result = run("fraud", TXID, "--store", str(store), input="n\n")
    assert result.exit_code != 0
    assert TXID not in server.answers
    result = ok("fraud", TXID, "--store", str(store), input="y\n")
    assert "blocked" in result.output
    assert server.answers[TXID]["decision"] == "fraud"


def test_a_second_answer_shows_the_servers_refusal(server, store):
    server.transactions.append(transaction())
    ok("approve", TXID, "--store", str(store))
    result = fails("deny", TXID, "--store", str(store))
    assert result.output == ("error: server refused: already_answered: this transaction was"
                             " already answered (HTTP 409)\n")
    assert server.answers[TXID]["decision"] == "approve"


def test_an_unknown_transaction_is_refused(server, store):
    result = fails("approve", OTHER_TXID, "--store", str(store))
    assert "server refused: not_found: no such transaction (HTTP 404)" in result.output


def test_a_bad_txid_or_number_never_reaches_the_server(server, store):
    assert run("approve", "../x", "--store", str(store)).exit_code == 2
    assert run("approve", TXID, "--store", str(store), "--number", "4 2").exit_code == 2
    assert run("approve", TXID, "--store", str(store), "--number", "420").exit_code == 2
    assert len(server.requests) == 1
