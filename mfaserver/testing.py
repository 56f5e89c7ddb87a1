"""Public fakes and packet builders for tests (ours and anyone embedding mfaserver).

Each fake here is checked against the real implementation by a contract
test in ``tests/``, one suite run over both, so the fake cannot drift:

* `MemoryDirectory`: ``tests/test_directory_contract.py``;
* `MemorySmsGateway`: ``SmsGatewayContract`` in ``tests/test_gateway_contracts.py``,
  also run over `TwilioGateway` (the fake Twilio), `HttpGateway` (a
  `WebhookStandIn`) and `SmtpGateway` (the fake SMTP server), all in memory;
* `MemoryVoiceGateway`: ``VoiceGatewayContract`` there, also run over `TwilioGateway`;
* `MemoryWakeNotifier`: ``WakeContract`` there, also run over `WakeNotifier`
  with ntfy and webhook `WebhookStandIn`s;
* `MemoryCodeFactor`, `MemoryApprovalFactor`, `MemoryConfirmedApprovalFactor`:
  ``tests/test_factor_contracts.py``, also run over `TokenFactor` (the real
  store), `SmsCodes`, `PushFactor`, `VoiceFactor` and `NumberMatchingPushFactor`;
* `MemoryAccountStore`: ``tests/test_store_contract.py``, also run over the
  `ThreadedStore` on a real SQLite store.

`WebhookStandIn` is no fake of ours but the far side of an HTTP gateway (a
webhook, an ntfy server), shared by those suites and the gateways' own tests.
"""

from __future__ import annotations

import dataclasses
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

from mfaserver.auth.interfaces import (ApprovalWithdrawn, FactorRefused, InvalidCredentials,
                                       UnknownApproval, UnknownUser, WrongConfirmation)
from mfaserver.auth.model import (Account, AuditEntry, CodeCheck, CodeResult, Login, Method,
                                  Principal, Reason, TokenKind, Verdict)
from mfaserver.gateways.base import GatewayError, check_call, check_e164
from mfaserver.radius import codec

T = TypeVar("T")


def run_now(f, *args, **kwargs) -> defer.Deferred:
    """A thread-pool runner that runs ``f`` at once: for tests of thread-pooled code."""
    return defer.execute(f, *args, **kwargs)


class MemoryDirectory:
    """`Directory` over a dict of username -> password.

    ``phones`` and ``groups`` (group DNs, reported lower-cased as the real
    directories do) by username fill in the `Principal`; set ``failure``
    (e.g. `DirectoryUnavailable()`) to make every login fail with it, as a
    directory whose server is down does.
    """

    def __init__(self, users: dict[str, str] | None = None, *,
                 phones: dict[str, str] | None = None,
                 groups: dict[str, Iterable[str]] | None = None):
        self.users = dict(users or {})
        self.phones = dict(phones or {})
        self.groups = dict(groups or {})
        self.failure: Exception | None = None
        self.calls: list[str] = []

    def authenticate(self, username: str, password: str) -> defer.Deferred:
        self.calls.append(username)
        if self.failure is not None:
            return defer.fail(self.failure)
        if not password:
            return defer.fail(InvalidCredentials())
        if username not in self.users:
            return defer.fail(UnknownUser())
        if self.users[username] != password:
            return defer.fail(InvalidCredentials())
        return defer.succeed(Principal(
            username=username, phone=self.phones.get(username),
            groups=frozenset(group.lower() for group in self.groups.get(username, ()))))


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


# --- Second factors ---------------------------------------------------------------------------

class MemoryCodeFactor:
    """`CodeFactor` whose codes the test sets: ``codes[user]`` is that user's code.

    A code is accepted once; the same code again is REPLAYED. Only users in
    ``users`` can use it. With ``sends`` it "texts" the code (``sent`` records
    whom; the prompt names the user), else the user holds it (an app). Set
    ``refusal`` (a `FactorRefused`) or ``failure`` (a `DeliveryFailed`) to
    make `send` refuse or fail.
    """

    def __init__(self, method: Method, *, users: Iterable[str] = (), sends: bool = False):
        self.method = method
        self.users = set(users)
        self.sends = sends
        self.codes: dict[str, str] = {}
        self.sent: list[str] = []
        self.refusal: FactorRefused | None = None
        self.failure: Exception | None = None
        self._used: dict[str, set[str]] = {}

    def usable(self, account: Account) -> bool:
        return account.name in self.users

    def send(self, login: Login) -> defer.Deferred[str | None]:
        if self.refusal is not None:
            raise self.refusal
        if self.failure is not None:
            return defer.fail(self.failure)
        if not self.sends:
            return defer.succeed(None)
        self.sent.append(login.user)
        return defer.succeed(f"Enter the code sent to {login.user}.")

    def check(self, account: Account, code: str) -> defer.Deferred[CodeCheck | None]:
        if account.name not in self.users:
            return defer.succeed(None)
        used = self._used.setdefault(account.name, set())
        if code in used:
            result = CodeResult.REPLAYED
        elif code == self.codes.get(account.name):
            used.add(code)
            result = CodeResult.ACCEPTED
        else:
            result = CodeResult.WRONG
        return defer.succeed(CodeCheck(result, self.method.name))


