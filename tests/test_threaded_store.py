"""The store on its database thread: audit rows committed together under load."""

import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.model import AuditEntry, Device
from mfaserver.store import Store
from mfaserver.store.threaded import ThreadedStore


def entry(i):
    return AuditEntry(time=1000.0 + i, user=f"u{i}", client="vpn", nas_ip=None,
                      calling_station_id=None, factor="totp", outcome="accept", reason="ok")


class AuditBatchTests(SynchronousTestCase):
    def setUp(self):
        d = Path(tempfile.mkdtemp())
        self.db = Store.open(d / "db.sqlite3", d / "seed.key")
        self.addCleanup(self.db.close)
        self.calls = []

        def run_later(f, *args):
            # Like the database thread while it is busy: the call runs later.
            result = defer.Deferred()
            self.calls.append((f, args, result))
            return result

        self.store = ThreadedStore(self.db, run_later)

    def run_pending(self):
        calls, self.calls = self.calls, []
        for f, args, result in calls:
            result.callback(f(*args))

    def test_rows_queued_while_the_thread_is_busy_share_one_call(self):
        written = [self.store.record_audit(entry(i)) for i in range(5)]
        self.assertEqual(len(self.calls), 1)
        for d in written:
            self.assertNoResult(d)
        self.run_pending()
        for d in written:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual([e.user for e in self.db.recent_audit(limit=10)],
                         ["u4", "u3", "u2", "u1", "u0"])

    def test_a_row_after_the_batch_was_taken_starts_the_next_one(self):
        first = self.store.record_audit(entry(0))
        self.run_pending()
        second = self.store.record_audit(entry(1))
        self.assertEqual(len(self.calls), 1)
        self.run_pending()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_a_failed_commit_fails_every_row_of_the_batch(self):
        self.db.close()
        written = [self.store.record_audit(entry(i)) for i in range(2)]
        self.run_pending()
        for d in written:
            self.failureResultOf(d)


class DeviceCacheTests(SynchronousTestCase):
    """Devices are read once, and forgotten when an admin command changes the file."""

    def setUp(self):
        from mfaserver.auth.model import Device
        from mfaserver.testing import run_now
        d = Path(tempfile.mkdtemp())
        self.db = Store.open(d / "db.sqlite3", d / "seed.key")
        self.addCleanup(self.db.close)
        # The CLI: another process, another connection to the same file.
        self.admin = Store.open(d / "db.sqlite3", d / "seed.key")
        self.addCleanup(self.admin.close)
        self.admin.add_user("alice", password_hash=None, phone=None, now=1000.0)
        self.admin.add_enrollment("alice", "a" * 64, 2000.0, now=1000.0)
        self.admin.enroll_device("a" * 64, Device(id="dev1", user="", public_key="ed25519:x"),
                                 now=1000.0)
        self.reads = []

        def counting_run(f, *args, **kwargs):
            self.reads.append(f.__name__)
            return run_now(f, *args, **kwargs)

        self.store = ThreadedStore(self.db, counting_run)
        self.successResultOf(self.store.check_outside_changes())

    def test_a_device_is_read_from_the_database_once(self):
        first = self.successResultOf(self.store.get_device("dev1"))
        second = self.successResultOf(self.store.get_device("dev1"))
        self.assertEqual((first.user, second), ("alice", first))
        self.assertEqual(self.reads.count("get_device"), 1)

    def test_an_unknown_device_is_not_cached(self):
        self.assertIsNone(self.successResultOf(self.store.get_device("nope")))
        self.assertIsNone(self.successResultOf(self.store.get_device("nope")))
        self.assertEqual(self.reads.count("get_device"), 2)

    def test_a_device_deleted_by_another_process_is_gone_after_the_check(self):
        self.successResultOf(self.store.get_device("dev1"))
        self.admin.delete_device("alice", "dev1")
        self.successResultOf(self.store.check_outside_changes())
        self.assertIsNone(self.successResultOf(self.store.get_device("dev1")))

    def test_with_the_reactors_statements_a_device_is_read_there_and_cached(self):
        read = []

        class Logins:   # PgLogins.get_device (tests/integration/test_pg_reactor.py)
            def get_device(_, device_id):
                read.append(device_id)
                return defer.execute(self.admin.get_device, device_id)

        store = ThreadedStore(self.db, self.store._run, logins=Logins())
        self.reads.clear()
        first = self.successResultOf(store.get_device("dev1"))
        self.assertEqual(self.successResultOf(store.get_device("dev1")), first)
        self.assertEqual((first.user, read, self.reads), ("alice", ["dev1"], []))

    def test_a_read_under_way_when_the_cache_is_emptied_is_not_kept(self):
        # The read may have seen the device just before another process deleted it.
        pending = []

        def run_later(f, *args):
            answer = defer.Deferred()
            pending.append((f, args, answer))
            return answer
        store = ThreadedStore(self.db, run_later)
        d = store.get_device("dev1")
        f, args, answer = pending.pop()
        read = f(*args)                           # the device, as it was
        self.admin.delete_device("alice", "dev1")
        store._forget_devices(None)               # the check saw the change
        answer.callback(read)
        self.assertEqual(self.successResultOf(d).id, "dev1")   # this request had it
        pending_again = store.get_device("dev1")
        self.assertEqual(len(pending), 1)         # not cached: read again
        f, args, answer = pending.pop()
        answer.callback(f(*args))
        self.assertIsNone(self.successResultOf(pending_again))

    def test_no_outside_change_keeps_the_cache(self):
        self.successResultOf(self.store.get_device("dev1"))
        self.successResultOf(self.store.check_outside_changes())
        self.successResultOf(self.store.get_device("dev1"))
        self.assertEqual(self.reads.count("get_device"), 1)


class _DeviceStore:
    """A store with one device for anyone asking, and two rarer operations."""

    def get_device(self, device_id):
        return Device(id=device_id, user="alice", public_key="ed25519:x")

    def delete_device(self, user, device_id):
        return f"deleted {device_id} of {user}"

    def list_tokens(self, user):
        return [f"token of {user}"]


def _counting(calls: list):
    """A database-thread runner that runs at once and notes each call."""
    def runner(f, *args, **kwargs):
        calls.append(f)
        return defer.execute(f, *args, **kwargs)
    return runner


def test_run_calls_a_store_method_on_the_database_thread_and_forgets_cached_devices():
    calls = []
    threaded = ThreadedStore(_DeviceStore(), _counting(calls))
    threaded.get_device("dev1")
    threaded.get_device("dev1")
    assert len(calls) == 1                      # the second read came from the cache
    results = []
    threaded.run(_DeviceStore.delete_device, "alice", "dev1").addCallback(results.append)
    assert results == ["deleted dev1 of alice"]
    threaded.get_device("dev1")
    assert len(calls) == 3                      # read again after the change


def test_read_runs_on_the_database_thread_and_keeps_cached_devices():
    calls = []
    threaded = ThreadedStore(_DeviceStore(), _counting(calls))
    threaded.get_device("dev1")
    results = []
    threaded.read(_DeviceStore.list_tokens, "alice").addCallback(results.append)
    assert results == [["token of alice"]]
    threaded.get_device("dev1")
    assert len(calls) == 2                      # the device still came from the cache
