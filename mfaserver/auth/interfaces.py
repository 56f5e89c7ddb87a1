"""The seams between the core and the outside world, as small Protocols.

The core (`mfaserver.auth.pipeline`) calls only these; `mfaserver.service`
wires real implementations in, tests wire fakes from `mfaserver.testing`.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from mfaserver.auth.model import Account, AuditEntry, Principal, Reason


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


class SeedIntegrityError(Exception):
    """A stored seed failed authentication (tampering, wrong key, moved blob)."""


class Directory(Protocol):
    """Checks a username and password (the first factor)."""

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        """Fire with the `Principal`, or fail with one of the exceptions above."""


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
