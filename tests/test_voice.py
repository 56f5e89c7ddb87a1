"""Phone-call approvals: VoiceCalls on a fake clock, and a call end to end.

The unit tests drive `VoiceCalls` directly with a recording gateway and
`task.Clock` (its web routes are tested in test_voice_web.py). The
end-to-end tests place calls through `TwilioGateway` against `FakeTwilio`,
which answers, presses the scripted keys and reports the status through our
web routes: in memory too (StubTreq both ways).
"""

from __future__ import annotations

from xml.etree import ElementTree

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio
from mfaserver.auth.model import Verdict
from mfaserver.factors.sms import SendRefused
from mfaserver.factors.voice import VoiceCalls
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.twilio import TwilioGateway, TwilioSettings
from mfaserver.web import WebApp
from mfaserver.web.voice import add_voice_routes

T0 = 1_700_000_000.0
PHONE = "+15551234567"
OTHER_PHONE = "+15557654321"
PIN = "1234"
PUBLIC = "https://mfa.example.com"
SID = "CA" + "0" * 32


class RecordingGateway:
    """A VoiceGateway that records start_call and answers as told."""

    def __init__(self):
        self.started: list[tuple[str, str, str | None]] = []
        self.next: defer.Deferred | None = None     # what the next start_call returns

    def start_call(self, to, *, answer_url, status_url=None):
        self.started.append((to, answer_url, status_url))
        d, self.next = self.next, None
        return d if d is not None else defer.succeed(SID)

    def call_id(self, index: int = -1) -> str:
        """The call id in the answer URL of a call started."""
        return self.started[index][1].split("/")[-2]


def said(twiml: bytes) -> str:
    """The text of the first <Say> of a TwiML document."""
    return ElementTree.fromstring(twiml).find(".//Say").text


class LogCapture:
    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, event):
        self.events.append(event)

    def text(self) -> str:
        return "\n".join(formatEvent(e) + repr(e) for e in self.events)


class VoiceCallsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.gateway = RecordingGateway()
        self.pins: list[tuple[str, str]] = []
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def calls(self, **kwargs) -> VoiceCalls:
        kwargs.setdefault("public_url", PUBLIC + "/")
        return VoiceCalls(self.gateway, self.clock, **kwargs)

    def pin_calls(self, **kwargs) -> VoiceCalls:
        def check_pin(user, pin):
            self.pins.append((user, pin))
            return defer.succeed(pin == PIN)
        return self.calls(pin_mode=True, check_pin=check_pin, **kwargs)

    def withdraw(self, d: defer.Deferred) -> None:
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    def assert_no_secrets_logged(self, *secrets):
        text = self.logs.text()
        for secret in (PHONE, OTHER_PHONE) + secrets:
            self.assertNotIn(secret, text)

    # --- Starting ------------------------------------------------------------------------

    def test_call_is_placed_with_callback_urls_on_the_public_url(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.assertNoResult(d)
        self.assertEqual(len(calls), 1)
        [(to, answer_url, status_url)] = self.gateway.started
        call_id = self.gateway.call_id()
        self.assertEqual(to, PHONE)
        self.assertRegex(call_id, r"^[A-Za-z0-9_-]{20,}$")
        self.assertEqual(answer_url, f"{PUBLIC}/v1/voice/{call_id}/answer")
        self.assertEqual(status_url, f"{PUBLIC}/v1/voice/{call_id}/status")

    def test_each_call_gets_its_own_id(self):
        calls = self.calls()
        calls.request_approval("alice", PHONE, client="vpn")
        calls.request_approval("bob", OTHER_PHONE, client="vpn")
        self.assertNotEqual(self.gateway.call_id(0), self.gateway.call_id(1))

    def test_plain_prompt_gathers_one_key_without_finish_key(self):
        calls = self.calls()
        calls.request_approval("alice", PHONE, client="vpn")
        call_id = self.gateway.call_id()
        twiml = calls.answer_twiml(call_id)
        gather = ElementTree.fromstring(twiml).find("Gather")
        self.assertEqual(gather.get("action"), f"{PUBLIC}/v1/voice/{call_id}/gather")
        self.assertEqual((gather.get("numDigits"), gather.get("finishOnKey")), ("1", ""))
        self.assertEqual(gather.find("Say").text,
                         "You are signing in to vpn. Press the pound key to sign in. "
                         "Press 0 to report fraud.")
        self.assertNotIn(b"alice", twiml)
        self.assertNotIn(PHONE.encode(), twiml)

    def test_pin_prompt_gathers_until_pound(self):
        calls = self.pin_calls()
        calls.request_approval("alice", PHONE, client="vpn")
        gather = ElementTree.fromstring(
            calls.answer_twiml(self.gateway.call_id())).find("Gather")
        self.assertEqual((gather.get("numDigits"), gather.get("finishOnKey")), (None, "#"))
        self.assertIn("Enter your PIN, then press the pound key", gather.find("Say").text)

    def test_gateway_failure_fails_the_request_and_forgets_the_call(self):
        calls = self.calls()
        self.gateway.next = defer.fail(GatewayError("twilio 400 21211: invalid number"))
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.failureResultOf(d, GatewayError)
        self.assertEqual(len(calls), 0)

    def test_gateway_failing_later_fails_the_request(self):
        calls = self.calls()
        self.gateway.next = defer.Deferred()
        started = self.gateway.next
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.assertNoResult(d)
        started.errback(GatewayError("twilio unreachable"))
        self.failureResultOf(d, GatewayError)
        self.assertEqual(len(calls), 0)

    # --- Plain mode ------------------------------------------------------------------------

    def answer(self, calls, digits):
        call_id = self.gateway.call_id()
        calls.answer_twiml(call_id)
        return calls.gather(call_id, digits)

    def test_pound_approves(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.assertEqual(said(self.answer(calls, "#")), "You are signed in. Goodbye.")
        self.assertEqual(self.successResultOf(d), Verdict.APPROVE)
        self.assertEqual(len(calls), 0)
        self.assert_no_secrets_logged()

    def test_zero_reports_fraud(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.assertIn("Fraud reported", said(self.answer(calls, "0")))
        self.assertEqual(self.successResultOf(d), Verdict.FRAUD)
        self.assertIn("Fraud reported", self.logs.text())
        self.assert_no_secrets_logged()

    def test_any_other_key_denies(self):
        for key in ("1", "*", "9", ""):
            calls = self.calls()
            d = calls.request_approval("alice", PHONE, client="vpn")
            self.assertEqual(said(self.answer(calls, key)), "The sign-in was denied. Goodbye.")
            self.assertEqual(self.successResultOf(d), Verdict.DENY)
            self.clock.advance(3600)  # refill the rate limit

    def test_second_gather_after_the_decision_gets_expired(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.answer(calls, "0")
        self.assertEqual(self.successResultOf(d), Verdict.FRAUD)
        again = calls.gather(self.gateway.call_id(), "#")
        self.assertEqual(said(again), "This sign-in has expired. Goodbye.")
        self.assertIn("late answer to call for alice", self.logs.text())

    def test_second_answer_fetch_gets_expired(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        call_id = self.gateway.call_id()
        calls.answer_twiml(call_id)
        self.assertEqual(said(calls.answer_twiml(call_id)), "This sign-in has expired. Goodbye.")
        self.assertNoResult(d)

    def test_status_after_the_decision_changes_nothing(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.answer(calls, "#")
        calls.call_ended(self.gateway.call_id(), "completed")
        self.assertEqual(self.successResultOf(d), Verdict.APPROVE)

    # --- No answer -------------------------------------------------------------------------

    def test_call_ending_before_any_key_is_no_answer(self):
        for status in ("busy", "no-answer", "failed", "canceled", "completed"):
            calls = self.calls()
            d = calls.request_approval("alice", PHONE, client="vpn")
            calls.call_ended(self.gateway.call_id(), status)
            self.assertEqual(self.successResultOf(d), Verdict.NO_ANSWER)
            self.assertEqual(len(calls), 0)
            self.clock.advance(3600)

    def test_answered_then_hung_up_without_keys_is_no_answer(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        calls.answer_twiml(self.gateway.call_id())
        calls.call_ended(self.gateway.call_id(), "completed")
        self.assertEqual(self.successResultOf(d), Verdict.NO_ANSWER)

    def test_intermediate_status_is_ignored(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        calls.call_ended(self.gateway.call_id(), "ringing")
        calls.call_ended(self.gateway.call_id(), "in-progress")
        self.assertNoResult(d)

    def test_unknown_call_gets_expired_and_is_logged_as_unknown(self):
        calls = self.calls()
        self.assertEqual(said(calls.answer_twiml("nosuchcall")),
                         "This sign-in has expired. Goodbye.")
        self.assertEqual(said(calls.gather("nosuchcall", "#")),
                         "This sign-in has expired. Goodbye.")
        calls.call_ended("nosuchcall", "completed")
        self.assertIn("unknown call", self.logs.text())
        self.assertNotIn("late answer", self.logs.text())

    # --- Cancelling ------------------------------------------------------------------------

    def test_cancel_withdraws_the_call(self):
        calls = self.calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        d.addTimeout(60, self.clock)
        self.clock.advance(60)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual(len(calls), 0)
        call_id = self.gateway.call_id()
        self.assertEqual(said(calls.answer_twiml(call_id)), "This sign-in has expired. Goodbye.")
        self.assertEqual(said(calls.gather(call_id, "#")), "This sign-in has expired. Goodbye.")
        calls.call_ended(call_id, "completed")   # nothing left to fire
        self.assertIn("late answer to call for alice", self.logs.text())

    def test_keys_after_the_timeout_are_reported_as_a_late_answer(self):
        late = []
        calls = self.calls(on_late=lambda *args: late.append(args))
        d = calls.request_approval("alice", PHONE, client="vpn")
        d.addTimeout(60, self.clock)
        call_id = self.gateway.call_id()
        calls.answer_twiml(call_id)
        self.clock.advance(60)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual(late, [])
        calls.gather(call_id, "0")
        self.assertEqual(late, [("alice", "vpn", "0")])

    def test_cancel_while_starting_abandons_the_request_to_the_provider(self):
        calls = self.calls()
        cancelled = []
        self.gateway.next = defer.Deferred(cancelled.append)
        d = calls.request_approval("alice", PHONE, client="vpn")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(len(calls), 0)

    def test_late_calls_are_forgotten_after_the_late_window(self):
        calls = self.calls(late_window=600)
        d = calls.request_approval("alice", PHONE, client="vpn")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.advance(601)
        calls.gather(self.gateway.call_id(), "#")
        self.assertIn("unknown call", self.logs.text())
        self.assertNotIn("late answer", self.logs.text())

    def test_remembered_calls_are_bounded(self):
        calls = self.calls(max_calls=2, per_user_per_hour=100, per_number_per_hour=100,
                           late_window=86_400)
        for _ in range(3):
            self.withdraw(calls.request_approval("alice", PHONE, client="vpn"))
            self.clock.advance(3600)
        self.assertEqual(len(calls._finished), 2)

    # --- PIN mode --------------------------------------------------------------------------

    def test_right_pin_approves(self):
        calls = self.pin_calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        twiml = self.successResultOf(self.answer(calls, PIN))
        self.assertEqual(said(twiml), "You are signed in. Goodbye.")
        self.assertEqual(self.successResultOf(d), Verdict.APPROVE)
        self.assertEqual(self.pins, [("alice", PIN)])
        self.assert_no_secrets_logged(PIN)

    def test_wrong_pin_denies(self):
        calls = self.pin_calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        twiml = self.successResultOf(self.answer(calls, "9876"))
        self.assertEqual(said(twiml), "The sign-in was denied. Goodbye.")
        self.assertEqual(self.successResultOf(d), Verdict.DENY)
        self.assert_no_secrets_logged("9876")

    def test_zero_in_pin_mode_reports_fraud_without_checking(self):
        calls = self.pin_calls()
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.answer(calls, "0")
        self.assertEqual(self.successResultOf(d), Verdict.FRAUD)
        self.assertEqual(self.pins, [])

    def test_pin_check_in_flight_decides_even_if_the_call_ends(self):
        checking = defer.Deferred()
        calls = self.calls(pin_mode=True, check_pin=lambda user, pin: checking)
        d = calls.request_approval("alice", PHONE, client="vpn")
        reply = self.answer(calls, PIN)
        calls.call_ended(self.gateway.call_id(), "completed")
        self.assertNoResult(d)
        # A second set of keys while checking is refused.
        self.assertEqual(said(calls.gather(self.gateway.call_id(), PIN)),
                         "This sign-in has expired. Goodbye.")
        checking.callback(True)
        self.assertEqual(self.successResultOf(d), Verdict.APPROVE)
        self.assertEqual(said(self.successResultOf(reply)), "You are signed in. Goodbye.")

    def test_web_hanging_up_does_not_cancel_the_pin_check(self):
        checking = defer.Deferred()
        calls = self.calls(pin_mode=True, check_pin=lambda user, pin: checking)
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.withdraw(self.answer(calls, PIN))   # Twilio hung up on the HTTP request
        checking.callback(True)
        self.assertEqual(self.successResultOf(d), Verdict.APPROVE)

    def test_withdrawn_while_checking_the_pin_gets_expired(self):
        checking = defer.Deferred()
        calls = self.calls(pin_mode=True, check_pin=lambda user, pin: checking)
        d = calls.request_approval("alice", PHONE, client="vpn")
        reply = self.answer(calls, PIN)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        checking.callback(True)
        self.assertEqual(said(self.successResultOf(reply)), "This sign-in has expired. Goodbye.")

    def test_pin_check_error_fails_the_request(self):
        calls = self.calls(pin_mode=True,
                           check_pin=lambda user, pin: defer.fail(RuntimeError("db down")))
        d = calls.request_approval("alice", PHONE, client="vpn")
        reply = self.successResultOf(self.answer(calls, PIN))
        self.assertEqual(said(reply), "The sign-in could not be completed. Goodbye.")
        self.failureResultOf(d, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_pin_mode_needs_check_pin(self):
        with self.assertRaises(ValueError):
            self.calls(pin_mode=True)

    # --- Limits ----------------------------------------------------------------------------

    def test_rate_limit_per_user_refuses_and_refills(self):
        calls = self.calls(per_user_per_hour=5, per_number_per_hour=100)
        for phone in ("+15550000001", "+15550000002", "+15550000003"):
            self.withdraw(calls.request_approval("alice", phone, client="vpn"))
        with self.assertRaises(SendRefused):
            calls.request_approval("alice", "+15550000004", client="vpn")
        self.assertEqual(len(self.gateway.started), 3)
        self.withdraw(calls.request_approval("bob", "+15550000004", client="vpn"))
        self.clock.advance(3600 / 5)
        self.withdraw(calls.request_approval("alice", "+15550000004", client="vpn"))
        self.assertEqual(len(self.gateway.started), 5)

    def test_rate_limit_per_number_refuses_and_refills(self):
        calls = self.calls(per_user_per_hour=100, per_number_per_hour=2)
        self.withdraw(calls.request_approval("alice", PHONE, client="vpn"))
        self.withdraw(calls.request_approval("bob", PHONE, client="vpn"))
        with self.assertRaises(SendRefused):
            calls.request_approval("carol", PHONE, client="vpn")
        self.withdraw(calls.request_approval("carol", OTHER_PHONE, client="vpn"))
        self.clock.advance(3600 / 2)
        self.withdraw(calls.request_approval("carol", PHONE, client="vpn"))
        self.assertEqual(len(self.gateway.started), 4)
        self.assert_no_secrets_logged()

    def test_max_calls_pending_refuses(self):
        calls = self.calls(max_calls=2)
        first = calls.request_approval("alice", PHONE, client="vpn")
        calls.request_approval("bob", OTHER_PHONE, client="vpn")
        with self.assertRaises(SendRefused):
            calls.request_approval("carol", "+15550000009", client="vpn")
        self.assertEqual(len(self.gateway.started), 2)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        calls.request_approval("carol", "+15550000009", client="vpn")
        self.assertEqual(len(calls), 2)


# --- End to end through TwilioGateway and FakeTwilio ----------------------------------------

class EndToEndTests(SynchronousTestCase):
    """A call placed through `TwilioGateway` with `FakeTwilio`, which fetches our TwiML,
    presses the scripted keys and reports the status through our web routes
    (`add_voice_routes`, signatures checked): all in memory, on a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.app = WebApp(self.clock)
        self.fake = FakeTwilio(self.clock, http_client=StubTreq(self.app.resource()))
        self.gateway = TwilioGateway(TwilioSettings(
            account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_number=FROM_NUMBER,
            timeout=5.0), self.clock, http_client=StubTreq(self.fake.resource))

    def voice(self, **kwargs) -> VoiceCalls:
        calls = VoiceCalls(self.gateway, self.clock, public_url=PUBLIC, **kwargs)
        add_voice_routes(self.app, calls, auth_token=AUTH_TOKEN, public_url=PUBLIC)
        return calls

    def place_call(self, calls: VoiceCalls, keys: str | None):
        self.fake.script_call(PHONE, keys)
        d = calls.request_approval("alice", PHONE, client="vpn")
        self.clock.advance(self.fake.answer_delay)
        verdict = self.successResultOf(d)
        call = self.successResultOf(self.fake.call_finished(self.fake.calls[-1].sid))
        for exchange in call.exchanges:
            self.assertIsNone(exchange.error, exchange)
        self.assertEqual(len(calls), 0)
        return verdict, call

    def test_pound_approves(self):
        verdict, call = self.place_call(self.voice(), "#")
        self.assertEqual(verdict, Verdict.APPROVE)
        self.assertEqual([e.what for e in call.exchanges], ["answer", "gather", "status"])
        self.assertEqual(call.exchange("gather").params["Digits"], "#")
        self.assertEqual(said(call.exchange("gather").body), "You are signed in. Goodbye.")
        self.assertEqual(call.exchange("status").code, 204)

    def test_zero_reports_fraud(self):
        verdict, call = self.place_call(self.voice(), "0#")
        self.assertEqual(verdict, Verdict.FRAUD)
        self.assertEqual(call.exchange("gather").params["Digits"], "0")

    def test_pin(self):
        checked = []

        def check_pin(user, pin):
            checked.append((user, pin))
            return defer.succeed(pin == PIN)
        verdict, _ = self.place_call(self.voice(pin_mode=True, check_pin=check_pin), "1234#")
        self.assertEqual(verdict, Verdict.APPROVE)
        self.assertEqual(checked, [("alice", PIN)])

    def test_unanswered_call(self):
        verdict, call = self.place_call(self.voice(), None)
        self.assertEqual(verdict, Verdict.NO_ANSWER)
        self.assertEqual([e.what for e in call.exchanges], ["status"])

    def test_refused_number_fails_with_gateway_error(self):
        calls = self.voice()
        self.failureResultOf(calls.request_approval("alice", "+1555123", client="vpn"),
                             GatewayError)
        self.assertEqual(len(calls), 0)
