"""SMS one-time codes: sending, limits, checking, and the core's SMS flows."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.model import AuthRequest, Outcome, Reason, TokenKind
from mfaserver.auth.pipeline import Authenticator, split_password
from mfaserver.config import MfaConfig
from mfaserver.factors import METHODS
from mfaserver.factors.token import TokenFactor
from mfaserver.factors.sms import SendRefused, SmsCodes, mask_phone
from mfaserver.gateways.base import GatewayError
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryDirectory, MemorySmsGateway, run_now

T0 = 1_700_000_000.0
PHONE = "+16502530000"


def test_keyword_sms_is_split_off_in_any_case():
    keywords = frozenset({"sms"})
    assert split_password("secret,SMS", ",", keywords) == ("secret", "sms")
    assert split_password("secret,smsx", ",", keywords) == ("secret,smsx", None)


def test_phone_is_masked_to_its_last_four_digits():
    assert mask_phone(PHONE) == "+*******0000"


class SmsCodesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.gateway = MemorySmsGateway()
        self.codes = SmsCodes(self.gateway, self.clock, code_length=8, ttl=300,
                              per_user_per_hour=5, per_number_per_hour=10)

    def test_a_code_is_sent_checked_once_and_expires(self):
        self.successResultOf(self.codes.send_code("alice", PHONE))
        code = self.gateway.last_code()
        self.assertEqual((self.gateway.sent[0][0], len(code)), (PHONE, 8))
        self.assertFalse(self.codes.check_code("alice", "00000000" if code != "00000000" else "1" * 8))
        self.assertFalse(self.codes.check_code("bob", code))
        self.assertTrue(self.codes.check_code("alice", code))
        self.assertFalse(self.codes.check_code("alice", code))
        self.successResultOf(self.codes.send_code("alice", PHONE))
        self.clock.advance(301)
        self.assertFalse(self.codes.check_code("alice", self.gateway.last_code()))

    def test_only_the_newest_code_counts(self):
        self.codes.send_code("alice", PHONE)
        first = self.gateway.last_code()
        self.codes.send_code("alice", PHONE)
        if first != self.gateway.last_code():
            self.assertFalse(self.codes.check_code("alice", first))
        self.assertTrue(self.codes.check_code("alice", self.gateway.last_code()))

    def test_sends_are_limited_per_user_and_per_number(self):
        for _ in range(3):
            self.codes.send_code("alice", PHONE)
        with pytest.raises(SendRefused):
            self.codes.send_code("alice", PHONE)
        for name in ("bob", "carol", "dave"):
            self.codes.send_code(name, "+16502530001")
        with pytest.raises(SendRefused):
            self.codes.send_code("erin", "+16502530001")
        self.assertEqual(len(self.gateway.sent), 6)


class SmsFlowTests(SynchronousTestCase):
    def setUp(self):
        d = Path(tempfile.mkdtemp())
        self.db = Store.open(d / "db.sqlite3", d / "seed.key")
        self.addCleanup(self.db.close)
        self.db.add_user("alice", password_hash=None, phone=PHONE, now=T0)   # phone only
        self.db.add_user("bob", password_hash=None, phone=PHONE, now=T0)     # phone + TOTP
        self.db.add_token("bob", NewToken(kind=TokenKind.TOTP, secret=bytes(20)), now=T0)
        self.db.add_user("carol", password_hash=None, phone=None, now=T0)    # TOTP, no phone
        self.db.add_token("carol", NewToken(kind=TokenKind.TOTP, secret=bytes(20)), now=T0)
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.gateway = MemorySmsGateway()
        store = ThreadedStore(self.db, run_now)
        self.auth = Authenticator(
            MemoryDirectory({"alice": "pw", "bob": "pw", "carol": "pw"}),
            store, ChallengeRegistry(self.clock), MfaConfig(), self.clock, methods=METHODS,
            factors={"totp": TokenFactor(store, self.clock),
                     "sms": SmsCodes(self.gateway, self.clock)})
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def decide(self, username, password, state=None):
        request = AuthRequest(client_name="vpn", username=username, password=password,
                              state=state)
        return self.successResultOf(self.auth.authenticate(request))

    def test_password_sms_sends_one_code_and_challenges_for_it(self):
        challenge = self.decide("bob", "pw,sms")
        self.assertIs(challenge.outcome, Outcome.CHALLENGE)
        self.assertIn("+*******0000", challenge.reply_message)
        self.assertEqual(len(self.gateway.sent), 1)
        decision = self.decide("bob", self.gateway.last_code(), state=challenge.state)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "sms"))

    def test_a_texted_code_works_once_in_the_password_field(self):
        self.decide("bob", "pw,sms")
        code = self.gateway.last_code()
        self.assertIs(self.decide("bob", f"pw,{code}").outcome, Outcome.ACCEPT)
        self.assertEqual(self.decide("bob", f"pw,{code}").outcome, Outcome.REJECT)

    def test_a_phone_only_user_gets_a_text_for_a_bare_password(self):
        challenge = self.decide("alice", "pw")
        self.assertIs(challenge.outcome, Outcome.CHALLENGE)
        self.assertEqual(challenge.factor, "sms")
        decision = self.decide("alice", self.gateway.last_code(), state=challenge.state)
        self.assertIs(decision.outcome, Outcome.ACCEPT)

    def test_a_wrong_texted_code_counts_towards_the_lockout(self):
        challenge = self.decide("alice", "pw")
        wrong = "000000" if self.gateway.last_code() != "000000" else "111111"
        decision = self.decide("alice", wrong, state=challenge.state)
        self.assertEqual((decision.reason, decision.factor), (Reason.BAD_CODE, "sms"))
        self.assertEqual(self.db.get_user("alice").failures, 1)

    def test_no_phone_no_text(self):
        self.assertEqual(self.decide("carol", "pw,sms").reason, Reason.NO_PHONE)
        self.assertEqual(self.gateway.sent, [])

    def test_the_fourth_request_in_a_row_is_refused(self):
        for _ in range(3):
            self.assertIs(self.decide("bob", "pw,sms").outcome, Outcome.CHALLENGE)
        self.assertEqual(self.decide("bob", "pw,sms").reason, Reason.RATE_LIMITED)
        self.assertEqual(len(self.gateway.sent), 3)

    def test_a_wrong_password_sends_nothing(self):
        self.assertEqual(self.decide("bob", "nope,sms").reason, Reason.BAD_PASSWORD)
        self.assertEqual(self.gateway.sent, [])

    def test_gateway_down_rejects_in_secure_mode_and_accepts_in_safe_mode(self):
        self.gateway.failure = GatewayError("twilio: no answer within 10 s")
        self.assertEqual(self.decide("bob", "pw,sms").reason, Reason.GATEWAY_FAILED)
        self.auth.policy = dataclasses.replace(MfaConfig(), failmode="safe")
        decision = self.decide("bob", "pw,sms")
        self.assertEqual((decision.outcome, decision.reason),
                         (Outcome.ACCEPT, Reason.FAILMODE_SAFE))
        self.assertEqual(self.db.recent_audit(limit=1)[0].reason, "failmode_safe")

    def test_safe_mode_never_lets_a_wrong_password_through(self):
        self.gateway.failure = GatewayError("down")
        self.auth.policy = dataclasses.replace(MfaConfig(), failmode="safe")
        self.assertEqual(self.decide("bob", "nope,sms").outcome, Outcome.REJECT)

    def test_the_code_never_reaches_the_log(self):
        challenge = self.decide("bob", "pw,sms")
        code = self.gateway.last_code()
        self.decide("bob", code, state=challenge.state)
        text = " ".join(formatEvent(e) + repr(e) for e in self.events)
        self.assertNotIn(code, text)
