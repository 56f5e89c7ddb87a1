"""TwilioGateway against the fake Twilio on 127.0.0.1, and the signature and TwiML helpers.

The gateway tests run on the real reactor (pytest-twisted): real sockets and
real, short timeouts. A small twisted.web site plays our callback endpoints
for calls: it serves TwiML on the answer URL, records the <Gather> and
status posts, and checks X-Twilio-Signature on every one.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs
from xml.etree import ElementTree

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet import reactor as real_reactor
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from fake_twilio import (
    ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio, HungServer, unused_port,
)
from mfaserver.gateways.base import GatewayError, is_e164, mask_number
from mfaserver.gateways.twilio import (
    TwilioGateway, TwilioSettings, check_signature, gather_twiml, say_twiml,
)

USER_PHONE = "+15551234567"
SMS_TEXT = "Your sign-in code is 493817"

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


def settings(api_base: str, **overrides) -> TwilioSettings:
    values = dict(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_number=FROM_NUMBER,
                  api_base=api_base, timeout=2.0)
    values.update(overrides)
    return TwilioSettings(**values)


async def failure(d, kind=GatewayError):
    """The exception ``d`` fails with; the test fails if it succeeds or fails otherwise."""
    try:
        result = await d
    except kind as e:
        return e
    pytest.fail(f"expected {kind.__name__}, got {result!r}")


@pytest.fixture
def log_events():
    """Every log event emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def logged_text(events) -> str:
    return "\n".join(repr(event) for event in events)


@pytest_twisted.async_yield_fixture
async def fake():
    twilio = FakeTwilio(real_reactor).start()
    yield twilio
    await twilio.stop()


@pytest_twisted.async_yield_fixture
async def gateways():
    """Makes TwilioGateway objects on the real reactor; closes their connections afterwards."""
    made = []

    def make(api_base: str, **overrides) -> TwilioGateway:
        gateway = TwilioGateway(settings(api_base, **overrides), real_reactor)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.close()


class Endpoints(resource.Resource):
    """Our side of a call: /answer serves ``twiml``, /gather and /status record the posts."""

    isLeaf = True

    def __init__(self, twiml: bytes = b""):
        super().__init__()
        self.twiml = twiml
        self.base = ""
        self.posts: list[tuple[str, dict[str, str], bool]] = []  # path, params, signature ok

    def render_POST(self, request):
        url = self.base + request.uri.decode()
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


@pytest_twisted.async_yield_fixture
async def endpoints():
    site = Endpoints()
    port = real_reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
    site.base = f"http://127.0.0.1:{port.getHost().port}"
    yield site
    await port.stopListening()


# --- Settings and numbers --------------------------------------------------------------------

def test_settings_repr_hides_the_auth_token():
    assert AUTH_TOKEN not in repr(settings("https://api.twilio.com"))


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
        settings(**{"api_base": "https://api.twilio.com", **overrides})


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
    from fake_twilio import twilio_signature
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

@pytest_twisted.ensureDeferred
async def test_send_sms(fake, gateways, log_events):
    result = await gateways(fake.api_base).send_sms(USER_PHONE, SMS_TEXT)
    assert result is None
    assert len(fake.messages) == 1
    message = fake.messages[0]
    assert (message["to"], message["from"], message["body"]) == (USER_PHONE, FROM_NUMBER,
                                                                 SMS_TEXT)
    assert message["sid"].startswith("SM")
    logged = logged_text(log_events)
    assert message["sid"] in logged and "***4567" in logged
    assert AUTH_TOKEN not in logged and "493817" not in logged and USER_PHONE not in logged


@pytest_twisted.ensureDeferred
async def test_send_sms_reuses_the_connection(fake, gateways):
    gateway = gateways(fake.api_base)
    await gateway.send_sms(USER_PHONE, SMS_TEXT)
    await gateway.send_sms(USER_PHONE, SMS_TEXT)
    assert len(fake.messages) == 2


@pytest_twisted.ensureDeferred
async def test_send_sms_with_bad_credentials_fails(fake, gateways, log_events):
    gateway = gateways(fake.api_base, auth_token="wrong-token")
    error = await failure(gateway.send_sms(USER_PHONE, SMS_TEXT))
    assert (error.status, error.provider_code) == (401, 20003)
    assert str(error) == "twilio 401 20003: Authenticate"
    assert fake.messages == []
    logged = logged_text(log_events)
    assert "wrong-token" not in logged and "493817" not in logged


@pytest_twisted.ensureDeferred
async def test_send_sms_to_a_number_twilio_refuses_names_the_error_code(fake, gateways,
                                                                         log_events):
    error = await failure(gateways(fake.api_base).send_sms("+1555123", SMS_TEXT))
    assert (error.status, error.provider_code) == (400, 21211)
    assert str(error).startswith("twilio 400 21211: The 'To' number ")
    assert "+1555123" not in str(error)  # the number Twilio quotes is masked
    assert "+1555123" not in logged_text(log_events)


