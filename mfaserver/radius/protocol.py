"""The RADIUS authentication listener: parse, consult the cache, ask the core, reply.

`datagramReceived` does only wire work (see STYLE.md §2): find the client by
source address (unknown: drop before parsing), validate strictly with the
codec (malformed or bad Message-Authenticator: drop), answer Status-Server,
consult the retransmission cache, translate to an `AuthRequest`, and hand it
to the core. The Decision comes back as a Deferred; the reply is encoded with
Message-Authenticator first and written, Access-Reject after ``reject_delay``
seconds on the injected clock, so nothing waits on a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from mfaserver.auth.model import AuthRequest, Decision, Outcome
from mfaserver.radius import codec, translate
from mfaserver.radius.replay import IN_PROGRESS, ReplyCache

log = Logger(namespace="mfaserver.radius")


class RateLimitedLog:
    """Emit at most one log line per key per ``interval`` seconds, counting the rest.

    Dropped packets are logged through this so that a flood cannot flood the log.
    """

    def __init__(self, clock: IReactorTime, interval: float = 10.0, max_keys: int = 10_000):
        self._clock = clock
        self._interval = interval
        self._max_keys = max_keys
        self._last: dict[tuple, tuple[float, int]] = {}

    def __call__(self, key: tuple, emit: Callable[[int], None]) -> None:
        """Call ``emit(suppressed_count)`` unless ``key`` was logged within the interval."""
        now = self._clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        emit(last[1] if last else 0)


@dataclass(frozen=True)
class ListenerSettings:
    """What the listener needs from the config; replaced as a whole on reload."""

    find_client: Callable  # (address: str) -> ClientConfig | None
    reject_delay: float
    status_server: bool


class RadiusAuthProtocol(DatagramProtocol):
    """Answers Access-Request and Status-Server on one UDP port."""

    def __init__(self, settings: ListenerSettings, authenticate: Callable[[AuthRequest], defer.Deferred],
                 cache: ReplyCache, clock: IReactorTime):
        self.settings = settings
        self._authenticate = authenticate
        self._cache = cache
        self._clock = clock
        self._throttled_log = RateLimitedLog(clock)
        self._in_flight: set[defer.Deferred] = set()
        self._delayed: dict = {}  # cache key -> pending delayed-reject call
        self.dropped = 0  # packets dropped (unknown client, malformed), for tests and metrics

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        host, port = addr[0], addr[1]
        settings = self.settings
        client = settings.find_client(host)
        if client is None:
            self._drop(("unknown", host), "dropped packet from unknown client {host}", host=host)
            return
        try:
            packet = codec.decode_request(
                data, client.secret,
                require_message_authenticator=client.require_message_authenticator)
        except codec.MalformedPacket as e:
            self._drop(("malformed", client.name, e.reason),
                       "dropped packet from {client} ({host}): {reason}",
                       client=client.name, host=host, reason=e.reason)
            return

        if packet.code == codec.STATUS_SERVER:
            # RFC 5997: no duplicate detection needed, no authentication done.
            if settings.status_server:
                self.transport.write(
                    codec.encode_response(codec.ACCESS_ACCEPT, packet, client.secret, ()), addr)
            return

        key = (host, port, packet.identifier)
        cached = self._cache.lookup(key, packet.authenticator)
        if cached is IN_PROGRESS:
            return
        if cached is not None:
            self.transport.write(cached, addr)
            return
        self._cache.begin(key, packet.authenticator)
        request = translate.to_auth_request(packet, client.name, client.secret, addr)
        packet = translate.reply_context(packet)
        d = self._authenticate(request)
        self._in_flight.add(d)
        d.addBoth(self._finished, d)
        d.addCallback(self._reply, packet, client, addr, key)
        d.addErrback(self._failed, packet, key, client)

    def _finished(self, result, d):
        self._in_flight.discard(d)
        return result

    def _reply(self, decision: Decision, packet: codec.Packet, client, addr, key) -> None:
        reply = translate.encode_decision(decision, packet, client.secret)
        delay = self.settings.reject_delay
        if decision.outcome is Outcome.REJECT and delay > 0:
            # Delayed on the clock; the cache keeps the request "in progress"
            # meanwhile, so retransmissions are dropped, not re-decided.
            self._delayed[key] = self._clock.callLater(
                delay, self._send, reply, addr, key, packet.authenticator)
        else:
            self._send(reply, addr, key, packet.authenticator)

    def _send(self, reply: bytes, addr, key, authenticator: bytes) -> None:
        self._delayed.pop(key, None)
        self._cache.complete(key, authenticator, reply)
        if self.transport is not None:
            self.transport.write(reply, addr)

    def _failed(self, failure, packet, key, client) -> None:
        self._cache.abandon(key, packet.authenticator)
        if not failure.check(defer.CancelledError):
            log.failure("no reply sent to {client}", failure, client=client.name)

    def _drop(self, key: tuple, message: str, **fields) -> None:
        self.dropped += 1

        def emit(suppressed: int) -> None:
            log.warn(message + (" ({suppressed} more since last logged)" if suppressed else ""),
                     suppressed=suppressed, **fields)

        self._throttled_log(key, emit)

    def stopProtocol(self) -> None:
        """Abandon undecided requests and unsent rejects: no reply after shutdown."""
        for call in self._delayed.values():
            if call.active():
                call.cancel()
        self._delayed.clear()
        for d in list(self._in_flight):
            d.cancel()
