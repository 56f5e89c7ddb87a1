"""Contract tests of the second-factor seams, one suite per Protocol run over the fake in
`mfaserver.testing` and over every real factor, so that a fake cannot drift from the real
thing: what the core relies on, and nothing more. In memory, on a Clock."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.interfaces import (ApprovalWithdrawn, FactorRefused, UnknownApproval,
                                       WrongConfirmation)
from mfaserver.auth.model import Account, CodeResult, Login, Method, Reason, TokenKind, Verdict
from mfaserver.factors import oath
from mfaserver.factors.push import (NumberMatchingPushFactor, PushFactor, PushTransactions,
                                    push_limit)
from mfaserver.factors.sms import SmsCodes
from mfaserver.factors.token import TokenFactor
from mfaserver.factors.voice import VoiceCalls, VoiceFactor
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import (MemoryApprovalFactor, MemoryCodeFactor,
                               MemoryConfirmedApprovalFactor, MemorySmsGateway,
                               MemoryVoiceGateway, run_now)

T0 = 1_700_000_010.0
SEED = bytes(range(20))
PHONE = "+16502530000"
TIMEOUT = 60.0
METHOD = Method("test", "a test factor", starts=True, unusable=Reason.NOT_ENROLLED,
                unusable_message="Not set up.")


def account(name: str = "alice", **kw) -> Account:
    values = dict(phone=PHONE, blocked=False, failures=0, locked_until=None, devices=1)
    values.update(kw)
    return Account(name=name, **values)


class Harness(SynchronousTestCase):
    """A clock at T0; ``self.alice`` can use the factor, ``self.bob`` cannot."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.make()

    def login(self, who: Account | None = None, station: str = "198.51.100.7") -> Login:
        return Login(who or self.alice, "vpn", "192.0.2.1", station)


# --- CodeFactor -------------------------------------------------------------------------------

class CodeFactorContract:
    """``make`` sets ``factor``, ``alice`` and ``bob``; ``right_code()`` is alice's
    current code (after `send`, for factors that send one)."""

    def test_usable_by_an_account_that_has_it_only(self):
        self.assertTrue(self.factor.usable(self.alice))
        self.assertFalse(self.factor.usable(self.bob))

    def test_send_fires_with_a_prompt_or_none(self):
        prompt = self.successResultOf(self.factor.send(self.login()))
        self.assertTrue(prompt is None or (isinstance(prompt, str) and prompt))

    def test_the_right_code_is_accepted_once(self):
        self.successResultOf(self.factor.send(self.login()))
        code = self.right_code()
        first = self.successResultOf(self.factor.check(self.alice, code))
        self.assertIs(first.result, CodeResult.ACCEPTED)
        self.assertTrue(first.factor)
        again = self.successResultOf(self.factor.check(self.alice, code))
        self.assertIn(again.result, (CodeResult.REPLAYED, CodeResult.WRONG))

    def test_a_wrong_code_is_wrong_and_names_the_factor(self):
        self.successResultOf(self.factor.send(self.login()))
        wrong = "000000" if self.right_code() != "000000" else "111111"
        found = self.successResultOf(self.factor.check(self.alice, wrong))
        self.assertIs(found.result, CodeResult.WRONG)
        self.assertTrue(found.factor)

    def test_junk_is_never_accepted_and_never_raises(self):
        self.successResultOf(self.factor.send(self.login()))
        for junk in ("", " ", "１２３４５６", "12 34 56", "x" * 100_000, "9" * 40, "\x00" * 6):
            found = self.successResultOf(self.factor.check(self.alice, junk))
            self.assertTrue(found is None or found.result is not CodeResult.ACCEPTED, junk)

    def test_a_code_is_never_accepted_for_an_account_that_cannot_use_it(self):
        self.successResultOf(self.factor.send(self.login()))
        found = self.successResultOf(self.factor.check(self.bob, self.right_code()))
        self.assertTrue(found is None or found.result is not CodeResult.ACCEPTED)


