"""End to end: radclient -> daemon -> a fake Twilio on 127.0.0.1 for the SMS codes.

The fake runs on this process's reactor, so radclient runs on a thread while
the test awaits it.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

import fake_twilio
from mfaserver.radius import codec
from mfaserver.testing import access_request

from .conftest import SECRET, start_daemon, stop_daemon

pytestmark = pytest.mark.integration

PHONE = "+16502530000"


def sms_config(api_base: str, failmode: str = "secure") -> str:
    return f"""failmode = "{failmode}"

[sms]
gateway = "twilio"
""" + fake_twilio.gateway_config(api_base)


def texted_code(fake) -> str:
    return re.search(r"code is (\d+)", fake.messages[-1]["body"]).group(1)


@pytest.fixture
def fake():
    server = fake_twilio.FakeTwilio(reactor).start()
    yield server
    pytest_twisted.blockon(defer_stop(server))


def defer_stop(server):
    from twisted.internet.defer import Deferred
    return Deferred.fromCoroutine(server.stop())


@pytest.fixture
def daemon(tmp_path, fake):
    d = start_daemon(tmp_path, sms_config(fake.api_base))
    d.cli("user", "add", "alice", "--password-stdin", "--phone", PHONE, input="pw-alice\n")
    yield d
    stop_daemon(d)


def login(daemon, *args):
    return deferToThread(daemon.login, *args)


@pytest_twisted.ensureDeferred
async def test_password_sms_then_the_texted_code_at_the_challenge(daemon, fake):
    challenge = await login(daemon, "alice", "pw-alice,sms")
    assert challenge.code == "Access-Challenge", challenge.output
    assert "+*******0000" in challenge.get("Reply-Message")
    assert [m["to"] for m in fake.messages] == [PHONE]
    reply = await login(daemon, "alice", texted_code(fake), f"State = {challenge.get('State')}")
    assert reply.code == "Access-Accept", reply.output


@pytest_twisted.ensureDeferred
async def test_a_phone_only_user_gets_a_text_for_a_bare_password(daemon, fake):
    challenge = await login(daemon, "alice", "pw-alice")
    assert challenge.code == "Access-Challenge", challenge.output
    reply = await login(daemon, "alice", f"pw-alice,{texted_code(fake)}")
    assert reply.code == "Access-Accept", reply.output


@pytest_twisted.ensureDeferred
async def test_a_retransmitted_request_sends_one_text(daemon, fake):
    data, auth = access_request(SECRET.encode(), "alice", "pw-alice,sms")
    first, second = await deferToThread(daemon.send_repeatedly, data, 2, 5)
    assert first == second
    assert codec.decode_response(first, SECRET.encode(), auth).code == codec.ACCESS_CHALLENGE
    assert len(fake.messages) == 1


@pytest.mark.parametrize("failmode, expected", [("secure", "Access-Reject"),
                                                ("safe", "Access-Accept")])
@pytest_twisted.ensureDeferred
async def test_gateway_down_follows_the_failmode(tmp_path, failmode, expected):
    dead = f"http://127.0.0.1:{fake_twilio.unused_port()}"
    d = start_daemon(tmp_path, sms_config(dead, failmode))
    try:
        d.cli("user", "add", "alice", "--password-stdin", "--phone", PHONE, input="pw-alice\n")
        reply = await login(d, "alice", "pw-alice,sms")
        assert reply.code == expected, reply.output
        wrong = await login(d, "alice", "wrong,sms")
        assert wrong.code == "Access-Reject"
        assert f"failmode_safe" in d.cli("log", "--limit", "5").stdout or failmode == "secure"
    finally:
        stop_daemon(d)
