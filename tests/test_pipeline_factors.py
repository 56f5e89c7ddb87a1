"""The core with second factors it has never heard of: a site's own code factor, approval
factor and confirmed approval, built from the fakes in `mfaserver.testing`, plug in with
their `Method` and nothing else (no change to the core). Over `MemoryAccountStore`, on a
Clock: the core needs no database either."""

from __future__ import annotations

import dataclasses

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import DeliveryFailed, FactorRefused
from mfaserver.auth.model import Account, AuthRequest, Method, Outcome, Reason, Verdict
from mfaserver.auth.pipeline import Authenticator
from mfaserver.config import MfaConfig
from mfaserver.testing import (MemoryAccountStore, MemoryApprovalFactor, MemoryCodeFactor,
                               MemoryConfirmedApprovalFactor, MemoryDirectory)

T0 = 1_700_000_010.0

# A site's own methods, in the order a default falls back through.
PIGEON = Method("pigeon", "carrier pigeon", starts=True, unusable=Reason.NO_DEVICE,
                unusable_message="You have no pigeon.")
KEY = Method("key", "a code from your key", starts=False, unusable=Reason.NOT_ENROLLED,
             unusable_message="You have no key.")
BEACON = Method("beacon", "the beacon", starts=True, unusable=Reason.NO_DEVICE,
                unusable_message="You have no beacon.")
LETTER = Method("letter", "a letter", starts=True, unusable=Reason.NO_PHONE,
                unusable_message="You have no letterbox.")
METHODS = (PIGEON, KEY, BEACON, LETTER)

POLICY = MfaConfig(default_method="pigeon", timeout=60.0, max_pending_per_user=2)


class OwnFactorsTests(SynchronousTestCase):
    """alice can use every factor; bob only the key."""

    def setUp(self):
        self.store = MemoryAccountStore()
        for name in ("alice", "bob"):
            self.store.add(Account(name=name, phone=None, blocked=False, failures=0,
                                   locked_until=None))
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.pigeon = MemoryApprovalFactor(PIGEON, self.clock, users={"alice"})
        self.key = MemoryCodeFactor(KEY, users={"alice", "bob"})
        self.key.codes.update(alice="111111", bob="222222")
        self.beacon = MemoryConfirmedApprovalFactor(BEACON, self.clock, users={"alice"})
        self.letter = MemoryCodeFactor(LETTER, users={"alice"}, sends=True)
        self.letter.codes["alice"] = "333333"
        self.auth = Authenticator(
            MemoryDirectory({"alice": "pw", "bob": "pw"}), self.store,
            ChallengeRegistry(self.clock), POLICY, self.clock, methods=METHODS,
            factors={"pigeon": self.pigeon, "key": self.key, "beacon": self.beacon,
                     "letter": self.letter})

    def start(self, password: str, username: str = "alice", **kw) -> defer.Deferred:
        return self.auth.authenticate(AuthRequest(client_name="vpn", username=username,
                                                  password=password, **kw))

    def decide(self, password: str, username: str = "alice", **kw):
        return self.successResultOf(self.start(password, username, **kw))

    def test_the_default_method_holds_the_login_until_the_approval(self):
        d = self.start("pw")
        self.assertNoResult(d)
        [(login, _)] = self.pigeon.requests
        self.assertEqual((login.user, login.client), ("alice", "vpn"))
        self.pigeon.answer(Verdict.APPROVE)
        decision = self.successResultOf(d)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "pigeon"))

    def test_an_unanswered_approval_times_out(self):
        d = self.start("pw,pigeon")
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_TIMEOUT)

    def test_a_code_of_any_code_factor_completes_the_first_round(self):
        for code, factor in (("111111", "key"), ("333333", "letter")):
            decision = self.decide("pw," + code)
            self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, factor))

    def test_a_replayed_code_is_refused_as_reused(self):
        self.decide("pw,111111")
        self.assertEqual(self.decide("pw,111111").reason, Reason.CODE_REUSED)

    def test_method_keywords_come_from_the_methods_that_start_something(self):
        self.assertEqual(self.decide("pw,letter").reply_message, "Enter the code sent to alice.")
        self.assertEqual(self.decide("pw,Beacon").reply_message, self.beacon.prompt)
        # "key" starts nothing: it is no keyword, so "pw,key" is the password.
        self.assertEqual(self.decide("pw,key").reason, Reason.BAD_PASSWORD)

    def test_a_method_the_user_cannot_use_is_refused_with_its_own_words(self):
        decision = self.decide("pw,pigeon", "bob")
        self.assertEqual((decision.reason, decision.reply_message, decision.factor),
                         (Reason.NO_DEVICE, "You have no pigeon.", "pigeon"))
        self.assertEqual(self.pigeon.requests, [])

    def test_the_menu_lists_the_methods_in_their_order(self):
        self.auth.policy = dataclasses.replace(POLICY, challenge_menu=True)
        menu = self.decide("pw")
        self.assertEqual(menu.reply_message, "Enter 1 for carrier pigeon, 2 for the beacon, "
                                             "3 for a letter, or a code from your key.")
        d = self.start("1", state=menu.state)
        self.pigeon.answer(Verdict.DENY)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_DENIED)

    def test_an_unusable_default_falls_back_in_method_order(self):
        decision = self.decide("pw", "bob")
        self.assertEqual((decision.outcome, decision.reply_message),
                         (Outcome.CHALLENGE, "Enter the code from your authenticator app or token."))
        self.assertEqual(self.decide("222222", "bob", state=decision.state).outcome,
                         Outcome.ACCEPT)

    def test_a_confirmed_approval_challenges_and_needs_the_shown_value(self):
        challenge = self.decide("pw,beacon")
        ticket = self.beacon.find(("alice", "vpn", None))
        d = self.start(self.beacon.shown(ticket), state=challenge.state)
        self.assertNoResult(d)
        self.beacon.answer(ticket, Verdict.APPROVE)
        self.assertEqual(self.successResultOf(d).factor, "beacon")

    def test_a_refusal_and_a_delivery_failure_of_a_factor(self):
        self.letter.refusal = FactorRefused(Reason.RATE_LIMITED, "Too many letters.")
        self.assertEqual(self.decide("pw,letter").reply_message, "Too many letters.")
        self.letter.refusal = None
        self.letter.failure = DeliveryFailed("the post is on strike")
        self.assertEqual(self.decide("pw,letter").reason, Reason.GATEWAY_FAILED)
        self.auth.policy = dataclasses.replace(POLICY, failmode="safe")
        self.assertEqual(self.decide("pw,letter").reason, Reason.FAILMODE_SAFE)

    def test_a_fraud_report_withdraws_the_approvals_of_every_factor(self):
        held = self.start("pw,pigeon")
        self.decide("pw,beacon", calling_station_id="198.51.100.7")
        self.successResultOf(defer.Deferred.fromCoroutine(
            self.auth.report_fraud("alice", "vpn", "pigeon")))
        self.assertEqual(self.successResultOf(held).reason, Reason.FACTOR_DENIED)
        self.assertEqual(self.beacon.pending_count(), 0)
        self.assertTrue(self.store.accounts["alice"].blocked)
        self.assertEqual([(e.outcome, e.reason) for e in self.store.audit][-1],
                         ("block", "fraud_reported"))

    def test_factors_for_unknown_methods_or_of_no_known_kind_are_refused(self):
        with self.assertRaises(ValueError):
            self.auth.set_factors({"carrier": self.pigeon})
        with self.assertRaises(TypeError):
            self.auth.set_factors({"pigeon": object()})
