"""Public fakes and packet builders for tests (ours and anyone embedding mfaserver).

Each fake here is checked against the real implementation by a contract
test in ``tests/``, one suite run over both, so the fake cannot drift:

* `MemoryDirectory`: ``tests/test_directory_contract.py``;
* `MemorySmsGateway`: ``SmsGatewayContract`` in ``tests/test_gateway_contracts.py``,
  also run over `TwilioGateway` (the fake Twilio), `HttpGateway` (a
  `WebhookStandIn`) and `SmtpGateway` (the fake SMTP server), all in memory;
* `MemoryVoiceGateway`: ``VoiceGatewayContract`` there, also run over `TwilioGateway`;
* `MemoryWakeNotifier`: ``WakeContract`` there, also run over `WakeNotifier`
  with ntfy and webhook `WebhookStandIn`s.

`WebhookStandIn` is no fake of ours but the far side of an HTTP gateway (a
webhook, an ntfy server), shared by those suites and the gateways' own tests.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mfaserver.auth.interfaces import InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal
from mfaserver.gateways.base import GatewayError, check_call, check_e164
from mfaserver.radius import codec

T = TypeVar("T")


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


class _MemoryProvider:
    """What the memory gateways share: a provider that refuses, answers, or is silent.

    ``failure`` set: requests fail with it (a refusal, or an unreachable
    provider: a `GatewayError`). ``hold`` set: requests get no answer; with a
    ``clock`` they fail with `GatewayError` after ``timeout`` seconds, like
    the real gateways; cancelling one abandons it (nothing recorded);
    `release` answers them. A request is recorded only once answered.
    """

    def __init__(self, clock: IReactorTime | None, timeout: float):
        self.failure: Exception | None = None
        self.hold = False
        self.timeout = timeout
        self._clock = clock
        self._held: list[tuple[defer.Deferred, Callable[[], object]]] = []

    @property
    def held(self) -> int:
        """How many requests wait for an answer."""
        return len(self._held)

    def release(self) -> None:
        """Answer the held requests: they are recorded and succeed."""
        held, self._held = self._held, []
        for d, accept in held:
            d.callback(accept())

    def _answer(self, accept: Callable[[], T], what: str) -> defer.Deferred[T]:
        """``accept()`` (records the request, gives the result) now, later or never."""
        if self.failure is not None:
            return defer.fail(self.failure)
        if not self.hold:
            return defer.succeed(accept())
        entry: tuple = ()
        d: defer.Deferred = defer.Deferred(lambda d: self._held.remove(entry))
        entry = (d, accept)
        self._held.append(entry)
        if self._clock is not None:
            def no_answer(result, timeout):
                return Failure(GatewayError(f"{what}: no answer within {timeout:g} seconds"))
            d.addTimeout(self.timeout, self._clock, onTimeoutCancel=no_answer)
        return d


class MemorySmsGateway(_MemoryProvider):
    """`SmsGateway` that records the texts it accepts in ``sent`` as (to, text).

    Refuses numbers not in E.164 form with `GatewayError`, as every real
    gateway does; set ``failure`` to make sends fail with it, ``hold`` to
    leave them unanswered (see `_MemoryProvider`).
    """

    def __init__(self, clock: IReactorTime | None = None, timeout: float = 10.0):
        super().__init__(clock, timeout)
        self.sent: list[tuple[str, str]] = []

    def send_sms(self, to: str, text: str) -> defer.Deferred[None]:
        """Record ``text`` for ``to``; fires with None (see the class docstring)."""
        try:
            check_e164(to, "SMS not sent")
        except GatewayError:
            return defer.fail()

        def accept() -> None:
            self.sent.append((to, text))
        return self._answer(accept, "SMS")

    def last_code(self) -> str:
        """The digits of the last text sent."""
        return "".join(c for c in self.sent[-1][1].split(".")[0] if c.isdigit())


@dataclass(frozen=True)
class PlacedCall:
    """A call a `MemoryVoiceGateway` placed."""

    to: str
    answer_url: str
    status_url: str | None
    call_id: str


class MemoryVoiceGateway(_MemoryProvider):
    """`VoiceGateway` that records the calls it places in ``calls`` (`PlacedCall`).

    Nobody answers: a test drives the call itself, posting to the recorded
    URLs. Call ids look like Twilio's ("CA" and 32 hex digits). Refuses
    numbers not in E.164 form and relative URLs as the real gateway does;
    ``failure`` and ``hold`` as for `MemorySmsGateway`.
    """

    def __init__(self, clock: IReactorTime | None = None, timeout: float = 10.0):
        super().__init__(clock, timeout)
        self.calls: list[PlacedCall] = []
        self._ids = itertools.count(1)

    def start_call(self, to: str, *, answer_url: str,
                   status_url: str | None = None) -> defer.Deferred[str]:
        """Record the call; fires with its call id."""
        try:
            check_call(to, answer_url, status_url)
        except GatewayError:
            return defer.fail()

        def accept() -> str:
            call = PlacedCall(to, answer_url, status_url, f"CA{next(self._ids):032x}")
            self.calls.append(call)
            return call.call_id
        return self._answer(accept, "call")


class MemoryWakeNotifier:
    """The push factor's ``wake(user)`` (`WakeNotifier`): records in ``woken`` whom it woke.

    Like the real one it returns None at once and never raises; `stop` only
    sets ``stopped`` (nothing is ever in flight here).
    """

    def __init__(self):
        self.woken: list[str] = []
        self.stopped = False

    def __call__(self, user: str) -> None:
        """Record that ``user`` was woken."""
        self.woken.append(user)

    def stop(self) -> None:
        """Shutdown: nothing to cancel."""
        self.stopped = True


# --- The far side of an HTTP gateway ---------------------------------------------------------

@dataclass
class WebRequest:
    """One request a `WebhookStandIn` received; ``status`` is None while unanswered."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]   # lower-case names, the first value of each
    body: bytes
    status: int | None = None


