"""The core's out-of-band flows: method choice, the menu, push (with and without number
matching), phone calls, timeouts, failmode, fraud reports, limits, joining and cancelling.

Over the real store (temporary SQLite), a real `PushTransactions` and a fake voice factor,
all on a `task.Clock`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.model import (
    AuthRequest, Device, Outcome, Principal, Reason, TokenKind, Verdict,
)
from mfaserver.auth.pipeline import (
    MSG_TOO_MANY_PENDING, MSG_TRY_LATER, Authenticator, split_password,
)
from mfaserver.config import ClientConfig, MfaConfig
from mfaserver.factors import METHODS, oath
from mfaserver.factors.push import (
    MSG_MATCH_NUMBER, NumberMatchingPushFactor, PushFactor, PushTransactions, TransactionExpired,
    push_limit,
)
from mfaserver.factors.token import TokenFactor
from mfaserver.factors.voice import PHONE, VoiceFactor
from mfaserver.factors.push_protocol import generate_device_key, public_key_text
from mfaserver.factors.sms import SendRefused, SmsCodes
from mfaserver.gateways.base import GatewayError
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryDirectory, MemorySmsGateway, run_now

T0 = 1_700_000_010.0
SEED = bytes(range(20))
ALICE_PHONE = "+16502530000"
CAROL_PHONE = "+16502530001"

POLICY = MfaConfig(delimiter=",", challenge=True, unenrolled="reject", challenge_timeout=300,
                   lockout_threshold=10, lockout_minutes=15, totp_window=1, hotp_look_ahead=10,
                   failmode="secure", default_method="push", timeout=60.0,
                   challenge_menu=False, max_pending_per_user=1, max_pending=100)


def totp_code(now: float, seed: bytes = SEED) -> str:
    return oath.hotp(seed, oath.totp_step(now))


def client_config(name: str, **kw) -> ClientConfig:
    return ClientConfig(name=name, network=ipaddress.ip_network("192.0.2.0/24"),
                        secret=b"s3cret", **kw)


@pytest.mark.parametrize("field, expected", [
    ("secret,push", ("secret", "push")),
    ("secret,PHONE", ("secret", "phone")),
    ("secret,Sms", ("secret", "sms")),
    ("se,cret,push", ("se,cret", "push")),
    ("secret,pushy", ("secret,pushy", None)),
    ("secret,totp", ("secret,totp", None)),
    ("secretpush", ("secretpush", None)),
])
def test_split_password_splits_off_a_method_keyword_in_any_case(field, expected):
    keywords = frozenset(method.name for method in METHODS if method.starts)
    assert split_password(field, ",", keywords) == expected


class FakeVoice:
    """A `VoiceCalls` stand-in: records calls; the test answers them."""

    reports_fraud = False

    def __init__(self):
        self.calls: list[tuple[str, str, str, Deferred]] = []
        self.withdrawn: list[str] = []
        self.refuse = False
        self.failure: Exception | None = None

    def request_approval(self, user: str, phone: str, *, client: str, login_key=None,
                         timeout=None) -> Deferred:
        if self.refuse:
            raise SendRefused()
        if self.failure is not None:
            return defer.fail(self.failure)
        d = Deferred(lambda d: self.withdrawn.append(user))
        self.calls.append((user, phone, client, d))
        return d

    def answer(self, verdict: Verdict, index: int = -1) -> None:
        self.calls[index][3].callback(verdict)

    def withdraw_user(self, user: str) -> None:
        self.withdrawn.append(user)

    def fail(self, error: Exception, index: int = -1) -> None:
        """The provider refused the call (after the request went out)."""
        self.calls[index][3].errback(error)


class FakeAlerts:
    """An AlertSink that records alerts; ``pending`` makes sends hang, ``failure`` fail."""

    def __init__(self):
        self.sent: list[tuple[str, str]] = []
        self.failure: Exception | None = None
        self.pending = False

    def send_alert(self, subject: str, text: str) -> Deferred:
        self.sent.append((subject, text))
        if self.failure is not None:
            return defer.fail(self.failure)
        if self.pending:
            return Deferred()
        return defer.succeed(None)


class OutOfBandTests(SynchronousTestCase):
    """alice: a push device, a TOTP token and a phone; bob: a push device only;
    carol: a phone only."""

    number_matching = False

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.db = Store.open(self.dir / "db.sqlite3", self.dir / "seed.key")
        self.addCleanup(self.db.close)
        self.store = ThreadedStore(self.db, run_now)
        self.directory = MemoryDirectory({"alice": "pw-alice", "bob": "pw-bob", "carol": "pw-c",
                                          "dave": "pw-d"})
        self.db.add_user("alice", password_hash=None, phone=ALICE_PHONE, now=T0)
        self.db.add_user("bob", password_hash=None, phone=None, now=T0)
        self.db.add_user("carol", password_hash=None, phone=CAROL_PHONE, now=T0)
        self.db.add_user("dave", password_hash=None, phone=None, now=T0)
        self.db.add_token("alice", NewToken(kind=TokenKind.TOTP, secret=SEED), now=T0)
        self.db.add_token("dave", NewToken(kind=TokenKind.TOTP, secret=SEED), now=T0)
        self.enroll("alice")
        self.enroll("bob")
        self.challenges = ChallengeRegistry(self.clock, ttl=300)
        self.push = PushTransactions(self.clock)
        self.voice = FakeVoice()
        self.alerts = FakeAlerts()
        self.auth = self.make_auth()

    def make_auth(self, policy=POLICY, sms=None, clients=None) -> Authenticator:
        push = NumberMatchingPushFactor if self.number_matching else PushFactor
        factors = {
            "totp": TokenFactor(self.store, self.clock),
            "push": push(self.push, push_limit(self.clock, 30)),
            "phone": VoiceFactor(self.voice, self.clock, report_fraud=self.report_phone_fraud),
        }
        if sms is not None:
            factors["sms"] = sms
        return Authenticator(self.directory, self.store, self.challenges, policy, self.clock,
                             methods=METHODS, factors=factors, alerts=self.alerts,
                             clients=clients or {})

    def report_phone_fraud(self, user: str, client: str) -> Deferred:
        return Deferred.fromCoroutine(self.auth.report_fraud(user, client, "phone"))

    def enroll(self, user: str) -> None:
        digest = f"digest-{user}"
        self.db.add_enrollment(user, digest, T0 + 600, now=T0)
        self.db.enroll_device(digest, Device(id=f"dev-{user}", user="",
                                             public_key=public_key_text(generate_device_key())),
                              now=T0)

    def start(self, username="alice", password="pw-alice", client="vpn", **kw) -> Deferred:
        request = AuthRequest(client_name=client, username=username, password=password, **kw)
        return self.auth.authenticate(request)

    def decide(self, username="alice", password="pw-alice", client="vpn", **kw):
        return self.successResultOf(self.start(username, password, client, **kw))

    def only_txn(self, user="alice"):
        txns = self.push.pending_for(user)
        self.assertEqual(len(txns), 1)
        return txns[0]

    def audit(self, user="alice"):
        return list(reversed(self.db.recent_audit(user=user, limit=50)))


class MethodChoiceTests(OutOfBandTests):

    def test_bare_password_pushes_by_default_and_an_approval_accepts(self):
        d = self.start(nas_ip="10.0.0.1", calling_station_id="198.51.100.7")
        self.assertNoResult(d)
        txn = self.only_txn()
        self.assertEqual((txn.client, txn.nas_ip, txn.calling_station_id),
                         ("vpn", "10.0.0.1", "198.51.100.7"))
        self.assertEqual(self.audit(), [])
        self.push.answer(txn.txid, "alice", "approve")
        decision = self.successResultOf(d)
        self.assertEqual((decision.outcome, decision.reason, decision.factor),
                         (Outcome.ACCEPT, Reason.OK, "push"))
        [row] = self.audit()
        self.assertEqual((row.outcome, row.factor, row.reason, row.calling_station_id),
                         ("accept", "push", "ok", "198.51.100.7"))

    def test_push_denied_on_the_device_rejects(self):
        d = self.start()
        self.push.answer(self.only_txn().txid, "alice", "deny")
        decision = self.successResultOf(d)
        self.assertEqual((decision.outcome, decision.reason, decision.factor),
                         (Outcome.REJECT, Reason.FACTOR_DENIED, "push"))

    def test_push_approval_carries_the_directory_attributes(self):
        class AttributeDirectory:
            def authenticate(self, username, password):
                return defer.succeed(Principal(username, attributes=(("Class", "staff"),)))

        self.auth.directory = AttributeDirectory()
        d = self.start()
        self.push.answer(self.only_txn().txid, "alice", "approve")
        self.assertEqual(self.successResultOf(d).attributes, (("Class", "staff"),))

    def test_user_default_totp_overrides_the_server_default_push(self):
        self.db.set_default_method("alice", "totp")
        decision = self.decide()
        self.assertEqual(decision.outcome, Outcome.CHALLENGE)
        self.assertIn("code", decision.reply_message)
        self.assertEqual(len(self.push), 0)
        accepted = self.decide(password=totp_code(T0), state=decision.state)
        self.assertEqual((accepted.outcome, accepted.factor), (Outcome.ACCEPT, "totp"))

    def test_user_default_phone_places_a_call(self):
        self.db.set_default_method("alice", "phone")
        d = self.start()
        self.assertNoResult(d)
        self.assertEqual([c[:3] for c in self.voice.calls], [("alice", ALICE_PHONE, "vpn")])
        self.assertEqual(len(self.push), 0)
        self.voice.answer(Verdict.APPROVE)
        decision = self.successResultOf(d)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "phone"))

    def test_server_default_method_applies_when_the_user_has_none(self):
        self.auth.policy = dataclasses.replace(POLICY, default_method="totp")
        self.assertEqual(self.decide().outcome, Outcome.CHALLENGE)
        self.assertEqual(len(self.push), 0)
        self.auth.policy = dataclasses.replace(POLICY, default_method="phone")
        self.assertNoResult(self.start())
        self.assertEqual(len(self.voice.calls), 1)

    def test_an_unusable_default_falls_back_to_the_first_usable_method(self):
        # sms is not configured: alice's default cannot be used; push comes first.
        self.db.set_default_method("alice", "sms")
        self.auth.policy = dataclasses.replace(POLICY, default_method="sms")
        self.assertNoResult(self.start())
        self.assertEqual(len(self.push), 1)
        # carol has only a phone: her login calls her, whatever the defaults say.
        self.assertNoResult(self.start("carol", "pw-c"))
        self.assertEqual(self.voice.calls[-1][:2], ("carol", CAROL_PHONE))

    def test_user_with_only_a_token_gets_the_code_challenge(self):
        decision = self.decide("dave", "pw-d")
        self.assertEqual(decision.outcome, Outcome.CHALLENGE)
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.voice.calls, [])

    def test_push_keyword_pushes_even_when_the_default_is_totp(self):
        self.db.set_default_method("alice", "totp")
        d = self.start(password="pw-alice,PUSH")
        self.assertNoResult(d)
        self.push.answer(self.only_txn().txid, "alice", "approve")
        self.assertEqual(self.successResultOf(d).factor, "push")

    def test_phone_keyword_calls(self):
        d = self.start(password="pw-alice,phone")
        self.assertNoResult(d)
        self.assertEqual(len(self.voice.calls), 1)
        self.assertEqual(len(self.push), 0)
        self.voice.answer(Verdict.APPROVE)
        self.assertEqual(self.successResultOf(d).outcome, Outcome.ACCEPT)

    def test_sms_keyword_texts_a_code_and_the_code_completes_the_login(self):
        gateway = MemorySmsGateway()
        self.auth = self.make_auth(sms=SmsCodes(gateway, self.clock))
        challenge = self.decide(password="pw-alice,sms")
        self.assertEqual(challenge.outcome, Outcome.CHALLENGE)
        self.assertIn("+*******0000", challenge.reply_message)
        self.assertNotIn(ALICE_PHONE, challenge.reply_message)
        self.assertEqual(gateway.sent[0][0], ALICE_PHONE)
        decision = self.decide(password=gateway.last_code(), state=challenge.state)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "sms"))

    def test_method_keywords_for_unavailable_methods_are_rejected(self):
        push = self.decide("dave", "pw-d,push")
        self.assertEqual((push.reason, push.factor), (Reason.NO_DEVICE, "push"))
        phone = self.decide("bob", "pw-bob,phone")
        self.assertEqual((phone.reason, phone.reply_message), (Reason.NO_PHONE, PHONE.unusable_message))
        sms = self.decide(password="pw-alice,sms")  # no [sms] configured
        self.assertEqual((sms.reason, sms.factor), (Reason.NO_PHONE, "sms"))
        self.assertEqual(self.voice.calls, [])
        self.assertEqual(len(self.push), 0)

    def test_wrong_password_with_a_keyword_starts_nothing(self):
        decision = self.decide(password="nope,push")
        self.assertEqual(decision.reason, Reason.BAD_PASSWORD)
        self.assertEqual(len(self.push), 0)

    def test_blocked_user_with_a_keyword_starts_nothing(self):
        self.db.set_blocked("alice", True)
        self.assertEqual(self.decide(password="pw-alice,phone").reason, Reason.USER_BLOCKED)
        self.assertEqual(self.voice.calls, [])


class MenuTests(OutOfBandTests):

    def setUp(self):
        super().setUp()
        self.auth.policy = dataclasses.replace(POLICY, challenge_menu=True)

    def test_menu_lists_the_out_of_band_methods_and_offers_a_code(self):
        decision = self.decide()
        self.assertEqual(decision.outcome, Outcome.CHALLENGE)
        self.assertEqual(decision.reply_message,
                         "Enter 1 for push to your app, 2 for phone call, "
                         "or a code from your app or token.")
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.voice.calls, [])

    def test_menu_without_a_token_does_not_offer_a_code(self):
        self.enroll("carol")
        decision = self.decide("carol", "pw-c")
        self.assertEqual(decision.reply_message,
                         "Enter 1 for push to your app, 2 for phone call.")

    def test_menu_number_picks_the_method(self):
        state = self.decide().state
        d = self.start(password="2", state=state)
        self.assertNoResult(d)
        self.assertEqual(len(self.voice.calls), 1)
        self.voice.answer(Verdict.APPROVE)
        self.assertEqual(self.successResultOf(d).factor, "phone")

    def test_menu_method_name_picks_the_method_in_any_case(self):
        state = self.decide().state
        d = self.start(password=" Push ", state=state)
        self.assertNoResult(d)
        self.push.answer(self.only_txn().txid, "alice", "approve")
        self.assertEqual(self.successResultOf(d).factor, "push")

    def test_menu_answered_with_a_code_accepts(self):
        state = self.decide().state
        decision = self.decide(password=totp_code(T0), state=state)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "totp"))
        self.assertEqual(len(self.push), 0)

    def test_menu_number_out_of_range_counts_as_a_wrong_code(self):
        state = self.decide().state
        decision = self.decide(password="3", state=state)
        self.assertEqual(decision.reason, Reason.BAD_CODE)
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.voice.calls, [])
        self.assertEqual(self.db.get_user("alice").failures, 1)

    def test_a_single_method_skips_the_menu(self):
        d = self.start("bob", "pw-bob")
        self.assertNoResult(d)
        self.assertEqual(len(self.push), 1)

    def test_a_keyword_skips_the_menu(self):
        self.assertNoResult(self.start(password="pw-alice,phone"))
        self.assertEqual(len(self.voice.calls), 1)

    def test_a_menu_state_is_single_use(self):
        state = self.decide().state
        self.assertNoResult(self.start(password="1", state=state))
        self.assertEqual(self.decide(password="1", state=state).reason, Reason.BAD_STATE)
        self.assertEqual(len(self.push), 1)


class PushTimeoutTests(OutOfBandTests):

    def test_unanswered_push_rejects_after_the_mfa_timeout(self):
        d = self.start()
        self.clock.advance(59)
        self.assertNoResult(d)
        self.clock.advance(1)
        decision = self.successResultOf(d)
        self.assertEqual((decision.reason, decision.factor), (Reason.FACTOR_TIMEOUT, "push"))
        self.assertEqual(len(self.push), 0)
        self.assertEqual([r.reason for r in self.audit()], ["factor_timeout"])

    def test_a_client_timeout_overrides_the_mfa_timeout(self):
        self.auth = self.make_auth(clients={"slow": client_config("slow", timeout=120.0),
                                            "plain": client_config("plain")})
        slow = self.start(client="slow")
        plain = self.start("bob", "pw-bob", client="plain")
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(plain).reason, Reason.FACTOR_TIMEOUT)
        self.assertNoResult(slow)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(slow).reason, Reason.FACTOR_TIMEOUT)

    def test_a_late_answer_is_refused_after_the_timeout(self):
        d = self.start()
        txid = self.only_txn().txid
        self.clock.advance(60)
        self.successResultOf(d)
        with self.assertRaises(TransactionExpired):
            self.push.answer(txid, "alice", "approve")


class NumberMatchingTests(OutOfBandTests):
    number_matching = True

    def test_push_challenges_for_the_number_and_the_number_after_approval_accepts(self):
        challenge = self.decide()
        self.assertEqual((challenge.outcome, challenge.reply_message, challenge.factor),
                         (Outcome.CHALLENGE, MSG_MATCH_NUMBER, "push"))
        txn = self.only_txn()
        self.assertRegex(txn.number, r"^[1-9][0-9]$")
        self.push.answer(txn.txid, "alice", "approve", number=txn.number)
        decision = self.decide(password=txn.number, state=challenge.state)
        self.assertEqual((decision.outcome, decision.reason, decision.factor),
                         (Outcome.ACCEPT, Reason.OK, "push"))
        self.assertEqual([r.outcome for r in self.audit()], ["challenge", "accept"])

    def test_number_typed_before_the_approval_holds_until_the_approval(self):
        challenge = self.decide()
        txn = self.only_txn()
        d = self.start(password=txn.number, state=challenge.state)
        self.assertNoResult(d)
        self.push.answer(txn.txid, "alice", "approve", number=txn.number)
        self.assertEqual(self.successResultOf(d).outcome, Outcome.ACCEPT)

    def test_number_typed_then_denied_on_the_device_rejects(self):
        challenge = self.decide()
        txn = self.only_txn()
        d = self.start(password=txn.number, state=challenge.state)
        self.push.answer(txn.txid, "alice", "deny")
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_DENIED)

    def test_wrong_number_rejects_and_closes_the_transaction(self):
        challenge = self.decide()
        txn = self.only_txn()
        wrong = "10" if txn.number != "10" else "11"
        decision = self.decide(password=wrong, state=challenge.state)
        self.assertEqual((decision.reason, decision.factor), (Reason.WRONG_NUMBER, "push"))
        self.assertEqual(len(self.push), 0)
        with self.assertRaises(TransactionExpired):
            self.push.answer(txn.txid, "alice", "approve", number=txn.number)

    def test_wrong_number_after_an_approval_still_rejects(self):
        challenge = self.decide()
        txn = self.only_txn()
        self.push.answer(txn.txid, "alice", "approve", number=txn.number)
        wrong = "10" if txn.number != "10" else "11"
        self.assertEqual(self.decide(password=wrong, state=challenge.state).reason,
                         Reason.WRONG_NUMBER)

    def test_a_totp_code_instead_of_the_number_accepts_and_closes_the_push(self):
        challenge = self.decide()
        txid = self.only_txn().txid
        decision = self.decide(password=totp_code(T0), state=challenge.state)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "totp"))
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.push.get(txid).state, "closed")

    def test_a_wrong_code_instead_of_the_number_rejects(self):
        challenge = self.decide()
        decision = self.decide(password="000000", state=challenge.state)
        self.assertEqual(decision.reason, Reason.BAD_CODE)
        self.assertEqual(len(self.push), 0)

    def test_number_matching_push_times_out(self):
        challenge = self.decide()
        txn = self.only_txn()
        d = self.start(password=txn.number, state=challenge.state)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_TIMEOUT)

    def test_number_after_the_push_expired_rejects_as_timed_out(self):
        challenge = self.decide()
        txn = self.only_txn()
        self.clock.advance(60)
        decision = self.decide(password=txn.number, state=challenge.state)
        self.assertEqual(decision.reason, Reason.FACTOR_TIMEOUT)

    def test_a_repeated_login_joins_the_pending_transaction(self):
        self.decide(calling_station_id="198.51.100.7")
        self.decide(calling_station_id="198.51.100.7")
        self.assertEqual(len(self.push), 1)

    def test_another_calling_station_is_refused_while_one_push_is_pending(self):
        self.decide(calling_station_id="198.51.100.7")
        decision = self.decide(calling_station_id="198.51.100.8")
        self.assertEqual((decision.reason, decision.reply_message),
                         (Reason.TOO_MANY_PENDING, MSG_TOO_MANY_PENDING))
        self.assertEqual(len(self.push), 1)

    def test_push_picked_at_the_menu_challenges_for_the_number(self):
        self.auth.policy = dataclasses.replace(POLICY, challenge_menu=True)
        menu = self.decide()
        challenge = self.decide(password="1", state=menu.state)
        self.assertEqual(challenge.reply_message, MSG_MATCH_NUMBER)
        txn = self.only_txn()
        self.push.answer(txn.txid, "alice", "approve", number=txn.number)
        decision = self.decide(password=txn.number, state=challenge.state)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "push"))

    def test_an_approval_with_the_wrong_number_on_the_device_denies(self):
        challenge = self.decide()
        txn = self.only_txn()
        wrong = "10" if txn.number != "10" else "11"
        self.push.answer(txn.txid, "alice", "approve", number=wrong)
        decision = self.decide(password=txn.number, state=challenge.state)
        self.assertEqual(decision.reason, Reason.FACTOR_DENIED)

    def test_a_pending_call_counts_towards_the_user_limit_of_number_matching_pushes(self):
        self.assertNoResult(self.start(password="pw-alice,phone",
                                       calling_station_id="198.51.100.7"))
        decision = self.decide(calling_station_id="198.51.100.8")
        self.assertEqual(decision.reason, Reason.TOO_MANY_PENDING)
        self.assertEqual(len(self.push), 0)

    def test_a_pending_number_matching_push_counts_towards_the_user_limit_of_calls(self):
        self.decide(calling_station_id="198.51.100.7")
        decision = self.decide(password="pw-alice,phone", calling_station_id="198.51.100.8")
        self.assertEqual(decision.reason, Reason.TOO_MANY_PENDING)
        self.assertEqual(self.voice.calls, [])

    def test_cancelling_the_number_round_closes_the_push_and_writes_no_audit_row(self):
        challenge = self.decide()
        txn = self.only_txn()
        d = self.start(password=txn.number, state=challenge.state)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.push), 0)
        self.assertEqual([r.outcome for r in self.audit()], ["challenge"])


class PhoneTests(OutOfBandTests):

    def call(self, client="vpn", **kw) -> Deferred:
        d = self.start(password="pw-alice,phone", client=client, **kw)
        self.assertNoResult(d)
        return d

    def test_phone_verdicts_map_to_decisions(self):
        for verdict, outcome, reason in ((Verdict.APPROVE, Outcome.ACCEPT, Reason.OK),
                                         (Verdict.DENY, Outcome.REJECT, Reason.FACTOR_DENIED),
                                         (Verdict.NO_ANSWER, Outcome.REJECT, Reason.NO_ANSWER)):
            d = self.call()
            self.voice.answer(verdict)
            decision = self.successResultOf(d)
            self.assertEqual((decision.outcome, decision.reason, decision.factor),
                             (outcome, reason, "phone"))

    def test_call_rate_limit_rejects_as_rate_limited(self):
        self.voice.refuse = True
        decision = self.decide(password="pw-alice,phone")
        self.assertEqual((decision.reason, decision.factor), (Reason.RATE_LIMITED, "phone"))
        # Nothing is left pending: the next call goes through.
        self.voice.refuse = False
        self.call()

    def failed_call(self, client="vpn"):
        d = self.call(client=client)
        self.voice.fail(GatewayError("provider down"))
        return self.successResultOf(d)

    def test_gateway_failure_rejects_under_failmode_secure(self):
        decision = self.failed_call()
        self.assertEqual((decision.outcome, decision.reason, decision.reply_message),
                         (Outcome.REJECT, Reason.GATEWAY_FAILED, MSG_TRY_LATER))
        self.assertEqual(len(self.auth.pending), 0)
        self.assertEqual([r.reason for r in self.audit()], ["gateway_failed"])

    def test_gateway_failure_accepts_under_failmode_safe(self):
        self.auth.policy = dataclasses.replace(POLICY, failmode="safe")
        decision = self.failed_call()
        self.assertEqual((decision.outcome, decision.reason, decision.factor),
                         (Outcome.ACCEPT, Reason.FAILMODE_SAFE, "phone"))

    def test_a_client_failmode_overrides_the_server_failmode(self):
        self.auth = self.make_auth(clients={"lenient": client_config("lenient", failmode="safe"),
                                            "strict": client_config("strict",
                                                                    failmode="secure")})
        self.assertEqual(self.failed_call(client="lenient").reason, Reason.FAILMODE_SAFE)
        self.assertEqual(self.failed_call(client="vpn").reason, Reason.GATEWAY_FAILED)
        self.auth.policy = dataclasses.replace(POLICY, failmode="safe")
        self.assertEqual(self.failed_call(client="strict").reason, Reason.GATEWAY_FAILED)
        self.assertEqual(self.failed_call(client="vpn").reason, Reason.FAILMODE_SAFE)

    def test_a_call_that_fails_at_once_still_gets_a_decision(self):
        self.voice.failure = GatewayError("call not started: the number is not in E.164 form")
        d = self.start(password="pw-alice,phone")
        self.clock.advance(3600)
        decision = self.successResultOf(d)
        self.assertEqual(decision.reason, Reason.GATEWAY_FAILED)

    def test_unanswered_call_times_out_and_is_withdrawn(self):
        d = self.call()
        self.clock.advance(59)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_TIMEOUT)
        self.assertEqual(self.voice.withdrawn, ["alice"])
        self.assertEqual(len(self.auth.pending), 0)

    def test_a_client_timeout_applies_to_calls(self):
        self.auth = self.make_auth(clients={"fast": client_config("fast", timeout=10.0)})
        d = self.call(client="fast")
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_TIMEOUT)

    def test_fraud_keyed_on_the_phone_blocks_the_user_and_alerts(self):
        d = self.call()
        self.voice.answer(Verdict.FRAUD)
        decision = self.successResultOf(d)
        self.assertEqual((decision.reason, decision.factor), (Reason.FRAUD_REPORTED, "phone"))
        self.assertTrue(self.db.get_user("alice").blocked)
        self.assertEqual(len(self.alerts.sent), 1)
        self.assertIn("alice", self.alerts.sent[0][0])
        self.assertEqual([(r.outcome, r.reason) for r in self.audit()],
                         [("block", "fraud_reported"), ("reject", "fraud_reported")])
        self.assertEqual(self.decide(password="pw-alice,phone").reason, Reason.USER_BLOCKED)

    def test_phone_fraud_report_names_the_client(self):
        d = self.call(client="vpn-east")
        self.voice.answer(Verdict.FRAUD)
        self.successResultOf(d)
        block = [r for r in self.audit() if r.outcome == "block"][0]
        self.assertEqual(block.client, "vpn-east")
        self.assertIn("vpn-east", self.alerts.sent[0][1])

    def test_fraud_on_a_joined_call_is_reported_once(self):
        first = self.call(calling_station_id="198.51.100.7")
        second = self.call(calling_station_id="198.51.100.7")
        self.assertEqual(len(self.voice.calls), 1)
        self.voice.answer(Verdict.FRAUD)
        self.assertEqual(self.successResultOf(first).reason, Reason.FRAUD_REPORTED)
        self.assertEqual(self.successResultOf(second).reason, Reason.FRAUD_REPORTED)
        self.assertEqual(len(self.alerts.sent), 1)
        self.assertEqual([r.outcome for r in self.audit()].count("block"), 1)

    def test_phone_fraud_reject_does_not_wait_for_the_alert_delivery(self):
        self.alerts.pending = True
        d = self.call()
        self.voice.answer(Verdict.FRAUD)
        self.assertEqual(self.successResultOf(d).reason, Reason.FRAUD_REPORTED)

    def test_a_repeated_login_joins_the_call(self):
        first = self.call(calling_station_id="198.51.100.7")
        second = self.call(calling_station_id="198.51.100.7")
        self.assertEqual(len(self.voice.calls), 1)
        self.voice.answer(Verdict.APPROVE)
        self.assertEqual(self.successResultOf(first).outcome, Outcome.ACCEPT)
        self.assertEqual(self.successResultOf(second).outcome, Outcome.ACCEPT)

    def test_cancelling_the_only_waiter_withdraws_the_call(self):
        d = self.call()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.voice.withdrawn, ["alice"])
        self.assertEqual(self.audit(), [])
        self.assertEqual(len(self.auth.pending), 0)


class FraudTests(OutOfBandTests):

    def test_report_fraud_blocks_closes_pending_pushes_and_alerts(self):
        d = self.start(client="vpn")
        txid = self.only_txn().txid
        self.successResultOf(Deferred.fromCoroutine(self.auth.report_fraud("alice", "vpn", "push")))
        self.assertTrue(self.db.get_user("alice").blocked)
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.push.get(txid).state, "closed")
        held = self.successResultOf(d)
        self.assertEqual((held.outcome, held.reason), (Outcome.REJECT, Reason.FACTOR_DENIED))
        [(subject, text)] = self.alerts.sent
        self.assertIn("alice", subject)
        self.assertIn("vpn", text)
        self.assertIn("mfaserver user unblock alice", text)
        block = [r for r in self.audit() if r.outcome == "block"]
        self.assertEqual([(r.client, r.factor, r.reason) for r in block],
                         [("vpn", "push", "fraud_reported")])
        self.assertEqual(self.decide().reason, Reason.USER_BLOCKED)

    def test_report_fraud_leaves_other_users_pushes_alone(self):
        self.start("bob", "pw-bob")
        self.successResultOf(Deferred.fromCoroutine(self.auth.report_fraud("alice", "vpn", "push")))
        self.assertEqual(len(self.push), 1)
        self.assertFalse(self.db.get_user("bob").blocked)

    def test_report_fraud_never_raises_when_the_alert_fails(self):
        self.alerts.failure = GatewayError("smtp down")
        self.successResultOf(Deferred.fromCoroutine(self.auth.report_fraud("alice", "vpn", "push")))
        self.assertTrue(self.db.get_user("alice").blocked)

    def test_report_fraud_without_an_alert_sink_still_blocks(self):
        self.alerts = None
        self.auth = self.make_auth()
        self.successResultOf(Deferred.fromCoroutine(self.auth.report_fraud("alice", "vpn", "push")))
        self.assertTrue(self.db.get_user("alice").blocked)

    def test_a_fraud_answer_to_a_push_rejects_as_fraud(self):
        d = self.start()
        self.push.answer(self.only_txn().txid, "alice", "fraud")
        self.assertEqual(self.successResultOf(d).reason, Reason.FRAUD_REPORTED)


class LimitTests(OutOfBandTests):

    def test_a_second_login_from_another_station_is_refused_while_a_push_is_pending(self):
        first = self.start(calling_station_id="198.51.100.7")
        decision = self.decide(calling_station_id="198.51.100.8")
        self.assertEqual((decision.reason, decision.reply_message, decision.factor),
                         (Reason.TOO_MANY_PENDING, MSG_TOO_MANY_PENDING, "push"))
        self.assertEqual(len(self.push), 1)
        self.assertNoResult(first)

    def test_the_user_limit_is_freed_when_the_push_completes(self):
        first = self.start(calling_station_id="198.51.100.7")
        self.push.answer(self.only_txn().txid, "alice", "approve")
        self.successResultOf(first)
        self.assertNoResult(self.start(calling_station_id="198.51.100.8"))

    def test_a_higher_user_limit_allows_concurrent_logins(self):
        self.auth = self.make_auth(dataclasses.replace(POLICY, max_pending_per_user=2))
        self.assertNoResult(self.start(calling_station_id="198.51.100.7"))
        self.assertNoResult(self.start(calling_station_id="198.51.100.8"))
        self.assertEqual(len(self.push), 2)

    def test_the_global_limit_refuses_with_try_later(self):
        self.auth = self.make_auth(dataclasses.replace(POLICY, max_pending=1))
        self.assertNoResult(self.start())
        decision = self.decide("bob", "pw-bob")
        self.assertEqual((decision.reason, decision.reply_message),
                         (Reason.TOO_MANY_PENDING, MSG_TRY_LATER))
        self.assertEqual(len(self.push), 1)

    def test_too_many_pushes_per_user_are_rate_limited(self):
        for i in range(5):
            d = self.start()
            self.push.answer(self.only_txn().txid, "alice", "deny")
            self.successResultOf(d)
        decision = self.decide()
        self.assertEqual((decision.reason, decision.factor), (Reason.RATE_LIMITED, "push"))
        self.assertEqual(len(self.push), 0)
        self.assertEqual(len(self.auth.pending), 0)
        # Bob has his own bucket.
        self.assertNoResult(self.start("bob", "pw-bob"))
        # The bucket refills at 30 an hour: one more push two minutes later.
        self.clock.advance(120)
        self.assertNoResult(self.start())

    def test_joined_logins_do_not_spend_the_push_rate(self):
        for i in range(10):
            self.assertNoResult(self.start(calling_station_id="198.51.100.7"))
        self.assertEqual(len(self.push), 1)


class RateLimitNumberMatchingTests(OutOfBandTests):
    number_matching = True

    def test_too_many_number_matching_pushes_are_rate_limited(self):
        for i in range(5):
            self.decide()
            self.push.close(self.only_txn().txid)
        decision = self.decide()
        self.assertEqual(decision.reason, Reason.RATE_LIMITED)

    def test_the_global_limit_applies_to_number_matching_pushes(self):
        self.auth = self.make_auth(dataclasses.replace(POLICY, max_pending=1))
        self.decide()
        decision = self.decide("bob", "pw-bob")
        self.assertEqual((decision.reason, decision.reply_message),
                         (Reason.TOO_MANY_PENDING, MSG_TRY_LATER))


class JoiningAndCancellingTests(OutOfBandTests):

    def test_the_same_login_twice_shares_one_push_and_both_get_the_answer(self):
        first = self.start(calling_station_id="198.51.100.7")
        second = self.start(calling_station_id="198.51.100.7")
        self.assertEqual(len(self.push), 1)
        self.push.answer(self.only_txn().txid, "alice", "approve")
        self.assertEqual(self.successResultOf(first).outcome, Outcome.ACCEPT)
        self.assertEqual(self.successResultOf(second).outcome, Outcome.ACCEPT)
        self.assertEqual([r.outcome for r in self.audit()], ["accept", "accept"])

    def test_the_same_user_from_another_client_is_another_login(self):
        self.auth = self.make_auth(dataclasses.replace(POLICY, max_pending_per_user=2))
        self.start(client="vpn", calling_station_id="198.51.100.7")
        self.start(client="wifi", calling_station_id="198.51.100.7")
        self.assertEqual(len(self.push), 2)

    def test_cancelling_the_only_waiter_closes_the_push_without_a_decision(self):
        d = self.start()
        txid = self.only_txn().txid
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.push), 0)
        self.assertEqual(self.push.get(txid).state, "closed")
        self.assertEqual(self.audit(), [])
        self.assertEqual(len(self.auth.pending), 0)
        # The user may sign in again at once.
        self.assertNoResult(self.start())

    def test_cancelling_one_joined_waiter_leaves_the_push_for_the_other(self):
        first = self.start(calling_station_id="198.51.100.7")
        second = self.start(calling_station_id="198.51.100.7")
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(len(self.push), 1)
        self.push.answer(self.only_txn().txid, "alice", "approve")
        self.assertEqual(self.successResultOf(second).outcome, Outcome.ACCEPT)
        self.assertEqual([r.outcome for r in self.audit()], ["accept"])

    def test_closing_all_pushes_at_shutdown_rejects_the_held_logins(self):
        d = self.start()
        self.push.close_all()
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_DENIED)
