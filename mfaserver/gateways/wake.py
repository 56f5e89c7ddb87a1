"""Wake-up notifications to push devices: ntfy topics, webhook relays, Web Push.

A wake-up says only "a sign-in needs you" (docs/device-api.rst): no user,
number or transaction id, so the notification service learns nothing and a
forged wake-up costs one poll. Delivery is best effort: one attempt with a
short timeout, never retried (a retry could wake a device twice), and a
failure never fails the sign-in, since devices also long-poll.

Web Push (kind ``webpush``) goes through a `WebPushSender`
(gateways/webpush.py): the same words, encrypted for the browser.

Sends go through a bounded queue with at most ``max_in_flight`` requests at
once, so a burst of logins cannot open thousands of connections.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from mfaserver.auth.model import Device
from mfaserver.gateways.http import BytesBody, make_agent, read_body
from mfaserver.gateways.webpush import SubscriptionGone

log = Logger(namespace="mfaserver.wake")

WAKE_TEXT = b"A sign-in needs you"
NTFY_TEXT = WAKE_TEXT
HTTP_KINDS = frozenset({"ntfy", "webhook"})  # a plain POST through our own Agent
WEBHOOK_BODY = b'{"type": "wake"}'


class WakeNotifier:
    """Called with a user name when a transaction opens; wakes that user's devices.

    ``list_devices(user)`` fires with the user's `Device`s (the store, on its
    thread); only targets whose type is in ``kinds`` are used; ``webpush``
    (a `WebPushSender`, required for the kind "webpush") sends those.
    ``reactor`` provides time and TCP; ``agent`` (an `IAgent`, for tests: treq's
    ``RequestTraversalAgent``, with ``reactor`` a `Clock`) replaces the
    default Agent on a pool of persistent connections. Calling it returns
    None at once and never raises; `stop` cancels what is in flight.
    Verified against `mfaserver.testing.MemoryWakeNotifier` by
    tests/test_gateway_contracts.py.
    """

    def __init__(self, reactor, list_devices: Callable[[str], Deferred], *,
                 kinds: frozenset[str], timeout: float = 5.0, max_in_flight: int = 32,
                 max_queued: int = 100_000, agent=None, webpush=None):
        self._reactor = reactor
        self._list_devices = list_devices
        if "webpush" in kinds and webpush is None:
            raise ValueError("the wake-up kind webpush needs a Web Push sender")
        self._webpush = webpush         # the Web Push sender, for kind "webpush"
        self.kinds = kinds
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._pool = None
        if agent is None and kinds & HTTP_KINDS:
            # Twisted's Agent directly, not treq: treq's URL handling (hyperlink,
            # IDNA) cost half the reactor's time per login in the 10,000-push bench.
            pool = self._pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = max_in_flight
            agent = make_agent(reactor, trust=platformTrust(), connect_timeout=timeout, pool=pool)
        self._agent = agent
        self._queue: deque[Device] = deque()
        self._in_flight: set[Deferred] = set()
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def __call__(self, user: str) -> None:
        """Queue one wake-up per device of ``user``; returns at once, never raises."""
        if not self.kinds:
            return
        d = self._list_devices(user)
        d.addCallback(self._enqueue)
        d.addErrback(lambda f: log.failure("could not list the devices of {user}", f,
                                           user=user))

    def _enqueue(self, devices: list[Device]) -> None:
        for device in devices:
            if device.notify_type in self.kinds and device.notify_url:
                if len(self._queue) >= self.max_queued:
                    self.dropped += 1
                    continue
                self._queue.append(device)
        self._pump()

    def _pump(self) -> None:
        while self._queue and len(self._in_flight) < self.max_in_flight:
            device = self._queue.popleft()
            d = Deferred.fromCoroutine(self._send(device))
            d.addTimeout(self.timeout, self._reactor)
            self._in_flight.add(d)
            d.addBoth(self._done, d, device)

    async def _send(self, device: Device) -> None:
        kind, url = device.notify_type, device.notify_url
        if kind == "webpush":
            keys = json.loads(device.notify_keys or "null")
            if not isinstance(keys, dict):
                raise ValueError("the device has no Web Push keys")
            await self._webpush.send(url, keys.get("p256dh", ""), keys.get("auth", ""),
                                     WAKE_TEXT)
            return
        if kind == "ntfy":
            body, content_type = NTFY_TEXT, b"text/plain; charset=utf-8"
        else:
            body, content_type = WEBHOOK_BODY, b"application/json"
        # Enrollment admits ASCII URLs only (check_notify_url); no redirects followed.
        response = await self._agent.request(
            b"POST", url.encode("ascii"), Headers({b"Content-Type": [content_type]}),
            BytesBody(body))
        await read_body(response)  # read to the end, so the connection goes back to the pool
        if not 200 <= response.code < 300:
            raise RuntimeError(f"status {response.code}")

    def _done(self, result, d: Deferred, device: Device) -> None:
        self._in_flight.discard(d)
        if isinstance(result, Failure):
            self.failed += 1
            # The URL holds the device's private topic: not logged.
            if result.check(SubscriptionGone):
                log.warn("device {device} of {user} has no Web Push subscription any more:"
                         " it gets no wake-ups, and learns of sign-ins only when it polls,"
                         " until it enrolls again",
                         device=device.id, user=device.user)
            else:
                log.warn("a wake-up notification failed: {error}",
                         error=result.getErrorMessage()[:200])
        else:
            self.sent += 1
        self._pump()

    def stop(self) -> None:
        """Drop what is queued and cancel what is in flight (shutdown)."""
        self._queue.clear()
        for d in list(self._in_flight):
            d.cancel()

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections, the Web Push sender's too (none to close
        with a caller's agent)."""
        closing = [self._pool.closeCachedConnections()] if self._pool is not None else []
        if self._webpush is not None:
            closing.append(self._webpush.close())
        if not closing:
            return succeed(None)
        return gatherResults(closing).addCallback(lambda _: None)
