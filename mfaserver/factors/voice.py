"""Phone calls that ask the user to approve a sign-in with a keypress.

The user's phone rings; they press # to sign in or 0 to report fraud, or, in
PIN mode, key their PIN and then #. `VoiceCalls` starts the call through a
`VoiceGateway` and keeps each call in flight as a Deferred in a registry,
keyed by a random call id that is part of the callback URLs. The provider's
callbacks (see mfaserver.web.voice, which checks their signatures) come back
here: `answer_twiml` when the phone is picked up, `gather` with the keys
pressed, `call_ended` with the final call status. The first of those that
decides resolves the Deferred; the deadline belongs to the caller, who
cancels the Deferred to withdraw the request.

`VoiceFactor` is the ``phone`` method's `ApprovalFactor` over `VoiceCalls`:
it sets the deadline, reports a fraud keypress before the login is answered,
and turns the gateway's failures into the core's `DeliveryFailed`.

Nothing here knows the user's name or number once the call is placed except
for logs (names only, numbers masked): prompts pass through the provider, so
they name the client, never the user or the number. Keys pressed and PINs
are never logged.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mfaserver.auth.approvals import hourly_send_limit
from mfaserver.auth.interfaces import ApprovalWithdrawn, DeliveryFailed, FactorRefused
from mfaserver.auth.model import Account, Login, Method, Reason, Verdict
from mfaserver.factors.sms import SendRefused
from mfaserver.gateways.base import GatewayError, mask_number
from mfaserver.gateways.twilio import gather_twiml, say_twiml

log = Logger(namespace="mfaserver.factors.voice")

PLAIN_PROMPT = ("You are signing in to {client}. Press the pound key to sign in. "
                "Press 0 to report fraud.")
PIN_PROMPT = ("You are signing in to {client}. Enter your PIN, then press the pound key. "
              "To report fraud, press 0, then the pound key.")
NO_KEYS = "No key was pressed. Goodbye."
GATHER_TIMEOUT = 10  # seconds Twilio waits for the first key

SIGNED_IN = "You are signed in. Goodbye."
DENIED = "The sign-in was denied. Goodbye."
FRAUD = "Fraud reported. Your account is now blocked; contact your administrator. Goodbye."
EXPIRED = "This sign-in has expired. Goodbye."
FAILED = "The sign-in could not be completed. Goodbye."

# CallStatus values that end a call (Twilio's "completed" status callback event).
FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})

_REPLIES = {Verdict.APPROVE: SIGNED_IN, Verdict.DENY: DENIED, Verdict.FRAUD: FRAUD}


class _Call:
    """One call in flight. Mutable on purpose: it moves from ringing to answered."""

    __slots__ = ("user", "client", "masked", "result", "start", "answered", "keyed")

    def __init__(self, user: str, client: str, masked: str, result: Deferred):
        self.user = user
        self.client = client
        self.masked = masked            # the number as logs may show it
        self.result = result            # what request_approval returned
        self.start: Deferred | None = None   # the gateway's start_call, while in flight
        self.answered = False           # the answer URL was fetched
        self.keyed = False              # keys arrived: the gather decides, nothing else


class VoiceCalls:
    """Phone calls that ask the user to approve a sign-in.

    ``public_url`` is where the provider reaches mfaserver.web (the callback
    URLs are built on it). In ``pin_mode`` the user keys a PIN, checked by
    ``check_pin(user, pin)``, a Deferred firing with True or False. Calls are
    limited per user and per number (a token bucket: 3 at once, then the
    hourly rate) and to ``max_calls`` in flight. Ids of finished calls are
    remembered for ``late_window`` seconds so a late callback is told apart
    from an unknown one in the logs.
    """

    def __init__(self, gateway, clock: IReactorTime, *, public_url: str,
                 pin_mode: bool = False,
                 check_pin: Callable[[str, str], Deferred[bool]] | None = None,
                 per_user_per_hour: int = 5, per_number_per_hour: int = 10,
                 max_calls: int = 10_000, late_window: float = 600.0,
                 on_late: Callable[[str], object] | None = None):
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc \
                or parts.query or parts.fragment:
            raise ValueError("public_url: must be an absolute http(s) URL "
                             "without query or fragment")
        if pin_mode and check_pin is None:
            raise ValueError("check_pin: required in PIN mode")
        self.gateway = gateway
        self._clock = clock
        self._base = public_url.rstrip("/")
        self.pin_mode = pin_mode
        self._check_pin = check_pin
        self._per_user = hourly_send_limit(clock, per_user_per_hour)
        self._per_number = hourly_send_limit(clock, per_number_per_hour)
        self.max_calls = max_calls
        self.late_window = late_window
        # Called with the user, the client and the keys when keys arrive for a
        # call already decided or withdrawn (the daemon audits it, and a "0"
        # still reports fraud); the caller hears "expired".
        self._on_late = on_late
        self._pending: dict[str, _Call] = {}
        # call id -> (user, client, forget at): finished calls, oldest first.
        self._finished: OrderedDict[str, tuple[str, str, float]] = OrderedDict()

    # Whether a fraud keypress is reported here, where the keys arrive (a
    # cluster's calls), rather than by the factor holding the login.
    reports_fraud = False

    def __len__(self) -> int:
        """The number of calls pending."""
        return len(self._pending)

    def url(self, call_id: str, what: str) -> str:
        """The callback URL ``what`` ("answer", "gather" or "status") of a call."""
        return f"{self._base}/v1/voice/{call_id}/{what}"

    # --- Starting a call -------------------------------------------------------------------

    def request_approval(self, user: str, phone: str, *, client: str, login_key=None,
                         timeout: float | None = None) -> Deferred[Verdict]:
        """Call ``phone`` for ``user``'s sign-in to ``client``.

        ``login_key`` and ``timeout`` are for a cluster's calls (which join the
        same login's call on any node, and expire); one node's `PendingLogins`
        joins, and the caller owns the deadline.

        Raises `SendRefused` synchronously (nothing sent) when over the
        per-user or per-number rate limit or when ``max_calls`` calls are
        pending. The Deferred fires with `Verdict.APPROVE` (# pressed, or the
        right PIN then #), `Verdict.FRAUD` (0), `Verdict.DENY` (any other key,
        or a wrong PIN), `Verdict.NO_ANSWER` (the call ended - busy,
        no-answer, failed, canceled, completed - before any key); fails with
        `GatewayError` when the provider refuses to start the call, or with
        ``check_pin``'s error if the PIN could not be checked. Cancelling the
        Deferred (timeout, shutdown) withdraws the request: later callbacks
        for the call get an "expired" goodbye and are logged as late.
        """
        # The global cap first, so a refusal does not also spend the user's tokens.
        if len(self._pending) >= self.max_calls:
            log.warn("Not calling {phone} for {user}: {count} calls already pending",
                     phone=mask_number(phone), user=user, count=len(self._pending))
            raise SendRefused()
        if not self._per_user.allow(user) or not self._per_number.allow(phone):
            log.warn("Not calling {phone} for {user}: over the call rate limit",
                     phone=mask_number(phone), user=user)
            raise SendRefused()
        call_id = secrets.token_urlsafe(16)
        result: Deferred[Verdict] = Deferred(lambda d: self._withdraw(call_id))
        call = _Call(user, client, mask_number(phone), result)
        # Registered before the provider is asked: it may fetch the answer URL
        # before its answer to our request reaches us.
        self._pending[call_id] = call
        log.info("Calling {phone} for {user} (sign-in to {client})",
                 phone=call.masked, user=user, client=client)
        start = maybeDeferred(self.gateway.start_call, phone,
                              answer_url=self.url(call_id, "answer"),
                              status_url=self.url(call_id, "status"))
        call.start = start
        start.addCallbacks(self._started, self._not_started,
                           callbackArgs=(call_id, call), errbackArgs=(call_id, call))
        return result

    def _started(self, sid: str, call_id: str, call: _Call) -> None:
        call.start = None
        if self._pending.get(call_id) is call:
            log.debug("Call for {user} started: {sid}", user=call.user, sid=sid)

    def _not_started(self, failure: Failure, call_id: str, call: _Call) -> None:
        call.start = None
        if self._pending.get(call_id) is not call:
            return None  # withdrawn meanwhile (that cancelled the request)
        del self._pending[call_id]
        log.warn("Call to {phone} for {user} not started: {error}", phone=call.masked,
                 user=call.user, error=str(failure.value))
        call.result.errback(failure)
        return None

    def _withdraw(self, call_id: str) -> None:
        """The canceller of request_approval's Deferred: forget the call."""
        call = self._pending.pop(call_id, None)
        if call is None:
            return
        self._remember(call_id, call)
        log.info("Call for {user} withdrawn before an answer", user=call.user)
        if call.start is not None:
            # Abandon the REST request; if the call is placed anyway, its
            # callbacks find the id among the finished ones.
            call.start.cancel()

    def withdraw_user(self, user: str) -> None:
        """Withdraw every pending call of ``user`` (blocked after a fraud report):
        their Deferreds fail with `ApprovalWithdrawn`."""
        for call_id, call in list(self._pending.items()):
            if call.user == user:
                del self._pending[call_id]
                self._remember(call_id, call)
                if call.start is not None:
                    call.start.cancel()
                call.result.errback(ApprovalWithdrawn(user))

    def set_limits(self, per_user_per_hour: int, per_number_per_hour: int) -> None:
        """Change the hourly call limits (a reload)."""
        self._per_user.set_per_hour(per_user_per_hour)
        self._per_number.set_per_hour(per_number_per_hour)

    # --- The provider's callbacks ----------------------------------------------------------

    def answer_twiml(self, call_id: str) -> bytes:
        """The TwiML for the answer URL: the prompt and a <Gather> for the keys."""
        call = self._pending.get(call_id)
        if call is None or call.answered:
            self._late(call_id, "answer")
            return say_twiml(EXPIRED)
        call.answered = True
        log.info("Call for {user} answered", user=call.user)
        action = self.url(call_id, "gather")
        if self.pin_mode:
            return gather_twiml(PIN_PROMPT.format(client=call.client), action,
                                timeout=GATHER_TIMEOUT, finish_on_key="#", goodbye=NO_KEYS)
        # "#" must be an ordinary key here: as the finish key, a bare "#" is no input.
        return gather_twiml(PLAIN_PROMPT.format(client=call.client), action, num_digits=1,
                            timeout=GATHER_TIMEOUT, finish_on_key="", goodbye=NO_KEYS)

    def gather(self, call_id: str, digits: str) -> Deferred[bytes] | bytes:
        """Decide on the keys pressed; the TwiML to answer with (a Deferred in PIN mode).

        Only the first set of keys for a call counts; any later one, or keys
        for a call withdrawn or unknown, get the "expired" goodbye.
        """
        call = self._pending.get(call_id)
        if call is None or call.keyed:
            self._late(call_id, "keys", digits)
            return say_twiml(EXPIRED)
        call.keyed = True
        if digits == "0":
            return self._decide(call_id, call, Verdict.FRAUD)
        if not self.pin_mode:
            return self._decide(call_id, call, Verdict.APPROVE if digits == "#" else Verdict.DENY)
        if not digits:
            return self._decide(call_id, call, Verdict.DENY)
        checked = Deferred.fromCoroutine(self._check(call_id, call, digits))
        # Twilio hanging up on our HTTP answer cancels what we return; that
        # must not cancel the check: the user's answer still counts.
        reply: Deferred[bytes] = Deferred()
        checked.chainDeferred(reply)
        return reply

    async def _check(self, call_id: str, call: _Call, digits: str) -> bytes:
        try:
            right = await maybeDeferred(self._check_pin, call.user, digits)
        except Exception:
            failure = Failure()
            if self._pending.get(call_id) is not call:
                self._late(call_id, "keys", digits)
                return say_twiml(EXPIRED)
            # Could not decide: the caller gets the error, as for a gateway failure.
            log.failure("Could not check the PIN of {user}", failure, user=call.user)
            del self._pending[call_id]
            self._remember(call_id, call)
            call.result.errback(failure)
            return say_twiml(FAILED)
        if self._pending.get(call_id) is not call:
            # Withdrawn (timed out) while the PIN was being checked.
            self._late(call_id, "keys", digits)
            return say_twiml(EXPIRED)
        if not right:
            log.info("Wrong PIN on the call for {user}", user=call.user)
        return self._decide(call_id, call, Verdict.APPROVE if right else Verdict.DENY)

    def call_ended(self, call_id: str, status: str) -> None:
        """The provider reports the call's final status: no keys by then is NO_ANSWER."""
        call = self._pending.get(call_id)
        if call is None:
            # Normal after a decision: the call ends after the goodbye.
            log.debug("Call {status} after it was decided or withdrawn", status=status)
            return
        if status not in FINAL_STATUSES:
            log.debug("Call for {user}: status {status}", user=call.user, status=status)
            return
        if call.keyed:
            return  # the PIN check in flight decides
        self._decide(call_id, call, Verdict.NO_ANSWER, status=status)

    # --- Bookkeeping -----------------------------------------------------------------------

    def _decide(self, call_id: str, call: _Call, verdict: Verdict, *,
                status: str | None = None) -> bytes:
        del self._pending[call_id]
        self._remember(call_id, call)
        if verdict is Verdict.FRAUD:
            log.warn("Fraud reported on the call to {phone} for {user} (sign-in to {client})",
                     phone=call.masked, user=call.user, client=call.client, verdict=verdict.value)
        else:
            log.info("Call to {phone} for {user}: {verdict}", phone=call.masked,
                     user=call.user, verdict=verdict.value, status=status)
        call.result.callback(verdict)
        return say_twiml(_REPLIES.get(verdict, EXPIRED))

    def _remember(self, call_id: str, call: _Call) -> None:
        self._prune()
        self._finished[call_id] = (call.user, call.client,
                                   self._clock.seconds() + self.late_window)
        while len(self._finished) > self.max_calls:
            self._finished.popitem(last=False)

    def _prune(self) -> None:
        # Oldest first, and all kept equally long: stop at the first live one.
        now = self._clock.seconds()
        while self._finished:
            call_id, (_, _, until) = next(iter(self._finished.items()))
            if until > now:
                break
            del self._finished[call_id]

    def _late(self, call_id: str, what: str, digits: str = "") -> None:
        self._prune()
        finished = self._finished.get(call_id)
        if finished is not None:
            user, client, _ = finished
            log.warn("late answer to call for {user} ({what} after the call was decided "
                     "or withdrawn)", user=user, what=what)
            if what == "keys" and self._on_late is not None:
                self._on_late(user, client, digits)
        else:
            log.warn("Callback ({what}) for an unknown call", what=what)


