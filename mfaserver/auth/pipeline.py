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

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import (
    AccountStore, Directory, DirectoryUnavailable, InvalidCredentials, UnknownUser,
)
from mfaserver.auth.model import (
    Account, AuditEntry, AuthRequest, Decision, Outcome, Principal, Reason, TokenKind,
)
from mfaserver.factors import oath
from mfaserver.factors.sms import SendRefused, SmsCodes, mask_phone
from mfaserver.gateways.base import GatewayError
from mfaserver.store.crypto import SeedIntegrityError

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


METHOD_KEYWORDS = ("sms",)


def split_password(field: str, delimiter: str) -> tuple[str, str | None]:
    """Split ``password<delimiter>code`` (or ``password<delimiter>sms``) into its parts.

    Only a suffix that looks like an OATH or SMS code (6 to 8 ASCII digits)
    or names a method (``sms``, any case; returned lower-cased) is split off,
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
                 policy, clock: IReactorTime, reply_rules: tuple = (), sms: SmsCodes | None = None):
        self.directory = directory
        self.store = store
        self.challenges = challenges
        self.policy = policy
        # `mfaserver.config.ReplyRule`s: group DN -> attributes for the Accept.
        self.reply_rules = reply_rules
        self.sms = sms  # None: no [sms] configured
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

    async def _decide(self, request: AuthRequest) -> Decision:
        if not request.pap:
            return Decision.reject(Reason.NOT_PAP, MSG_PAP_REQUIRED, factor="password")
        if request.password is None:
            # User-Password did not decode as UTF-8: almost always a wrong shared secret.
            log.warn("password from client {client} is not valid UTF-8: "
                     "check that the shared secrets match", client=request.client_name)
            return Decision.reject(Reason.PASSWORD_UNDECODABLE, MSG_FAILED, factor="password")
        if request.state is not None:
            return await self._answer_challenge(request)
        return await self._first_round(request)

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
        sms_ready = self.sms is not None and account is not None and bool(account.phone)
        if code == "sms":
            if not sms_ready:
                return Decision.reject(Reason.NO_PHONE, MSG_NO_PHONE, factor="sms")
            return await self._send_sms(request, account, grants)
        if account is None or not (account.tokens or sms_ready):
            if self.policy.unenrolled == "allow":
                return Decision.accept(Reason.UNENROLLED_ALLOWED, factor="password",
                                       attributes=grants)
            return Decision.reject(Reason.NOT_ENROLLED, MSG_NOT_ENROLLED, factor="password")
        if code is not None:
            decision = await self._check_code(account, code)
            if decision.outcome is Outcome.ACCEPT:
                decision = dataclasses.replace(decision, attributes=grants)
            return decision
        if not account.tokens:
            # Enrolled by phone only: a bare password asks for a texted code.
            return await self._send_sms(request, account, grants)
        if self.policy.challenge:
            # Bound to the name as typed (the NAS sends it again with the
            # State); the canonical name and the grants ride along.
            state = self.challenges.issue(request.client_name, request.username,
                                          {"user": name, "attributes": grants})
            return Decision.challenge(state, MSG_ENTER_CODE, factor="password")
        return Decision.reject(
            Reason.CODE_MISSING,
            f"Enter your password followed by '{self.policy.delimiter}' and your code.",
            factor="password")

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
            if self.policy.failmode == "safe":
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
            return refusal
        if account is None:
            return Decision.reject(Reason.NOT_ENROLLED, MSG_NOT_ENROLLED)
        decision = await self._check_code(account, request.password.strip())
        if decision.outcome is Outcome.ACCEPT:
            decision = dataclasses.replace(decision, attributes=pending.context["attributes"])
        return decision

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

    async def _success(self, account: Account, factor: str) -> Decision:
        if account.failures:
            await self.store.clear_failures(account.name)
        return Decision.accept(Reason.OK, factor=factor)

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
