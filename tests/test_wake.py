"""Wake-up notifications: what is POSTed where, once, and how failures are taken.

The notifier's Agent is treq's RequestTraversalAgent over a `WebhookStandIn`
(in memory); its timeouts run on a `Clock`.
"""

from __future__ import annotations

import json

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.model import Device
from mfaserver.gateways.wake import NTFY_TEXT, WEBHOOK_BODY, WakeNotifier
from mfaserver.testing import WebhookStandIn

BOTH = frozenset({"ntfy", "webhook"})
URL = "https://ntfy.example.org"


def device(name: str, kind: str | None, url: str | None, user: str = "alice") -> Device:
    return Device(id=name, user=user, public_key="ed25519:x", notify_type=kind, notify_url=url)


def devices_of(devices: list[Device]):
    """``list_devices`` over a list of devices."""
    def list_devices(user):
        return defer.succeed([d for d in devices if d.user == user])
    return list_devices


class WakeNotifierTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.target = WebhookStandIn(body=b"")
        self.agent = RequestTraversalAgent(self.target)

    def notifier(self, devices: list[Device], kinds=BOTH, **options) -> WakeNotifier:
        options.setdefault("timeout", 5)
        return WakeNotifier(self.clock, devices_of(devices), kinds=kinds, agent=self.agent,
                            **options)

    def paths(self) -> list[str]:
        return [r.path for r in self.target.requests]

    def test_each_device_of_the_user_gets_one_wake_up_of_its_kind(self):
        notifier = self.notifier([
            device("a", "ntfy", URL + "/topic-a"), device("b", "webhook", URL + "/hook-b"),
            device("c", None, None), device("d", "ntfy", URL + "/topic-d", user="bob")])
        self.assertIsNone(notifier("alice"))
        got = sorted((r.path, r.headers["content-type"], r.body) for r in self.target.requests)
        self.assertEqual(got, [("/hook-b", "application/json", WEBHOOK_BODY),
                               ("/topic-a", "text/plain; charset=utf-8", NTFY_TEXT)])
        self.assertEqual(json.loads(WEBHOOK_BODY), {"type": "wake"})
        self.assertEqual((notifier.sent, notifier.failed), (2, 0))

    def test_a_user_without_devices_gets_nothing(self):
        notifier = self.notifier([device("a", "ntfy", URL + "/topic-a")])
        notifier("bob")
        self.assertEqual(self.target.requests, [])

    def test_only_the_configured_kind_is_sent(self):
        notifier = self.notifier([device("a", "ntfy", URL + "/topic-a"),
                                  device("b", "webhook", URL + "/hook-b")],
                                 kinds=frozenset({"webhook"}))
        notifier("alice")
        self.assertEqual(self.paths(), ["/hook-b"])

    def test_no_kinds_sends_nothing_and_lists_no_devices(self):
        asked = []
        notifier = WakeNotifier(self.clock, lambda user: asked.append(user) or defer.succeed([]),
                                kinds=frozenset(), agent=self.agent)
        notifier("alice")
        self.assertEqual((asked, self.target.requests), ([], []))

    def test_a_refusing_target_is_counted_as_failed_and_not_retried(self):
        self.target.status = 500
        notifier = self.notifier([device("a", "ntfy", URL + "/t")])
        notifier("alice")
        self.clock.advance(60)
        self.assertEqual((notifier.sent, notifier.failed, len(self.target.requests)), (0, 1, 1))

    def test_a_failure_is_logged_without_the_private_topic(self):
        self.target.status = 500
        with capturedLogs() as events:
            self.notifier([device("a", "ntfy", URL + "/secret-topic-4711")])("alice")
        self.assertIn("a wake-up notification failed", repr(events))
        self.assertNotIn("secret-topic-4711", repr(events))

    def test_a_target_that_never_answers_times_out_and_is_hung_up_on(self):
        for partial in (False, True):
            with self.subTest(partial=partial):
                self.target.hold, self.target.partial = True, partial
                notifier = self.notifier([device("a", "ntfy", URL + "/t")], timeout=2)
                notifier("alice")
                self.clock.advance(1.999)
                self.assertEqual(notifier.failed, 0)
                self.clock.advance(0.001)
                self.assertEqual((notifier.sent, notifier.failed), (0, 1))
        self.agent.flush()
        self.assertEqual(self.target.dropped, 2)

    def wake_held(self, users: int, **options) -> WakeNotifier:
        """Wake ``users`` users (u0, u1, ...: one webhook each) while the target holds requests."""
        self.target.hold = True
        notifier = self.notifier([device(f"d{i}", "webhook", f"{URL}/{i}", user=f"u{i}")
                                  for i in range(users)], **options)
        for i in range(users):
            notifier(f"u{i}")
        return notifier

    def test_at_most_max_in_flight_at_once_the_rest_queued(self):
        notifier = self.wake_held(5, max_in_flight=2)
        self.assertEqual(self.paths(), ["/0", "/1"])
        self.target.hold = False
        self.target.release()
        self.agent.flush()
        self.assertEqual(notifier.sent, 5)
        self.assertEqual(self.paths(), ["/0", "/1", "/2", "/3", "/4"])

    def test_past_max_queued_wake_ups_are_dropped(self):
        notifier = self.wake_held(4, max_in_flight=1, max_queued=2)
        self.assertEqual((len(self.target.requests), notifier.dropped), (1, 1))

    def test_stop_drops_the_queue_and_hangs_up_on_what_is_in_flight(self):
        notifier = self.wake_held(3, max_in_flight=1)
        notifier.stop()
        self.agent.flush()
        self.assertEqual((self.target.dropped, notifier.sent), (1, 0))
        self.assertEqual(self.paths(), ["/0"])  # the queued two were never sent
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_devices_that_cannot_be_listed_are_logged_not_raised(self):
        notifier = WakeNotifier(self.clock, lambda user: defer.fail(RuntimeError("db gone")),
                                kinds=BOTH, agent=self.agent)
        with capturedLogs() as events:
            self.assertIsNone(notifier("alice"))
        self.assertIn("could not list the devices of alice", repr(events))
        self.flushLoggedErrors(RuntimeError)


