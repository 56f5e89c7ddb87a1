"""The core: decide an `AuthRequest` into a `Decision`.

No I/O happens here directly: the directory, the store and the second
factors are reached through the Protocols in `mfaserver.auth.interfaces`,
time through the injected clock. The core names no factor: it knows the
`Method`s it was given (in fallback order) and the factor objects configured
for them. Every decision writes one audit row and one structured log event;
neither ever carries the password, the code or the State.

The flow, for a request without State::

    password field --split--> password [, code or method keyword]
    empty password            -> Reject (no directory call)
    directory.authenticate    -> Reject on a wrong password / unknown user
    account blocked / locked  -> Reject
    pending bypass            -> Accept (consumed)
    password,METHOD           -> start that method (text a code, push, call)
    no usable factor          -> Accept or Reject per [mfa] unenrolled
    code given                -> check it against the code factors -> Accept / Reject
    no code                   -> the challenge menu ([mfa] challenge_menu), or the
                                 user's default method, else the server's, else the
                                 first usable one

Starting a method: a code factor sends a code where it has to and the core
answers with an Access-Challenge for it; an approval factor is held (one
`_hold` path: the request waits, without a thread, for the user's answer);
a confirmed approval (number matching) answers with an Access-Challenge at
once and the user's answer to it is checked with the factor.

For a request with State: redeem the State (bound to client and user, single
use), then take User-Password as the answer to what was asked: a code, a menu
choice, or the confirmation of an approval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.auth.approvals import PendingLogins, TooManyPending
from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import (
    AccountStore, AlertSink, ApprovalFactor, ApprovalWithdrawn, CodeFactor,
    ConfirmedApprovalFactor, DeliveryFailed, Directory, DirectoryUnavailable, FactorRefused,
    InvalidCredentials, MsChapNotConfigured, SeedIntegrityError, StoreUnavailable,
    StoredCodeFactor, UnknownApproval, UnknownUser, WrongConfirmation,
)
from mfaserver.auth.model import (
    Account, AuditEntry, AuthRequest, CodeResult, CodeUse, Decision, Login, Method, Outcome,
    Principal, Reason, Verdict,
)

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
MSG_DENIED = "The sign-in was denied."
MSG_FRAUD = "Fraud reported: your account is now blocked. Contact your administrator."
MSG_TIMEOUT = "No answer in time. Please sign in again."
MSG_NO_ANSWER = "The call was not answered. Please sign in again."
MSG_MSCHAP_NOT_CONFIGURED = "This server is not set up for MS-CHAPv2 sign-ins. Use PAP."
MSG_MSCHAP_NO_APPROVAL = ("Your VPN cannot ask for a code: set up push or phone sign-in,"
                          " or contact your administrator.")
MSG_MSCHAP_NUMBER_MATCHING = ("Push with number matching needs a prompt your VPN cannot show:"
                              " contact your administrator.")
MSG_TOO_MANY_PENDING = "A sign-in is already waiting for your answer. Answer it or wait for it to expire."

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

# A typed answer of this many ASCII digits is taken for a code (OATH, SMS).
CODE_LENGTHS = range(6, 9)

# How each kind of factor is started; computed once per set of factors.
_CODE, _HELD, _CONFIRMED = "code", "held", "confirmed"


class _Audited:
    """A Decision whose audit row the store has written already (with the code use
    that made it: `AccountStore.load_and_use_code`); `_authenticate` only logs it."""

    __slots__ = ("decision",)

    def __init__(self, decision: Decision):
        self.decision = decision


async def _decided(decision: Decision) -> Decision:
    """``decision`` as an awaitable, for the steps that return another step's awaitable."""
    return decision


def _looks_like_code(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) in CODE_LENGTHS


def _menu_choice(answer: str, choices: tuple) -> str | None:
    """The method picked at the menu: its number or its name; None for anything else."""
    answer = answer.lower()
    if answer.isascii() and answer.isdigit() and 1 <= int(answer) <= len(choices):
        return choices[int(answer) - 1]
    return answer if answer in choices else None


