"""The push transaction registry: waiters, expiry, long polls, answers, late memory."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.model import Verdict
from mfaserver.factors.push import (ANSWERED, CLOSED, EXPIRED, PENDING, AlreadyAnswered,
                                    AnswerRefused, TransactionExpired, UnknownTransaction,
                                    PushTransactions, TransactionClosed)
from mfaserver.factors.push_protocol import new_match_number

START = 1_700_000_000.0


class Registry(SynchronousTestCase):
    """A registry on a Clock set to START, recording wake-ups."""

    number_matching = False

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.woken: list[str] = []
        self.push = self.make()

    def make(self, **kwargs) -> PushTransactions:
        kwargs.setdefault("wake", self.woken.append)
        return PushTransactions(self.clock, **kwargs)

    def open(self, user="alice", timeout=60, push=None, **kwargs):
        kwargs.setdefault("client", "vpn")
        kwargs.setdefault("nas_ip", "192.0.2.10")
        kwargs.setdefault("calling_station_id", "203.0.113.7")
        if self.number_matching:
            kwargs.setdefault("number", new_match_number())
        # `push or self.push` would not do: an empty registry is falsy (it has __len__).
        return (self.push if push is None else push).open(user, timeout=timeout, **kwargs)

    def refusal(self, *args, **kwargs) -> AnswerRefused:
        with self.assertRaises(AnswerRefused) as caught:
            self.push.answer(*args, **kwargs)
        return caught.exception


class OpenTests(Registry):
    def test_to_json_has_the_documented_fields(self):
        txn = self.open(calling_station_id=None)
        self.assertEqual(txn.to_json(), {
            "txid": txn.txid, "user": "alice", "client": "vpn", "nas_ip": "192.0.2.10",
            "calling_station_id": None, "created": int(START), "expires": int(START) + 60,
            "number": None,
        })

    def test_to_json_times_are_integers(self):
        self.clock.advance(0.75)
        data = self.open(timeout=30).to_json()
        self.assertIs(type(data["created"]), int)
        self.assertIs(type(data["expires"]), int)
        self.assertEqual((data["created"], data["expires"]), (int(START), int(START) + 30))

    def test_transaction_ids_are_unique_22_character_base64url(self):
        ids = {self.open().txid for _ in range(50)}
        self.assertEqual(len(ids), 50)
        for txid in ids:
            self.assertRegex(txid, r"\A[A-Za-z0-9_-]{22}\Z")

    def test_number_is_null_without_number_matching(self):
        self.assertIsNone(self.open().number)

    def test_the_number_given_is_the_transactions(self):
        self.assertEqual(self.open(number="42").number, "42")

    def test_new_transaction_is_pending_and_counted(self):
        txn = self.open()
        self.open()
        self.open(user="bob")
        self.assertEqual(txn.state, PENDING)
        self.assertEqual(len(self.push), 3)
        self.assertEqual(self.push.count_for("alice"), 2)
        self.assertEqual(self.push.count_for("bob"), 1)
        self.assertEqual(self.push.count_for("carol"), 0)
        self.assertIs(self.push.get(txn.txid), txn)

    def test_wake_is_called_once_per_open_with_the_user(self):
        self.open()
        self.open(user="bob")
        self.assertEqual(self.woken, ["alice", "bob"])

    def test_find_never_wakes(self):
        self.open(login_key=("alice", "nas", "1.2.3.4"))
        self.push.find(("alice", "nas", "1.2.3.4"))
        self.push.find(("other",))
        self.assertEqual(self.woken, ["alice"])

    def test_a_failing_wake_does_not_fail_the_open(self):
        def wake(user):
            raise RuntimeError("ntfy is down")

        push = self.make(wake=wake)
        txn = self.open(push=push)
        self.assertEqual(push.pending_for("alice"), [txn])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_without_wake_open_works(self):
        push = PushTransactions(self.clock)
        self.assertEqual(self.open(push=push).state, PENDING)

    def test_pending_for_lists_the_users_transactions_oldest_first(self):
        first = self.open()
        self.clock.advance(1)
        self.open(user="bob")
        second = self.open()
        self.assertEqual(self.push.pending_for("alice"), [first, second])
        self.assertEqual(self.push.pending_for("nobody"), [])

    def test_pending_for_returns_a_copy(self):
        self.open()
        self.push.pending_for("alice").clear()
        self.assertEqual(len(self.push.pending_for("alice")), 1)


class FindTests(Registry):
    def test_find_returns_the_pending_transaction_of_a_login(self):
        key = ("alice", "192.0.2.10", "203.0.113.7")
        txn = self.open(login_key=key)
        self.assertIs(self.push.find(key), txn)
        self.assertIsNone(self.push.find(("alice", "192.0.2.10", "198.51.100.1")))

    def test_transaction_without_login_key_is_not_found(self):
        self.open()
        self.assertIsNone(self.push.find(None))

    def test_find_forgets_an_answered_transaction(self):
        key = ("alice", "nas", "x")
        txn = self.open(login_key=key)
        self.push.answer(txn.txid, "alice", "approve")
        self.assertIsNone(self.push.find(key))

    def test_find_forgets_an_expired_transaction(self):
        key = ("alice", "nas", "x")
        self.open(login_key=key, timeout=10)
        self.clock.advance(10)
        self.assertIsNone(self.push.find(key))

    def test_find_forgets_a_closed_transaction(self):
        key = ("alice", "nas", "x")
        txn = self.open(login_key=key)
        self.push.close(txn.txid)
        self.assertIsNone(self.push.find(key))

    def test_finishing_an_older_transaction_keeps_the_newer_one_of_the_same_login(self):
        key = ("alice", "nas", "x")
        old = self.open(login_key=key)
        new = self.open(login_key=key)
        self.push.close(old.txid)
        self.assertIs(self.push.find(key), new)


class WaitTests(Registry):
    def test_approval_fires_the_waiter_with_approve(self):
        txn = self.open()
        d = self.push.wait(txn.txid)
        self.assertNoResult(d)
        self.push.answer(txn.txid, "alice", "approve", device_id="dev1")
        self.assertIs(self.successResultOf(d), Verdict.APPROVE)
        self.assertEqual((txn.state, txn.verdict, txn.answered_by),
                         (ANSWERED, Verdict.APPROVE, "dev1"))

    def test_every_waiter_of_a_joined_login_gets_the_verdict(self):
        txn = self.open()
        waiters = [self.push.wait(txn.txid) for _ in range(3)]
        self.push.answer(txn.txid, "alice", "deny")
        self.assertEqual([self.successResultOf(d) for d in waiters], [Verdict.DENY] * 3)

    def test_expiry_fails_waiters_with_timeout_error_at_exactly_the_timeout(self):
        txn = self.open(timeout=60)
        d = self.push.wait(txn.txid)
        self.clock.advance(59.999)
        self.assertNoResult(d)
        self.assertEqual(txn.state, PENDING)
        self.clock.advance(0.001)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual(txn.state, EXPIRED)
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.push.pending_for("alice"), [])

    def test_answer_cancels_the_expiry_call(self):
        txn = self.open(timeout=60)
        self.push.answer(txn.txid, "alice", "approve")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_cancels_the_expiry_call(self):
        txn = self.open(timeout=60)
        self.push.close(txn.txid)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_fails_waiters_with_transaction_closed(self):
        txn = self.open()
        d = self.push.wait(txn.txid)
        self.push.close(txn.txid)
        self.failureResultOf(d, TransactionClosed)
        self.assertEqual(txn.state, CLOSED)

    def test_close_of_an_unknown_or_finished_transaction_does_nothing(self):
        txn = self.open()
        self.push.answer(txn.txid, "alice", "approve")
        self.push.close(txn.txid)
        self.push.close("unknown")
        self.assertEqual(txn.state, ANSWERED)

    def test_cancelling_the_last_waiter_closes_the_transaction(self):
        key = ("alice", "nas", "x")
        txn = self.open(login_key=key)
        first, second = self.push.wait(txn.txid), self.push.wait(txn.txid)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(txn.state, PENDING)
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)
        self.assertEqual(txn.state, CLOSED)
        self.assertIsNone(self.push.find(key))
        self.assertEqual(self.push.pending_for("alice"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_added_by_the_pipeline_closes_the_transaction(self):
        txn = self.open(timeout=120)
        d = self.push.wait(txn.txid)
        d.addTimeout(30, self.clock)
        self.clock.advance(30)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual(txn.state, CLOSED)

    def test_waiting_on_an_answered_transaction_gives_its_verdict(self):
        txn = self.open()
        self.push.answer(txn.txid, "alice", "fraud")
        self.assertIs(self.successResultOf(self.push.wait(txn.txid)), Verdict.FRAUD)

    def test_waiting_on_an_expired_transaction_fails_with_timeout(self):
        txn = self.open(timeout=5)
        self.clock.advance(5)
        self.failureResultOf(self.push.wait(txn.txid), defer.TimeoutError)

    def test_waiting_on_a_closed_or_unknown_transaction_fails_with_closed(self):
        txn = self.open()
        self.push.close(txn.txid)
        self.failureResultOf(self.push.wait(txn.txid), TransactionClosed)
        self.failureResultOf(self.push.wait("unknown"), TransactionClosed)

    def test_close_user_closes_all_of_the_users_transactions_only(self):
        mine = [self.open(), self.open(), self.open()]
        theirs = self.open(user="bob")
        waiters = [self.push.wait(txn.txid) for txn in mine]
        self.assertEqual(self.push.close_user("alice"), 3)
        for d in waiters:
            self.failureResultOf(d, TransactionClosed)
        self.assertEqual([txn.state for txn in mine], [CLOSED] * 3)
        self.assertEqual(self.push.pending_for("alice"), [])
        self.assertEqual(self.push.pending_for("bob"), [theirs])
        self.assertEqual(self.push.close_user("alice"), 0)

    def test_close_all_closes_everything_and_ends_long_polls(self):
        a, b = self.open(), self.open(user="bob")
        waiters = [self.push.wait(a.txid), self.push.wait(b.txid)]
        poll = self.push.wait_for_new("carol", 30)
        self.push.close_all()
        for d in waiters:
            self.failureResultOf(d, TransactionClosed)
        self.assertIsNone(self.successResultOf(poll))
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LongPollTests(Registry):
    def test_long_poll_fires_when_a_transaction_opens_for_the_user(self):
        d = self.push.wait_for_new("alice", 30)
        self.open(user="bob")
        self.assertNoResult(d)
        self.open()
        self.assertIsNone(self.successResultOf(d))
        # The timeout was cancelled; only the transaction expiries remain.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)

    def test_long_poll_fires_after_its_timeout(self):
        d = self.push.wait_for_new("alice", 30)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(d))

    def test_a_poll_that_timed_out_is_not_fired_again(self):
        d = self.push.wait_for_new("alice", 30)
        self.clock.advance(30)
        self.successResultOf(d)
        self.open()     # would raise AlreadyCalledError if the poll were still registered

    def test_every_poll_of_the_user_fires(self):
        polls = [self.push.wait_for_new("alice", 30) for _ in range(3)]
        self.open()
        for d in polls:
            self.assertIsNone(self.successResultOf(d))

    def test_cancelled_poll_is_dropped_with_its_timer(self):
        d = self.push.wait_for_new("alice", 30)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.open()     # must not touch the cancelled poll
        self.assertEqual(self.push._polls.users(), [])

    def test_polls_with_different_deadlines_share_one_timer_and_each_fires_on_time(self):
        first = self.push.wait_for_new("alice", 30)
        self.clock.advance(10)
        second = self.push.wait_for_new("bob", 5)
        third = self.push.wait_for_new("carol", 30)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(5)
        self.successResultOf(second)
        self.assertNoResult(first)
        self.clock.advance(15)
        self.successResultOf(first)
        self.assertNoResult(third)
        self.clock.advance(10)
        self.successResultOf(third)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_timer_moves_on_when_the_earliest_poll_is_answered_or_withdrawn(self):
        early = self.push.wait_for_new("alice", 5)
        late = self.push.wait_for_new("bob", 30)
        self.open()                                  # answers alice's poll
        self.successResultOf(early)
        [timer] = [c for c in self.clock.getDelayedCalls() if c.func == self.push._polls._deadlines._reached]
        self.assertEqual(timer.getTime(), START + 30)
        late.cancel()
        self.failureResultOf(late, defer.CancelledError)
        self.assertEqual([c for c in self.clock.getDelayedCalls()
                          if c.func == self.push._polls._deadlines._reached], [])

    def test_joining_a_login_does_not_wake_polls(self):
        key = ("alice", "nas", "x")
        self.open(login_key=key)
        d = self.push.wait_for_new("alice", 30)
        self.push.find(key)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)


class AnswerTests(Registry):
    def test_each_decision_becomes_its_verdict(self):
        for decision, verdict in [("approve", Verdict.APPROVE), ("deny", Verdict.DENY),
                                  ("fraud", Verdict.FRAUD)]:
            txn = self.open()
            self.assertIs(self.push.answer(txn.txid, "alice", decision), txn)
            self.assertIs(txn.verdict, verdict)

    def test_answer_removes_the_transaction_from_pending(self):
        txn = self.open()
        self.push.answer(txn.txid, "alice", "approve")
        self.assertEqual(self.push.pending_for("alice"), [])
        self.assertEqual(len(self.push), 0)
        self.assertIs(self.push.get(txn.txid), txn)

    def test_unknown_transaction_is_404(self):
        e = self.refusal("unknown", "alice", "approve")
        self.assertIsInstance(e, UnknownTransaction)

    def test_transaction_of_another_user_is_404(self):
        txn = self.open(user="bob")
        e = self.refusal(txn.txid, "alice", "approve")
        self.assertIsInstance(e, UnknownTransaction)
        self.assertEqual(txn.state, PENDING)

    def test_finished_transaction_of_another_user_is_still_404(self):
        expired = self.open(user="bob", timeout=1)
        answered = self.open(user="bob")
        self.push.answer(answered.txid, "bob", "approve")
        self.clock.advance(1)
        for txn in (expired, answered):
            self.assertIsInstance(self.refusal(txn.txid, "alice", "approve"), UnknownTransaction)

    def test_expired_transaction_is_410(self):
        txn = self.open(timeout=60)
        self.clock.advance(60)
        e = self.refusal(txn.txid, "alice", "approve")
        self.assertIsInstance(e, TransactionExpired)

    def test_answer_at_the_expiry_time_is_410_even_before_the_timer_runs(self):
        txn = self.open(timeout=60)
        # Move the clock without running the expiry call, as if it were late.
        self.clock.rightNow = START + 60
        self.assertIsInstance(self.refusal(txn.txid, "alice", "approve"), TransactionExpired)

    def test_closed_transaction_is_410(self):
        txn = self.open()
        self.push.close(txn.txid)
        self.assertIsInstance(self.refusal(txn.txid, "alice", "approve"), TransactionExpired)

    def test_second_answer_is_409_and_the_first_wins(self):
        txn = self.open()
        self.push.answer(txn.txid, "alice", "deny", device_id="first")
        e = self.refusal(txn.txid, "alice", "approve", device_id="second")
        self.assertIsInstance(e, AlreadyAnswered)
        self.assertEqual((txn.verdict, txn.answered_by), (Verdict.DENY, "first"))

    def test_checks_run_in_order_404_then_410_then_409(self):
        # Answered, then remembered past its expiry time: still 409, not 410.
        answered = self.open(timeout=10)
        self.push.answer(answered.txid, "alice", "approve")
        self.clock.advance(20)
        self.assertIsInstance(self.refusal(answered.txid, "alice", "approve"), AlreadyAnswered)
        # Someone else's answered transaction: 404 before 409.
        self.assertIsInstance(self.refusal(answered.txid, "bob", "approve"), UnknownTransaction)
        # Someone else's expired transaction: 404 before 410.
        expired = self.open(timeout=10)
        self.clock.advance(10)
        self.assertIsInstance(self.refusal(expired.txid, "bob", "approve"), UnknownTransaction)
        self.assertIsInstance(self.refusal(expired.txid, "alice", "approve"), TransactionExpired)


class NumberMatchingTests(Registry):
    number_matching = True

    def test_approval_with_the_right_number_approves(self):
        txn = self.open()
        d = self.push.wait(txn.txid)
        self.push.answer(txn.txid, "alice", "approve", number=txn.number)
        self.assertIs(self.successResultOf(d), Verdict.APPROVE)

    def test_approval_with_a_wrong_number_is_a_denial(self):
        txn = self.open()
        d = self.push.wait(txn.txid)
        wrong = "10" if txn.number != "10" else "11"
        self.push.answer(txn.txid, "alice", "approve", number=wrong)
        self.assertIs(self.successResultOf(d), Verdict.DENY)
        self.assertEqual(txn.state, ANSWERED)

    def test_approval_without_a_number_approves_the_number_is_checked_on_the_radius_side(self):
        txn = self.open()
        self.push.answer(txn.txid, "alice", "approve")
        self.assertIs(txn.verdict, Verdict.APPROVE)

    def test_fraud_with_a_wrong_number_stays_fraud(self):
        txn = self.open()
        wrong = "10" if txn.number != "10" else "11"
        self.push.answer(txn.txid, "alice", "fraud", number=wrong)
        self.assertIs(txn.verdict, Verdict.FRAUD)

    def test_only_transactions_with_a_number_are_counted_as_numbered(self):
        plain = self.open("alice", number=None)
        numbered = self.open("alice", calling_station_id="203.0.113.8")
        self.open("bob", calling_station_id="203.0.113.9")
        self.assertEqual((self.push.numbered_count("alice"), self.push.numbered_count()), (1, 2))
        self.push.close(numbered.txid)
        self.push.close(plain.txid)
        self.assertEqual((self.push.numbered_count("alice"), self.push.numbered_count()), (0, 1))

    def test_number_is_ignored_without_number_matching(self):
        txn = self.open(number=None)
        self.push.answer(txn.txid, "alice", "approve", number="42")
        self.assertIs(txn.verdict, Verdict.APPROVE)


class RememberTests(Registry):
    def test_finished_transactions_are_remembered_for_late_answers(self):
        expired = self.open(timeout=10)
        closed = self.open()
        self.push.close(closed.txid)
        self.clock.advance(10)
        self.assertIs(self.push.get(expired.txid), expired)
        self.assertIs(self.push.get(closed.txid), closed)

    def test_memory_is_bounded_by_max_remembered_oldest_forgotten_first(self):
        push = self.make(max_remembered=3)
        txns = [self.open(push=push) for _ in range(5)]
        for txn in txns:
            push.close(txn.txid)
        self.assertEqual([push.get(t.txid) for t in txns], [None, None] + txns[2:])
        self.assertEqual(len(push._done), 3)
        # Forgotten: an answer is now indistinguishable from a forged txid.
        with self.assertRaises(AnswerRefused) as caught:
            push.answer(txns[0].txid, "alice", "approve")
        self.assertIsInstance(caught.exception, UnknownTransaction)

    def test_memory_is_forgotten_after_the_late_window(self):
        push = self.make(late_window=600)
        txn = self.open(push=push)
        push.close(txn.txid)
        self.clock.advance(599)
        self.assertIs(push.get(txn.txid), txn)
        self.clock.advance(1)
        self.assertIsNone(push.get(txn.txid))
        with self.assertRaises(AnswerRefused) as caught:
            push.answer(txn.txid, "alice", "approve")
        self.assertIsInstance(caught.exception, UnknownTransaction)
        self.failureResultOf(push.wait(txn.txid), TransactionClosed)

    def test_old_memory_is_pruned_when_another_transaction_finishes(self):
        push = self.make(late_window=600)
        old = self.open(push=push)
        push.close(old.txid)
        self.clock.advance(600)
        new = self.open(push=push)
        push.close(new.txid)
        self.assertEqual(list(push._done), [new.txid])
