"""The store as the daemon uses it: every call on one dedicated database thread.

SQLite calls are short but blocking, and two writers must not interleave
inside one connection, so the daemon funnels them through a one-thread pool.
``run(f, *args, **kwargs)`` runs ``f`` there and fires with its result; tests
pass a runner that calls ``f`` at once.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred

from mfaserver.auth.model import Account, AuditEntry


class ThreadedStore:
    """`AccountStore` (and the local directory's password lookup) over a `Store`."""

    def __init__(self, store, run: Callable[..., Deferred]):
        self._store = store
        self._run = run

    def lookup_password(self, name: str) -> Deferred[tuple[str | None, str | None] | None]:
        return self._run(self._store.get_password, name)

    def load_account(self, name: str) -> Deferred[Account | None]:
        return self._run(self._store.load_account, name)

    def use_totp_step(self, token_id: int, step: int, drift: int) -> Deferred[bool]:
        return self._run(self._store.use_totp_step, token_id, step, drift)

    def use_hotp_counter(self, token_id: int, matched_counter: int) -> Deferred[bool]:
        return self._run(self._store.use_hotp_counter, token_id, matched_counter)

    def register_failure(self, name: str, *, now: float, threshold: int,
                         lock_seconds: float) -> Deferred[tuple[int, float | None]]:
        return self._run(self._store.register_failure, name, now=now, threshold=threshold,
                         lock_seconds=lock_seconds)

    def clear_failures(self, name: str) -> Deferred[None]:
        return self._run(self._store.clear_failures, name)

    def consume_bypass(self, name: str, *, now: float) -> Deferred[bool]:
        return self._run(self._store.consume_bypass, name, now=now)

    def record_audit(self, entry: AuditEntry) -> Deferred[None]:
        return self._run(self._store.record_audit, entry)
