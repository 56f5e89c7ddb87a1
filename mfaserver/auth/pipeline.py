"""The core: decide an `AuthRequest` into a `Decision`.

No I/O happens here directly: the directory and the store are reached through
the Protocols in `mfaserver.auth.interfaces`, time through the injected clock.
Every decision writes one audit row and one structured log event; neither
ever carries the password, the code or the State.

The flow, for a request without State::

    password field --split--> password [, code]
    empty password            -> Reject (no directory call)
    directory.authenticate    -> Reject on a wrong password / unknown user
    account blocked / locked  -> Reject
    pending bypass            -> Accept (consumed)
    password,sms              -> text a code, Access-Challenge for it
    no token and no phone     -> Accept or Reject per [mfa] unenrolled
    code given                -> check it (atomic replay guard) -> Accept / Reject
    no code                   -> Access-Challenge (if [mfa] challenge) or Reject;
                                 a phone-only user gets a texted code

and for a request with State: redeem the State (bound to client and user,
single use), then check the code in User-Password.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable
import hmac

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.auth.approvals import PendingLogins, RateLimiter, TooManyPending
from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import (
    AccountStore, Directory, DirectoryUnavailable, InvalidCredentials, SeedIntegrityError,
    UnknownUser,
)
from mfaserver.auth.model import (
    Account, AuditEntry, AuthRequest, Decision, Outcome, Principal, Reason, TokenKind, Verdict,
)
from mfaserver.factors import oath
from mfaserver.factors.push import TransactionClosed
from mfaserver.factors.sms import SendRefused, SmsCodes, mask_phone
from mfaserver.gateways.base import GatewayError

log = Logger(namespace="mfaserver.auth")

# What the user reads. Short, useful, and the same whether or not the user exists.
MSG_FAILED = "Authentication failed."
MSG_PAP_REQUIRED = "This server requires PAP authentication (CHAP and MS-CHAP are not supported)."
MSG_BLOCKED = "Your account is blocked. Contact your administrator."
MSG_LOCKED = "Too many wrong codes. Try again later or contact your administrator."
MSG_NOT_ENROLLED = "No second factor is set up for your account. Contact your administrator."
MSG_ENTER_CODE = "Enter the code from your authenticator app or token."
MSG_WRONG_CODE = "Wrong or already used code."
MSG_SESSION_EXPIRED = "Your sign-in session expired. Please sign in again."
MSG_TRY_LATER = "The sign-in service is unavailable. Try again later."
MSG_BYPASS = "Signed in with a one-time bypass."
MSG_NO_PHONE = "No phone number is set up for text messages. Contact your administrator."
MSG_TOO_MANY_CODES = "Too many codes were sent. Wait a while, then try again."
MSG_NO_DEVICE = "No authenticator app is set up for your account. Contact your administrator."
MSG_NO_VOICE = "Sign-in by phone call is not set up for your account."
MSG_DENIED = "The sign-in was denied."
MSG_FRAUD = "Fraud reported: your account is now blocked. Contact your administrator."
MSG_TIMEOUT = "No answer in time. Please sign in again."
MSG_NO_ANSWER = "The call was not answered. Please sign in again."
MSG_WRONG_NUMBER = "Wrong number. Please sign in again."
MSG_TOO_MANY_PENDING = "A sign-in is already waiting for your answer. Answer it or wait for it to expire."
MSG_TOO_MANY_CALLS = "Too many calls were placed. Wait a while, then try again."
MSG_TOO_MANY_PUSHES = "Too many sign-in requests. Wait a while, then try again."
MSG_MATCH_NUMBER = "Approve the sign-in in your app, then enter the number it shows."

# How each method is offered in the [mfa] challenge_menu prompt.
MENU_LABELS = {"push": "push to your app", "phone": "phone call", "sms": "text message",
               "totp": "a code from your app or token"}

# What a directory's refusal tells the user: only what they may know once
# their password was right (AD reports these states only then).
DIRECTORY_MESSAGES = {
    Reason.PASSWORD_EXPIRED: "Your password has expired. Change it, then sign in again.",
    Reason.MUST_CHANGE_PASSWORD: "You must change your password before you can sign in.",
    Reason.ACCOUNT_DISABLED: "Your account is disabled. Contact your administrator.",
    Reason.ACCOUNT_EXPIRED: "Your account has expired. Contact your administrator.",
    Reason.ACCOUNT_LOCKED: "Your account is locked. Try again later or contact your administrator.",
    Reason.LOGON_NOT_PERMITTED: "You may not sign in at this time or from this computer.",
    Reason.NOT_IN_GROUP: "You are not allowed to use this service.",
}

CODE_LENGTHS = range(6, 9)


METHOD_KEYWORDS = ("sms", "push", "phone")


async def _decided(decision: Decision) -> Decision:
    """``decision`` as an awaitable, for the steps that return another step's awaitable."""
    return decision


