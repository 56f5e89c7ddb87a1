"""Public fakes and packet builders for tests (ours and anyone embedding mfaserver).

Each fake here is checked against the real implementation by a contract
test in ``tests/`` (``tests/test_directory_contract.py``).
"""

from __future__ import annotations

import os
from typing import Iterable

from twisted.internet import defer

from mfaserver.auth.interfaces import InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal
from mfaserver.radius import codec


def run_now(f, *args, **kwargs) -> defer.Deferred:
    """A thread-pool runner that runs ``f`` at once: for tests of thread-pooled code."""
    return defer.execute(f, *args, **kwargs)


class MemoryDirectory:
    """`Directory` over a dict of username -> password."""

    def __init__(self, users: dict[str, str] | None = None):
        self.users = dict(users or {})
        self.calls: list[str] = []

    def authenticate(self, username: str, password: str) -> defer.Deferred:
        self.calls.append(username)
        if not password:
            return defer.fail(InvalidCredentials())
        if username not in self.users:
            return defer.fail(UnknownUser())
        if self.users[username] != password:
            return defer.fail(InvalidCredentials())
        return defer.succeed(Principal(username=username))


class FakeDatagramTransport:
    """Records what a DatagramProtocol writes."""

    def __init__(self):
        self.written: list[tuple[bytes, tuple]] = []

    def write(self, data: bytes, addr=None) -> None:
        self.written.append((data, addr))


def access_request(secret: bytes, username: str | None = "alice", password: str | bytes | None = "",
                   *, identifier: int = 1, authenticator: bytes | None = None,
                   extra: Iterable[tuple[int, bytes]] = (),
                   message_authenticator: bool = True) -> tuple[bytes, bytes]:
    """Build an Access-Request datagram; returns ``(datagram, request_authenticator)``."""
    authenticator = authenticator or os.urandom(16)
    attributes = []
    if username is not None:
        attributes.append((codec.USER_NAME, username.encode("utf-8")))
    if password is not None:
        raw = password.encode("utf-8") if isinstance(password, str) else password
        attributes.append((codec.USER_PASSWORD,
                           codec.encrypt_password(raw, secret, authenticator)))
    attributes.extend(extra)
    data = codec.encode_request(codec.ACCESS_REQUEST, identifier, authenticator, secret,
                                attributes, message_authenticator=message_authenticator)
    return data, authenticator


def status_server(secret: bytes, *, identifier: int = 1,
                  message_authenticator: bool = True) -> tuple[bytes, bytes]:
    """Build a Status-Server datagram; returns ``(datagram, request_authenticator)``."""
    authenticator = os.urandom(16)
    data = codec.encode_request(codec.STATUS_SERVER, identifier, authenticator, secret, [],
                                message_authenticator=message_authenticator)
    return data, authenticator


class MemorySmsGateway:
    """`SmsGateway` that records texts; set ``failure`` to make sends fail with it."""

    def __init__(self):
        self.sent: list[tuple[str, str]] = []
        self.failure: Exception | None = None

    def send_sms(self, to: str, text: str) -> defer.Deferred:
        if self.failure is not None:
            return defer.fail(self.failure)
        self.sent.append((to, text))
        return defer.succeed(None)

    def last_code(self) -> str:
        """The digits of the last text sent."""
        return "".join(c for c in self.sent[-1][1].split(".")[0] if c.isdigit())