# --- The factor -------------------------------------------------------------------------------

PHONE = Method(
    name="phone", label="phone call", starts=True, unusable=Reason.NO_PHONE,
    unusable_message="Sign-in by phone call is not set up for your account.")
MSG_TOO_MANY_CALLS = "Too many calls were placed. Wait a while, then try again."


class VoiceFactor:
    """`ApprovalFactor`: call the user's phone and fire with the key they press.

    ``report_fraud(user, client)`` (a Deferred) is called once per call on a
    fraud keypress, and the Deferred fires only after it: the user is
    blocked before the login is answered.
    """

    method = PHONE

    def __init__(self, calls: VoiceCalls, clock: IReactorTime, *,
                 report_fraud: Callable[[str, str], Deferred]):
        self.calls = calls
        self._clock = clock
        self._report_fraud = report_fraud

    def usable(self, account: Account) -> bool:
        return bool(account.phone)

    def request_approval(self, login: Login, timeout: float) -> Deferred[Verdict]:
        try:
            d = self.calls.request_approval(login.user, login.account.phone, client=login.client,
                                            login_key=login.key, timeout=timeout)
        except SendRefused:
            raise _too_many_calls(login.user) from None
        d.addTimeout(timeout, self._clock)
        d.addCallbacks(self._after_answer, _undelivered, callbackArgs=(login,),
                       errbackArgs=(login.user,))
        return d

    def _after_answer(self, verdict: Verdict, login: Login):
        if verdict is not Verdict.FRAUD or self.calls.reports_fraud:
            return verdict
        d = self._report_fraud(login.user, login.client)
        d.addCallback(lambda _: verdict)
        return d

    def withdraw_user(self, user: str) -> None:
        self.calls.withdraw_user(user)


def _too_many_calls(user: str) -> FactorRefused:
    log.warn("call limit reached for {user}: no call placed", user=user)
    return FactorRefused(Reason.RATE_LIMITED, MSG_TOO_MANY_CALLS)


def _undelivered(failure: Failure, user: str):
    """The provider would not place the call: the core's `DeliveryFailed` (a cluster's
    calls refuse over a limit later, with `SendRefused`)."""
    if failure.check(SendRefused):
        raise _too_many_calls(user)
    failure.trap(GatewayError)
    raise DeliveryFailed(failure.getErrorMessage())