def hold_request(request, *, partial: bool, dropped: Callable[[], None]) -> object:
    """Leave a twisted.web ``request`` unanswered; returns what ``render`` returns.

    With ``partial``, the status, headers and the start of a 1000-byte body
    go out first, then nothing more. ``dropped()`` is called if the client
    hangs up.
    """
    request.notifyFinish().addErrback(lambda failure: dropped())
    if partial:
        request.setResponseCode(200)
        request.setHeader(b"content-length", b"1000")
        request.write(b'{"sid": ')
    return NOT_DONE_YET


class WebhookStandIn(Resource):
    """A recording web server (an `IResource`): what a webhook or ntfy server received.

    Serve it in memory with ``treq.testing.StubTreq(stand_in)`` (or treq's
    ``RequestTraversalAgent``), or on a port with a `Site`. ``requests`` lists
    every `WebRequest`; each is answered with ``status`` and ``body`` (a 3xx
    with a Location elsewhere). With ``hold`` set, requests get no answer
    until `release`, or with ``partial`` only the start of one, for good;
    ``dropped`` counts the held requests whose client hung up.
    """

    isLeaf = True

    def __init__(self, status: int = 200, body: bytes = b'{"result": "ok"}'):
        super().__init__()
        self.status = status
        self.body = body
        self.hold = False
        self.partial = False
        self.requests: list[WebRequest] = []
        self.dropped = 0
        self._held: list = []

    def accepted(self) -> list[WebRequest]:
        """The requests answered with a 2xx status."""
        return [r for r in self.requests if r.status is not None and 200 <= r.status < 300]

    def render(self, request):
        recorded = WebRequest(
            request.method.decode(), request.path.decode(),
            parse_qs(urlsplit(request.uri.decode()).query),
            {k.decode().lower(): v[0].decode()
             for k, v in request.requestHeaders.getAllRawHeaders()},
            request.content.read())
        self.requests.append(recorded)
        if self.hold:
            self._held.append((request, recorded))
            return hold_request(request, partial=self.partial, dropped=self._dropped)
        return self._answer(request, recorded)

    def release(self) -> None:
        """Answer the held requests that are still connected (not the ``partial`` ones)."""
        held, self._held = self._held, []
        for request, recorded in held:
            if not request.startedWriting and request.channel is not None:
                request.write(self._answer(request, recorded))
                request.finish()

    def _dropped(self) -> None:
        self.dropped += 1

    def _answer(self, request, recorded: WebRequest) -> bytes:
        recorded.status = self.status
        request.setResponseCode(self.status)
        if 300 <= self.status < 400:
            request.setHeader(b"location", b"https://elsewhere.example/")
        return self.body
