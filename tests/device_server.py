"""A strict device server for the reference authenticator's tests, and loopback HTTP in memory.

`DeviceServer` checks every request by the rules of docs/device-api.rst with
push_protocol's own verifier: exact JSON fields, valid signatures, fresh
timestamps, single-use nonces. It only answers `DeviceServer.handle` calls:
`MemoryNetwork` hands it the requests of ``mfaserver authenticator`` in
memory (the unit tests), and the integration tests put a real HTTPS server
in front of it.
"""

from __future__ import annotations

import errno
import json
import os
import time
from http import HTTPStatus
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from mfaserver.factors import push_protocol as pp

TOKEN = pp.new_enrollment_token()


def error(code: str, message: str) -> dict:
    return {"error": code, "message": message}


class DeviceServer:
    """The server side of the device protocol, minimal and strict.

    ``requests`` records what arrived, ``answers`` the accepted answers;
    ``fail_next`` makes the next request fail with (status, JSON body or
    bytes). ``base`` is set by whoever serves it; ``clock`` is its time.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.base: str | None = None
        self.tokens = {pp.token_digest(TOKEN): "alice"}
        self.devices: dict[str, object] = {}   # device id -> public key
        self.transactions: list[dict] = []
        self.answers: dict[str, dict] = {}     # txid -> accepted answer body
        self.requests: list[dict] = []
        self.fail_next: tuple[int, dict | bytes] | None = None
        self.window = pp.FreshnessWindow()

    @property
    def enroll_url(self) -> str:
        return f"{self.base}/v1/enroll/{TOKEN}"

    def handle(self, method: str, target: str, headers: dict[str, str],
               raw: bytes | None) -> tuple[int, dict | bytes]:
        """Answer one request: (status, JSON object or raw bytes). Never raises on bad input."""
        body = None
        if method == "POST":
            raw = raw or b""
            if headers.get("Content-Type") != "application/json" or len(raw) > 8192:
                return 400, error("invalid_request", "not a JSON body")
            try:
                body = json.loads(raw)
            except ValueError:
                return 400, error("invalid_request", "malformed JSON")
        parts = urlsplit(target)
        segments = parts.path.split("/")
        self.requests.append({"method": method, "path": target, "headers": dict(headers),
                              "body": body})
        if self.fail_next is not None:
            reply, self.fail_next = self.fail_next, None
            return reply
        if method == "POST" and segments[1:3] == ["v1", "enroll"]:
            return self.enroll(segments[3], body)
        if (method == "GET" and segments[1:3] == ["v1", "devices"]
                and segments[4:] == ["transactions"]):
            return self.poll(segments[3], headers, parse_qs(parts.query, keep_blank_values=True))
        if method == "POST" and segments[1:3] == ["v1", "transactions"]:
            return self.answer(segments[3], body)
        return 404, error("not_found", "no such endpoint")

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
        if not pp.is_fresh(body["timestamp"], self.clock()):
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
        if not pp.is_fresh(timestamp, self.clock()):
            return 401, error("stale_timestamp", "timestamp too far from the server's clock")
        if not self.window.check((device_id, nonce), timestamp, self.clock()):
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
        if not pp.is_fresh(body["timestamp"], self.clock()):
            return 401, error("stale_timestamp", "timestamp too far from the server's clock")
        if txid not in {t["txid"] for t in self.transactions}:
            return 404, error("not_found", "no such transaction")
        if txid in self.answers:
            return 409, error("already_answered", "this transaction was already answered")
        self.answers[txid] = body
        return 200, {"txid": txid, "decision": body["decision"]}


def encode_reply(reply: dict | bytes) -> bytes:
    return reply if isinstance(reply, bytes) else json.dumps(reply).encode()


# --- Loopback HTTP in memory ------------------------------------------------------------------

class MemoryNetwork:
    """Clear-text HTTP on 127.0.0.1, in memory.

    `connect` has the signature of `mfaserver.cli.authenticator.open_connection`:
    a request to the address of a served `DeviceServer` reaches its `handle`;
    any other address refuses the connection, as a closed port does.
    """

    def __init__(self):
        self._servers: dict[int, DeviceServer] = {}
        self._next_port = 8001

    def serve(self, server: DeviceServer) -> DeviceServer:
        port, self._next_port = self._next_port, self._next_port + 1
        self._servers[port] = server
        server.base = f"http://127.0.0.1:{port}"
        return server

    def stop(self, server: DeviceServer) -> None:
        self._servers = {p: s for p, s in self._servers.items() if s is not server}

    def connect(self, scheme: str, host: str, port: int | None, timeout: float,
                context) -> _MemoryConnection:
        server = self._servers.get(port) if (scheme, host) == ("http", "127.0.0.1") else None
        return _MemoryConnection(server)


class _MemoryConnection:
    """What the authenticator uses of ``http.client.HTTPConnection``.

    Like it, it connects on the first request: that is where a refusal is raised.
    """

    def __init__(self, server: DeviceServer | None):
        self._server = server
        self._response: _MemoryResponse | None = None

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> None:
        if self._server is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        status, reply = self._server.handle(method, url, dict(headers or {}), body)
        self._response = _MemoryResponse(status, encode_reply(reply))

    def getresponse(self) -> _MemoryResponse:
        return self._response

    def close(self) -> None:
        pass


class _MemoryResponse:
    def __init__(self, status: int, data: bytes):
        self.status = status
        self.reason = HTTPStatus(status).phrase
        self._data = data

    def read(self, amount: int | None = None) -> bytes:
        return self._data[:amount]
