"""The upstream RADIUS directory: an NPS or FreeRADIUS server checks the password.

mfaserver sends a PAP Access-Request (User-Name, hidden User-Password,
NAS-Identifier, Message-Authenticator first) to the first live server,
retransmits the same datagram ``retries`` times, ``timeout`` seconds apart,
then fails over to the next server. A server that timed out is tried after
the others for ``retry_dead_after`` seconds.

Replies are trusted only when they come from the server's address and port,
match an outstanding Identifier and pass `codec.decode_response`, which
checks the Response Authenticator and requires a valid Message-Authenticator
(BlastRADIUS). Anything else is dropped silently, with a rate-limited log.
The upstream server must therefore sign its replies, or every login times
out. FreeRADIUS 3.2.1 (tested) does not by default: it needs
``update reply { &Message-Authenticator := 0x00 }`` in post-auth, in
Post-Auth-Type REJECT and in Post-Auth-Type Challenge (see
``tests/freeradius_server.py``); the BlastRADIUS releases (3.2.5 and later)
are meant to sign every reply themselves.

Each server has 256 Identifiers. When all of a server's Identifiers are in
use, the request skips to the next server, and fails with
`DirectoryUnavailable` when no server has one free: fail closed rather than
queue, because 256 logins in flight means the upstream is not keeping up.
An upstream Access-Challenge (the upstream wants its own second factor) is
refused: mfaserver is the second factor, and has no way to relay it.

MS-CHAPv2 (`authenticate_mschap`): MS-CHAP-Challenge and MS-CHAP2-Response
are forwarded as received (the upstream, NPS or FreeRADIUS ``mschap``, knows
the NT hash). From its Access-Accept, MS-CHAP2-Success is kept as is and the
MS-MPPE-Send-Key / MS-MPPE-Recv-Key are decrypted with the upstream secret
and the Request Authenticator we sent (RFC 2548 §2.4.2), to be re-encrypted
for the NAS at the RADIUS edge. An Access-Reject's MS-CHAP-Error code tells
a wrong password (691) from an expired password (648), a disabled account
(647) or a refused logon time or dial-in permission (646, 649).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials
from mfaserver.auth.model import (MPPE_RECV_KEY, MPPE_SEND_KEY, MSCHAP2_SUCCESS, Principal,
                                  Reason, Secret)
from mfaserver.directory.settings import UpstreamRadiusConfig
from mfaserver.radius import attributes, codec
from mfaserver.radius.protocol import RateLimitedLog

log = Logger(namespace="mfaserver.directory.radius")

IDENTIFIERS = 256
MAX_PASSWORD = 128  # octets: the most RFC 2865 §5.2 can hide

# MS-CHAP-Error "E=" codes (RFC 2759 §6) -> why the upstream refused.
MSCHAP_ERRORS = {
    646: (Reason.LOGON_NOT_PERMITTED, "restricted logon hours"),
    647: (Reason.ACCOUNT_DISABLED, "account disabled"),
    648: (Reason.PASSWORD_EXPIRED, "password expired"),
    649: (Reason.LOGON_NOT_PERMITTED, "no dial-in permission"),
    691: (Reason.BAD_PASSWORD, "authentication failure"),
}
_MSCHAP_ERROR = re.compile(rb"E=(\d+)")
_MPPE = {codec.MS_MPPE_SEND_KEY: MPPE_SEND_KEY, codec.MS_MPPE_RECV_KEY: MPPE_RECV_KEY}


class _Server:
    """One upstream server: its address, health and outstanding requests."""

    def __init__(self, host: str, port: int):
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # for logs
        self.host = host
        self.port = port
        self.family = socket.AF_INET
        self.dead_until: float | None = None
        self.outstanding: dict[int, _Request] = {}
        self._next_identifier = 0

    def resolve(self) -> None:
        """Turn the configured host into the IP text that replies come from."""
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            # A host name: looked up once, when the daemon starts.
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            address = ipaddress.ip_address(info[0][4][0])
        self.host = str(address)
        self.family = socket.AF_INET6 if address.version == 6 else socket.AF_INET

    def allocate(self, request: _Request) -> int | None:
        """Reserve a free Identifier for ``request``; None when all 256 are in use."""
        if len(self.outstanding) >= IDENTIFIERS:
            return None
        # Sequential, skipping busy ones: an Identifier is reused as late as
        # possible, so a late reply to an old request rarely meets a new one.
        while self._next_identifier in self.outstanding:
            self._next_identifier = (self._next_identifier + 1) % IDENTIFIERS
        identifier = self._next_identifier
        self._next_identifier = (identifier + 1) % IDENTIFIERS
        self.outstanding[identifier] = request
        return identifier


class _Request:
    """One login in flight. Holds the password for as long as failover may need it."""

    __slots__ = ("username", "password", "mschap", "remaining", "deferred", "server", "identifier",
                 "authenticator", "datagram", "sends", "timer")

    def __init__(self, username: str, password: bytes, servers: list[_Server],
                 mschap: tuple[bytes, bytes] | None = None):
        self.username = username
        self.password = password
        self.mschap = mschap  # (MS-CHAP-Challenge, MS-CHAP2-Response), or None: PAP
        self.remaining = servers
        self.deferred: Deferred | None = None
        self.server: _Server | None = None
        self.identifier = 0
        self.authenticator = b""
        self.datagram = b""
        self.sends = 0
        self.timer = None


class _Socket(DatagramProtocol):
    """The UDP socket of one address family; hands every datagram to the directory."""

    def __init__(self, received):
        self._received = received

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        self._received(data, addr)


class RadiusDirectory:
    """`Directory` that forwards the password check to upstream RADIUS servers.

    ``reactor`` provides IReactorUDP and IReactorTime. `authenticate` fires
    with a `Principal` whose ``attributes`` are the ``pass_through``
    attributes of the upstream Access-Accept, as (name, raw octets) in reply
    order.
    """

    def __init__(self, config: UpstreamRadiusConfig, reactor):
        self.config = config
        self._reactor = reactor
        self._servers = tuple(_Server(host, port) for host, port in config.servers)
        self._by_address: dict[tuple[str, int], _Server] = {}
        self._ports: dict[int, object] = {}  # address family -> listening port
        self._pass_through = {attributes.NUMBERS[name]: name for name in config.pass_through}
        self._nas_identifier = config.nas_identifier.encode("utf-8")
        if not 1 <= len(self._nas_identifier) <= codec.MAX_VALUE:
            raise ValueError("nas_identifier must be 1..253 octets")
        self._throttled_log = RateLimitedLog(reactor)
        self.dropped = 0  # replies dropped, for tests and metrics

    def start(self) -> None:
        """Open one UDP socket per address family the servers use."""
        for server in self._servers:
            server.resolve()
        self._by_address = {(s.host, s.port): s for s in self._servers}
        if len(self._by_address) != len(self._servers):
            # Replies are matched by address: one server listed twice would
            # have two sets of Identifiers and lose half of its replies.
            raise ValueError("[directory.radius] servers lists the same server twice")
        for family in {s.family for s in self._servers}:
            hosts = [ipaddress.ip_address(s.host) for s in self._servers if s.family == family]
            # Bind to loopback when every server is local: nothing else can reach us.
            if all(h.is_loopback for h in hosts):
                interface = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            else:
                interface = "::" if family == socket.AF_INET6 else "0.0.0.0"
            self._ports[family] = self._reactor.listenUDP(
                0, _Socket(self._received), interface=interface, maxPacketSize=8192)

    def stop(self) -> Deferred | None:
        """Fail pending logins with `DirectoryUnavailable` and close the sockets."""
        for server in self._servers:
            for request in list(server.outstanding.values()):
                self._release(request)
                request.remaining = []
                request.deferred.errback(DirectoryUnavailable("shutting down"))
        ports = list(self._ports.values())
        self._ports.clear()
        if not ports:
            return None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        """Fire with the `Principal`, or fail with `InvalidCredentials` or
        `DirectoryUnavailable`. Cancelling stops the retransmissions."""
        if not password:
            return defer.fail(InvalidCredentials(Reason.EMPTY_PASSWORD, "empty password"))
        secret_password = password.encode("utf-8")
        if len(secret_password) > MAX_PASSWORD:
            return defer.fail(InvalidCredentials(Reason.BAD_PASSWORD,
                                                 "password longer than 128 octets"))
        if not 1 <= len(username.encode("utf-8")) <= codec.MAX_VALUE:
            return defer.fail(InvalidCredentials(Reason.BAD_PASSWORD,
                                                 "user name cannot be sent upstream"))
        if not self._ports:
            return defer.fail(DirectoryUnavailable("upstream RADIUS client not started"))
        now = self._reactor.seconds()
        # Live servers first, then dead ones; each group in configured order.
        servers = sorted(self._servers,
                         key=lambda s: s.dead_until is not None and s.dead_until > now)
        request = _Request(username, secret_password, servers)
        request.deferred = Deferred(canceller=lambda d: self._abandon(request))
        self._next_server(request)
        return request.deferred

    def authenticate_mschap(self, username: str, challenge: bytes,
                            response: bytes) -> Deferred[Principal]:
        """Have the upstream check MS-CHAPv2 credentials (see the module's text).

        Fire with the `Principal`, its attributes the pass-through ones then
        MS-CHAP2-Success and the MPPE keys (in the clear, as `Secret`); fail
        like `authenticate`. Cancelling stops the retransmissions.
        """
        if not 1 <= len(username.encode("utf-8")) <= codec.MAX_VALUE:
            return defer.fail(InvalidCredentials(Reason.BAD_PASSWORD,
                                                 "user name cannot be sent upstream"))
        if not self._ports:
            return defer.fail(DirectoryUnavailable("upstream RADIUS client not started"))
        request = _Request(username, b"", self._ordered_servers(), (challenge, response))
        request.deferred = Deferred(canceller=lambda d: self._abandon(request))
        self._next_server(request)
        return request.deferred

    def _ordered_servers(self) -> list[_Server]:
        now = self._reactor.seconds()
        return sorted(self._servers,
                      key=lambda s: s.dead_until is not None and s.dead_until > now)

    def _credentials(self, request: _Request, authenticator: bytes) -> list[tuple[int, bytes]]:
        if request.mschap is None:
            return [(codec.USER_PASSWORD,
                     codec.encrypt_password(request.password, self.config.secret,
                                            authenticator))]
        challenge, response = request.mschap
        return [codec.vsa(codec.VENDOR_MICROSOFT, codec.MS_CHAP_CHALLENGE, challenge),
                codec.vsa(codec.VENDOR_MICROSOFT, codec.MS_CHAP2_RESPONSE, response)]

    def _next_server(self, request: _Request) -> None:
        """Send ``request`` to the next server that has an Identifier free."""
        secret = self.config.secret
        while request.remaining:
            server = request.remaining.pop(0)
            identifier = server.allocate(request)
            if identifier is None:
                self._note(("busy", server.name),
                           "all 256 identifiers for {server} are in use; skipping it",
                           server=server.name)
                continue
            # A fresh authenticator per server; retransmissions repeat the datagram.
            authenticator = os.urandom(16)
            attrs = [
                (codec.USER_NAME, request.username.encode("utf-8")),
                *self._credentials(request, authenticator),
                (codec.NAS_IDENTIFIER, self._nas_identifier),
            ]
            request.server = server
            request.identifier = identifier
            request.authenticator = authenticator
            request.datagram = codec.encode_request(codec.ACCESS_REQUEST, identifier,
                                                    authenticator, secret, attrs)
            request.sends = 0
            self._transmit(request)
            return
        request.deferred.errback(DirectoryUnavailable("no upstream RADIUS server answered"))

    def _transmit(self, request: _Request) -> None:
        server = request.server
        request.sends += 1
        try:
            self._ports[server.family].write(request.datagram, (server.host, server.port))
        except OSError as e:
            # Treated like a lost datagram: the timer fails over.
            self._note(("send", server.name), "cannot send to {server}: {error}",
                       server=server.name, error=str(e))
        request.timer = self._reactor.callLater(self.config.timeout, self._timed_out, request)

    def _timed_out(self, request: _Request) -> None:
        request.timer = None
        if request.sends <= self.config.retries:
            self._transmit(request)
            return
        server = request.server
        self._release(request)
        now = self._reactor.seconds()
        if server.dead_until is None or server.dead_until <= now:
            log.warn("upstream RADIUS server {server} did not answer; trying it last"
                     " for {seconds} s", server=server.name,
                     seconds=self.config.retry_dead_after)
        server.dead_until = now + self.config.retry_dead_after
        self._next_server(request)

    def _release(self, request: _Request) -> None:
        """Stop the timer and free the Identifier."""
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        server = request.server
        if server is not None and server.outstanding.get(request.identifier) is request:
            del server.outstanding[request.identifier]
        request.server = None

    def _abandon(self, request: _Request) -> None:
        """Canceller of the login Deferred: no more datagrams for it."""
        self._release(request)
        request.remaining = []

    def _received(self, data: bytes, addr: tuple) -> None:
        server = self._by_address.get((addr[0], addr[1]))
        if server is None:
            self._drop(("source", addr[0]), "dropped datagram from {source}, not an upstream"
                       " server", source=f"{addr[0]}:{addr[1]}")
            return
        request = server.outstanding.get(data[1]) if len(data) >= 20 else None
        if request is None:
            self._drop(("stray", server.name), "dropped reply from {server}: no request"
                       " outstanding with that identifier", server=server.name)
            return
        try:
            packet = codec.decode_response(data, self.config.secret, request.authenticator)
        except codec.MalformedPacket as e:
            self._drop(("malformed", server.name, e.reason),
                       "dropped reply from {server}: {reason}", server=server.name,
                       reason=e.reason)
            return
        self._release(request)
        request.remaining = []
        if server.dead_until is not None:
            server.dead_until = None
            log.info("upstream RADIUS server {server} answers again", server=server.name)
        self._answer(request, packet, server)

    def _answer(self, request: _Request, packet: codec.Packet, server: _Server) -> None:
        d = request.deferred
        if packet.code == codec.ACCESS_ACCEPT:
            passed = tuple((self._pass_through[t], value) for t, value in packet.attributes
                           if t in self._pass_through)
            if request.mschap is not None:
                try:
                    passed += self._mschap_items(packet, request, server)
                except ValueError as e:
                    d.errback(DirectoryUnavailable(f"bad MS-CHAPv2 reply from upstream: {e}"))
                    return
            d.callback(Principal(username=request.username, attributes=passed))
        elif packet.code == codec.ACCESS_REJECT:
            d.errback(self._rejected(packet, request))
        else:
            self._note(("challenge", server.name),
                       "upstream RADIUS server {server} answered with an Access-Challenge:"
                       " turn off its own second factor for mfaserver", server=server.name)
            d.errback(InvalidCredentials(Reason.BAD_PASSWORD,
                                         "upstream challenge not supported"))

    def _mschap_items(self, packet: codec.Packet, request: _Request,
                      server: _Server) -> tuple:
        """MS-CHAP2-Success and the MPPE keys (decrypted) of an upstream Accept."""
        items = []
        for vendor_type, value in packet.vendor_attributes(codec.VENDOR_MICROSOFT):
            if vendor_type == codec.MS_CHAP2_SUCCESS:
                items.append((MSCHAP2_SUCCESS, value))
            elif vendor_type in _MPPE:
                key = codec.decrypt_salted(value, self.config.secret, request.authenticator)
                items.append((_MPPE[vendor_type], Secret(key)))
        if not any(name == MSCHAP2_SUCCESS for name, _ in items):
            # Without it the client drops the connection: the upstream did not
            # really check MS-CHAPv2 (a users file with Auth-Type Accept?).
            raise ValueError(f"{server.name} accepted without MS-CHAP2-Success")
        return tuple(items)

    @staticmethod
    def _rejected(packet: codec.Packet, request: _Request) -> InvalidCredentials:
        if request.mschap is not None:
            for vendor_type, value in packet.vendor_attributes(codec.VENDOR_MICROSOFT):
                match = _MSCHAP_ERROR.search(value) if vendor_type == codec.MS_CHAP_ERROR else None
                if match is not None:
                    reason, text = MSCHAP_ERRORS.get(int(match.group(1)),
                                                     (Reason.BAD_PASSWORD, "unknown error"))
                    return InvalidCredentials(reason, f"upstream MS-CHAP error "
                                                      f"{match.group(1).decode()}: {text}")
        return InvalidCredentials(Reason.BAD_PASSWORD, "upstream reject")

    def _drop(self, key: tuple, message: str, **fields) -> None:
        self.dropped += 1
        self._note(key, message, **fields)

    def _note(self, key: tuple, message: str, **fields) -> None:
        def emit(suppressed: int) -> None:
            log.warn(message + (" ({suppressed} more since last logged)" if suppressed else ""),
                     suppressed=suppressed, **fields)

        self._throttled_log(key, emit)