class MemoryCodeFactorTests(CodeFactorContract, Harness):
    def make(self):
        self.factor = MemoryCodeFactor(METHOD, users={"alice"}, sends=True)
        self.factor.codes["alice"] = "123456"
        self.alice, self.bob = account("alice"), account("bob")

    def right_code(self) -> str:
        return "123456"


class TokenFactorTests(CodeFactorContract, Harness):
    """Over the real store: the replay guard is the store's atomic write."""

    def make(self):
        folder = Path(tempfile.mkdtemp())
        db = Store.open(folder / "db.sqlite3", folder / "seed.key")
        self.addCleanup(db.close)
        for name in ("alice", "bob"):
            db.add_user(name, password_hash=None, phone=None, now=T0)
        db.add_token("alice", NewToken(kind=TokenKind.TOTP, secret=SEED), now=T0)
        self.factor = TokenFactor(ThreadedStore(db, run_now), self.clock)
        self.alice, self.bob = db.load_account("alice"), db.load_account("bob")

    def right_code(self) -> str:
        return oath.hotp(SEED, oath.totp_step(self.clock.seconds()))


class SmsCodesTests(CodeFactorContract, Harness):
    def make(self):
        self.gateway = MemorySmsGateway()
        self.factor = SmsCodes(self.gateway, self.clock)
        self.alice, self.bob = account("alice"), account("bob", phone=None)

    def right_code(self) -> str:
        return self.gateway.last_code()


# --- ApprovalFactor ---------------------------------------------------------------------------

class ApprovalFactorContract:
    """``make`` sets ``factor``, ``alice`` and ``bob``; ``answer(verdict)`` is the
    user's answer to the last request; ``withdrawn()`` whether the last request
    was withdrawn where it went (push closed, call abandoned); ``exhaust()``
    spends alice's send limit."""

    def request(self, who: Account | None = None) -> defer.Deferred:
        d = self.factor.request_approval(self.login(who), TIMEOUT)
        self.assertNoResult(d)
        return d

    def test_usable_by_an_account_that_has_it_only(self):
        self.assertTrue(self.factor.usable(self.alice))
        self.assertFalse(self.factor.usable(self.bob))

    def test_each_answer_fires_with_its_verdict(self):
        for verdict in (Verdict.APPROVE, Verdict.DENY, Verdict.FRAUD):
            d = self.request()
            self.answer(verdict)
            self.assertIs(self.successResultOf(d), verdict)

    def test_no_answer_in_time_is_a_timeout(self):
        d = self.request()
        self.clock.advance(TIMEOUT - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, defer.TimeoutError)

    def test_cancelling_withdraws_the_request(self):
        d = self.request()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(self.withdrawn())

    def test_withdrawing_a_user_closes_only_their_requests(self):
        mine = self.request()
        theirs = self.request(account("carol"))
        self.factor.withdraw_user("alice")
        self.failureResultOf(mine, ApprovalWithdrawn)
        self.assertNoResult(theirs)

    def test_over_the_send_limit_it_refuses_and_sends_nothing(self):
        self.exhaust()
        with self.assertRaises(FactorRefused) as refused:
            self.factor.request_approval(self.login(), TIMEOUT)
        self.assertIs(refused.exception.reason, Reason.RATE_LIMITED)
        self.assertTrue(refused.exception.message)


class MemoryApprovalFactorTests(ApprovalFactorContract, Harness):
    def make(self):
        self.factor = MemoryApprovalFactor(METHOD, self.clock, users={"alice", "carol"})
        self.alice, self.bob = account("alice"), account("bob")

    def answer(self, verdict):
        self.factor.answer(verdict)

    def withdrawn(self) -> bool:
        return self.factor.withdrawn[-1:] == ["alice"]

    def exhaust(self):
        self.factor.refusal = FactorRefused(Reason.RATE_LIMITED, "Too many.")