def split_password(field: str, delimiter: str,
                   keywords: frozenset[str] = frozenset()) -> tuple[str, str | None]:
    """Split ``password<delimiter>code`` (or ``password<delimiter>KEYWORD``).

    Only a suffix that looks like an OATH or SMS code (6 to 8 ASCII digits)
    or is one of ``keywords`` (the names of the methods that start something:
    ``sms``, ``push``, ``phone``; any case, returned lower-cased) is split
    off, so a password that merely contains the delimiter still works. A
    password ending in ``<delimiter>`` plus such a suffix must be entered with
    a code (or through the challenge) - documented in the README.
    """
    password, sep, suffix = field.rpartition(delimiter)
    if sep and _looks_like_code(suffix):
        return password, suffix
    if sep and suffix.lower() in keywords:
        return password, suffix.lower()
    return field, None


class Authenticator:
    """Turns AuthRequests into Decisions.

    ``methods`` are every second factor mfaserver knows, in the order a
    default the user cannot use falls back through; ``factors`` maps the
    names of the configured ones to their factor objects (`set_factors`
    swaps them on reload). ``policy`` is an `mfaserver.config.MfaConfig` and
    may be replaced on reload, like ``reply_rules`` and ``clients``.
    """

    def __init__(self, directory: Directory, store: AccountStore, challenges: ChallengeRegistry,
                 policy, clock: IReactorTime, *, methods: Sequence[Method] = (),
                 factors: Mapping[str, object] | None = None, reply_rules: tuple = (),
                 alerts: AlertSink | None = None, clients: dict | None = None):
        self.directory = directory
        self.store = store
        self.challenges = challenges
        self.policy = policy
        # `mfaserver.config.ReplyRule`s: group DN -> attributes for the Accept.
        self.reply_rules = reply_rules
        # Where fraud reports go; None: the log only.
        self.alerts = alerts
        # Client name -> ClientConfig, for per-client timeout and failmode.
        self.clients = clients or {}
        self.methods = {method.name: method for method in methods}
        self._keywords = frozenset(method.name for method in methods if method.starts)
        self.pending = PendingLogins(max_per_user=policy.max_pending_per_user,
                                     max_total=policy.max_pending)
        # Confirmed approvals hold no request, so PendingLogins does not see
        # them; they count towards the same limits.
        self.pending.also_for_user = self._confirmed_pending_for
        self.pending.also_total = self._confirmed_pending_total
        self._clock = clock
        self.set_factors(factors or {})

    def set_factors(self, factors: Mapping[str, object]) -> None:
        """Use ``factors`` (method name -> factor) from now on.

        Logins in flight keep the factor objects they started with.
        """
        unknown = set(factors) - set(self.methods)
        if unknown:
            raise ValueError(f"factors for unknown methods: {', '.join(sorted(unknown))}")
        # In method order: code factors are tried in it, and it is the fallback order.
        self.factors = {name: factors[name] for name in self.methods if name in factors}
        self._kinds = {name: _kind(factor) for name, factor in self.factors.items()}
        self._code_factors = [factor for name, factor in self.factors.items()
                              if self._kinds[name] == _CODE]
        # A typed code is tried against the code factors in order; when the first
        # checks codes against the account alone (tokens), the account read, the
        # code's use and the audit row of the Accept take one trip to the store.
        first = self._code_factors[0] if self._code_factors else None
        self._stored_code = first if isinstance(first, StoredCodeFactor) else None
        self._confirmed = [factor for name, factor in self.factors.items()
                           if self._kinds[name] == _CONFIRMED]

    def authenticate(self, request: AuthRequest) -> defer.Deferred[Decision]:
        """Fire with the Decision for ``request`` (always; errors become Reject).

        The audit row is written before the Deferred fires. Cancelling the
        Deferred (shutdown) abandons the request: no decision, no audit row.
        """
        return defer.Deferred.fromCoroutine(self._authenticate(request))

    async def _authenticate(self, request: AuthRequest) -> Decision:
        try:
            decision = await self._decide(request)
            if isinstance(decision, _Audited):
                decision = decision.decision
                self._log_decision(request, self._audit_entry(request, decision))
                return decision
        except defer.CancelledError:
            raise  # shutdown, or the NAS's copy was dropped: no decision, no audit row
        except StoreUnavailable:
            decision = Decision.reject(Reason.STORE_UNAVAILABLE, MSG_TRY_LATER)
        except SeedIntegrityError:
            log.critical("token seed failed its integrity check for user {user}: "
                         "the store was tampered with or the key file is wrong",
                         user=request.username)
            decision = Decision.reject(Reason.SEED_INTEGRITY, MSG_TRY_LATER)
        except Exception:
            log.failure("could not decide a request from {client} for {user}",
                        client=request.client_name, user=request.username)
            decision = Decision.reject(Reason.INTERNAL_ERROR, MSG_TRY_LATER)
        return await self._audit(request, decision)

    def _decide(self, request: AuthRequest) -> Awaitable[Decision]:
        # Not a coroutine itself, nor is _start_method: each hands back the
        # awaitable of the step that decides, so a login held for an approval
        # keeps fewer suspended frames (memory per pending login).
        if request.mschap is not None:
            return self._mschap_round(request)
        if not request.pap:
            log.warn("refused a {protocol} login from {client} for {user}: mfaserver takes"
                     " PAP, or MS-CHAPv2 with an upstream that checks it",
                     protocol=request.protocol, client=request.client_name,
                     user=request.username)
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
        password, code = split_password(request.password, self.policy.delimiter,
                                        self._keywords)
        if not password:
            return Decision.reject(Reason.EMPTY_PASSWORD, MSG_FAILED, factor="password")
        known = await self._known_user(
            request, self.directory.authenticate(request.username, password),
            code=code if code is not None and code not in self._keywords else None)
        if isinstance(known, (Decision, _Audited)):
            return known
        account, grants = known
        methods = self._usable(account)
        if code in self._keywords:
            return await self._start_method(code, request, account, grants)
        if not methods:
            return self._unenrolled(grants)
        if code is not None:
            return _with_grants(await self._check_code(account, code), grants)
        if self.policy.challenge_menu and len(methods) > 1:
            return await self._offer_menu(request, account, grants, methods)
        return await self._start_method(self._preferred(account, methods), request, account,
                                        grants)

    async def _known_user(self, request: AuthRequest, checked: defer.Deferred,
                          code: str | None = None,
                          ) -> Decision | _Audited | tuple[Account | None, tuple]:
        """After the first factor: the Decision when the directory refused, the
        account is blocked or locked, or a bypass lets the user in; else the
        account (None: not in the store) and the reply attributes granted.

        With the ``code`` typed after the password, the account read also tries
        the code (`_plan_code`): a right one comes back as the Accept, audited."""
        try:
            principal = await checked
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
        factor = self._stored_code
        if code is not None and factor is not None:
            now = self._clock.seconds()
            account, used = await self.store.load_and_use_code(
                name, lambda account: self._plan_code(factor, request, account, code, now))
            if used is not None:
                return _Audited(Decision.accept(Reason.OK, factor=used.kind.value,
                                                attributes=grants))
            # Not planned, or the code was used meanwhile: the ordinary path decides.
        else:
            account = await self.store.load_account(name)
        refusal = self._refuse_account(account)
        if refusal is not None:
            return refusal
        now = self._clock.seconds()
        # The account read tells whether a bypass is pending, which saves the
        # store a write on every other login; consuming it is still atomic.
        if (request.bypass and account is not None and account.bypass_until is not None
                and account.bypass_until > now
                and await self.store.consume_bypass(name, now=now)):
            return Decision.accept(Reason.BYPASS, factor="bypass", message=MSG_BYPASS,
                                   attributes=grants)
        return account, grants

    def _plan_code(self, factor: StoredCodeFactor, request: AuthRequest,
                   account: Account | None, code: str,
                   now: float) -> tuple[CodeUse, AuditEntry] | None:
        """On the store's thread (pure): the use of ``code`` that makes this login an
        Accept, as `_check_code` would find it, and the Accept's audit row; None
        for every login the ordinary path must decide (no account, blocked or
        locked, a bypass to consume, no token the code matches)."""
        if (account is None or account.blocked
                or (account.locked_until is not None and account.locked_until > now)
                or (request.bypass and account.bypass_until is not None
                    and account.bypass_until > now)
                or not factor.usable(account)):
            return None
        use = factor.match(account, code, now)
        if use is None:
            return None
        return use, self._audit_entry(
            request, Decision.accept(Reason.OK, factor=use.kind.value), now)

    def _unenrolled(self, grants: tuple) -> Decision:
        """A user with no usable second factor: per [mfa] unenrolled."""
        if self.policy.unenrolled == "allow":
            return Decision.accept(Reason.UNENROLLED_ALLOWED, factor="password",
                                   attributes=grants)
        return Decision.reject(Reason.NOT_ENROLLED, MSG_NOT_ENROLLED, factor="password")

    async def _mschap_round(self, request: AuthRequest) -> Decision:
        """An MS-CHAPv2 login: the directory checks the response first (a wrong
        password is refused without a push), then the login is held for an
        approval factor of ``[mfa] mschap_methods``; only then does the NAS get
        the directory's MS-CHAP2-Success and MPPE keys (in the grants)."""
        check = getattr(self.directory, "authenticate_mschap", None)
        try:
            checked = (defer.fail(MsChapNotConfigured()) if check is None else
                       defer.maybeDeferred(check, request.username, request.mschap.challenge,
                                           request.mschap.response))
            known = await self._known_user(request, checked)
        except MsChapNotConfigured:
            log.warn("refused an MS-CHAPv2 login from {client} for {user}: no directory"
                     " checks MS-CHAPv2 ([directory] backend \"radius\" or"
                     " [directory.ad] mschap)", client=request.client_name,
                     user=request.username)
            return Decision.reject(Reason.MSCHAP_NOT_CONFIGURED, MSG_MSCHAP_NOT_CONFIGURED,
                                   factor="password")
        if isinstance(known, Decision):
            return known
        account, grants = known
        methods = self._usable(account)
        if not methods:
            return self._unenrolled(grants)
        allowed = [name for name in methods if name in self.policy.mschap_methods]
        held = [name for name in allowed if self._kinds[name] == _HELD]
        if not held:
            # Never the password alone: an MS-CHAP NAS cannot prompt for a code,
            # nor for the number a number-matching push shows.
            confirmed = any(self._kinds[name] == _CONFIRMED for name in allowed)
            log.warn("refused an MS-CHAPv2 login of {user} from {client}: no usable"
                     " approval factor among [mfa] mschap_methods ({detail})",
                     user=account.name, client=request.client_name,
                     detail="push has number matching" if confirmed else
                     "only code factors")
            return Decision.reject(Reason.NO_APPROVAL_FACTOR,
                                   MSG_MSCHAP_NUMBER_MATCHING if confirmed
                                   else MSG_MSCHAP_NO_APPROVAL, factor="password")
        name = self._preferred(account, held)
        login = Login(account, request.client_name, request.nas_ip, request.calling_station_id)
        return await self._hold(self.factors[name], request, login, grants)

    # --- choosing and starting a method ---

    def _usable(self, account: Account | None) -> list[str]:
        """The methods ``account`` can use now, in fallback order."""
        if account is None:
            return []
        return [name for name, factor in self.factors.items() if factor.usable(account)]

    def _preferred(self, account: Account, methods: list[str]) -> str:
        """The user's default method, else the server's, else the first one usable."""
        for method in (account.default_method, self.policy.default_method):
            if method in methods:
                return method
        return methods[0]

    def _start_method(self, name: str, request: AuthRequest, account: Account | None,
                      grants: tuple) -> Awaitable[Decision]:
        """Start method ``name`` (named by the user, the menu or the default) for this login."""
        factor = self.factors.get(name)
        if factor is None or account is None or not factor.usable(account):
            method = self.methods[name]
            return _decided(Decision.reject(method.unusable, method.unusable_message,
                                            factor=name))
        login = Login(account, request.client_name, request.nas_ip, request.calling_station_id)
        kind = self._kinds[name]
        if kind == _CODE:
            return self._send_code(factor, request, login, grants)
        if kind == _CONFIRMED:
            return self._open_confirmed(factor, request, login, grants)
        return self._hold(factor, request, login, grants)

    async def _offer_menu(self, request: AuthRequest, account: Account, grants: tuple,
                          methods: list[str]) -> Decision:
        """An Access-Challenge that lists the methods to start, and the codes to type."""
        choices = [name for name in methods if self.methods[name].starts]
        typed = [self.methods[name].label for name in methods if not self.methods[name].starts]
        numbered = ", ".join(f"{i} for {self.methods[name].label}"
                             for i, name in enumerate(choices, 1))
        text = f"Enter {numbered}"
        text += f", or {' or '.join(typed)}." if typed else "."
        return await self._challenge(request, {"user": account.name, "attributes": grants,
                                               "menu": tuple(choices)}, text, "password")

    async def _challenge(self, request: AuthRequest, context: dict, text: str,
                         factor: str) -> Decision:
        """An Access-Challenge with a new State standing for ``context`` (plain values
        only: a cluster keeps it in the database), bound to the name as typed (the
        NAS sends it again with the State)."""
        state = await defer.maybeDeferred(self.challenges.issue, request.client_name,
                                          request.username, context)
        return Decision.challenge(state, text, factor=factor)

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

    async def _send_code(self, factor: CodeFactor, request: AuthRequest, login: Login,
                         grants: tuple) -> Decision:
        """Get a code to the user (if the factor sends one), then challenge for it."""
        name = factor.method.name
        try:
            prompt = await factor.send(login)
        except FactorRefused as e:
            return Decision.reject(e.reason, e.message, factor=name)
        except DeliveryFailed as e:
            return self._undelivered(request, login, name, e, grants)
        if prompt is None and not self.policy.challenge:
            return Decision.reject(
                Reason.CODE_MISSING,
                f"Enter your password followed by '{self.policy.delimiter}' and your code.",
                factor="password")
        # The canonical name and the grants ride along.
        context = {"user": login.user, "attributes": grants}
        if prompt is None:
            return await self._challenge(request, context, MSG_ENTER_CODE, "password")
        return await self._challenge(request, context, prompt, name)

    def _undelivered(self, request: AuthRequest, login: Login, name: str, error: Exception,
                     grants: tuple) -> Decision:
        """The factor could not reach the user: accept or reject per [mfa] failmode."""
        log.error("could not reach {user} by {method}: {error}", user=login.user,
                  method=name, error=str(error))
        if self._failmode(request) == "safe":
            return Decision.accept(Reason.FAILMODE_SAFE, factor=name, attributes=grants)
        return Decision.reject(Reason.GATEWAY_FAILED, MSG_TRY_LATER, factor=name)

    async def _hold(self, factor: ApprovalFactor, request: AuthRequest, login: Login,
                    grants: tuple) -> Decision:
        """Hold the request until the user answers the approval, joining the same
        login's approval if one is pending (one push or call per login)."""
        name = factor.method.name
        timeout = self._timeout(request)
        try:
            waiter = self.pending.join_or_start(
                login.key, login.user, lambda: factor.request_approval(login, timeout))
        except FactorRefused as e:
            return Decision.reject(e.reason, e.message, factor=name)
        except TooManyPending as e:
            return self._too_many_pending(e, name, login.user)
        try:
            verdict = await waiter
        except FactorRefused as e:
            # A cluster's factor opens in the database, so refuses later.
            return Decision.reject(e.reason, e.message, factor=name)
        except TooManyPending as e:
            return self._too_many_pending(e, name, login.user)
        except defer.TimeoutError:
            return Decision.reject(Reason.FACTOR_TIMEOUT, MSG_TIMEOUT, factor=name)
        except ApprovalWithdrawn:
            # Closed under us: the user was blocked meanwhile (fraud), or shutdown.
            return Decision.reject(Reason.FACTOR_DENIED, MSG_DENIED, factor=name)
        except DeliveryFailed as e:
            return self._undelivered(request, login, name, e, grants)
        return await self._verdict(verdict, login.account, name, grants)

    async def _open_confirmed(self, factor: ConfirmedApprovalFactor, request: AuthRequest,
                              login: Login, grants: tuple) -> Decision:
        """Start (or join) an approval the user also confirms at the NAS, and
        challenge for the confirmation."""
        name = factor.method.name
        # A cluster's factor answers from the database (Deferreds); one node's at once.
        ticket = await defer.maybeDeferred(factor.find, login.key)
        if ticket is None:
            try:
                self.pending.check_room(login.user)
                ticket = await defer.maybeDeferred(factor.open, login, self._timeout(request))
            except TooManyPending as e:
                return self._too_many_pending(e, name, login.user)
            except FactorRefused as e:
                return Decision.reject(e.reason, e.message, factor=name)
        # The method's name, not the factor object: the State may be answered on
        # another node. A reload keeps the registry behind the factor, so the
        # ticket is still known to the new one.
        return await self._challenge(request, {"user": login.user, "attributes": grants,
                                               "confirm": (name, ticket)},
                                     factor.prompt, name)

    async def _confirm(self, factor: ConfirmedApprovalFactor, ticket: str, typed: str,
                       account: Account, grants: tuple) -> Decision:
        """The user's answer to a confirmed approval's challenge: the confirmation
        must be right, and a device must approve (before or after)."""
        name = factor.method.name
        if not await defer.maybeDeferred(factor.known, ticket):
            return Decision.reject(Reason.BAD_STATE, MSG_SESSION_EXPIRED, factor=name)
        if _looks_like_code(typed):
            # A code instead of the confirmation: fine, if it is right.
            self._withdraw(factor, ticket)
            return _with_grants(await self._check_code(account, typed), grants)
        try:
            verdict = await factor.confirm(ticket, typed)
        except UnknownApproval:
            return Decision.reject(Reason.BAD_STATE, MSG_SESSION_EXPIRED, factor=name)
        except WrongConfirmation as e:
            return Decision.reject(e.reason, e.message, factor=name)
        except defer.TimeoutError:
            return Decision.reject(Reason.FACTOR_TIMEOUT, MSG_TIMEOUT, factor=name)
        except ApprovalWithdrawn:
            return Decision.reject(Reason.FACTOR_DENIED, MSG_DENIED, factor=name)
        return await self._verdict(verdict, account, name, grants)

    @staticmethod
    def _withdraw(factor: ConfirmedApprovalFactor, ticket: str) -> None:
        """Close a confirmed approval; not waited for (a cluster's closes in the database)."""
        d = defer.maybeDeferred(factor.withdraw, ticket)
        d.addErrback(lambda f: log.error("could not close approval {ticket}: {error}",
                                         ticket=ticket, error=f.getErrorMessage()))

    def _confirmed_pending_for(self, user: str) -> int:
        return sum(factor.pending_count(user) for factor in self._confirmed)

    def _confirmed_pending_total(self) -> int:
        return sum(factor.pending_count() for factor in self._confirmed)

    @staticmethod
    def _too_many_pending(e: TooManyPending, factor: str, user: str) -> Decision:
        log.warn("too many logins pending ({scope}): refused {factor} for {user}",
                 scope=e.scope, factor=factor, user=user)
        message = MSG_TOO_MANY_PENDING if e.scope == "user" else MSG_TRY_LATER
        return Decision.reject(Reason.TOO_MANY_PENDING, message, factor=factor)

    async def _verdict(self, verdict: Verdict, account: Account, factor: str,
                       grants: tuple) -> Decision:
        """The decision for an out-of-band answer. A fraud report is acted on where
        it arrives (the device API, the call's factor), not here."""
        if verdict is Verdict.APPROVE:
            return await self._success(account, factor, grants)
        if verdict is Verdict.FRAUD:
            return Decision.reject(Reason.FRAUD_REPORTED, MSG_FRAUD, factor=factor)
        if verdict is Verdict.NO_ANSWER:
            return Decision.reject(Reason.NO_ANSWER, MSG_NO_ANSWER, factor=factor)
        return Decision.reject(Reason.FACTOR_DENIED, MSG_DENIED, factor=factor)

    async def report_fraud(self, user: str, client: str, factor: str) -> None:
        """The user says a sign-in was not theirs: block them at once, close their
        pending approvals, alert the administrators. Never raises."""
        log.critical("FRAUD reported by {user} for a sign-in to {client} ({factor}):"
                     " user blocked", user=user, client=client or "?", factor=factor)
        try:
            await self.store.block_user(user)
        except Exception:
            log.failure("could not block {user} after a fraud report", user=user)
        for name, other in self.factors.items():
            if self._kinds[name] != _CODE:
                try:
                    other.withdraw_user(user)
                except Exception:
                    log.failure("could not close the {method} approvals of {user}",
                                method=name, user=user)
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

    def _grants(self, principal: Principal) -> tuple:
        """Reply attributes for ``principal``: the directory's own, then [[radius.reply]]."""
        grants = list(principal.attributes)
        for rule in self.reply_rules:
            if rule.group in principal.groups:
                grants.extend(rule.attributes)
        return tuple(grants)

    async def _answer_challenge(self, request: AuthRequest) -> Decision:
        pending = await defer.maybeDeferred(self.challenges.redeem, request.state,
                                            request.client_name, request.username)
        if pending is None:
            return Decision.reject(Reason.BAD_STATE, MSG_SESSION_EXPIRED)
        context = pending.context
        confirming = None
        if "confirm" in context:
            name, ticket = context["confirm"]
            factor = self.factors.get(name)
            if self._kinds.get(name) != _CONFIRMED:
                # Number matching was switched off by a reload meanwhile.
                return Decision.reject(Reason.BAD_STATE, MSG_SESSION_EXPIRED, factor=name)
            confirming = factor, ticket
        account = await self.store.load_account(context["user"])
        refusal = self._refuse_account(account)
        if refusal is not None:
            if confirming is not None:
                self._withdraw(*confirming)
            return refusal
        if account is None:
            return Decision.reject(Reason.NOT_ENROLLED, MSG_NOT_ENROLLED)
        answer = request.password.strip()
        grants = context["attributes"]
        if confirming is not None:
            factor, ticket = confirming
            return await self._confirm(factor, ticket, answer, account, grants)
        if "menu" in context:
            method = _menu_choice(answer, context["menu"])
            if method is not None:
                return await self._start_method(method, request, account, grants)
        return _with_grants(await self._check_code(account, answer), grants)

    def _refuse_account(self, account: Account | None) -> Decision | None:
        if account is None:
            return None
        if account.blocked:
            return Decision.reject(Reason.USER_BLOCKED, MSG_BLOCKED)
        if account.locked_until is not None and account.locked_until > self._clock.seconds():
            return Decision.reject(Reason.USER_LOCKED, MSG_LOCKED)
        return None

    async def _check_code(self, account: Account, code: str) -> Decision:
        """Check ``code`` against each code factor in turn (a use is recorded
        atomically by the factor); a miss counts towards the lockout."""
        replayed = missed = None
        for factor in self._code_factors:
            found = await factor.check(account, code)
            if found is None:
                continue
            if found.result is CodeResult.ACCEPTED:
                return await self._success(account, found.factor)
            if found.result is CodeResult.REPLAYED:
                replayed = replayed or found
            else:
                missed = missed or found
        factor = (replayed or missed).factor if (replayed or missed) else ""
        policy = self.policy
        now = self._clock.seconds()
        _, locked_until = await self.store.register_failure(
            account.name, now=now, threshold=policy.lockout_threshold,
            lock_seconds=policy.lockout_minutes * 60)
        if locked_until is not None and locked_until > now:
            log.warn("user {user} locked after {n} consecutive wrong codes",
                     user=account.name, n=policy.lockout_threshold)
            return Decision.reject(Reason.USER_LOCKED, MSG_LOCKED, factor=factor)
        reason = Reason.CODE_REUSED if replayed is not None else Reason.BAD_CODE
        return Decision.reject(reason, MSG_WRONG_CODE, factor=factor)

    async def _success(self, account: Account, factor: str, grants: tuple = ()) -> Decision:
        if account.failures:
            await self.store.clear_failures(account.name)
        return Decision.accept(Reason.OK, factor=factor, attributes=grants)

    def _audit_entry(self, request: AuthRequest, decision: Decision,
                     now: float | None = None) -> AuditEntry:
        return AuditEntry(
            time=self._clock.seconds() if now is None else now, user=request.username,
            client=request.client_name, nas_ip=request.nas_ip,
            calling_station_id=request.calling_station_id, factor=decision.factor,
            outcome=decision.outcome.value, reason=decision.reason.value)

    @staticmethod
    def _log_decision(request: AuthRequest, entry: AuditEntry) -> None:
        log.info("{outcome} {user} from {client}: {reason}", outcome=entry.outcome,
                 user=entry.user, client=entry.client, reason=entry.reason,
                 nas_ip=entry.nas_ip, calling_station_id=entry.calling_station_id,
                 factor=entry.factor, source=request.source, audit=True)

    async def _audit(self, request: AuthRequest, decision: Decision) -> Decision:
        """Commit ``decision``'s audit row, then log it; the decision to send.

        An Accept whose row cannot be committed because the store is out of
        reach becomes a Reject ("try later"): nobody gets in unaudited, and a
        node that lost its database fails closed. Otherwise a lost row is
        logged loudly and the decision stands."""
        entry = self._audit_entry(request, decision)
        try:
            await self.store.record_audit(entry)
        except StoreUnavailable:
            log.error("audit row of a {outcome} for {user} not written: the store is out "
                      "of reach", outcome=entry.outcome, user=entry.user)
            if decision.outcome is Outcome.ACCEPT:
                decision = Decision.reject(Reason.STORE_UNAVAILABLE, MSG_TRY_LATER,
                                           factor=decision.factor)
                entry = self._audit_entry(request, decision)
        except Exception:
            log.failure("could not write the audit row for {user}", user=request.username)
        self._log_decision(request, entry)
        return decision


def _with_grants(decision: Decision, grants: tuple) -> Decision:
    """An Accept carries the login's reply attributes."""
    if decision.outcome is Outcome.ACCEPT:
        return dataclasses.replace(decision, attributes=grants)
    return decision


def _kind(factor) -> str:
    """Which of the three factor Protocols ``factor`` implements."""
    if isinstance(factor, CodeFactor):
        return _CODE
    if isinstance(factor, ConfirmedApprovalFactor):
        return _CONFIRMED
    if isinstance(factor, ApprovalFactor):
        return _HELD
    raise TypeError(f"{factor!r} is not a CodeFactor, ApprovalFactor or ConfirmedApprovalFactor")