@pytest.mark.parametrize("to", ["5551234567", "+1 555 123 4567", "+15551234567\n", ""])
@pytest_twisted.ensureDeferred
async def test_send_sms_to_a_non_e164_number_sends_nothing(fake, gateways, to):
    await failure(gateways(fake.api_base).send_sms(to, SMS_TEXT))
    assert fake.requests == 0


@pytest.mark.parametrize("text", ["", "x" * 1601])
@pytest_twisted.ensureDeferred
async def test_send_sms_with_an_empty_or_overlong_text_sends_nothing(fake, gateways, text):
    await failure(gateways(fake.api_base).send_sms(USER_PHONE, text))
    assert fake.requests == 0


@pytest.mark.parametrize("status, code, expected", [
    (500, 20500, "twilio 500 20500: Internal Server Error"),
    (503, None, "twilio 503: Internal Server Error"),
    (429, 20429, "twilio 429 20429: Too Many Requests"),
])
@pytest_twisted.ensureDeferred
async def test_send_sms_provider_errors(fake, gateways, status, code, expected):
    message = "Too Many Requests" if status == 429 else "Internal Server Error"
    fake.fail_next(status, code=code, message=message)
    error = await failure(gateways(fake.api_base).send_sms(USER_PHONE, SMS_TEXT))
    assert str(error) == expected
    assert (error.status, error.provider_code) == (status, code)


@pytest.mark.parametrize("body", [
    b"<html><body>502 Bad Gateway</body></html>", b"", b"[1, 2]", b'{"code": "x"}',
    b'{"code": true, "message": 5}', b"\xff\xfe", b"[" * 100000,
])
@pytest_twisted.ensureDeferred
async def test_send_sms_unparseable_error_answer(fake, gateways, body):
    fake.fail_next(502, body=body)
    error = await failure(gateways(fake.api_base).send_sms(USER_PHONE, SMS_TEXT))
    assert str(error).startswith("twilio 502")
    assert (error.status, error.provider_code) == (502, None)


@pytest_twisted.ensureDeferred
async def test_send_sms_answer_too_large_fails(fake, gateways):
    fake.fail_next(201, body=b'{"sid": "' + b"x" * (1024 * 1024) + b'"}')
    error = await failure(gateways(fake.api_base).send_sms(USER_PHONE, SMS_TEXT))
    assert "longer than" in str(error)


@pytest_twisted.ensureDeferred
async def test_send_sms_accepted_with_odd_json_succeeds(fake, gateways):
    # 201 means Twilio took the message: failing would invite a duplicate send.
    fake.fail_next(201, body=b"not json")
    assert await gateways(fake.api_base).send_sms(USER_PHONE, SMS_TEXT) is None


@pytest_twisted.ensureDeferred
async def test_send_sms_with_nothing_listening_fails_quickly(gateways):
    gateway = gateways(f"http://127.0.0.1:{unused_port()}", timeout=5.0)
    started = time.monotonic()
    error = await failure(gateway.send_sms(USER_PHONE, SMS_TEXT))
    assert time.monotonic() - started < 1.0
    assert str(error).startswith("twilio unreachable")
    assert error.status is None


@pytest.mark.parametrize("partial", [False, True], ids=["silent", "stalls-in-body"])
@pytest_twisted.ensureDeferred
async def test_send_sms_to_a_hung_server_times_out(gateways, partial):
    hung = HungServer(real_reactor, partial=partial)
    try:
        gateway = gateways(hung.url, timeout=0.5)
        started = time.monotonic()
        error = await failure(gateway.send_sms(USER_PHONE, SMS_TEXT))
        elapsed = time.monotonic() - started
        await deferLater(real_reactor, 0.05)
        assert (hung.connections, hung.closed) == (1, 1)  # we dropped the connection
    finally:
        await hung.stop()
    assert 0.4 < elapsed < 2.0
    assert str(error) == "twilio: no answer within 0.5 s"


@pytest_twisted.ensureDeferred
async def test_cancelling_a_send_gives_cancelled_error(gateways):
    hung = HungServer(real_reactor)
    try:
        d = gateways(hung.url).send_sms(USER_PHONE, SMS_TEXT)
        real_reactor.callLater(0.1, d.cancel)
        await failure(d, defer.CancelledError)
    finally:
        await hung.stop()


# --- start_call -----------------------------------------------------------------------------

async def place_call(fake, gateway, endpoints, keys, twiml):
    """Call USER_PHONE, who presses ``keys``; the FakeCall once it has ended."""
    fake.script_call(USER_PHONE, keys)
    endpoints.twiml = twiml
    sid = await gateway.start_call(USER_PHONE, answer_url=endpoints.base + "/answer?c=1",
                                   status_url=endpoints.base + "/status")
    assert sid.startswith("CA") and len(sid) == 34
    call = await fake.call_finished(sid)
    assert call.sid == sid
    assert all(ok for _, _, ok in endpoints.posts), "a callback had a bad signature"
    return call


