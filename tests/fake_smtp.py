"""A small recording SMTP server for the smtp gateway tests, in memory or on 127.0.0.1.

Twisted's own ESMTP server, with optional STARTTLS (a certificate and key)
and optional AUTH (one user and password). Every accepted message is kept
as a `Received` value: envelope, raw bytes, and whether it came over TLS and
after a login.

In memory, an `SmtpGateway` runs on a `MemoryReactorClock` and
`FakeSmtpServer.accept` connects the connection it asked for to the server
(`connect_in_memory`): real SMTP and real TLS, over no socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy

from twisted.cred import checkers, portal
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol, ISSLTransport
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock
from twisted.mail import imap4, smtp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import log
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides, implementer


@dataclass
class Received:
    """One message as the server received it, for one recipient."""

    sender: str
    recipient: str
    data: bytes
    tls: bool
    user: str | None

    @property
    def message(self):
        return message_from_bytes(self.data, policy=policy.default)


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, delivery, recipient: str):
        self._delivery = delivery
        self._recipient = recipient
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self):
        self._delivery.server.received.append(Received(
            self._delivery.sender, self._recipient, b"\n".join(self._lines) + b"\n",
            self._delivery.tls, self._delivery.user))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Accepts every sender; refuses recipients listed in ``server.refuse``."""

    def __init__(self, server: FakeSmtpServer, user: str | None = None):
        self.server = server
        self.user = user
        self.sender = ""
        self.tls = False

    def receivedHeader(self, helo, origin, recipients):
        return None  # FakeSmtpProtocol answers this itself

    def validateFrom(self, helo, origin):
        self.sender = str(origin)
        return origin

    def validateTo(self, user):
        address = str(user.dest)
        if address in self.server.refuse:
            raise smtp.SMTPBadRcpt(user)
        return lambda: _Message(self, address)


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, server: FakeSmtpServer):
        self._server = server

    def requestAvatar(self, avatar_id, mind, *interfaces):
        user = avatar_id.decode() if isinstance(avatar_id, bytes) else None
        delivery = _Delivery(self._server, user)
        return smtp.IMessageDelivery, delivery, lambda: None


class FakeSmtpProtocol(smtp.ESMTP):
    def __init__(self, server: FakeSmtpServer):
        challengers = {}
        if server.portal is not None:
            challengers = {b"LOGIN": smtp.LOGINCredentials, b"PLAIN": imap4.PLAINCredentials}
        super().__init__(challengers, server.tls)
        self.server = server
        self.portal = server.portal
        self.host = b"fake-smtp.test"
        self.timeout = None  # no idle timer on the global reactor
        if server.portal is None:
            self.delivery = _Delivery(server)

    def connectionMade(self):
        super().connectionMade()
        self.server.connections.append(self)

    def receivedHeader(self, helo, origin, recipients):
        # Stamp the delivery with the transport's state at DATA time.
        if self.delivery is not None:
            self.delivery.tls = ISSLTransport.providedBy(self.transport)
        return None


class FakeSmtpServer:
    """The server; `received` collects what arrives, ``refuse`` lists recipients to refuse.

    ``FakeSmtpServer(reactor)`` listens on 127.0.0.1 on a free port
    (``port``); ``FakeSmtpServer()`` listens nowhere and takes connections
    in memory (`accept`).
    """

    def __init__(self, reactor=None, cert_file=None, key_file=None,
                 user: str | None = None, password: str | None = None):
        self.received: list[Received] = []
        self.refuse: set[str] = set()
        self.connections: list[FakeSmtpProtocol] = []
        self.tls = None
        if cert_file is not None:
            pem = cert_file.read_bytes() + key_file.read_bytes()
            self.tls = PrivateCertificate.loadPEM(pem).options()
        self.portal = None
        if user is not None:
            checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
            checker.addUser(user.encode(), password.encode())
            self.portal = portal.Portal(_Realm(self), [checker])
        self._port = self.port = None
        if reactor is not None:
            factory = protocol.Factory.forProtocol(lambda: FakeSmtpProtocol(self))
            factory.noisy = False
            self._port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.port = self._port.getHost().port

    def accept(self, reactor: MemoryReactorClock) -> iosim.IOPump:
        """Connect the oldest connection ``reactor`` was asked for to this server, in memory."""
        return connect_in_memory(reactor, FakeSmtpProtocol(self))

    def close(self):
        """Stop listening and drop open connections; fires when the port is closed."""
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
        if self._port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self._port.stopListening)


# --- Connections in memory ---------------------------------------------------------------------

def connect_in_memory(reactor: MemoryReactorClock, server: IProtocol) -> iosim.IOPump:
    """Connect the oldest pending ``connectTCP`` of ``reactor`` to ``server``, in memory.

    The pump is flushed before it is returned: everything the two sides had
    to say is said. STARTTLS works (see `_MemoryTransport`), and the client's
    factory hears of the end of the connection as from a real connector.
    """
    _, port, factory, _, _ = reactor.tcpClients.pop(0)
    connector = reactor.connectors.pop(0)
    server_address = IPv4Address("TCP", "127.0.0.1", port)
    client_address = IPv4Address("TCP", "127.0.0.1", 40000)
    client = factory.buildProtocol(server_address)
    client_transport = _MemoryTransport(
        client, False, client_address, server_address, reactor,
        lost=lambda reason: factory.clientConnectionLost(connector, reason))
    server_transport = _MemoryTransport(server, True, server_address, client_address, reactor)
    return iosim.connect(server, server_transport, client, client_transport, clock=reactor)


class Silent(protocol.Protocol):
    """A server that accepts the connection and says nothing; ``lost`` once the client hung up."""

    lost = False

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost = True


class _MemoryTransport(iosim.FakeTransport):
    """iosim's in-memory transport, with a real `startTLS`.

    iosim's own startTLS only pretends; this one puts a TLSMemoryBIOProtocol
    between the transport and the protocol, as Twisted's TCP transports do,
    so certificates are really checked. ``lost(reason)`` is called once the
    protocol has lost the connection.
    """

    def __init__(self, protocol, is_server: bool, host, peer, clock, lost=None):
        super().__init__(protocol, is_server, host, peer)
        self._clock = clock
        self._lost = lost
        self._tls = None
        self._logger = protocol

    def bufferReceived(self, data) -> None:
        # As a reactor does: what the protocol logs carries its name (log_system).
        log.callWithLogger(self._logger, super().bufferReceived, data)

    def startTLS(self, options, beNormal=True):
        factory = TLSMemoryBIOFactory(options, not self.isServer, None, clock=self._clock)
        self._tls = self.protocol = factory.protocol(factory, self.protocol, False)
        directlyProvides(self, ISSLTransport)
        self._tls.makeConnection(_BelowTls(self))

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            super().loseConnection()

    def abortConnection(self) -> None:
        if self._tls is not None:
            self._tls.abortConnection()
        else:
            super().abortConnection()

    def getPeerCertificate(self):
        return self._tls.getPeerCertificate()

    def reportDisconnect(self) -> None:
        super().reportDisconnect()
        if self._lost is not None:
            self._lost(Failure(self.disconnectReason))


class _BelowTls:
    """The transport as the TLS layer sees it: bytes go out as they are."""

    def __init__(self, transport: _MemoryTransport):
        self._transport = transport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._transport, data)

    def writeSequence(self, data) -> None:
        iosim.FakeTransport.write(self._transport, b"".join(data))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._transport)

    def abortConnection(self) -> None:
        iosim.FakeTransport.abortConnection(self._transport)
