"""Wake-up notifications: what is POSTed where, once, and how failures are taken."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web import resource, server

from mfaserver.auth.model import Device
from mfaserver.gateways.wake import NTFY_TEXT, WakeNotifier


class _Sink(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.received: list[tuple[bytes, bytes, bytes]] = []
        self.status = 200
        self.held: list = []  # requests not answered yet (hold = True)
        self.hold = False

    def render_POST(self, request):
        self.received.append((request.path, request.getHeader(b"content-type"),
                              request.content.read()))
        if self.hold:
            self.held.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(self.status)
        return b""


@pytest_twisted.async_yield_fixture
async def sink():
    site = _Sink()
    port = reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
    site.url = f"http://127.0.0.1:{port.getHost().port}"
    yield site
    for request in site.held:
        request.finish()
    await port.stopListening()


def devices_of(mapping):
    def list_devices(user):
        return defer.succeed(mapping.get(user, []))
    return list_devices


async def settle(notifier, wanted: int):
    for _ in range(200):
        if notifier.sent + notifier.failed >= wanted and not notifier._in_flight:
            return
        await deferLater(reactor, 0.01, lambda: None)


def device(name, kind, url):
    return Device(id=name, user="alice", public_key="ed25519:x", notify_type=kind,
                  notify_url=url)


@pytest_twisted.ensureDeferred
async def test_each_device_of_the_user_gets_one_wake_up_of_its_kind(sink):
    notifier = WakeNotifier(reactor, devices_of({"alice": [
        device("a", "ntfy", sink.url + "/topic-a"),
        device("b", "webhook", sink.url + "/hook-b"),
        device("c", None, None),
    ]}), kinds=frozenset({"ntfy", "webhook"}), timeout=5)
    notifier("alice")
    notifier("bob")  # no devices: nothing
    await settle(notifier, 2)
    got = sorted(sink.received)
    assert got == [(b"/hook-b", b"application/json", b'{"type": "wake"}'),
                   (b"/topic-a", b"text/plain; charset=utf-8", NTFY_TEXT)]
    assert json.loads(got[0][2]) == {"type": "wake"}
    assert (notifier.sent, notifier.failed) == (2, 0)


@pytest_twisted.ensureDeferred
async def test_only_the_configured_kind_is_sent(sink):
    notifier = WakeNotifier(reactor, devices_of({"alice": [
        device("a", "ntfy", sink.url + "/topic-a"),
        device("b", "webhook", sink.url + "/hook-b"),
    ]}), kinds=frozenset({"webhook"}), timeout=5)
    notifier("alice")
    await settle(notifier, 1)
    assert [path for path, _, _ in sink.received] == [b"/hook-b"]


@pytest_twisted.ensureDeferred
async def test_a_refusing_target_is_counted_as_failed_and_not_retried(sink):
    sink.status = 500
    notifier = WakeNotifier(reactor, devices_of({"alice": [device("a", "ntfy",
                                                                  sink.url + "/t")]}),
                            kinds=frozenset({"ntfy"}), timeout=5)
    notifier("alice")
    await settle(notifier, 1)
    await deferLater(reactor, 0.2, lambda: None)
    assert (notifier.sent, notifier.failed, len(sink.received)) == (0, 1, 1)


@pytest_twisted.ensureDeferred
async def test_at_most_max_in_flight_at_once_the_rest_queued(sink):
    sink.hold = True
    users = {f"u{i}": [device(f"d{i}", "webhook", f"{sink.url}/{i}")] for i in range(5)}
    notifier = WakeNotifier(reactor, devices_of(users), kinds=frozenset({"webhook"}),
                            timeout=5, max_in_flight=2)
    for user in users:
        notifier(user)
    for _ in range(100):
        if len(sink.received) >= 2:
            break
        await deferLater(reactor, 0.01, lambda: None)
    await deferLater(reactor, 0.1, lambda: None)
    assert len(sink.received) == 2
    assert len(notifier._queue) == 3
    sink.hold = False
    for request in sink.held:
        request.finish()
    sink.held = []
    await settle(notifier, 5)
    assert notifier.sent == 5 and len(sink.received) == 5


@pytest_twisted.ensureDeferred
async def test_no_kinds_sends_nothing(sink):
    asked = []
    notifier = WakeNotifier(reactor, lambda user: asked.append(user) or defer.succeed([]),
                            kinds=frozenset())
    notifier("alice")
    assert asked == [] and sink.received == []


@pytest.mark.parametrize("url", ["https://ntfy.example.org/tópico", "https://a b/x"])
def test_enrollment_refuses_a_non_ascii_or_spaced_notify_url(url):
    from mfaserver.web.devices import check_notify_url
    from mfaserver.web.validation import HttpError
    with pytest.raises(HttpError):
        check_notify_url(url)
