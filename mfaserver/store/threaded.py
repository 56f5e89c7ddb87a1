"""The store as the daemon uses it: every call on one dedicated database thread.

SQLite calls are short but blocking, and two writers must not interleave
inside one connection, so the daemon funnels them through a one-thread pool.
``run(f, *args, **kwargs)`` runs ``f`` there and fires with its result; tests
pass a runner that calls ``f`` at once.
"""

from __future__ import annotations

import threading
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from mfaserver.auth.model import Account, AuditEntry, CodeUse, Device


MAX_CACHED_DEVICES = 100_000


class ThreadedStore:
    """`AccountStore` (and the local directory's password lookup) over a `Store`."""

    def __init__(self, store, run: Callable[..., Deferred]):
        self._store = store
        self._run = run
        self._audit_lock = threading.Lock()
        self._devices: dict[str, Device] = {}
        self._data_version: int | None = None
        self._audit_queue: list[tuple[AuditEntry, Deferred]] = []

    def lookup_password(self, name: str) -> Deferred[tuple[str | None, str | None] | None]:
        return self._run(self._store.get_password, name)

    def load_account(self, name: str) -> Deferred[Account | None]:
        return self._run(self._store.load_account, name)

    def load_and_use_code(
        self, name: str, plan: Callable[[Account | None], tuple[CodeUse, AuditEntry] | None],
    ) -> Deferred[tuple[Account | None, CodeUse | None]]:
        """One database thread call for a login with a code (`AccountStore`): each
        hop costs more CPU than the SQL it carries, and adds its wake-ups."""
        return self._run(self._load_and_use_code, name, plan)

    def _load_and_use_code(self, name, plan):
        # On the database thread.
        account = self._store.load_account(name)
        planned = plan(account)
        if planned is None:
            return account, None
        use, entry = planned
        used = self._store.use_code_and_audit(
            use, entry, clear_failures_of=account.name if account.failures else None)
        return account, (use if used else None)

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

    def block_user(self, name: str) -> Deferred[None]:
        return self._run(self._store.set_blocked, name, True)

    def get_device(self, device_id: str) -> Deferred[Device | None]:
        """The device, from memory when it was read since the last outside change.

        Every device answer and poll needs its device; the database thread hop
        costs more than the rest of a poll. Admin commands write from other
        processes, so `check_outside_changes` (run every second by the daemon)
        empties the cache when the file was changed by anyone else: a deleted
        device is refused within a second.
        """
        device = self._devices.get(device_id)
        if device is not None:
            return succeed(device)
        d = self._run(self._store.get_device, device_id)
        d.addCallback(self._cache_device)
        return d

    def _cache_device(self, device: Device | None) -> Device | None:
        if device is not None:
            if len(self._devices) >= MAX_CACHED_DEVICES:
                self._devices.clear()
            self._devices[device.id] = device
        return device

    def check_outside_changes(self) -> Deferred[None]:
        """Forget cached devices if another process changed the database."""
        d = self._run(self._store.data_version)

        def compare(version: int) -> None:
            if version != self._data_version:
                self._data_version = version
                self._devices.clear()
        d.addCallback(compare)
        return d

    def run(self, f: Callable[..., object], *args, **kwargs) -> Deferred:
        """Run ``f(store, *args, **kwargs)`` on the database thread; fire with its result.

        For the rarer operations (the portal's). As one of them may delete or
        change a device, the device cache is emptied when it returns.
        """
        d = self._run(f, self._store, *args, **kwargs)
        d.addBoth(self._forget_devices)
        return d

    def read(self, f: Callable[..., object], *args, **kwargs) -> Deferred:
        """Like `run`, for an ``f`` that only reads: the device cache stays.

        Pages anyone may ask for (an enrollment link's page, the portal's)
        read through here, so they cannot make every device poll go to the
        database thread.
        """
        return self._run(f, self._store, *args, **kwargs)

    def _forget_devices(self, result):
        self._devices.clear()
        return result

    def list_devices(self, user: str) -> Deferred[list[Device]]:
        return self._run(self._store.list_devices, user)

    def enroll_device(self, digest: str, device: Device, *, now: float) -> Deferred[str]:
        return self._run(self._store.enroll_device, digest, device, now=now)

    def get_pin_hash(self, name: str) -> Deferred[str | None]:
        return self._run(self._store.get_pin_hash, name)

    def record_audit(self, entry: AuditEntry) -> Deferred[None]:
        """Fires once the row is committed. Rows that arrive while the database
        thread is busy are committed together (one transaction, one thread
        hop), so a busy daemon spends less per decision on its audit log."""
        d = Deferred()
        with self._audit_lock:
            self._audit_queue.append((entry, d))
            start = len(self._audit_queue) == 1
        if start:
            self._run(self._write_audit_batch).addBoth(self._audit_written)
        return d

    def _write_audit_batch(self) -> list[Deferred]:
        # On the database thread: take everything queued so far.
        with self._audit_lock:
            batch, self._audit_queue = self._audit_queue, []
        try:
            self._store.record_audits([entry for entry, _ in batch])
        except Exception:
            return [(d, Failure()) for _, d in batch]
        return [(d, None) for _, d in batch]

    def _audit_written(self, results) -> None:
        if isinstance(results, Failure):
            # The runner itself failed (not the store): fail what is queued now.
            with self._audit_lock:
                batch, self._audit_queue = self._audit_queue, []
            results = [(d, results) for _, d in batch]
        for d, failure in results:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)
