"""The ``smtp`` gateway: e-mail to SMS gateways, and admin alerts by e-mail.

Configured under ``[gateways.NAME]`` with ``type = "smtp"``::

    host = "mail.example.com"
    port = 25                        # 587 for submission
    starttls = "required"            # "required", "optional" or "none"
    username = ""                    # set both to log in (AUTH) after STARTTLS
    password = ""
    sender = "mfaserver@example.com"
    ca_file = "/etc/mfaserver/mail-ca.pem"  # optional; else the system CAs
    timeout = 10.0                   # seconds, for the whole session
    sms_address = "{number}@sms.example.net"  # for e-mail to SMS; "" = not used

``starttls``: ``required`` refuses a server that does not offer STARTTLS;
``optional`` uses it when offered; ``none`` never does. Either way, once TLS
is used the server certificate must be valid for ``host`` (from ``ca_file``
or the system CAs), TLS 1.2 or newer. Messages carry one-time codes, so
``none`` is accepted only for a relay on this machine (``localhost``,
127.0.0.1, ::1), and a username only with ``required`` or to such a relay:
a password is never sent where STARTTLS could be stripped.

``sms_address`` is the recipient for an SMS: ``{number}`` is the E.164 number
without the ``+`` (``4917012345678``), ``{e164}`` with it. The text is the
body, with no subject.

The mail is sent in one SMTP session, never retried (the relay may have
accepted it already). A refusal, a TLS or login failure, or no end of the
session within ``timeout`` fails with `GatewayError`. Nothing here is logged,
and error messages carry only SMTP status codes: a server's answer may quote
the recipient (a phone number), and Twisted's error texts include the
session transcript, AUTH line included.
"""

from __future__ import annotations

import email.policy
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from io import BytesIO
from pathlib import Path

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.mail.smtp import (
    AUTHDeclinedError, AUTHRequiredError, AuthenticationError, ESMTPSender, ESMTPSenderFactory,
    SMTPClientError, SMTPConnectError, TLSError, TLSRequiredError,
)

from mfaserver.gateways.base import GatewayError, check_e164
from mfaserver.addresses import is_loopback
from mfaserver.auth.interfaces import AlertSink
from mfaserver.gateways.http import (
    client_tls, substitute, tls_problem, trust_root, unknown_placeholders,
)

STARTTLS = ("required", "optional", "none")
# 7bit: non-ASCII text is encoded, so the relay need not offer 8BITMIME.
# "\n" line ends: Twisted's client turns them into CRLF (and dot-stuffs).
_POLICY = email.policy.default.clone(cte_type="7bit")
ADDRESS_PLACEHOLDERS = ("number", "e164")


@dataclass(frozen=True)
class SmtpSettings:
    """``[gateways.NAME]`` of type ``smtp``; see the module docstring."""

    host: str
    sender: str
    port: int = 25
    starttls: str = "required"
    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: Path | None = None
    timeout: float = 10.0
    sms_address: str = ""

    def __post_init__(self):
        if self.starttls not in STARTTLS:
            raise ValueError(f"starttls must be one of {', '.join(STARTTLS)}")
        local = is_loopback(self.host)
        if self.starttls == "none" and not local:
            raise ValueError('starttls = "none" is only allowed to a relay on this '
                             'machine (localhost, 127.0.0.1, ::1)')
        if self.username and self.starttls != "required" and not local:
            raise ValueError('a username (SMTP AUTH) needs starttls = "required"')
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together")
        if not 0 < self.port < 65536:
            raise ValueError("port must be 1 to 65535")
        if not self.timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")
        if "@" not in parseaddr(self.sender)[1]:
            raise ValueError("sender must be an e-mail address")
        if self.sms_address:
            unknown = unknown_placeholders(self.sms_address, ADDRESS_PLACEHOLDERS)
            if unknown:
                raise ValueError(f"sms_address: unknown placeholder {unknown[0]} "
                                 "(known: {number}, {e164})")
            if "@" not in self.sms_address:
                raise ValueError("sms_address must be an e-mail address")


class _Sender(ESMTPSender):
    # No transcript: Twisted keeps the last lines, AUTH included, for its
    # error texts.
    debug = False


class _SenderFactory(ESMTPSenderFactory):
    protocol = _Sender
    noisy = False  # no "Starting factory" line per mail


def _describe(failure: BaseException) -> str:
    """A short, secret-free description of why the session failed."""
    if isinstance(failure, TLSRequiredError):
        return "the server does not offer STARTTLS"
    if isinstance(failure, AUTHRequiredError):
        return "the server offers no login method we support"
    if isinstance(failure, (AUTHDeclinedError, AuthenticationError)):
        return f"login refused ({failure.code})"
    if isinstance(failure, TLSError):
        return "STARTTLS refused"
    if isinstance(failure, SMTPConnectError) and failure.code < 0:
        # Twisted's wrapper for a connection that failed or dropped.
        cause = failure.__cause__
        if isinstance(cause, (SSL.Error, VerificationError)):
            return tls_problem(cause)
        if isinstance(cause, error.ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, error.DNSLookupError):
            return "host name not found"
        return "connection failed or closed"
    if isinstance(failure, SMTPClientError):
        return f"server answered {failure.code}"
    return f"session failed ({type(failure).__name__})"


