"""Pending out-of-band logins and send-rate limits, on an injected clock."""

import pytest
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.approvals import PendingLogins, RateLimiter, TooManyPending

KEY = ("alice", "vpn", "198.51.100.7")


class PendingLoginsTests(SynchronousTestCase):
    def setUp(self):
        self.pending = PendingLogins(max_per_user=1, max_total=3)
        self.started: list[defer.Deferred] = []
        self.withdrawn: list[bool] = []  # a started login was cancelled (push withdrawn)

    def start(self):
        d = defer.Deferred(lambda _: self.withdrawn.append(True))
        self.started.append(d)
        return d

    def test_copies_of_a_pending_login_join_it_and_all_get_the_answer(self):
        first = self.pending.join_or_start(KEY, "alice", self.start)
        second = self.pending.join_or_start(KEY, "alice", self.start)
        self.assertEqual(len(self.started), 1)
        self.started[0].callback("approved")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         ("approved", "approved"))
        self.assertEqual(len(self.pending), 0)

    def test_a_failure_reaches_every_copy(self):
        first = self.pending.join_or_start(KEY, "alice", self.start)
        second = self.pending.join_or_start(KEY, "alice", self.start)
        self.started[0].errback(RuntimeError("gateway down"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)

    def test_a_second_login_of_the_same_user_from_elsewhere_is_over_the_user_limit(self):
        self.pending.join_or_start(KEY, "alice", self.start)
        with pytest.raises(TooManyPending) as e:
            self.pending.join_or_start(("alice", "vpn", "203.0.113.1"), "alice", self.start)
        self.assertEqual(e.value.scope, "user")
        self.assertEqual(len(self.started), 1)

    def test_the_global_cap_refuses_new_logins(self):
        for user in ("a", "b", "c"):
            self.pending.join_or_start((user,), user, self.start)
        with pytest.raises(TooManyPending) as e:
            self.pending.join_or_start(("d",), "d", self.start)
        self.assertEqual(e.value.scope, "global")

    def test_after_it_completes_the_user_may_start_again(self):
        self.pending.join_or_start(KEY, "alice", self.start)
        self.started[0].callback("denied")
        self.pending.join_or_start(KEY, "alice", self.start)
        self.assertEqual(len(self.started), 2)

    def test_one_waiter_leaving_does_not_cancel_the_login_for_the_others(self):
        first = self.pending.join_or_start(KEY, "alice", self.start)
        second = self.pending.join_or_start(KEY, "alice", self.start)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(self.withdrawn, [])
        self.started[0].callback("approved")
        self.assertEqual(self.successResultOf(second), "approved")

    def test_the_last_waiter_leaving_cancels_the_login(self):
        only = self.pending.join_or_start(KEY, "alice", self.start)
        only.cancel()
        self.failureResultOf(only, defer.CancelledError)
        self.assertEqual(self.withdrawn, [True])
        self.assertEqual(len(self.pending), 0)

    def test_start_raising_leaves_nothing_pending(self):
        def broken():
            raise RuntimeError("no gateway")
        with pytest.raises(RuntimeError):
            self.pending.join_or_start(KEY, "alice", broken)
        self.assertEqual(len(self.pending), 0)
        self.pending.join_or_start(KEY, "alice", self.start)


def test_rate_limiter_allows_a_burst_then_refills_over_time():
    clock = task.Clock()
    limiter = RateLimiter(clock, per_hour=6, max_burst=3)
    assert [limiter.allow("+15550001111") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("+15550002222")  # another destination has its own bucket
    clock.advance(599)
    assert not limiter.allow("+15550001111")
    clock.advance(1)
    assert limiter.allow("+15550001111")
    assert not limiter.allow("+15550001111")


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(task.Clock(), per_hour=1, max_burst=1, max_keys=100)
    for i in range(1000):
        limiter.allow(i)
    assert len(limiter._buckets) == 100