class MemoryApprovalFactor:
    """`ApprovalFactor` that records each request; the test answers it.

    ``requests`` holds (login, Deferred) in order; `answer` fires one. Only
    users in ``users`` can use it; ``refusal`` (a `FactorRefused`) makes
    requests refuse. The timeout runs on ``clock``; cancelling withdraws
    (``withdrawn`` records whose).
    """

    def __init__(self, method: Method, clock: IReactorTime, *, users: Iterable[str] = ()):
        self.method = method
        self.users = set(users)
        self.refusal: FactorRefused | None = None
        self.requests: list[tuple[Login, defer.Deferred]] = []
        self.withdrawn: list[str] = []
        self._clock = clock

    def usable(self, account: Account) -> bool:
        return account.name in self.users

    def request_approval(self, login: Login, timeout: float) -> defer.Deferred[Verdict]:
        if self.refusal is not None:
            raise self.refusal
        d: defer.Deferred = defer.Deferred(lambda d: self.withdrawn.append(login.user))
        d.addTimeout(timeout, self._clock)
        self.requests.append((login, d))
        return d

    def answer(self, verdict: Verdict, index: int = -1) -> None:
        """The user answers request ``index`` (the last one by default)."""
        self.requests[index][1].callback(verdict)

    def withdraw_user(self, user: str) -> None:
        for login, d in self.requests:
            if login.user == user and not d.called:
                self.withdrawn.append(user)
                d.errback(ApprovalWithdrawn(user))


class MemoryConfirmedApprovalFactor:
    """`ConfirmedApprovalFactor`: the "device" shows ``shown(ticket)``; the test answers.

    Tickets are kept (answered ones too) until ``remember`` seconds after
    they end, like the push registry; each expires ``timeout`` seconds after
    `open` on ``clock``.
    """

    prompt = "Enter the number your device shows."

    def __init__(self, method: Method, clock: IReactorTime, *, users: Iterable[str] = (),
                 remember: float = 600.0):
        self.method = method
        self.users = set(users)
        self.refusal: FactorRefused | None = None
        self._clock = clock
        self._remember = remember
        self._ids = itertools.count(1)
        self._approvals: dict[str, _Confirmable] = {}

    def usable(self, account: Account) -> bool:
        return account.name in self.users

    def find(self, login_key) -> str | None:
        for ticket, approval in self._approvals.items():
            if approval.login.key == login_key and approval.outcome is None:
                return ticket
        return None

    def open(self, login: Login, timeout: float) -> str:
        if self.refusal is not None:
            raise self.refusal
        ticket = f"ticket-{next(self._ids)}"
        approval = _Confirmable(login, f"{10 + len(self._approvals) % 90}")
        approval.expiry = self._clock.callLater(timeout, self._end, ticket,
                                                defer.TimeoutError(ticket))
        self._approvals[ticket] = approval
        return ticket

    def shown(self, ticket: str) -> str:
        """What the device shows for ``ticket``."""
        return self._approvals[ticket].number

    def answer(self, ticket: str, verdict: Verdict) -> None:
        """The device answers ``ticket``."""
        if self._approvals[ticket].outcome is None:
            self._end(ticket, verdict)

    def known(self, ticket: str) -> bool:
        return ticket in self._approvals

    def confirm(self, ticket: str, typed: str) -> defer.Deferred[Verdict]:
        approval = self._approvals.get(ticket)
        if approval is None:
            raise UnknownApproval(ticket)
        if typed != approval.number:
            self.withdraw(ticket)
            raise WrongConfirmation(Reason.WRONG_NUMBER, "Wrong number.")
        if approval.outcome is not None:
            return defer.succeed(approval.outcome) if isinstance(approval.outcome, Verdict) \
                else defer.fail(approval.outcome)
        d: defer.Deferred = defer.Deferred()
        approval.waiters.append(d)
        return d

    def withdraw(self, ticket: str) -> None:
        if ticket in self._approvals and self._approvals[ticket].outcome is None:
            self._end(ticket, ApprovalWithdrawn(ticket))

    def withdraw_user(self, user: str) -> None:
        for ticket, approval in list(self._approvals.items()):
            if approval.login.user == user:
                self.withdraw(ticket)

    def pending_count(self, user: str | None = None) -> int:
        return sum(1 for a in self._approvals.values()
                   if a.outcome is None and user in (None, a.login.user))

    def _end(self, ticket: str, outcome) -> None:
        approval = self._approvals[ticket]
        if approval.outcome is not None:
            return
        approval.outcome = outcome
        if approval.expiry.active():
            approval.expiry.cancel()
        self._clock.callLater(self._remember, self._approvals.pop, ticket, None)
        waiters, approval.waiters = approval.waiters, []
        for d in waiters:
            if isinstance(outcome, Verdict):
                d.callback(outcome)
            else:
                d.errback(outcome)