class _Refused(Exception):
    """Raised inside a PendingLogins start function: refuse with ``decision``."""

    def __init__(self, decision: Decision):
        super().__init__(decision.reason.value)
        self.decision = decision


def _menu_choice(answer: str, choices: tuple) -> str | None:
    """The method picked at the menu: its number or its name; None for anything else."""
    answer = answer.lower()
    if answer.isascii() and answer.isdigit() and 1 <= int(answer) <= len(choices):
        return choices[int(answer) - 1]
    return answer if answer in choices else None


def split_password(field: str, delimiter: str) -> tuple[str, str | None]:
    """Split ``password<delimiter>code`` (or ``password<delimiter>push|phone|sms``).

    Only a suffix that looks like an OATH or SMS code (6 to 8 ASCII digits)
    or names a method (``sms``, ``push``, ``phone``, any case; returned
    lower-cased) is split off,
    so a password that merely contains the delimiter still works. A password
    ending in ``<delimiter>`` plus such a suffix must be entered with a code
    (or through the challenge) - documented in the README.
    """
    password, sep, suffix = field.rpartition(delimiter)
    if sep and suffix.isascii() and suffix.isdigit() and len(suffix) in CODE_LENGTHS:
        return password, suffix
    if sep and suffix.lower() in METHOD_KEYWORDS:
        return password, suffix.lower()
    return field, None


