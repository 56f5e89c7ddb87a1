"""TwilioGateway against the fake Twilio in memory, and the signature and TwiML helpers.

The gateway reaches the fake through treq's StubTreq, with a `Clock` for its
deadline and for the fake's play-out of calls; the fake's callbacks reach a
small twisted.web resource that plays our endpoints through another StubTreq:
it serves TwiML on the answer URL, records the <Gather> and status posts, and
checks X-Twilio-Signature on every one. Connecting and the connection pool
are tested with the gateway's own Agent on a `MemoryReactorClock`.
"""

from __future__ import annotations

from urllib.parse import parse_qs
from xml.etree import ElementTree

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.server import Site

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio, twilio_signature
from mfaserver.gateways.base import GatewayError, is_e164, mask_number
from mfaserver.gateways.twilio import (
    TwilioGateway, TwilioSettings, check_signature, gather_twiml, say_twiml,
)

USER_PHONE = "+15551234567"
SMS_TEXT = "Your sign-in code is 493817"
PUBLIC = "https://mfa.example.com"  # where our endpoints are
PRESS_POUND = gather_twiml("Press pound to sign in, zero to report fraud.",
                           PUBLIC + "/gather?c=1", num_digits=1, finish_on_key="")

# Twilio's documented example (www.twilio.com/docs/usage/security), recomputed here.
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
    "From": "+12349013030", "To": "+18005551212",
}
DOC_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
# The vectors of twilio-python's tests/unit/test_request_validator.py.
LIB_PARAMS = {
    "CallSid": "CA1234567890ABCDE", "Digits": "1234", "From": "+14158675309",
    "To": "+18005551212", "Caller": "+14158675309",
}
LIB_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def settings(api_base: str = "https://api.twilio.com", **overrides) -> TwilioSettings:
    values = dict(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_number=FROM_NUMBER,
                  api_base=api_base, timeout=2.0)
    values.update(overrides)
    return TwilioSettings(**values)


class Endpoints(resource.Resource):
    """Our side of a call: /answer serves ``twiml``, /gather and /status record the posts."""

    isLeaf = True

    def __init__(self, twiml: bytes = b""):
        super().__init__()
        self.twiml = twiml
        self.posts: list[tuple[str, dict[str, str], bool]] = []  # path, params, signature ok

    def render_POST(self, request):
        url = PUBLIC + request.uri.decode()
        # The form body only: request.args would mix in the query string.
        params = {name: values[-1] for name, values in parse_qs(
            request.content.read().decode(), keep_blank_values=True).items()}
        signature = request.getHeader("X-Twilio-Signature") or ""
        self.posts.append((request.path.decode(), params,
                           check_signature(AUTH_TOKEN, url, params, signature)))
        request.setHeader(b"Content-Type", b"text/xml")
        if request.path == b"/answer":
            return self.twiml
        if request.path == b"/gather":
            return say_twiml("Thank you.")
        return b""

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.posts]


# --- Settings and numbers --------------------------------------------------------------------

def test_settings_repr_hides_the_auth_token():
    assert AUTH_TOKEN not in repr(settings())


@pytest.mark.parametrize("overrides, key", [
    ({"account_sid": "AC123"}, "account_sid"),
    ({"auth_token": ""}, "auth_token"),
    ({"auth_token": AUTH_TOKEN + "\n"}, "auth_token"),
    ({"from_number": "5550001111"}, "from_number"),
    ({"api_base": "http://api.twilio.com"}, "api_base"),
    ({"api_base": "https://user:pw@api.twilio.com"}, "api_base"),
    ({"api_base": "ftp://127.0.0.1"}, "api_base"),
    ({"timeout": 0}, "timeout"),
    ({"ring_timeout": 1}, "ring_timeout"),
])
def test_settings_refuse_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        settings(**overrides)


def test_plain_http_is_allowed_only_on_loopback():
    settings("http://127.0.0.1:8080")
    settings("http://localhost:8080")
    settings("http://[::1]:8080")


@pytest.mark.parametrize("number, valid", [
    ("+15551234567", True), ("+4930123456", True), ("+1234567", True),
    ("+123456789012345", True), ("+123456", False), ("+1234567890123456", False),
    ("15551234567", False), ("+05551234567", False), ("+1555123456\n", False),
    ("+1 555 123 4567", False), ("+١٥٥٥١٢٣٤٥٦٧", False), ("", False),
])
def test_e164_check(number, valid):
    assert is_e164(number) is valid