class PushFactorTests(ApprovalFactorContract, Harness):
    def make(self):
        self.push = PushTransactions(self.clock)
        self.factor = PushFactor(self.push, push_limit(self.clock, 30))
        self.alice, self.bob = account("alice"), account("bob", devices=0)

    def request(self, who=None):
        d = super().request(who)
        if who is None:
            self.txid = self.push.pending_for("alice")[-1].txid
        return d

    def answer(self, verdict):
        self.push.answer(self.txid, "alice", verdict.value)

    def withdrawn(self) -> bool:
        return self.push.get(self.txid).state == "closed"

    def exhaust(self):
        self.factor._limit.set_per_hour(0)


class VoiceFactorTests(ApprovalFactorContract, Harness):
    def make(self):
        self.gateway = MemoryVoiceGateway()
        self.calls = VoiceCalls(self.gateway, self.clock, public_url="https://mfa.example.org",
                                per_user_per_hour=30)
        self.fraud: list[tuple[str, str]] = []
        self.factor = VoiceFactor(self.calls, self.clock, report_fraud=self.report_fraud)
        self.alice, self.bob = account("alice"), account("bob", phone=None)

    def report_fraud(self, user, client):
        self.fraud.append((user, client))
        return defer.succeed(None)

    def call_id(self) -> str:
        return self.gateway.calls[-1].answer_url.split("/")[-2]

    def answer(self, verdict):
        call_id = self.call_id()
        self.calls.answer_twiml(call_id)
        keys = {Verdict.APPROVE: "#", Verdict.DENY: "1", Verdict.FRAUD: "0"}[verdict]
        self.calls.gather(call_id, keys)

    def withdrawn(self) -> bool:
        return len(self.calls) == 0

    def exhaust(self):
        self.calls.set_limits(0, 10)

    def test_a_fraud_keypress_is_reported_before_the_answer_fires(self):
        d = self.request()
        self.answer(Verdict.FRAUD)
        self.assertEqual(self.fraud, [("alice", "vpn")])
        self.assertIs(self.successResultOf(d), Verdict.FRAUD)


# --- ConfirmedApprovalFactor ------------------------------------------------------------------