class Authenticator:
    """Turns AuthRequests into Decisions. ``policy`` is an `mfaserver.config.MfaConfig`
    and may be replaced on reload."""

    def __init__(self, directory: Directory, store: AccountStore, challenges: ChallengeRegistry,
                 policy, clock: IReactorTime, reply_rules: tuple = (), sms: SmsCodes | None = None,
                 *, push=None, voice=None, alerts=None, clients: dict | None = None,
                 pushes_per_user_per_hour: int = 30):
        self.directory = directory
        self.store = store
        self.challenges = challenges
        self.policy = policy
        # `mfaserver.config.ReplyRule`s: group DN -> attributes for the Accept.
        self.reply_rules = reply_rules
        self.sms = sms  # None: no [sms] configured
        # `mfaserver.factors.push.PushTransactions`; None: no push.
        self.push = push
        # `mfaserver.factors.voice.VoiceCalls`; None: no [voice].
        self.voice = voice
        # An AlertSink (send_alert(subject, text)) for fraud reports; None: log only.
        self.alerts = alerts
        # Client name -> ClientConfig, for per-client timeout and failmode.
        self.clients = clients or {}
        self.pending = PendingLogins(max_per_user=policy.max_pending_per_user,
                                     max_total=policy.max_pending)
        # Number-matching pushes hold no request, so PendingLogins does not
        # see them; they count towards the same limits.
        self.pending.also_for_user = self._matching_pushes_for
        self.pending.also_total = self._matching_pushes_total
        self._push_limit = RateLimiter(clock, burst=min(5, pushes_per_user_per_hour),
                                       per_hour=pushes_per_user_per_hour)
        self._clock = clock

    def authenticate(self, request: AuthRequest) -> Deferred[Decision]:
        """Fire with the Decision for ``request`` (always; errors become Reject).

        The audit row is written before the Deferred fires. Cancelling the
        Deferred (shutdown) abandons the request: no decision, no audit row.
        """
        return Deferred.fromCoroutine(self._authenticate(request))

    async def _authenticate(self, request: AuthRequest) -> Decision:
        try:
            decision = await self._decide(request)
        except defer.CancelledError:
            raise  # shutdown, or the NAS's copy was dropped: no decision, no audit row
        except SeedIntegrityError:
            log.critical("token seed failed its integrity check for user {user}: "
                         "the store was tampered with or the key file is wrong",
                         user=request.username)
            decision = Decision.reject(Reason.SEED_INTEGRITY, MSG_TRY_LATER)
        except Exception:
            log.failure("could not decide a request from {client} for {user}",
                        client=request.client_name, user=request.username)
            decision = Decision.reject(Reason.INTERNAL_ERROR, MSG_TRY_LATER)
        await self._audit(request, decision)
        return decision

    def _decide(self, request: AuthRequest) -> Awaitable[Decision]:
        # Not a coroutine itself, nor are _start_method and _push: each hands
        # back the awaitable of the step that decides, so a login held for a
        # push keeps fewer suspended frames (memory per pending login).
        if not request.pap:
            return _decided(Decision.reject(Reason.NOT_PAP, MSG_PAP_REQUIRED, factor="password"))
        if request.password is None:
            # User-Password did not decode as UTF-8: almost always a wrong shared secret.
            log.warn("password from client {client} is not valid UTF-8: "
                     "check that the shared secrets match", client=request.client_name)
            return _decided(Decision.reject(Reason.PASSWORD_UNDECODABLE, MSG_FAILED,
                                            factor="password"))
        if request.state is not None:
            return self._answer_challenge(request)
        return self._first_round(request)

    async def _first_round(self, request: AuthRequest) -> Decision:
        password, code = split_password(request.password, self.policy.delimiter)
        if not password:
            return Decision.reject(Reason.EMPTY_PASSWORD, MSG_FAILED, factor="password")
        try:
            principal = await self.directory.authenticate(request.username, password)
        except InvalidCredentials as e:
            return Decision.reject(e.reason, DIRECTORY_MESSAGES.get(e.reason, MSG_FAILED),
                                   factor="password")
        except UnknownUser:
            return Decision.reject(Reason.UNKNOWN_USER, MSG_FAILED, factor="password")
        except DirectoryUnavailable:
            return Decision.reject(Reason.DIRECTORY_UNAVAILABLE, MSG_TRY_LATER, factor="password")

        # The store knows users by the directory's canonical name.
        name = principal.username
        grants = self._grants(principal)
        account = await self.store.load_account(name)
        refusal = self._refuse_account(account)
        if refusal is not None:
            return refusal
        now = self._clock.seconds()
        # The account read tells whether a bypass is pending, which saves the
        # store a write on every other login; consuming it is still atomic.
        if (account is not None and account.bypass_until is not None
                and account.bypass_until > now
                and await self.store.consume_bypass(name, now=now)):
            return Decision.accept(Reason.BYPASS, factor="bypass", message=MSG_BYPASS,
                                   attributes=grants)
        methods = self._methods(account)
        if code in METHOD_KEYWORDS:
            return await self._start_method(code, request, account, grants)
        if not methods:
            if self.policy.unenrolled == "allow":
                return Decision.accept(Reason.UNENROLLED_ALLOWED, factor="password",
                                       attributes=grants)
            return Decision.reject(Reason.NOT_ENROLLED, MSG_NOT_ENROLLED, factor="password")
        if code is not None:
            decision = await self._check_code(account, code)
            if decision.outcome is Outcome.ACCEPT:
                decision = dataclasses.replace(decision, attributes=grants)
            return decision
        if self.policy.challenge_menu and len(methods) > 1:
            return self._offer_menu(request, account, grants, methods)
        return await self._start_method(self._preferred(account, methods), request, account,
                                        grants)

    # --- choosing and starting a method ---

    def _methods(self, account: Account | None) -> list[str]:
        """The second factors ``account`` can use now, in fallback order."""
        if account is None:
            return []
        methods = []
        if self.push is not None and account.devices:
            methods.append("push")
        if account.tokens:
            methods.append("totp")
        if self.sms is not None and account.phone:
            methods.append("sms")
        if self.voice is not None and account.phone:
            methods.append("phone")
        return methods

    def _preferred(self, account: Account, methods: list[str]) -> str:
        """The user's default method, else the server's, else the first one usable."""
        for method in (account.default_method, self.policy.default_method):
            if method in methods:
                return method
        return methods[0]

    def _start_method(self, method: str, request: AuthRequest, account: Account | None,
                      grants: tuple) -> Awaitable[Decision]:
        """Start ``method`` (named by the user, the menu or the default) for this login."""
        if method == "sms":
            if self.sms is None or account is None or not account.phone:
                return _decided(Decision.reject(Reason.NO_PHONE, MSG_NO_PHONE, factor="sms"))
            return self._send_sms(request, account, grants)
        if method == "push":
            if self.push is None or account is None or not account.devices:
                return _decided(Decision.reject(Reason.NO_DEVICE, MSG_NO_DEVICE, factor="push"))
            return self._push(request, account, grants)
        if method == "phone":
            if self.voice is None or account is None or not account.phone:
                return _decided(Decision.reject(Reason.NO_PHONE, MSG_NO_VOICE, factor="phone"))
            return self._call(request, account, grants)
        # totp: ask for the code.
        if self.policy.challenge:
            # Bound to the name as typed (the NAS sends it again with the
            # State); the canonical name and the grants ride along.
            state = self.challenges.issue(request.client_name, request.username,
                                          {"user": account.name, "attributes": grants})
            return _decided(Decision.challenge(state, MSG_ENTER_CODE, factor="password"))
        return _decided(Decision.reject(
            Reason.CODE_MISSING,
            f"Enter your password followed by '{self.policy.delimiter}' and your code.",
            factor="password"))

    def _offer_menu(self, request: AuthRequest, account: Account, grants: tuple,
                    methods: list[str]) -> Decision:
        choices = [m for m in methods if m != "totp"]
        numbered = ", ".join(f"{i} for {MENU_LABELS[m]}" for i, m in enumerate(choices, 1))
        text = f"Enter {numbered}"
        text += ", or a code from your app or token." if "totp" in methods else "."
        state = self.challenges.issue(request.client_name, request.username,
                                      {"user": account.name, "attributes": grants,
                                       "menu": tuple(choices)})
        return Decision.challenge(state, text, factor="password")

    def _timeout(self, request: AuthRequest) -> float:
        client = self.clients.get(request.client_name)
        if client is not None and client.timeout is not None:
            return client.timeout
        return self.policy.timeout

    def _failmode(self, request: AuthRequest) -> str:
        client = self.clients.get(request.client_name)
        if client is not None and client.failmode is not None:
            return client.failmode
        return self.policy.failmode

    @staticmethod
    def _login_key(request: AuthRequest, account: Account) -> tuple:
        """What makes two requests "the same login": one push or call for both."""
        return (account.name, request.client_name, request.calling_station_id)

    def _push(self, request: AuthRequest, account: Account,
              grants: tuple) -> Awaitable[Decision]:
        """Push to the user's devices and hold the request for the answer; or, with
        number matching, challenge for the number the app shows."""
        push = self.push
        key = self._login_key(request, account)
        if push.number_matching:
            txn = push.find(key)
            if txn is None:
                try:
                    self.pending.check_room(account.name)
                except TooManyPending as e:
                    return _decided(self._too_many_pending(e, "push", account))
                refusal = self._refuse_new_push(account)
                if refusal is not None:
                    return _decided(refusal)
                txn = push.open(account.name, client=request.client_name,
                                nas_ip=request.nas_ip,
                                calling_station_id=request.calling_station_id,
                                timeout=self._timeout(request), login_key=key)
            state = self.challenges.issue(request.client_name, request.username,
                                          {"user": account.name, "attributes": grants,
                                           "push": txn.txid})
            return _decided(Decision.challenge(state, MSG_MATCH_NUMBER, factor="push"))

        def start() -> Deferred:
            refusal = self._refuse_new_push(account)
            if refusal is not None:
                raise _Refused(refusal)
            txn = push.open(account.name, client=request.client_name, nas_ip=request.nas_ip,
                            calling_station_id=request.calling_station_id,
                            timeout=self._timeout(request), login_key=key)
            return push.wait(txn.txid)

        return self._hold(key, account, start, "push", grants)

    def _matching_pushes_for(self, user: str) -> int:
        """Number-matching pushes pending for ``user``: they hold no request."""
        if self.push is None or not self.push.number_matching:
            return 0
        return self.push.count_for(user)

    def _matching_pushes_total(self) -> int:
        if self.push is None or not self.push.number_matching:
            return 0
        return len(self.push)

    def _refuse_new_push(self, account: Account) -> Decision | None:
        """Reject a new push over the user's push rate (push-fatigue guard)."""
        if not self._push_limit.allow(account.name):
            log.warn("push limit reached for {user}: no push sent", user=account.name)
            return Decision.reject(Reason.RATE_LIMITED, MSG_TOO_MANY_PUSHES, factor="push")
        return None

    async def _call(self, request: AuthRequest, account: Account, grants: tuple) -> Decision:
        """Call the user's phone and hold the request until they key an answer."""
        key = self._login_key(request, account)
        timeout = self._timeout(request)

        def start() -> Deferred:
            try:
                d = self.voice.request_approval(account.name, account.phone,
                                                client=request.client_name)
            except SendRefused:
                log.warn("call limit reached for {user}: no call placed", user=account.name)
                raise _Refused(Decision.reject(Reason.RATE_LIMITED, MSG_TOO_MANY_CALLS,
                                               factor="phone")) from None
            d.addTimeout(timeout, self._clock)
            # Once per call, however many copies of the login wait on it.
            d.addCallback(self._report_phone_fraud, account.name, request.client_name)
            return d

        try:
            return await self._hold(key, account, start, "phone", grants)
        except GatewayError as e:
            log.error("could not call {user}: {error}", user=account.name, error=str(e))
            if self._failmode(request) == "safe":
                return Decision.accept(Reason.FAILMODE_SAFE, factor="phone", attributes=grants)
            return Decision.reject(Reason.GATEWAY_FAILED, MSG_TRY_LATER, factor="phone")

    def _report_phone_fraud(self, verdict: Verdict, user: str, client: str):
        if verdict is not Verdict.FRAUD:
            return verdict
        d = Deferred.fromCoroutine(self.report_fraud(user, client, "phone"))
        d.addCallback(lambda _: verdict)
        return d

    async def _hold(self, key: tuple, account: Account, start, factor: str,
                    grants: tuple) -> Decision:
        """Wait for the out-of-band answer of the login ``key``, joining it if pending."""
        try:
            waiter = self.pending.join_or_start(key, account.name, start)
        except _Refused as e:
            return e.decision
        except TooManyPending as e:
            return self._too_many_pending(e, factor, account)
        try:
            verdict = await waiter
        except defer.TimeoutError:
            return Decision.reject(Reason.FACTOR_TIMEOUT, MSG_TIMEOUT, factor=factor)
        except TransactionClosed:
            # Closed under us: the user was blocked meanwhile (fraud), or shutdown.
            return Decision.reject(Reason.FACTOR_DENIED, MSG_DENIED, factor=factor)
        return await self._verdict(verdict, account, factor, grants)

    @staticmethod
    def _too_many_pending(e: TooManyPending, factor: str, account: Account) -> Decision:
        log.warn("too many logins pending ({scope}): refused {factor} for {user}",
                 scope=e.scope, factor=factor, user=account.name)
        message = MSG_TOO_MANY_PENDING if e.scope == "user" else MSG_TRY_LATER
        return Decision.reject(Reason.TOO_MANY_PENDING, message, factor=factor)

    async def _verdict(self, verdict: Verdict, account: Account, factor: str,
                       grants: tuple) -> Decision:
        """The decision for an out-of-band answer. A fraud report was already acted
        on where it arrived (the device API, or the call's own Deferred)."""
        if verdict is Verdict.APPROVE:
            return await self._success(account, factor, grants)
        if verdict is Verdict.FRAUD:
            return Decision.reject(Reason.FRAUD_REPORTED, MSG_FRAUD, factor=factor)
        if verdict is Verdict.NO_ANSWER:
            return Decision.reject(Reason.NO_ANSWER, MSG_NO_ANSWER, factor=factor)
        return Decision.reject(Reason.FACTOR_DENIED, MSG_DENIED, factor=factor)

    async def report_fraud(self, user: str, client: str, factor: str = "push") -> None:
        """The user says a sign-in was not theirs: block them at once, close their
        pending pushes, alert the administrators. Never raises."""
        log.critical("FRAUD reported by {user} for a sign-in to {client} ({factor}):"
                     " user blocked", user=user, client=client or "?", factor=factor)
        try:
            await self.store.block_user(user)
        except Exception:
            log.failure("could not block {user} after a fraud report", user=user)
        if self.push is not None:
            self.push.close_user(user)
        try:
            await self.store.record_audit(AuditEntry(
                time=self._clock.seconds(), user=user, client=client or "", nas_ip=None,
                calling_station_id=None, factor=factor, outcome="block",
                reason=Reason.FRAUD_REPORTED.value))
        except Exception:
            log.failure("could not audit the fraud report of {user}", user=user)
        if self.alerts is not None:
            # Not awaited: a slow mail relay must not hold back the Access-Reject.
            try:
                d = self.alerts.send_alert(
                    f"mfaserver: fraud reported by {user}",
                    f"User {user} reported a sign-in to {client or 'a RADIUS client'} "
                    f"({factor}) as not theirs. The user is blocked until an administrator "
                    f"runs `mfaserver user unblock {user}`. Their password is likely known "
                    "to someone else: have it changed.")
            except Exception as e:
                d = defer.fail(e)
            d.addErrback(lambda f: log.error("could not send the fraud alert for {user}:"
                                             " {error}", user=user,
                                             error=f.getErrorMessage()))

    async def _send_sms(self, request: AuthRequest, account: Account, grants: tuple) -> Decision:
        """Text a code to the user and challenge for it (or fail per [mfa] failmode)."""
        try:
            await self.sms.send(account.name, account.phone)
        except SendRefused:
            log.warn("SMS limit reached for {user}: no code sent", user=account.name)
            return Decision.reject(Reason.RATE_LIMITED, MSG_TOO_MANY_CODES, factor="sms")
        except (GatewayError, defer.TimeoutError) as e:
            log.error("could not text a code to {user}: {error}", user=account.name,
                      error=str(e))
            if self._failmode(request) == "safe":
                return Decision.accept(Reason.FAILMODE_SAFE, factor="sms", attributes=grants)
            return Decision.reject(Reason.GATEWAY_FAILED, MSG_TRY_LATER, factor="sms")
        state = self.challenges.issue(request.client_name, request.username,
                                      {"user": account.name, "attributes": grants})
        return Decision.challenge(
            state, f"Enter the code sent to {mask_phone(account.phone)}.", factor="sms")

    def _grants(self, principal: Principal) -> tuple:
        """Reply attributes for ``principal``: the directory's own, then [[radius.reply]]."""
        grants = list(principal.attributes)
        for rule in self.reply_rules:
            if rule.group in principal.groups:
                grants.extend(rule.attributes)
        return tuple(grants)

    async def _answer_challenge(self, request: AuthRequest) -> Decision:
        pending = self.challenges.redeem(request.state, request.client_name, request.username)
        if pending is None:
            return Decision.reject(Reason.BAD_STATE, MSG_SESSION_EXPIRED)
        account = await self.store.load_account(pending.context["user"])
        refusal = self._refuse_account(account)
        if refusal is not None:
            if "push" in pending.context and self.push is not None:
                self.push.close(pending.context["push"])
            return refusal
        if account is None:
            return Decision.reject(Reason.NOT_ENROLLED, MSG_NOT_ENROLLED)
        answer = request.password.strip()
        grants = pending.context["attributes"]
        if "push" in pending.context:
            return await self._match_number(pending.context["push"], answer, account, grants)
        if "menu" in pending.context:
            method = _menu_choice(answer, pending.context["menu"])
            if method is not None:
                return await self._start_method(method, request, account, grants)
        decision = await self._check_code(account, answer)
        if decision.outcome is Outcome.ACCEPT:
            decision = dataclasses.replace(decision, attributes=pending.context["attributes"])
        return decision

    async def _match_number(self, txid: str, typed: str, account: Account,
                            grants: tuple) -> Decision:
        """The number-matching round: the typed number must be the transaction's, and
        a device must approve it (before or after)."""
        txn = self.push.get(txid) if self.push is not None else None
        if txn is None:
            return Decision.reject(Reason.BAD_STATE, MSG_SESSION_EXPIRED, factor="push")
        if typed.isascii() and typed.isdigit() and len(typed) in CODE_LENGTHS:
            # A code instead of the number: fine, if it is right.
            self.push.close(txid)
            decision = await self._check_code(account, typed)
            if decision.outcome is Outcome.ACCEPT:
                decision = dataclasses.replace(decision, attributes=grants)
            return decision
        if txn.number is None or not hmac.compare_digest(typed.encode(), txn.number.encode()):
            self.push.close(txid)
            return Decision.reject(Reason.WRONG_NUMBER, MSG_WRONG_NUMBER, factor="push")
        try:
            verdict = await self.push.wait(txid)
        except defer.TimeoutError:
            return Decision.reject(Reason.FACTOR_TIMEOUT, MSG_TIMEOUT, factor="push")
        except TransactionClosed:
            return Decision.reject(Reason.FACTOR_DENIED, MSG_DENIED, factor="push")
        return await self._verdict(verdict, account, "push", grants)

    def _refuse_account(self, account: Account | None) -> Decision | None:
        if account is None:
            return None
        if account.blocked:
            return Decision.reject(Reason.USER_BLOCKED, MSG_BLOCKED)
        if account.locked_until is not None and account.locked_until > self._clock.seconds():
            return Decision.reject(Reason.USER_LOCKED, MSG_LOCKED)
        return None

    async def _check_code(self, account: Account, code: str) -> Decision:
        """Check ``code`` against the account's tokens (use recorded atomically), then
        against a code texted to the user; a miss counts towards the lockout."""
        now = self._clock.seconds()
        policy = self.policy
        reused_by = None
        for token in account.tokens:
            if oath.normalize_code(code, token.digits) is None:
                continue
            if token.kind is TokenKind.TOTP:
                step = oath.match_totp(token, code, now, window=policy.totp_window)
                if step is not None:
                    drift = step - oath.totp_step(now, token.period)
                    if await self.store.use_totp_step(token.id, step, drift):
                        return await self._success(account, token.kind.value)
                    reused_by = token  # lost a race with another request using the same code
                elif oath.totp_replayed(token, code, now, window=policy.totp_window):
                    reused_by = token
            else:
                counter = oath.match_hotp(token, code, look_ahead=policy.hotp_look_ahead)
                if counter is not None:
                    if await self.store.use_hotp_counter(token.id, counter):
                        return await self._success(account, token.kind.value)
                    reused_by = token
                elif oath.hotp_replayed(token, code, look_back=policy.hotp_look_ahead):
                    reused_by = token
        if self.sms is not None and self.sms.check(account.name, code.strip()):
            return await self._success(account, "sms")
        if reused_by is not None or account.tokens:
            factor = (reused_by or account.tokens[0]).kind.value
        else:
            factor = "sms"
        _, locked_until = await self.store.register_failure(
            account.name, now=now, threshold=policy.lockout_threshold,
            lock_seconds=policy.lockout_minutes * 60)
        if locked_until is not None and locked_until > now:
            log.warn("user {user} locked after {n} consecutive wrong codes",
                     user=account.name, n=policy.lockout_threshold)
            return Decision.reject(Reason.USER_LOCKED, MSG_LOCKED, factor=factor)
        reason = Reason.CODE_REUSED if reused_by is not None else Reason.BAD_CODE
        return Decision.reject(reason, MSG_WRONG_CODE, factor=factor)

    async def _success(self, account: Account, factor: str, grants: tuple = ()) -> Decision:
        if account.failures:
            await self.store.clear_failures(account.name)
        return Decision.accept(Reason.OK, factor=factor, attributes=grants)

    async def _audit(self, request: AuthRequest, decision: Decision) -> None:
        entry = AuditEntry(
            time=self._clock.seconds(), user=request.username, client=request.client_name,
            nas_ip=request.nas_ip, calling_station_id=request.calling_station_id,
            factor=decision.factor, outcome=decision.outcome.value,
            reason=decision.reason.value)
        log.info("{outcome} {user} from {client}: {reason}", outcome=entry.outcome,
                 user=entry.user, client=entry.client, reason=entry.reason,
                 nas_ip=entry.nas_ip, calling_station_id=entry.calling_station_id,
                 factor=entry.factor, source=request.source, audit=True)
        try:
            await self.store.record_audit(entry)
        except Exception:
            # The decision stands; losing the audit row is logged loudly instead.
            log.failure("could not write the audit row for {user}", user=request.username)
