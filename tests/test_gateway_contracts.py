"""Contract tests: one suite per seam, run over the fake in `mfaserver.testing` and the real thing.

A suite is a mixin of test methods over abstract factory methods; each
implementation subclasses it once, so a fake cannot drift from the real
gateway unnoticed. All in memory, time on a `Clock`:

* `SmsGatewayContract` (``send_sms``): `MemorySmsGateway`; `TwilioGateway`
  against the fake Twilio; `HttpGateway` against a `WebhookStandIn`;
  `SmtpGateway` against the fake SMTP server.
* `VoiceGatewayContract` (``start_call``): `MemoryVoiceGateway`; `TwilioGateway`
  against the fake Twilio.
* `WakeContract` (the push factor's ``wake(user)``): `MemoryWakeNotifier`;
  `WakeNotifier` against an ntfy and a webhook-relay `WebhookStandIn`, and
  with a `WebPushSender` against the `FakePushService`.

Each implementation is made with its provider in one of four states:
"accepting", "refusing", "unreachable" (the connection is refused) or
"silent" (it takes the request and never answers). What the fake records
(`MemorySmsGateway.sent`, ...) must equal what the stand-in received.
"""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase

from fake_push_service import FakePushService
from fake_smtp import FakeSmtpServer, Silent, connect_in_memory
from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio
from mfaserver.auth.model import Device
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.http import HttpGateway, HttpGatewaySettings
from mfaserver.gateways.smtp import SmtpGateway, SmtpSettings
from mfaserver.gateways.twilio import TwilioGateway, TwilioSettings
from mfaserver.gateways.wake import NTFY_TEXT, WAKE_TEXT, WEBHOOK_BODY, WakeNotifier
from mfaserver.gateways.webpush import VapidKey, WebPushSender
from mfaserver.testing import (
    MemorySmsGateway, MemoryVoiceGateway, MemoryWakeNotifier, WebhookStandIn,
)

NUMBER = "+4917012345678"
OTHER_NUMBER = "+4930123456"
TEXT = "Your code is 493817"
ODD_TEXT = "Code 493817 – grüße {to} {text.__class__} & a=b"
NOT_E164 = ["4917012345678", "+49 170 1234567", "+4917012345678\n", "+0123456789", ""]
ANSWER_URL = "https://mfa.example.com/v1/voice/c1/answer"
STATUS_URL = "https://mfa.example.com/v1/voice/c1/status"
TIMEOUT = 5.0
STATES = ("accepting", "refusing", "unreachable", "silent")


# --- The suites --------------------------------------------------------------------------------