@pytest.mark.parametrize("url", ["https://ntfy.example.org/tópico", "https://a b/x"])
def test_enrollment_refuses_a_non_ascii_or_spaced_notify_url(url):
    from mfaserver.web.devices import check_notify_url
    from mfaserver.web.validation import HttpError
    with pytest.raises(HttpError):
        check_notify_url(url)


class WebPushWakeTests(SynchronousTestCase):
    """Kind "webpush": one Web Push per webpush device, through the `WebPushSender`."""

    def setUp(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        from fake_push_service import FakePushService
        from mfaserver.gateways.webpush import VapidKey, WebPushSender
        self.clock = Clock()
        self.service = FakePushService(self.clock, "https://push.example.net")
        self.push_agent = RequestTraversalAgent(self.service)
        key = VapidKey(ec.generate_private_key(ec.SECP256R1()))
        self.sender = WebPushSender(self.clock, key, subject="mailto:admin@example.org",
                                    timeout=5, agent=self.push_agent)
        self.target = WebhookStandIn(body=b"")

    def subscribed(self, name: str, user: str = "alice") -> Device:
        s = self.service.subscribe()
        return Device(id=name, user=user, public_key="ed25519:x", notify_type="webpush",
                      notify_url=s.endpoint,
                      notify_keys=json.dumps({"p256dh": s.p256dh, "auth": s.auth}))

    def notifier(self, devices: list[Device], kinds=frozenset({"webpush"})) -> WakeNotifier:
        return WakeNotifier(self.clock, devices_of(devices), kinds=kinds, timeout=5,
                            agent=RequestTraversalAgent(self.target), webpush=self.sender)

    def test_each_webpush_device_of_the_user_gets_one_push_and_other_kinds_nothing(self):
        a, b = self.subscribed("a"), self.subscribed("b")
        notifier = self.notifier([a, b, self.subscribed("c", user="bob"),
                                  device("d", "ntfy", URL + "/topic-d"),
                                  device("e", "webhook", URL + "/hook-e"), device("f", None, None)])
        self.assertIsNone(notifier("alice"))
        got = sorted((m.subscription.endpoint, m.plaintext) for m in self.service.received)
        self.assertEqual(got, sorted([(a.notify_url, NTFY_TEXT), (b.notify_url, NTFY_TEXT)]))
        self.assertEqual(self.target.requests, [])
        self.assertEqual((notifier.sent, notifier.failed), (2, 0))

    def test_webpush_devices_get_nothing_when_another_kind_is_configured(self):
        notifier = self.notifier([self.subscribed("a"), device("b", "ntfy", URL + "/t")],
                                 kinds=frozenset({"ntfy"}))
        notifier("alice")
        self.assertEqual((self.service.requests, [r.path for r in self.target.requests]),
                         (0, ["/t"]))

    def test_the_kind_webpush_needs_a_sender(self):
        with self.assertRaisesRegex(ValueError, "Web Push sender"):
            WakeNotifier(self.clock, devices_of([]), kinds=frozenset({"webpush"}))

    def test_a_device_without_keys_is_counted_as_failed(self):
        broken = Device(id="a", user="alice", public_key="ed25519:x", notify_type="webpush",
                        notify_url="https://push.example.net/wpush/x")
        notifier = self.notifier([broken, self.subscribed("b")])
        with capturedLogs() as events:
            notifier("alice")
        self.assertEqual((notifier.sent, notifier.failed), (1, 1))
        self.assertIn("a wake-up notification failed", repr(events))

    def test_a_subscription_gone_is_logged_with_the_device_not_the_endpoint(self):
        gone = self.subscribed("dev-4711")
        self.service.unsubscribe(next(iter(self.service.subscriptions.values())))
        with capturedLogs() as events:
            notifier = self.notifier([gone])
            notifier("alice")
        self.assertEqual(notifier.failed, 1)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("device dev-4711 of alice has no Web Push subscription", text)
        self.assertNotIn(gone.notify_url, text)
        self.assertNotIn(gone.notify_url.rpartition("/")[2], text)

    def test_a_silent_push_service_times_out_and_stop_hangs_up(self):
        self.service.hold = True
        notifier = self.notifier([self.subscribed("a"), self.subscribed("b")])
        notifier("alice")
        self.clock.advance(5)
        self.assertEqual((notifier.sent, notifier.failed), (0, 2))
        notifier("alice")
        notifier.stop()
        self.push_agent.flush()
        self.assertEqual(self.service.dropped, 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_closes_the_senders_connections_too(self):
        closed = []
        self.sender.close = lambda: closed.append(True) or defer.succeed(None)
        notifier = WakeNotifier(self.clock, devices_of([]), kinds=frozenset({"webpush"}),
                                webpush=self.sender)
        self.assertIsNone(self.successResultOf(notifier.close()))
        self.assertEqual(closed, [True])