class _Confirmable:
    """One approval of a `MemoryConfirmedApprovalFactor`."""

    def __init__(self, login: Login, number: str):
        self.login = login
        self.number = number
        self.outcome = None             # a Verdict or an exception, once ended
        self.expiry = None
        self.waiters: list[defer.Deferred] = []


# --- The store --------------------------------------------------------------------------------

class MemoryAccountStore:
    """`AccountStore` over a dict of `Account`s, with `mfaserver.store.db.Store`'s semantics.

    Set a test up with `add`; ``audit`` lists the rows written.
    """

    def __init__(self):
        self.accounts: dict[str, Account] = {}
        self.audit: list[AuditEntry] = []

    def add(self, account: Account) -> None:
        self.accounts[account.name] = account

    def load_account(self, name: str) -> defer.Deferred[Account | None]:
        return defer.succeed(self.accounts.get(name))

    def use_totp_step(self, token_id: int, step: int, drift: int) -> defer.Deferred[bool]:
        return defer.succeed(self._use(
            token_id, TokenKind.TOTP,
            lambda t: t.last_step is None or t.last_step < step,
            lambda t: dataclasses.replace(t, last_step=step, drift=drift)))

    def use_hotp_counter(self, token_id: int, matched_counter: int) -> defer.Deferred[bool]:
        return defer.succeed(self._use(
            token_id, TokenKind.HOTP, lambda t: t.counter <= matched_counter,
            lambda t: dataclasses.replace(t, counter=matched_counter + 1)))

    def register_failure(self, name: str, *, now: float, threshold: int,
                         lock_seconds: float) -> defer.Deferred[tuple[int, float | None]]:
        if threshold < 1:
            return defer.fail(ValueError("failure threshold must be at least 1"))
        account = self.accounts.get(name)
        if account is None:
            return defer.succeed((0, None))
        if account.failures + 1 >= threshold:
            account = self._change(name, failures=0, locked_until=now + lock_seconds)
        else:
            account = self._change(name, failures=account.failures + 1)
        return defer.succeed((account.failures, account.locked_until))

    def clear_failures(self, name: str) -> defer.Deferred[None]:
        if name in self.accounts:
            self._change(name, failures=0)
        return defer.succeed(None)

    def consume_bypass(self, name: str, *, now: float) -> defer.Deferred[bool]:
        account = self.accounts.get(name)
        if account is None or account.bypass_until is None:
            return defer.succeed(False)
        self._change(name, bypass_until=None)
        return defer.succeed(account.bypass_until > now)

    def block_user(self, name: str) -> defer.Deferred[None]:
        if name in self.accounts:
            self._change(name, blocked=True)
        return defer.succeed(None)

    def record_audit(self, entry: AuditEntry) -> defer.Deferred[None]:
        self.audit.append(entry)
        return defer.succeed(None)

    def load_and_use_code(self, name: str, plan) -> defer.Deferred:
        account = self.accounts.get(name)
        planned = plan(account)
        if planned is None:
            return defer.succeed((account, None))
        use, entry = planned
        if use.kind is TokenKind.TOTP:
            used = self._use(use.token_id, TokenKind.TOTP,
                             lambda t: t.last_step is None or t.last_step < use.value,
                             lambda t: dataclasses.replace(t, last_step=use.value,
                                                           drift=use.drift))
        else:
            used = self._use(use.token_id, TokenKind.HOTP, lambda t: t.counter <= use.value,
                             lambda t: dataclasses.replace(t, counter=use.value + 1))
        if not used:
            return defer.succeed((account, None))
        if account.failures:
            self._change(account.name, failures=0)
        self.audit.append(entry)
        return defer.succeed((account, use))

    def _change(self, name: str, **changes) -> Account:
        account = dataclasses.replace(self.accounts[name], **changes)
        self.accounts[name] = account
        return account

    def _use(self, token_id: int, kind: TokenKind, allowed, used) -> bool:
        for name, account in self.accounts.items():
            for i, token in enumerate(account.tokens):
                if token.id == token_id and token.kind is kind:
                    if not allowed(token):
                        return False
                    tokens = list(account.tokens)
                    tokens[i] = used(token)
                    self._change(name, tokens=tuple(tokens))
                    return True
        return False