class _ProviderContract:
    """What callers of any gateway rely on, whatever its provider does.

    Subclasses set ``clock`` (the gateway's time) and implement:
    """

    clock: Clock

    def make_gateway(self, state: str):
        """The gateway under test, its provider in ``state`` (see STATES), deadline TIMEOUT."""
        raise NotImplementedError

    def request(self, gateway, to: str = NUMBER) -> defer.Deferred:
        """What the seam asks of ``gateway``, for ``to``."""
        raise NotImplementedError

    def recorded(self) -> list:
        """What the provider accepted, in order."""
        raise NotImplementedError

    def settle(self) -> None:
        """Let the provider's side act on what was asked of it (connect, refuse, ...)."""

    def abandoned(self) -> bool:
        """Whether the provider saw the silent request given up (the connection dropped)."""
        raise NotImplementedError

    def send(self, gateway, to: str = NUMBER) -> defer.Deferred:
        d = self.request(gateway, to)
        self.settle()
        return d

    def test_a_number_not_in_e164_form_fails_with_gateway_error_and_asks_nothing(self):
        gateway = self.make_gateway("accepting")
        for number in NOT_E164:
            self.failureResultOf(self.request(gateway, number), GatewayError)
        self.settle()
        self.assertEqual(self.recorded(), [])

    def test_a_refusal_fails_with_gateway_error(self):
        self.failureResultOf(self.send(self.make_gateway("refusing")), GatewayError)
        self.assertEqual(self.recorded(), [])

    def test_an_unreachable_provider_fails_with_gateway_error_before_the_deadline(self):
        error = self.failureResultOf(self.send(self.make_gateway("unreachable")), GatewayError)
        self.assertIsNone(error.value.status)
        self.assertLess(self.clock.seconds(), TIMEOUT)

    def test_no_answer_within_the_deadline_fails_with_gateway_error_and_gives_up(self):
        d = self.send(self.make_gateway("silent"))
        self.clock.advance(TIMEOUT - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.failureResultOf(d, GatewayError)
        self.assertTrue(self.abandoned())
        self.assertEqual(self.recorded(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_abandons_the_request(self):
        d = self.send(self.make_gateway("silent"))
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.abandoned())
        self.assertEqual(self.recorded(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SmsGatewayContract(_ProviderContract):
    """`SmsGateway.send_sms`: fires with None once accepted, else fails with GatewayError."""

    def request(self, gateway, to: str = NUMBER, text: str = TEXT) -> defer.Deferred:
        return gateway.send_sms(to, text)

    def test_an_accepted_text_fires_with_none_and_arrives_as_written(self):
        gateway = self.make_gateway("accepting")
        self.assertIsNone(self.successResultOf(self.send(gateway)))
        d = self.request(gateway, OTHER_NUMBER, ODD_TEXT)
        self.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.recorded(), [(NUMBER, TEXT), (OTHER_NUMBER, ODD_TEXT)])


class VoiceGatewayContract(_ProviderContract):
    """`VoiceGateway.start_call`: fires with the call id once placed, else fails with GatewayError."""

    def request(self, gateway, to: str = NUMBER, status_url: str | None = STATUS_URL):
        return gateway.start_call(to, answer_url=ANSWER_URL, status_url=status_url)

    def test_a_placed_call_fires_with_its_id(self):
        gateway = self.make_gateway("accepting")
        first = self.successResultOf(self.send(gateway))
        d = self.request(gateway, OTHER_NUMBER, status_url=None)
        self.settle()
        second = self.successResultOf(d)
        self.assertIsInstance(first, str)
        self.assertNotEqual(first, second)
        self.assertEqual(self.recorded(), [(NUMBER, ANSWER_URL, STATUS_URL, first),
                                           (OTHER_NUMBER, ANSWER_URL, None, second)])

    def test_a_relative_url_is_a_programming_error(self):
        gateway = self.make_gateway("accepting")
        with self.assertRaisesRegex(ValueError, "answer_url"):
            gateway.start_call(NUMBER, answer_url="/answer")
        with self.assertRaisesRegex(ValueError, "status_url"):
            gateway.start_call(NUMBER, answer_url=ANSWER_URL, status_url="status")
        self.settle()
        self.assertEqual(self.recorded(), [])


class WakeContract:
    """The push factor's ``wake(user)``: returns None at once, never raises, best effort.

    Subclasses set ``clock`` and implement `make_notifier`, `woken` and
    `abandoned`; alice and bob each have one device to wake.
    """

    clock: Clock

    def make_notifier(self, state: str):
        """The notifier (``wake(user)`` and ``stop()``), its target in ``state``."""
        raise NotImplementedError

    def woken(self) -> list[str]:
        """Whom the wake-ups reached, in order."""
        raise NotImplementedError

    def abandoned(self) -> bool:
        """Whether what was in flight at `stop` was given up."""
        raise NotImplementedError

    def settle(self) -> None:
        """Let the target's side act on what was sent."""

    def test_each_call_wakes_the_user_once(self):
        wake = self.make_notifier("accepting")
        for user in ("alice", "bob", "alice"):
            self.assertIsNone(wake(user))
        self.settle()
        self.assertEqual(self.woken(), ["alice", "bob", "alice"])

    def test_wake_returns_none_and_raises_nothing_whatever_the_target_does(self):
        for state in ("refusing", "unreachable", "silent"):
            wake = self.make_notifier(state)
            self.assertIsNone(wake("alice"))
            self.settle()
            self.clock.advance(60)
            self.assertIsNone(wake("bob"))
            self.settle()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_abandons_what_is_in_flight(self):
        wake = self.make_notifier("silent")
        wake("alice")
        self.settle()
        wake.stop()
        self.assertTrue(self.abandoned())
        self.assertEqual(self.woken(), ["alice"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --- Stand-ins on a MemoryReactorClock ---------------------------------------------------------

class _RefusedConnections:
    """For "unreachable": the real thing on a MemoryReactorClock whose connections are refused.

    Otherwise (``reactor`` None) it runs on ``clock`` with an in-memory HTTP client.
    """

    reactor: MemoryReactorClock | None = None

    def unreachable_reactor(self) -> MemoryReactorClock:
        self.clock = self.reactor = MemoryReactorClock()
        return self.reactor

    def settle(self) -> None:
        if self.reactor is None:
            return
        while self.reactor.tcpClients:
            ConnectionCompleter(self.reactor).failOnce(Failure(ConnectionRefusedError()))
        self.reactor.advance(0.5)  # a HostnameEndpoint's next attempt: there is none


# --- The fakes ---------------------------------------------------------------------------------

class _MemoryGateway:
    """The fakes: ``failure`` for a refusal or an unreachable provider, ``hold`` for silence."""

    fake: type

    def make_gateway(self, state: str):
        self.clock = Clock()
        self.gateway = self.fake(self.clock, TIMEOUT)
        if state == "refusing":
            self.gateway.failure = GatewayError("refused", status=400)
        elif state == "unreachable":
            self.gateway.failure = GatewayError("unreachable")
        elif state == "silent":
            self.gateway.hold = True
        return self.gateway

    def abandoned(self) -> bool:
        return self.gateway.held == 0


class MemorySmsGatewayContractTests(_MemoryGateway, SmsGatewayContract, SynchronousTestCase):
    fake = MemorySmsGateway

    def recorded(self):
        return self.gateway.sent

    def test_release_answers_a_held_text(self):
        gateway = self.make_gateway("silent")
        d = self.send(gateway)
        gateway.release()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.recorded(), [(NUMBER, TEXT)])


class MemoryVoiceGatewayContractTests(_MemoryGateway, VoiceGatewayContract, SynchronousTestCase):
    fake = MemoryVoiceGateway

    def recorded(self):
        return [(c.to, c.answer_url, c.status_url, c.call_id) for c in self.gateway.calls]


class MemoryWakeNotifierContractTests(WakeContract, SynchronousTestCase):
    def make_notifier(self, state: str):
        self.clock = Clock()
        self.notifier = MemoryWakeNotifier()
        return self.notifier

    def woken(self):
        return self.notifier.woken

    def abandoned(self) -> bool:
        return self.notifier.stopped


# --- Twilio ------------------------------------------------------------------------------------

class _Twilio(_RefusedConnections):
    """`TwilioGateway` against the fake Twilio through StubTreq."""

    def make_gateway(self, state: str) -> TwilioGateway:
        self.clock, self.reactor = Clock(), None
        # Calls play out on the clock; their callbacks go to a stand-in.
        self.fake = FakeTwilio(self.clock, http_client=StubTreq(WebhookStandIn()))
        self.stub = StubTreq(self.fake.resource)
        token = "not-the-token" if state == "refusing" else AUTH_TOKEN
        if state == "silent":
            self.fake.hang_next()
        if state == "unreachable":
            return TwilioGateway(self.settings("http://127.0.0.1:8080", AUTH_TOKEN),
                                 self.unreachable_reactor())
        return TwilioGateway(self.settings("https://api.twilio.com", token), self.clock,
                             http_client=self.stub)

    @staticmethod
    def settings(api_base: str, auth_token: str) -> TwilioSettings:
        return TwilioSettings(account_sid=ACCOUNT_SID, auth_token=auth_token,
                              from_number=FROM_NUMBER, api_base=api_base, timeout=TIMEOUT)

    def abandoned(self) -> bool:
        self.stub.flush()
        return self.fake.dropped == 1


class TwilioSmsContractTests(_Twilio, SmsGatewayContract, SynchronousTestCase):
    def recorded(self):
        return [(m["to"], m["body"]) for m in self.fake.messages]


class TwilioVoiceContractTests(_Twilio, VoiceGatewayContract, SynchronousTestCase):
    def recorded(self):
        return [(c.to, c.url, c.status_callback, c.sid) for c in self.fake.calls]


# --- A webhook and a mail relay ----------------------------------------------------------------

class HttpSmsContractTests(_RefusedConnections, SmsGatewayContract, SynchronousTestCase):
    """`HttpGateway` against a `WebhookStandIn` through StubTreq."""

    def make_gateway(self, state: str) -> HttpGateway:
        self.clock, self.reactor = Clock(), None
        self.web = WebhookStandIn(status=503 if state == "refusing" else 200)
        self.web.hold = state == "silent"
        self.stub = StubTreq(self.web)
        settings = HttpGatewaySettings(url="https://sms.example.com/send", timeout=TIMEOUT)
        if state == "unreachable":
            return HttpGateway(settings, self.unreachable_reactor())
        return HttpGateway(settings, self.clock, http_client=self.stub)

    def recorded(self):
        return [(body["to"], body["text"])
                for body in (json.loads(r.body) for r in self.web.accepted())]

    def abandoned(self) -> bool:
        self.stub.flush()
        return self.web.dropped == 1


class SmtpSmsContractTests(SmsGatewayContract, SynchronousTestCase):
    """`SmtpGateway` on a MemoryReactorClock against the fake SMTP server."""

    def make_gateway(self, state: str) -> SmtpGateway:
        self.clock = self.reactor = MemoryReactorClock()
        self.state = state
        self.server = FakeSmtpServer()
        if state == "refusing":
            self.server.refuse.add(f"{NUMBER}@sms.example.net")
        self.silent: list[Silent] = []
        self.pumps = []
        return SmtpGateway(SmtpSettings(
            host="127.0.0.1", sender="mfa@example.com", starttls="none", timeout=TIMEOUT,
            sms_address="{e164}@sms.example.net"), self.reactor)

    def settle(self) -> None:
        while self.reactor.tcpClients:
            if self.state == "unreachable":
                ConnectionCompleter(self.reactor).failOnce(Failure(ConnectionRefusedError()))
            elif self.state == "silent":
                self.silent.append(Silent())
                self.pumps.append(connect_in_memory(self.reactor, self.silent[-1]))
            else:
                self.server.accept(self.reactor)

    def recorded(self):
        return [(r.recipient.partition("@")[0], r.message.get_content().removesuffix("\n"))
                for r in self.server.received]

    def abandoned(self) -> bool:
        for pump in self.pumps:
            pump.flush()
        return all(server.lost for server in self.silent)


# --- Wake-ups ----------------------------------------------------------------------------------

class _WakeNotifier(_RefusedConnections):
    """`WakeNotifier` against a stand-in of the ``kind`` of target, one device a user."""

    kind: str
    body: bytes
    content_type: str

    def make_notifier(self, state: str) -> WakeNotifier:
        self.clock, self.reactor = Clock(), None
        self.target = WebhookStandIn(status=500 if state == "refusing" else 200)
        self.target.hold = state == "silent"
        self.agent = RequestTraversalAgent(self.target)
        devices = {user: [Device(id=f"d-{user}", user=user, public_key="ed25519:x",
                                 notify_type=self.kind,
                                 notify_url=f"https://push.example.org/{user}")]
                   for user in ("alice", "bob")}
        list_devices = lambda user: defer.succeed(devices.get(user, []))  # noqa: E731
        if state == "unreachable":
            return WakeNotifier(self.unreachable_reactor(), list_devices,
                                kinds=frozenset({self.kind}), timeout=TIMEOUT)
        return WakeNotifier(self.clock, list_devices, kinds=frozenset({self.kind}),
                            timeout=TIMEOUT, agent=self.agent)

    def woken(self) -> list[str]:
        return [r.path.strip("/") for r in self.target.requests
                if (r.body, r.headers["content-type"]) == (self.body, self.content_type)]

    def abandoned(self) -> bool:
        self.agent.flush()
        return self.target.dropped == len(self.target.requests)


class NtfyWakeContractTests(_WakeNotifier, WakeContract, SynchronousTestCase):
    kind, body, content_type = "ntfy", NTFY_TEXT, "text/plain; charset=utf-8"


class WebhookWakeContractTests(_WakeNotifier, WakeContract, SynchronousTestCase):
    kind, body, content_type = "webhook", WEBHOOK_BODY, "application/json"


class WebPushWakeContractTests(_RefusedConnections, WakeContract, SynchronousTestCase):
    """`WakeNotifier` with a `WebPushSender` against the `FakePushService`, one
    subscription a user: what the push service verified and decrypted."""

    def make_notifier(self, state: str) -> WakeNotifier:
        self.clock, self.reactor = Clock(), None
        self.service = FakePushService(self.clock, "https://push.example.net")
        if state == "refusing":
            self.service.status = 500
        self.service.hold = state == "silent"
        self.agent = RequestTraversalAgent(self.service)
        key = VapidKey(ec.generate_private_key(ec.SECP256R1()))
        subscriptions = {user: self.service.subscribe(key.public_key)
                         for user in ("alice", "bob")}
        self.users = {s.id: user for user, s in subscriptions.items()}
        devices = {user: [Device(id=f"d-{user}", user=user, public_key="ed25519:x",
                                 notify_type="webpush", notify_url=s.endpoint,
                                 notify_keys=json.dumps({"p256dh": s.p256dh, "auth": s.auth}))]
                   for user, s in subscriptions.items()}
        list_devices = lambda user: defer.succeed(devices.get(user, []))  # noqa: E731
        if state == "unreachable":
            sender = WebPushSender(self.unreachable_reactor(), key,
                                   subject="mailto:admin@example.org", timeout=TIMEOUT)
        else:
            sender = WebPushSender(self.clock, key, subject="mailto:admin@example.org",
                                   timeout=TIMEOUT, agent=self.agent)
        return WakeNotifier(self.clock, list_devices, kinds=frozenset({"webpush"}),
                            timeout=TIMEOUT, webpush=sender)

    def woken(self) -> list[str]:
        return [self.users[m.subscription.id] for m in self.service.received
                if m.plaintext == WAKE_TEXT]

    def abandoned(self) -> bool:
        self.agent.flush()
        return self.service.dropped == self.service.requests
