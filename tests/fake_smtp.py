"""A small recording SMTP server on 127.0.0.1 for the smtp gateway tests.

Twisted's own ESMTP server, with optional STARTTLS (a certificate and key)
and optional AUTH (one user and password). Every accepted message is kept
as a `Received` value: envelope, raw bytes, and whether it came over TLS and
after a login.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy

from twisted.cred import checkers, portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.ssl import PrivateCertificate
from twisted.mail import imap4, smtp
from zope.interface import implementer


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
    """Listen on 127.0.0.1 (port 0); `received` collects what arrives."""

    def __init__(self, reactor, cert_file=None, key_file=None,
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
        factory = protocol.Factory.forProtocol(lambda: FakeSmtpProtocol(self))
        factory.noisy = False
        self._port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._port.getHost().port

    def close(self):
        """Stop listening and drop open connections; fires when the port is closed."""
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
        return defer.maybeDeferred(self._port.stopListening)
