"""The seams between the core and the outside world, as small Protocols.

The core (`mfaserver.auth.pipeline`) calls only these; `mfaserver.service`
wires real implementations in, tests wire fakes from `mfaserver.testing`.

The first factor is a `Directory`; the MFA state lives in an `AccountStore`.
A second factor is one object behind one of three Protocols:

* `CodeFactor`: the user types a code (an app or token, a texted code);
* `ApprovalFactor`: the user approves out of band (push, phone call) while
  the core holds the RADIUS request open;
* `ConfirmedApprovalFactor`: the user approves out of band and also types
  at the NAS what the device shows (push with number matching): the core
  answers with an Access-Challenge at once and holds nothing.

Each has a `Method` (its name, menu label, and what the user reads when it
cannot be used). Expected refusals are exceptions defined here, so that the
core never imports the factors, the gateways or the store.
"""

from __future__ import annotations

from typing import Callable, Hashable, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

from mfaserver.auth.model import (Account, AuditEntry, CodeCheck, CodeUse, Login, Method,
                                  Principal, Reason, Verdict)


class InvalidCredentials(Exception):
    """The directory refuses the user (final): a wrong password by default, or
    a more precise ``reason`` (expired password, disabled account, not in the
    required group...) that the audit log records and the core may tell the
    user about."""

    def __init__(self, reason: Reason = Reason.BAD_PASSWORD, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail  # for the log: never a password


class UnknownUser(Exception):
    """The directory does not know the user (a chain may try the next one)."""


class DirectoryUnavailable(Exception):
    """The directory could not answer (down, timed out): fail closed."""


class StoreUnavailable(Exception):
    """The store's database cannot be reached (down, failing over): fail closed.

    The store reports the outage once; logins that need the store are
    rejected with "try later" meanwhile, without a traceback each."""


class MsChapNotConfigured(Exception):
    """No directory here can check an MS-CHAPv2 response."""


class SeedIntegrityError(Exception):
    """A stored seed failed authentication (tampering, wrong key, moved blob)."""


class Directory(Protocol):
    """Checks a username and password (the first factor)."""

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        """Fire with the `Principal`, or fail with one of the exceptions above."""


class MsChapDirectory(Protocol):
    """Checks MS-CHAPv2 credentials (an upstream NPS or FreeRADIUS, ntlm_auth).

    Fires with the `Principal`; its ``attributes`` carry the reply items the
    NAS needs (`mfaserver.auth.model.MSCHAP_REPLY_ITEMS`: MS-CHAP2-Success,
    the MPPE keys in the clear as `Secret`), which the core passes on
    untouched. Fails like `Directory.authenticate`, or with
    `MsChapNotConfigured`.
    """

    def authenticate_mschap(self, username: str, challenge: bytes,
                            response: bytes) -> Deferred[Principal]: ...


class AccountStore(Protocol):
    """The MFA state of users, as the login path needs it.

    Each method is one atomic operation on the store; see
    `mfaserver.store.db.Store` for the semantics. Every Deferred may fail
    with `SeedIntegrityError` or a database error.
    """

    def load_account(self, name: str) -> Deferred[Account | None]: ...

    def use_totp_step(self, token_id: int, step: int, drift: int) -> Deferred[bool]: ...

    def use_hotp_counter(self, token_id: int, matched_counter: int) -> Deferred[bool]: ...

    def register_failure(self, name: str, *, now: float, threshold: int,
                         lock_seconds: float) -> Deferred[tuple[int, float | None]]: ...

    def clear_failures(self, name: str) -> Deferred[None]: ...

    def consume_bypass(self, name: str, *, now: float) -> Deferred[bool]: ...

    def block_user(self, name: str) -> Deferred[None]: ...

    def record_audit(self, entry: AuditEntry) -> Deferred[None]: ...

    def load_and_use_code(
        self, name: str, plan: Callable[[Account | None], tuple[CodeUse, AuditEntry] | None],
    ) -> Deferred[tuple[Account | None, CodeUse | None]]:
        """A login with a typed code in one trip to the store: load the account, ask
        ``plan`` (pure: it runs where the store does, on its thread) for the code use
        it makes an Accept of and that Accept's audit row; record the use (the replay
        guard, atomic as ever), clear the failures and append the row in one
        transaction. Fires with the account as loaded and the use if it was
        recorded (None: nothing was planned, or another login used the code first,
        and nothing was written)."""


class AlertSink(Protocol):
    """Where alerts for the administrators go (fraud reports)."""

    def send_alert(self, subject: str, text: str) -> Deferred[None]:
        """Fire with None once the alert is handed on; fail if it cannot be."""


# --- Second factors -------------------------------------------------------------------------

class FactorRefused(Exception):
    """The factor will not start for this login and sent nothing (over a send limit).

    ``reason`` goes to the audit log, ``message`` to the user.
    """

    def __init__(self, reason: Reason, message: str):
        super().__init__(reason.value)
        self.reason = reason
        self.message = message


class DeliveryFailed(Exception):
    """The factor could not reach the user: the gateway refused, failed or timed out.

    ``[mfa] failmode`` decides the login. The text is for the log (no secrets).
    """


class ApprovalWithdrawn(Exception):
    """An approval was closed from our side before an answer: the user was blocked
    meanwhile (a fraud report), or the daemon is stopping."""


class UnknownApproval(Exception):
    """No approval has this ticket (never opened, or forgotten long ago)."""


class WrongConfirmation(Exception):
    """The user typed something other than what the device shows; the approval is
    closed. ``reason`` goes to the audit log, ``message`` to the user."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(reason.value)
        self.reason = reason
        self.message = message


@runtime_checkable
class CodeFactor(Protocol):
    """A second factor the user answers by typing a code (TOTP/HOTP, SMS)."""

    method: Method

    def usable(self, account: Account) -> bool:
        """Whether ``account`` can use this factor now (has a token, a phone...)."""

    def send(self, login: Login) -> Deferred[str | None]:
        """Get a code to the user where this factor has to (SMS).

        Fires with the prompt that asks for the code just sent, or with None
        when the user holds the code already (an app or token). Raises or
        fails with `FactorRefused` (nothing sent) or `DeliveryFailed`.
        """

    def check(self, account: Account, code: str) -> Deferred[CodeCheck | None]:
        """Check a typed ``code``; an accepted code is used up atomically (replay guard).

        Fires with None when the account has nothing of this factor to check
        against (no token), or WRONG; a code is never accepted for an account
        that cannot use the factor. Never fails for odd input.
        """


@runtime_checkable
class StoredCodeFactor(CodeFactor, Protocol):
    """A `CodeFactor` whose codes are checked against the account alone (the user's
    TOTP and HOTP tokens): the core may then match the code where the store runs
    and record it in the same trip as the account read (`AccountStore.load_and_use_code`)."""

    def match(self, account: Account, code: str, now: float) -> CodeUse | None:
        """The use ``check`` would try to record first for ``code`` at ``now``, or None.
        Pure: no I/O, safe on any thread."""


@runtime_checkable
class ApprovalFactor(Protocol):
    """A second factor the user answers out of band while the login is held."""

    method: Method

    def usable(self, account: Account) -> bool:
        """Whether ``account`` can use this factor now (has a device, a phone...)."""

    def request_approval(self, login: Login, timeout: float) -> Deferred[Verdict]:
        """Ask the user to approve ``login``.

        Fires with the user's `Verdict`; fails with `defer.TimeoutError` when
        nobody answered within ``timeout`` seconds (the factor owns the
        deadline: a push shows it to the device), `ApprovalWithdrawn`, or
        `DeliveryFailed`. Raises `FactorRefused` (nothing sent). A fraud
        answer is reported where it arrives (`Authenticator.report_fraud`);
        the core only rejects. Cancelling the Deferred withdraws the request.
        """

    def withdraw_user(self, user: str) -> None:
        """Close every pending approval of ``user`` (blocked after a fraud report)."""


@runtime_checkable
class ConfirmedApprovalFactor(Protocol):
    """An approval that the user also confirms at the NAS (number matching).

    The login is not held: `open` starts the approval and the core answers
    with an Access-Challenge showing ``prompt``; the user's answer goes to
    `confirm`. The factor keeps its approvals (and their outcome, for a while)
    under a ticket, and counts them towards the pending-login limits.
    """

    method: Method
    prompt: str

    def usable(self, account: Account) -> bool:
        """Whether ``account`` can use this factor now."""

    def find(self, login_key: Hashable) -> str | None:
        """The ticket of the approval pending for this login, to join it."""

    def open(self, login: Login, timeout: float) -> str:
        """Start an approval expiring in ``timeout`` seconds; return its ticket.

        Raises `FactorRefused` (nothing sent).
        """

    def known(self, ticket: str) -> bool:
        """Whether ``ticket`` is pending, or ended recently enough to be remembered."""

    def confirm(self, ticket: str, typed: str) -> Deferred[Verdict]:
        """The user typed ``typed`` at the NAS: fire with the device's `Verdict`.

        Raises `UnknownApproval`, or `WrongConfirmation` (the approval is
        closed). The Deferred fails with `defer.TimeoutError` when the
        approval expired unanswered, `ApprovalWithdrawn` when it was closed.
        """

    def withdraw(self, ticket: str) -> None:
        """Close the approval: the login went another way (a code, a refusal)."""

    def withdraw_user(self, user: str) -> None:
        """Close every pending approval of ``user`` (blocked after a fraud report)."""

    def pending_count(self, user: str | None = None) -> int:
        """Approvals pending, of ``user`` or in all."""