def press_pound(endpoints) -> bytes:
    return gather_twiml("Press pound to sign in, zero to report fraud.",
                        endpoints.base + "/gather?c=1", num_digits=1, finish_on_key="")


@pytest_twisted.ensureDeferred
async def test_call_pressing_pound(fake, gateways, endpoints):
    call = await place_call(fake, gateways(fake.api_base), endpoints, "#",
                            press_pound(endpoints))
    assert (call.to, call.from_, call.timeout) == (USER_PHONE, FROM_NUMBER, 30)
    assert call.url == endpoints.base + "/answer?c=1"
    assert call.status_callback == endpoints.base + "/status"
    assert call.status_callback_event == ["completed"]
    assert endpoints.paths() == ["/answer", "/gather", "/status"]
    answer, gather, status = (params for _, params, _ in endpoints.posts)
    assert answer["CallStatus"] == "in-progress" and answer["CallSid"] == call.sid
    assert gather["Digits"] == "#" and gather["CallSid"] == call.sid
    assert status["CallStatus"] == "completed"
    # What our endpoints answered, as the fake saw it.
    assert call.exchange("answer").body == press_pound(endpoints)
    assert ElementTree.fromstring(call.exchange("gather").body)[0].text == "Thank you."


@pytest_twisted.ensureDeferred
async def test_call_reporting_fraud(fake, gateways, endpoints):
    await place_call(fake, gateways(fake.api_base), endpoints, "0#", press_pound(endpoints))
    assert endpoints.posts[1][:2] == ("/gather", {**endpoints.posts[1][1], "Digits": "0"})


@pytest_twisted.ensureDeferred
async def test_call_with_pin(fake, gateways, endpoints):
    twiml = gather_twiml("Enter your PIN, then pound.", endpoints.base + "/gather")
    await place_call(fake, gateways(fake.api_base), endpoints, "1234#", twiml)
    assert endpoints.posts[1][1]["Digits"] == "1234"


@pytest_twisted.ensureDeferred
async def test_call_pound_alone_with_pound_as_finish_key_posts_nothing(fake, gateways,
                                                                       endpoints):
    # The trap the module docstring warns about: "#" alone is no input.
    twiml = gather_twiml("Press pound.", endpoints.base + "/gather")
    await place_call(fake, gateways(fake.api_base), endpoints, "#", twiml)
    assert endpoints.paths() == ["/answer", "/status"]


@pytest_twisted.ensureDeferred
async def test_call_answered_in_silence_posts_nothing(fake, gateways, endpoints):
    await place_call(fake, gateways(fake.api_base), endpoints, "", press_pound(endpoints))
    assert endpoints.paths() == ["/answer", "/status"]


@pytest_twisted.ensureDeferred
async def test_call_not_answered(fake, gateways, endpoints):
    call = await place_call(fake, gateways(fake.api_base), endpoints, None,
                            press_pound(endpoints))
    assert endpoints.paths() == ["/status"]
    assert endpoints.posts[0][1]["CallStatus"] == "no-answer"
    assert call.status == "no-answer"


@pytest_twisted.ensureDeferred
async def test_call_without_status_url(fake, gateways, endpoints):
    fake.script_call(USER_PHONE, "#")
    endpoints.twiml = press_pound(endpoints)
    sid = await gateways(fake.api_base).start_call(USER_PHONE,
                                                   answer_url=endpoints.base + "/answer")
    await fake.call_finished(sid)
    assert endpoints.paths() == ["/answer", "/gather"]
    assert fake.calls[0].status_callback is None


@pytest_twisted.ensureDeferred
async def test_call_to_a_number_twilio_refuses(fake, gateways, endpoints):
    error = await failure(gateways(fake.api_base).start_call(
        "+1555123", answer_url=endpoints.base + "/answer"))
    assert error.provider_code == 21211
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_call_to_a_non_e164_number_sends_nothing(fake, gateways, endpoints):
    await failure(gateways(fake.api_base).start_call("5551234567",
                                                     answer_url=endpoints.base + "/answer"))
    assert fake.requests == 0


def test_call_with_a_relative_answer_url_is_a_programming_error():
    gateway = TwilioGateway(settings("https://api.twilio.com"), real_reactor)
    with pytest.raises(ValueError, match="answer_url"):
        gateway.start_call(USER_PHONE, answer_url="/answer")


@pytest_twisted.ensureDeferred
async def test_call_answer_without_a_call_sid_fails(fake, gateways, endpoints):
    fake.fail_next(201, body=b'{"status": "queued"}')
    error = await failure(gateways(fake.api_base).start_call(
        USER_PHONE, answer_url=endpoints.base + "/answer"))
    assert "no call SID" in str(error)