def test_mask_number_keeps_the_last_four_digits():
    assert mask_number("+15551234567") == "***4567"
    assert mask_number("+12") == "***"


# --- check_signature ------------------------------------------------------------------------

def test_signature_matches_twilios_documented_example():
    assert check_signature("12345", DOC_URL, DOC_PARAMS, DOC_SIGNATURE)


def test_signature_matches_twilio_python_vector():
    assert check_signature("12345", DOC_URL, LIB_PARAMS, LIB_SIGNATURE)


def test_signature_sorts_the_values_of_a_repeated_parameter():
    params = {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234"]}
    assert check_signature("12345", DOC_URL, params, "IK+Dwps556ElfBT0I3Rgjkr1wJU=")
    assert check_signature("12345", DOC_URL, {**params, "Digits": ["1234", "5678"]},
                           "IK+Dwps556ElfBT0I3Rgjkr1wJU=")


def test_signature_over_url_without_port_validates_url_with_port():
    # twilio-python: test_validation_removes_port_on_https
    assert check_signature("12345", DOC_URL.replace(".com", ".com:1234"), LIB_PARAMS,
                           LIB_SIGNATURE)


def test_signature_over_url_with_port_validates_url_without_port():
    # Signatures of the same URL with :443 and :80 added (twilio-python's vectors).
    assert check_signature("12345", DOC_URL, LIB_PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=")
    assert check_signature("12345", DOC_URL.replace("https", "http"), LIB_PARAMS,
                           "0ZXoZLH/DfblKGATFgpif+LLRf4=")


def test_signature_over_http_url_with_port():
    url = DOC_URL.replace(".com", ".com:1234").replace("https", "http")
    assert check_signature("12345", url, LIB_PARAMS, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")


@pytest.mark.parametrize("token, url, params, signature", [
    ("12345", DOC_URL, {**DOC_PARAMS, "Digits": "0"}, DOC_SIGNATURE),           # tampered
    ("12345", DOC_URL, {**DOC_PARAMS, "Extra": ""}, DOC_SIGNATURE),             # added
    ("12345", DOC_URL, {k: v for k, v in DOC_PARAMS.items() if k != "To"}, DOC_SIGNATURE),
    ("12345", DOC_URL.replace("foo=1", "foo=2"), DOC_PARAMS, DOC_SIGNATURE),    # other URL
    ("12345", DOC_URL.replace("https", "http"), DOC_PARAMS, DOC_SIGNATURE),     # other scheme
    ("54321", DOC_URL, DOC_PARAMS, DOC_SIGNATURE),                              # other token
    ("12345", DOC_URL, DOC_PARAMS, ""),
    ("12345", DOC_URL, DOC_PARAMS, DOC_SIGNATURE[:-1]),
    ("12345", DOC_URL, DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQé"),             # not ASCII
    ("12345", "https://mycompany.com:99999/x", DOC_PARAMS, DOC_SIGNATURE),      # bad port
])
def test_signature_refuses_anything_else(token, url, params, signature):
    assert not check_signature(token, url, params, signature)


def test_empty_values_are_signed():
    url = "https://mfa.example.com/twilio/gather"
    signature = twilio_signature("tok", url, [("CallSid", "CA1"), ("Digits", "")])
    assert check_signature("tok", url, {"CallSid": "CA1", "Digits": ""}, signature)
    assert not check_signature("tok", url, {"CallSid": "CA1"}, signature)


# --- TwiML ----------------------------------------------------------------------------------

def test_gather_twiml_structure():
    root = ElementTree.fromstring(gather_twiml("Press pound to sign in.",
                                               "https://mfa.example.com/gather?c=1&d=2"))
    assert root.tag == "Response"
    assert [child.tag for child in root] == ["Gather", "Say", "Hangup"]
    gather = root[0]
    assert gather.attrib == {"action": "https://mfa.example.com/gather?c=1&d=2",
                             "method": "POST", "finishOnKey": "#", "timeout": "10"}
    assert [child.tag for child in gather] == ["Say"]
    assert gather[0].text == "Press pound to sign in."
    assert root[1].text == "Goodbye."


def test_gather_twiml_options():
    gather = ElementTree.fromstring(gather_twiml(
        "p", "https://x/g", num_digits=1, timeout=15, finish_on_key="", goodbye="Bye"))[0]
    assert gather.get("numDigits") == "1"
    assert gather.get("timeout") == "15"
    assert gather.get("finishOnKey") == ""


def test_gather_twiml_escapes_markup():
    prompt = 'Hello <Play>x</Play> & "friends" \'here\' ]]>'
    action = 'https://x/g?a=1&b="<>"'
    twiml = gather_twiml(prompt, action, goodbye="</Say><Dial>+15550000000</Dial>")
    assert b"<Play>" not in twiml and b"<Dial>" not in twiml
    root = ElementTree.fromstring(twiml)
    assert root[0][0].text == prompt
    assert root[0].get("action") == action
    assert root[1].text == "</Say><Dial>+15550000000</Dial>"


def test_twiml_drops_characters_xml_cannot_carry():
    root = ElementTree.fromstring(gather_twiml("user\x00\x1b[31m\x07name", "https://x/g"))
    assert root[0][0].text == "user[31mname"
    assert ElementTree.fromstring(say_twiml("a\x0bb")).find("Say").text == "ab"


@pytest.mark.parametrize("kwargs", [
    {"finish_on_key": "##"}, {"finish_on_key": "a"}, {"num_digits": 0}, {"timeout": 0},
])
def test_gather_twiml_refuses_bad_options(kwargs):
    with pytest.raises(ValueError):
        gather_twiml("p", "https://x/g", **kwargs)


def test_say_twiml():
    root = ElementTree.fromstring(say_twiml("Fraud reported <now> & logged."))
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root[0].text == "Fraud reported <now> & logged."


# --- send_sms -------------------------------------------------------------------------------

class TwilioTestCase(SynchronousTestCase):
    """The fake Twilio and our endpoints in memory, time on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.endpoints = Endpoints()
        self.fake = FakeTwilio(self.clock, http_client=StubTreq(self.endpoints))
        self.stub = StubTreq(self.fake.resource)

    def gateway(self, **overrides) -> TwilioGateway:
        return TwilioGateway(settings(**overrides), self.clock, http_client=self.stub)

    def gateway_error(self, d) -> GatewayError:
        """The GatewayError that ``d`` has failed with."""
        return self.failureResultOf(d, GatewayError).value


class SendSmsTests(TwilioTestCase):
    def test_send_sms(self):
        with capturedLogs() as events:
            self.assertIsNone(self.successResultOf(
                self.gateway().send_sms(USER_PHONE, SMS_TEXT)))
        [message] = self.fake.messages
        self.assertEqual((message["to"], message["from"], message["body"]),
                         (USER_PHONE, FROM_NUMBER, SMS_TEXT))
        self.assertTrue(message["sid"].startswith("SM"))
        logged = repr(events)
        self.assertIn(message["sid"], logged)
        self.assertIn("***4567", logged)
        for secret in (AUTH_TOKEN, "493817", USER_PHONE):
            self.assertNotIn(secret, logged)

    def test_send_sms_with_bad_credentials_fails(self):
        with capturedLogs() as events:
            error = self.gateway_error(self.gateway(auth_token="wrong-token").send_sms(
                USER_PHONE, SMS_TEXT))
        self.assertEqual((error.status, error.provider_code), (401, 20003))
        self.assertEqual(str(error), "twilio 401 20003: Authenticate")
        self.assertEqual(self.fake.messages, [])
        self.assertNotIn("wrong-token", repr(events))
        self.assertNotIn("493817", repr(events))

    def test_send_sms_to_a_number_twilio_refuses_names_the_error_code(self):
        with capturedLogs() as events:
            error = self.gateway_error(self.gateway().send_sms("+1555123", SMS_TEXT))
        self.assertEqual((error.status, error.provider_code), (400, 21211))
        self.assertTrue(str(error).startswith("twilio 400 21211: The 'To' number "))
        self.assertNotIn("+1555123", str(error))  # the number Twilio quotes is masked
        self.assertNotIn("+1555123", repr(events))

    def test_send_sms_to_a_non_e164_number_sends_nothing(self):
        for to in ["5551234567", "+1 555 123 4567", "+15551234567\n", "", None]:
            with self.subTest(to=to):
                self.assertIn("E.164", str(self.gateway_error(
                    self.gateway().send_sms(to, SMS_TEXT))))
        self.assertEqual(self.fake.requests, 0)

    def test_send_sms_with_an_empty_or_overlong_text_sends_nothing(self):
        for text in ["", "x" * 1601]:
            with self.subTest(length=len(text)):
                self.gateway_error(self.gateway().send_sms(USER_PHONE, text))
        self.assertEqual(self.fake.requests, 0)

    def test_send_sms_provider_errors(self):
        for status, code, expected in [
            (500, 20500, "twilio 500 20500: Internal Server Error"),
            (503, None, "twilio 503: Internal Server Error"),
            (429, 20429, "twilio 429 20429: Too Many Requests"),
        ]:
            with self.subTest(status=status):
                message = "Too Many Requests" if status == 429 else "Internal Server Error"
                self.fake.fail_next(status, code=code, message=message)
                error = self.gateway_error(self.gateway().send_sms(USER_PHONE, SMS_TEXT))
                self.assertEqual(str(error), expected)
                self.assertEqual((error.status, error.provider_code), (status, code))

    def test_send_sms_unparseable_error_answer(self):
        for body in [b"<html><body>502 Bad Gateway</body></html>", b"", b"[1, 2]",
                     b'{"code": "x"}', b'{"code": true, "message": 5}', b"\xff\xfe",
                     b"[" * 100000]:
            with self.subTest(body=body[:20]):
                self.fake.fail_next(502, body=body)
                error = self.gateway_error(self.gateway().send_sms(USER_PHONE, SMS_TEXT))
                self.assertTrue(str(error).startswith("twilio 502"))
                self.assertEqual((error.status, error.provider_code), (502, None))

    def test_send_sms_answer_too_large_fails(self):
        self.fake.fail_next(201, body=b'{"sid": "' + b"x" * (1024 * 1024) + b'"}')
        error = self.gateway_error(self.gateway().send_sms(USER_PHONE, SMS_TEXT))
        self.assertIn("longer than", str(error))

    def test_send_sms_accepted_with_odd_json_succeeds(self):
        # 201 means Twilio took the message: failing would invite a duplicate send.
        self.fake.fail_next(201, body=b"not json")
        self.assertIsNone(self.successResultOf(self.gateway().send_sms(USER_PHONE, SMS_TEXT)))

    def test_send_sms_to_a_hung_server_times_out_and_hangs_up(self):
        for partial in (False, True):
            with self.subTest(partial=partial):
                self.fake.hang_next(partial=partial)
                d = self.gateway(timeout=0.5).send_sms(USER_PHONE, SMS_TEXT)
                self.assertNoResult(d)
                self.clock.advance(0.5)
                self.assertEqual(str(self.gateway_error(d)), "twilio: no answer within 0.5 s")
        self.stub.flush()
        self.assertEqual(self.fake.dropped, 2)  # we dropped both connections

    def test_cancelling_a_send_gives_cancelled_error_and_hangs_up(self):
        self.fake.hang_next()
        d = self.gateway().send_sms(USER_PHONE, SMS_TEXT)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(self.fake.dropped, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionTests(SynchronousTestCase):
    """The gateway's own Agent and pool on a MemoryReactorClock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.fake = FakeTwilio(self.reactor)
        self.gateway = TwilioGateway(settings("http://127.0.0.1:8080", timeout=5.0),
                                     self.reactor)

    def test_send_sms_reuses_the_connection_and_close_closes_it(self):
        self.reactor.listenTCP(8080, Site(self.fake.resource, reactor=self.reactor))
        d = self.gateway.send_sms(USER_PHONE, SMS_TEXT)
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        pump.flush()
        self.successResultOf(d)
        d = self.gateway.send_sms(USER_PHONE, SMS_TEXT)
        self.assertEqual(self.reactor.tcpClients, [])  # no new connection
        pump.flush()
        self.successResultOf(d)
        self.assertEqual(len(self.fake.messages), 2)
        closed = self.gateway.close()
        pump.flush()
        self.successResultOf(closed)
        self.assertTrue(pump.serverIO.disconnected)

    def test_send_sms_with_nothing_listening_fails_before_the_deadline(self):
        d = self.gateway.send_sms(USER_PHONE, SMS_TEXT)
        ConnectionCompleter(self.reactor).failOnce(Failure(ConnectionRefusedError()))
        self.reactor.advance(1)  # the endpoint's next attempt: there is none
        error = self.failureResultOf(d, GatewayError).value
        self.assertTrue(str(error).startswith("twilio unreachable"))
        self.assertIsNone(error.status)


# --- start_call -----------------------------------------------------------------------------

class StartCallTests(TwilioTestCase):
    def place_call(self, keys, twiml: bytes):
        """Call USER_PHONE, who presses ``keys``; the FakeCall once it has ended."""
        self.fake.script_call(USER_PHONE, keys)
        self.endpoints.twiml = twiml
        sid = self.successResultOf(self.gateway().start_call(
            USER_PHONE, answer_url=PUBLIC + "/answer?c=1", status_url=PUBLIC + "/status"))
        self.assertTrue(sid.startswith("CA"))
        self.assertEqual(len(sid), 34)
        finished = self.fake.call_finished(sid)
        self.assertNoResult(finished)
        self.clock.advance(self.fake.answer_delay)
        call = self.successResultOf(finished)
        self.assertEqual(call.sid, sid)
        self.assertTrue(all(ok for _, _, ok in self.endpoints.posts),
                        "a callback had a bad signature")
        return call

    def test_call_pressing_pound(self):
        call = self.place_call("#", PRESS_POUND)
        self.assertEqual((call.to, call.from_, call.timeout), (USER_PHONE, FROM_NUMBER, 30))
        self.assertEqual(call.url, PUBLIC + "/answer?c=1")
        self.assertEqual(call.status_callback, PUBLIC + "/status")
        self.assertEqual(call.status_callback_event, ["completed"])
        self.assertEqual(self.endpoints.paths(), ["/answer", "/gather", "/status"])
        answer, gather, status = (params for _, params, _ in self.endpoints.posts)
        self.assertEqual((answer["CallStatus"], answer["CallSid"]), ("in-progress", call.sid))
        self.assertEqual((gather["Digits"], gather["CallSid"]), ("#", call.sid))
        self.assertEqual(status["CallStatus"], "completed")
        # What our endpoints answered, as the fake saw it.
        self.assertEqual(call.exchange("answer").body, PRESS_POUND)
        self.assertEqual(ElementTree.fromstring(call.exchange("gather").body)[0].text,
                         "Thank you.")

    def test_call_reporting_fraud(self):
        self.place_call("0#", PRESS_POUND)
        path, params, _ = self.endpoints.posts[1]
        self.assertEqual((path, params["Digits"]), ("/gather", "0"))

    def test_call_with_pin(self):
        self.place_call("1234#", gather_twiml("Enter your PIN, then pound.", PUBLIC + "/gather"))
        self.assertEqual(self.endpoints.posts[1][1]["Digits"], "1234")

    def test_call_pound_alone_with_pound_as_finish_key_posts_nothing(self):
        # The trap the module docstring warns about: "#" alone is no input.
        self.place_call("#", gather_twiml("Press pound.", PUBLIC + "/gather"))
        self.assertEqual(self.endpoints.paths(), ["/answer", "/status"])

    def test_call_answered_in_silence_posts_nothing(self):
        self.place_call("", PRESS_POUND)
        self.assertEqual(self.endpoints.paths(), ["/answer", "/status"])

    def test_call_not_answered(self):
        call = self.place_call(None, PRESS_POUND)
        self.assertEqual(self.endpoints.paths(), ["/status"])
        self.assertEqual(self.endpoints.posts[0][1]["CallStatus"], "no-answer")
        self.assertEqual(call.status, "no-answer")

    def test_call_without_status_url(self):
        self.fake.script_call(USER_PHONE, "#")
        self.endpoints.twiml = PRESS_POUND
        sid = self.successResultOf(self.gateway().start_call(
            USER_PHONE, answer_url=PUBLIC + "/answer"))
        self.clock.advance(self.fake.answer_delay)
        self.successResultOf(self.fake.call_finished(sid))
        self.assertEqual(self.endpoints.paths(), ["/answer", "/gather"])
        self.assertIsNone(self.fake.calls[0].status_callback)

    def test_call_to_a_number_twilio_refuses(self):
        error = self.gateway_error(self.gateway().start_call(
            "+1555123", answer_url=PUBLIC + "/answer"))
        self.assertEqual(error.provider_code, 21211)
        self.assertEqual(self.fake.calls, [])

    def test_call_to_a_non_e164_number_sends_nothing(self):
        self.gateway_error(self.gateway().start_call("5551234567", answer_url=PUBLIC + "/answer"))
        self.assertEqual(self.fake.requests, 0)

    def test_call_with_a_relative_url_is_a_programming_error(self):
        gateway = self.gateway()
        with self.assertRaisesRegex(ValueError, "answer_url"):
            gateway.start_call(USER_PHONE, answer_url="/answer")
        with self.assertRaisesRegex(ValueError, "status_url"):
            gateway.start_call(USER_PHONE, answer_url=PUBLIC + "/answer", status_url="/status")
        self.assertEqual(self.fake.requests, 0)

    def test_call_answer_without_a_call_sid_fails(self):
        self.fake.fail_next(201, body=b'{"status": "queued"}')
        error = self.gateway_error(self.gateway().start_call(
            USER_PHONE, answer_url=PUBLIC + "/answer"))
        self.assertIn("no call SID", str(error))
