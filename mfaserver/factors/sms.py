"""One-time codes sent by text message: the ``sms`` method, a `CodeFactor`.

A code is random (``secrets``), ``code_length`` digits, valid ``code_ttl``
seconds, good for one login of the user it was sent to, and only the newest
code of a user counts. Codes live in memory (a restart voids them, like
challenge States). Sends are limited per user and per destination number
(toll-fraud and annoyance guard) before the gateway is asked.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.auth.approvals import hourly_send_limit
from mfaserver.auth.interfaces import DeliveryFailed, FactorRefused
from mfaserver.auth.model import Account, CodeCheck, CodeResult, Login, Method, Reason
from mfaserver.gateways.base import GatewayError
from mfaserver.store.cluster import ClusterState

log = Logger(namespace="mfaserver.factors.sms")

SMS = Method(
    name="sms", label="text message", starts=True, unusable=Reason.NO_PHONE,
    unusable_message="No phone number is set up for text messages. "
                     "Contact your administrator.")
MSG_TOO_MANY_CODES = "Too many codes were sent. Wait a while, then try again."


class SendRefused(Exception):
    """Over a send limit: nothing was sent."""


@dataclass(frozen=True)
class _Code:
    code: str
    expires: float


def mask_phone(number: str) -> str:
    """``+*******1234``: enough for the user to recognise their phone, no more."""
    return "+" + "*" * max(0, len(number) - 5) + number[-4:]


class SmsCodes:
    """Sends codes through an `SmsGateway` and checks what users type back.

    The ``sms`` method's `CodeFactor`. ``gateway`` may be swapped (a reload):
    a send in flight finishes on the gateway it started with.
    """

    method = SMS

    def __init__(self, gateway, clock: IReactorTime, *, code_length: int = 6,
                 ttl: float = 300.0, per_user_per_hour: int = 5,
                 per_number_per_hour: int = 10, max_entries: int = 100_000):
        self.gateway = gateway
        self._clock = clock
        self.code_length = code_length
        self.ttl = ttl
        self._per_user = hourly_send_limit(clock, per_user_per_hour)
        self._per_number = hourly_send_limit(clock, per_number_per_hour)
        self._max_entries = max_entries
        self._codes: OrderedDict[str, _Code] = OrderedDict()

    def set_limits(self, per_user_per_hour: int, per_number_per_hour: int) -> None:
        """Change the hourly send limits (a reload)."""
        self._per_user.set_per_hour(per_user_per_hour)
        self._per_number.set_per_hour(per_number_per_hour)

    # --- the CodeFactor ---

    def usable(self, account: Account) -> bool:
        return bool(account.phone)

    def send(self, login: Login) -> Deferred[str]:
        """Text a code to the user's phone; fire with the prompt that asks for it.

        Raises `FactorRefused` over a send limit (nothing sent); fails with
        `DeliveryFailed` when the gateway cannot deliver.
        """
        phone = login.account.phone
        try:
            sent = self.send_code(login.user, phone)
        except SendRefused:
            raise _refused(login.user) from None
        sent.addCallbacks(lambda _: _prompt(phone), _undelivered)
        return sent

    def check(self, account: Account, code: str) -> Deferred[CodeCheck]:
        """ACCEPTED (once) if ``code`` is the user's live code, else WRONG."""
        if self.check_code(account.name, code.strip()):
            return succeed(CodeCheck(CodeResult.ACCEPTED, SMS.name))
        return succeed(CodeCheck(CodeResult.WRONG, SMS.name))

    # --- codes ---

    def send_code(self, user: str, phone: str) -> Deferred[None]:
        """Text a new code to ``phone`` for ``user``.

        Raises `SendRefused` (nothing sent) over a limit; the Deferred fails
        with the gateway's error if it cannot deliver. The code is valid
        from the moment it is handed to the gateway.
        """
        if not self._per_user.allow(user) or not self._per_number.allow(phone):
            raise SendRefused()
        code = self.new_code()
        self._codes.pop(user, None)
        self._codes[user] = _Code(code, self._clock.seconds() + self.ttl)
        while len(self._codes) > self._max_entries:
            self._codes.popitem(last=False)
        return self.text_code(phone, code)

    def new_code(self) -> str:
        return "".join(secrets.choice("0123456789") for _ in range(self.code_length))

    def text_code(self, phone: str, code: str) -> Deferred[None]:
        minutes = max(1, round(self.ttl / 60))
        return self.gateway.send_sms(
            phone, f"Your sign-in code is {code}. It expires in {minutes} minutes.")

    def check_code(self, user: str, code: str) -> bool:
        """True, once, if ``code`` is ``user``'s live code (constant-time compare)."""
        entry = self._codes.get(user)
        if entry is None:
            return False
        if entry.expires <= self._clock.seconds():
            del self._codes[user]
            return False
        # compare_digest refuses non-ASCII text: compare the bytes (a typed
        # full-width "１２３４５６" is simply wrong).
        if len(code) != len(entry.code) or not hmac.compare_digest(code.encode(),
                                                                    entry.code.encode()):
            return False
        del self._codes[user]
        return True


class SharedSmsCodes(SmsCodes):
    """`SmsCodes` for the nodes of a cluster: the live codes and the send limits are
    in PostgreSQL (`mfaserver.store.cluster`), so a code texted by one node is
    accepted, once, by whichever node the user's answer reaches. ``run`` runs
    a `ClusterState` method on a database thread."""

    def __init__(self, gateway, clock: IReactorTime, run, **settings):
        super().__init__(gateway, clock, **settings)
        self._run = run

    def send(self, login: Login) -> Deferred[str]:
        phone = login.account.phone
        code = self.new_code()
        stored = self._run(ClusterState.put_sms_code, login.user, phone, code,
                           now=self._clock.seconds(), ttl=self.ttl,
                           per_user=self._per_user.bucket, per_number=self._per_number.bucket)

        def text(allowed: bool) -> Deferred[str]:
            if not allowed:
                raise _refused(login.user)
            sent = self.text_code(phone, code)
            sent.addCallbacks(lambda _: _prompt(phone), _undelivered)
            return sent
        return stored.addCallback(text)

    def check(self, account: Account, code: str) -> Deferred[CodeCheck]:
        d = self._run(ClusterState.use_sms_code, account.name, code.strip(),
                      self._clock.seconds())
        d.addCallback(lambda right: CodeCheck(CodeResult.ACCEPTED if right else CodeResult.WRONG,
                                              SMS.name))
        return d


def _prompt(phone: str) -> str:
    return f"Enter the code sent to {mask_phone(phone)}."


def _refused(user: str) -> FactorRefused:
    log.warn("SMS limit reached for {user}: no code sent", user=user)
    return FactorRefused(Reason.RATE_LIMITED, MSG_TOO_MANY_CODES)


def _undelivered(failure):
    """A gateway's failure to deliver, as the core's `DeliveryFailed`."""
    failure.trap(GatewayError, defer.TimeoutError)
    raise DeliveryFailed(failure.getErrorMessage())
