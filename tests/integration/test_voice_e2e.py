"""End to end: radclient -> daemon -> a fake Twilio that calls back the daemon's web listener.

The fake Twilio runs on this process's reactor: it takes the daemon's
Calls.json request, fetches the TwiML from the daemon's answer URL, presses
the scripted keys and posts them to the Gather's action URL, each callback
signed with X-Twilio-Signature as Twilio does. radclient runs on a thread.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

import fake_twilio
from ldap_server import free_tcp_port

from .conftest import start_daemon, stop_daemon

pytestmark = pytest.mark.integration

PHONE = "+16502530000"
PASSWORD = "pw-alice"


def voice_config(api_base: str, web_port: int, *, pin: bool = False,
                 failmode: str = "secure", default_method: str = "phone") -> str:
    return f"""failmode = "{failmode}"
default_method = "{default_method}"
timeout = 20

[web]
listen = "127.0.0.1"
port = {web_port}
public_url = "http://127.0.0.1:{web_port}"

[voice]
gateway = "twilio"
pin = {str(pin).lower()}

[alerts]
gateway = "console"
""" + fake_twilio.gateway_config(api_base)


@pytest.fixture
def fake():
    server = fake_twilio.FakeTwilio(reactor).start()
    yield server
    pytest_twisted.blockon(Deferred.fromCoroutine(server.stop()))


def started(tmp_path, api_base: str, **options):
    web_port = free_tcp_port()
    daemon = start_daemon(tmp_path, voice_config(api_base, web_port, **options))
    daemon.web_port = web_port
    daemon.cli("user", "add", "alice", "--password-stdin", "--phone", PHONE,
               input=PASSWORD + "\n")
    return daemon


def login(daemon, *args):
    # A call takes a moment: give radclient room before it retransmits.
    return deferToThread(daemon.radclient, ",".join([
        f'User-Name = "alice"', f'User-Password = "{args[0]}"',
        "Message-Authenticator = 0x00", *args[1:]]), "auth", timeout=25)


@pytest.fixture
def daemon(tmp_path, fake):
    d = started(tmp_path, fake.api_base)
    yield d
    stop_daemon(d)


@pytest_twisted.ensureDeferred
async def test_call_answered_with_pound_accepts(daemon, fake):
    fake.script_call(PHONE, "#")
    reply = await login(daemon, PASSWORD)
    assert reply.code == "Access-Accept", reply.output
    assert [call.to for call in fake.calls] == [PHONE]
    gather = fake.calls[0].exchange("gather")
    assert gather.params["Digits"] == "#"
    assert b"signed in" in gather.body
    # The prompt names the client, never the user or the number.
    answer = fake.calls[0].exchange("answer").body
    assert b"nas" in answer and b"alice" not in answer and PHONE.encode() not in answer


@pytest_twisted.ensureDeferred
async def test_password_phone_keyword_calls_even_when_the_default_is_otherwise(tmp_path, fake):
    daemon = started(tmp_path, fake.api_base, default_method="sms")
    try:
        fake.script_call(PHONE, "#")
        reply = await login(daemon, PASSWORD + ",phone")
        assert reply.code == "Access-Accept", reply.output
        assert len(fake.calls) == 1
    finally:
        stop_daemon(daemon)


@pytest_twisted.ensureDeferred
async def test_zero_reports_fraud_and_blocks_the_user(daemon, fake):
    fake.script_call(PHONE, "0#")
    reply = await login(daemon, PASSWORD)
    assert reply.code == "Access-Reject", reply.output
    assert "blocked" in reply.get("Reply-Message")
    assert "blocked" in daemon.cli("user", "show", "alice").stdout
    calls = len(fake.calls)
    again = await login(daemon, PASSWORD)
    assert again.code == "Access-Reject"
    assert len(fake.calls) == calls  # blocked: no more calls
    assert "FRAUD reported by alice" in daemon.wait_for_log("FRAUD reported by alice")


@pytest_twisted.ensureDeferred
async def test_unanswered_call_rejects(daemon, fake):
    fake.script_call(PHONE, None, status="no-answer")
    reply = await login(daemon, PASSWORD)
    assert reply.code == "Access-Reject", reply.output
    assert "not answered" in reply.get("Reply-Message")


@pytest_twisted.ensureDeferred
async def test_pin_mode_right_pin_accepts_and_wrong_pin_rejects(tmp_path, fake):
    daemon = started(tmp_path, fake.api_base, pin=True)
    try:
        daemon.cli("user", "set-pin", "alice", "--pin-stdin", input="4711\n")
        fake.script_call(PHONE, "4711#")
        reply = await login(daemon, PASSWORD)
        assert reply.code == "Access-Accept", reply.output
        gather = fake.calls[0].exchange("gather")
        assert gather.params["Digits"] == "4711"
        fake.script_call(PHONE, "1234#")
        reply = await login(daemon, PASSWORD)
        assert reply.code == "Access-Reject", reply.output
        # 0 then # still reports fraud in PIN mode.
        fake.script_call(PHONE, "0#")
        reply = await login(daemon, PASSWORD)
        assert reply.code == "Access-Reject"
        assert "blocked" in reply.get("Reply-Message")
    finally:
        stop_daemon(daemon)


@pytest.mark.parametrize("failmode, expected", [("secure", "Access-Reject"),
                                                ("safe", "Access-Accept")])
@pytest_twisted.ensureDeferred
async def test_voice_gateway_down_follows_the_failmode(tmp_path, failmode, expected):
    dead = f"http://127.0.0.1:{fake_twilio.unused_port()}"
    daemon = started(tmp_path, dead, failmode=failmode)
    try:
        reply = await login(daemon, PASSWORD)
        assert reply.code == expected, reply.output
        # Never fail-open on a wrong password.
        wrong = await login(daemon, "wrong")
        assert wrong.code == "Access-Reject"
        log = daemon.cli("log", "--limit", "5").stdout
        assert ("failmode_safe" in log) == (failmode == "safe")
    finally:
        stop_daemon(daemon)


@pytest_twisted.ensureDeferred
async def test_forged_twilio_callback_is_refused(daemon, fake):
    import treq
    response = await treq.post(
        f"http://127.0.0.1:{daemon.web_port}/v1/voice/Xq7pD2mVtY1kLs9wB4nR0g/gather",
        data={"Digits": "#", "CallSid": "CA" + "0" * 32},
        headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"})
    assert response.code == 403
    assert (await response.json())["error"] == "forbidden"


@pytest_twisted.ensureDeferred
async def test_a_repeated_login_during_a_call_places_one_call(tmp_path):
    slow = fake_twilio.FakeTwilio(reactor, answer_delay=1.5).start()
    daemon = started(tmp_path, slow.api_base)
    try:
        slow.script_call(PHONE, "#")
        station = 'Calling-Station-Id = "203.0.113.7"'
        first = login(daemon, PASSWORD, station)
        await deferLater(reactor, 0.5, lambda: None)
        second = login(daemon, PASSWORD, station)
        replies = await gatherResults([first, second])
        assert [r.code for r in replies] == ["Access-Accept", "Access-Accept"]
        assert len(slow.calls) == 1
    finally:
        stop_daemon(daemon)
        await slow.stop()