class SmtpGateway:
    """An `SmsGateway` through an e-mail to SMS service, and an admin alert sender.

    ``reactor`` provides time and TCP: a `MemoryReactorClock` in tests, whose
    pending connection `tests/fake_smtp.py` completes in memory. Fires with
    None once the relay took the message for at least one recipient.
    """

    def __init__(self, settings: SmtpSettings, reactor):
        self._settings = settings
        self._reactor = reactor
        self._tls = None
        if settings.starttls != "none":
            # Read the CA file now, so a bad one stops the daemon at start.
            self._tls = client_tls(settings.host, trust_root(settings.ca_file))

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Mail ``text`` to ``sms_address`` for ``to`` (E.164)."""
        try:
            check_e164(to, "smtp gateway")
            if not self._settings.sms_address:
                raise GatewayError("smtp gateway: no sms_address configured")
        except GatewayError:
            return defer.fail()
        address = substitute(self._settings.sms_address, {"number": to[1:], "e164": to})
        return self._send([address], None, text)

    def send_alert(self, recipients: Sequence[str], subject: str,
                   text: str) -> Deferred[None]:
        """Mail an admin alert to ``recipients``.

        Fires with None once the relay took it for at least one of them (the
        others refused it): an alert that reached someone is delivered.
        """
        if not recipients:
            return defer.fail(GatewayError("smtp gateway: no alert recipients"))
        return self._send(list(recipients), subject, text)

    def alerts_to(self, recipients: Sequence[str]) -> AlertSink:
        """An `AlertSink` that mails every alert to ``recipients``."""
        return _MailAlerts(self, tuple(recipients))

    def _message(self, recipients: list[str], subject: str | None, text: str) -> bytes:
        sender = self._settings.sender
        msg = EmailMessage(policy=_POLICY)
        msg["From"] = sender
        msg["To"] = ", ".join(recipients)
        if subject is not None:
            # A subject may quote a user name; a line break would add headers.
            msg["Subject"] = " ".join(subject.splitlines())
        msg["Date"] = formatdate(self._reactor.seconds(), localtime=True)
        msg["Message-ID"] = make_msgid(domain=parseaddr(sender)[1].rpartition("@")[2])
        msg.set_content(text)  # text/plain; UTF-8 in quoted-printable or base64 if not ASCII
        return msg.as_bytes()

    def _send(self, recipients: list[str], subject: str | None, text: str) -> Deferred[None]:
        settings = self._settings
        try:
            data = self._message(recipients, subject, text)
            # "Admin <admin@example.com>" in the header, the bare address in RCPT.
            envelope_to = [parseaddr(address)[1].encode("ascii") for address in recipients]
        except (ValueError, UnicodeError):
            return defer.fail(GatewayError("smtp gateway: a recipient or header is malformed"))
        if not all(b"@" in address for address in envelope_to):
            return defer.fail(GatewayError("smtp gateway: a recipient is not an e-mail address"))
        result: Deferred = Deferred(lambda d: cancel())
        factory = _SenderFactory(
            settings.username.encode("utf-8") or None,
            settings.password.encode("utf-8") or None,
            parseaddr(settings.sender)[1], envelope_to, BytesIO(data), result,
            retries=0, contextFactory=self._tls, heloFallback=True,
            requireAuthentication=bool(settings.username),
            requireTransportSecurity=settings.starttls == "required")
        connector = self._reactor.connectTCP(settings.host, settings.port, factory,
                                             timeout=settings.timeout)

        def cancel():
            # As twisted.mail.smtp.sendmail does: no retry, drop the connection.
            factory.sendFinished = True
            if factory.currentProtocol is not None:
                factory.currentProtocol.transport.abortConnection()
            else:
                connector.disconnect()

        result.addTimeout(settings.timeout, self._reactor)
        result.addCallbacks(lambda _: None, self._failed)
        return result

    def _failed(self, failure):
        if failure.check(defer.TimeoutError):
            raise GatewayError(
                f"smtp gateway: no end of session within {self._settings.timeout:g} "
                "seconds") from None
        if failure.check(defer.CancelledError):
            return failure
        # "from None": Twisted's errors carry the session transcript.
        raise GatewayError(f"smtp gateway: {_describe(failure.value)}") from None


class _MailAlerts:
    """`SmtpGateway.alerts_to`: alerts to a fixed list of recipients."""

    def __init__(self, gateway: SmtpGateway, recipients: tuple[str, ...]):
        self._gateway = gateway
        self._recipients = recipients

    def send_alert(self, subject: str, text: str) -> Deferred[None]:
        """Mail the alert; fires with None once the relay took it."""
        return self._gateway.send_alert(self._recipients, subject, text)