class ConfirmedApprovalFactorContract:
    """``make`` sets ``factor``, ``alice`` and ``bob``; ``shown(ticket)`` is what the
    device shows; ``answer(ticket, verdict)`` the device's answer; ``exhaust()``
    spends alice's send limit; ``late_window`` how long an ended approval is known."""

    def open(self, station: str = "198.51.100.7") -> str:
        return self.factor.open(self.login(station=station), TIMEOUT)

    def wrong(self, ticket: str) -> str:
        return "10" if self.shown(ticket) != "10" else "11"

    def test_usable_by_an_account_that_has_it_only(self):
        self.assertTrue(self.factor.usable(self.alice))
        self.assertFalse(self.factor.usable(self.bob))

    def test_an_open_approval_is_found_by_its_login_and_counted(self):
        ticket = self.open()
        self.assertTrue(isinstance(self.factor.prompt, str) and self.factor.prompt)
        self.assertEqual(self.factor.find(self.login().key), ticket)
        self.assertIsNone(self.factor.find(self.login(station="198.51.100.8").key))
        self.assertTrue(self.factor.known(ticket))
        self.assertEqual((self.factor.pending_count("alice"), self.factor.pending_count("bob"),
                          self.factor.pending_count()), (1, 0, 1))

    def test_the_right_confirmation_waits_for_the_device(self):
        ticket = self.open()
        d = self.factor.confirm(ticket, self.shown(ticket))
        self.assertNoResult(d)
        self.answer(ticket, Verdict.APPROVE)
        self.assertIs(self.successResultOf(d), Verdict.APPROVE)

    def test_the_device_may_answer_before_the_user_types(self):
        for i, verdict in enumerate((Verdict.APPROVE, Verdict.DENY)):
            ticket = self.open(station=f"198.51.100.{10 + i}")
            self.answer(ticket, verdict)
            self.assertEqual(self.factor.pending_count(), 0)
            self.assertIs(self.successResultOf(self.factor.confirm(ticket, self.shown(ticket))),
                          verdict)

    def test_a_wrong_confirmation_is_refused_and_closes_the_approval(self):
        ticket = self.open()
        number = self.shown(ticket)
        with self.assertRaises(WrongConfirmation) as refused:
            self.factor.confirm(ticket, self.wrong(ticket))
        self.assertIs(refused.exception.reason, Reason.WRONG_NUMBER)
        self.assertEqual(self.factor.pending_count(), 0)
        self.failureResultOf(self.factor.confirm(ticket, number), ApprovalWithdrawn)

    def test_an_unknown_ticket_is_refused(self):
        self.assertFalse(self.factor.known("no-such-ticket"))
        with self.assertRaises(UnknownApproval):
            self.factor.confirm("no-such-ticket", "42")

    def test_an_unanswered_approval_expires(self):
        ticket = self.open()
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.factor.pending_count(), 0)
        self.assertIsNone(self.factor.find(self.login().key))
        self.failureResultOf(self.factor.confirm(ticket, self.shown(ticket)),
                             defer.TimeoutError)

    def test_withdrawing_closes_the_approval(self):
        ticket, theirs = self.open(), self.factor.open(self.login(account("carol")), TIMEOUT)
        number = self.shown(ticket)
        self.factor.withdraw(ticket)
        self.failureResultOf(self.factor.confirm(ticket, number), ApprovalWithdrawn)
        self.factor.withdraw_user("carol")
        self.assertEqual(self.factor.pending_count(), 0)
        self.assertTrue(self.factor.known(theirs))

    def test_an_ended_approval_is_forgotten_after_a_while(self):
        ticket = self.open()
        self.answer(ticket, Verdict.APPROVE)
        self.clock.advance(self.late_window + 1)
        self.assertFalse(self.factor.known(ticket))

    def test_over_the_send_limit_it_refuses(self):
        self.exhaust()
        with self.assertRaises(FactorRefused) as refused:
            self.open()
        self.assertIs(refused.exception.reason, Reason.RATE_LIMITED)


class MemoryConfirmedApprovalFactorTests(ConfirmedApprovalFactorContract, Harness):
    late_window = 600

    def make(self):
        self.factor = MemoryConfirmedApprovalFactor(METHOD, self.clock,
                                                    users={"alice", "carol"})
        self.alice, self.bob = account("alice"), account("bob")

    def shown(self, ticket):
        return self.factor.shown(ticket)

    def answer(self, ticket, verdict):
        self.factor.answer(ticket, verdict)

    def exhaust(self):
        self.factor.refusal = FactorRefused(Reason.RATE_LIMITED, "Too many.")


class NumberMatchingPushFactorTests(ConfirmedApprovalFactorContract, Harness):
    late_window = 600

    def make(self):
        self.push = PushTransactions(self.clock, late_window=self.late_window)
        self.factor = NumberMatchingPushFactor(self.push, push_limit(self.clock, 30))
        self.alice, self.bob = account("alice"), account("bob", devices=0)

    def shown(self, ticket):
        return self.push.get(ticket).number

    def answer(self, ticket, verdict):
        txn = self.push.get(ticket)
        self.push.answer(ticket, txn.user, verdict.value)

    def exhaust(self):
        self.factor._limit.set_per_hour(0)

    def test_a_held_push_of_the_same_login_is_not_joined(self):
        # Number matching switched on (a reload) while a push without a number waits.
        held = PushFactor(self.push, push_limit(self.clock, 30))
        self.assertNoResult(held.request_approval(self.login(), TIMEOUT))
        self.assertIsNone(self.factor.find(self.login().key))
