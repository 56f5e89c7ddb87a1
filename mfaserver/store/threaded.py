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
from twisted.logger import Logger
from twisted.python.failure import Failure

from mfaserver.auth.interfaces import StoreUnavailable
from mfaserver.auth.model import Account, AuditEntry, CodeUse, Device

log = Logger(namespace="mfaserver.store")


MAX_CACHED_DEVICES = 100_000


class ThreadedStore:
    """`AccountStore` (and the local directory's password lookup) over a `Store`."""

    def __init__(self, store, run: Callable[..., Deferred], *, logins=None):
        self._store = store
        self._run_on_thread = run
        # PostgreSQL: the login path's reads and code write sent by the reactor
        # itself (`mfaserver.store.pg_reactor.PgLogins`), not through a thread.
        self._logins = logins
        # While the database is unreachable (StoreUnavailable): said once, not per call.
        self.unavailable = False
        self._audit_lock = threading.Lock()
        self._devices: dict[str, Device] = {}
        # Moves on each time the cache is emptied: a read that was under way then
        # may have seen the device before it was deleted, and must not be kept.
        self._devices_emptied = 0
        self._devices_version: int | None = None
        self._audit_queue: list[tuple[AuditEntry, Deferred]] = []

    def _run(self, f, *args, **kwargs) -> Deferred:
        return self._watch(self._run_on_thread(f, *args, **kwargs))

    def _watch(self, d: Deferred) -> Deferred:
        if self.unavailable:
            d.addCallback(self._available_again)
        d.addErrback(self._maybe_unavailable)
        return d

    def _maybe_unavailable(self, failure: Failure) -> Failure:
        if failure.check(StoreUnavailable) and not self.unavailable:
            self.unavailable = True
            log.error("store unavailable: {error}; logins that need it are rejected "
                      "(\"try later\") until it is back", error=failure.getErrorMessage())
        return failure

    def _available_again(self, result):
        if self.unavailable:
            self.unavailable = False
            log.info("store available again")
        return result

    def lookup_password(self, name: str) -> Deferred[tuple[str | None, str | None] | None]:
        if self._logins is not None:
            return self._watch(self._logins.lookup_password(name))
        return self._run(self._store.get_password, name)

    def load_account(self, name: str) -> Deferred[Account | None]:
        if self._logins is not None:
            return self._watch(self._logins.load_account(name))
        return self._run(self._store.load_account, name)

    def load_and_use_code(
        self, name: str, plan: Callable[[Account | None], tuple[CodeUse, AuditEntry] | None],
    ) -> Deferred[tuple[Account | None, CodeUse | None]]:
        """One database thread call for a login with a code (`AccountStore`): each
        hop costs more CPU than the SQL it carries, and adds its wake-ups."""
        if self._logins is not None:
            return self._watch(self._logins.load_and_use_code(name, plan))
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
        if self._logins is not None:
            d = self._watch(self._logins.get_device(device_id))
        else:
            d = self._run(self._store.get_device, device_id)
        d.addCallback(self._cache_device, self._devices_emptied)
        return d

    def _cache_device(self, device: Device | None, emptied_before: int) -> Device | None:
        if device is not None and emptied_before == self._devices_emptied:
            if len(self._devices) >= MAX_CACHED_DEVICES:
                self._devices.clear()
            self._devices[device.id] = device
        return device

    def check_outside_changes(self) -> Deferred[None]:
        """Forget cached devices if another process changed the database."""
        d = self._run(self._store.devices_version)

        def compare(version: int) -> None:
            if version != self._devices_version:
                self._devices_version = version
                self._forget_devices(None)
        d.addCallback(compare)
        return d

    def run(self, f: Callable[..., object], *args, **kwargs) -> Deferred:
        """Run ``f(store, *args, **kwargs)`` on the database thread; fire with its result.

        For the rarer operations (the portal's). As one of them may delete or
        change a device, the device cache is emptied when it returns.
        """
        d = self._run(_call_with_store, self._store, f, args, kwargs)
        d.addBoth(self._forget_devices)
        return d

    def read(self, f: Callable[..., object], *args, **kwargs) -> Deferred:
        """Like `run`, for an ``f`` that only reads: the device cache stays.

        Pages anyone may ask for (an enrollment link's page, the portal's)
        read through here, so they cannot make every device poll go to the
        database thread.
        """
        return self._run(_call_with_store, self._store, f, args, kwargs)

    def run_state(self, f: Callable[..., object], *args, **kwargs) -> Deferred:
        """Run ``f(store, ...)`` on a database thread for the cluster's short-lived
        state (`mfaserver.store.cluster`): it writes, but never devices, so the
        device cache stays."""
        return self._run(_call_with_store, self._store, f, args, kwargs)

    def _forget_devices(self, result):
        self._devices.clear()
        self._devices_emptied += 1
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
        hop), so a busy daemon spends less per decision on its audit log. On
        PostgreSQL each row is one statement the reactor sends itself."""
        if self._logins is not None:
            return self._watch(self._logins.record_audit(entry))
        d = Deferred()
        with self._audit_lock:
            self._audit_queue.append((entry, d))
            start = len(self._audit_queue) == 1
        if start:
            # Not through _run: the batch fires with each row's outcome, which
            # _audit_written reads for the outage state itself.
            self._run_on_thread(self._write_audit_batch).addBoth(self._audit_written)
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
        failures = [failure for _, failure in results if failure is not None]
        if failures:
            self._maybe_unavailable(failures[0])
        elif self.unavailable:
            self._available_again(None)
        for d, failure in results:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)


class PerThreadStore:
    """One store per database thread, opened on its first call there (PostgreSQL:
    one connection per thread, so the threads' calls run side by side).

    Stands in for a store in `ThreadedStore`: ``proxy.method(...)``, called on a
    database thread, runs that thread's store's ``method``.
    """

    def __init__(self, open_store: Callable[[], object]):
        self._open = open_store
        self._local = threading.local()
        self._lock = threading.Lock()
        self._stores: list = []

    def current(self):
        """This thread's store, opened now if it has none."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._open()
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def on_this_thread(*args, **kwargs):
            return getattr(self.current(), name)(*args, **kwargs)
        return on_this_thread

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()


def _call_with_store(store, f, args, kwargs):
    # On a database thread: ``f(store, ...)`` with this thread's own store.
    if isinstance(store, PerThreadStore):
        store = store.current()
    return f(store, *args, **kwargs)
