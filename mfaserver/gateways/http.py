"""The ``http`` gateway: a generic JSON or form webhook, for in-house SMS gateways.

Configured under ``[gateways.NAME]`` with ``type = "http"``::

    url = "https://sms.example.com/api/send"
    method = "POST"                  # POST, PUT or GET
    format = "json"                  # "json" or "form" (ignored for GET)
    fields = { to = "{to}", text = "{text}", api_key = "..." }
    headers = { Authorization = "Bearer ..." }
    success_status = [200, 201, 202, 204]
    timeout = 10.0                   # seconds, for the whole request
    ca_file = "/etc/mfaserver/sms-ca.pem"   # optional; else the system CAs

Each field value is a template. The placeholders are ``{to}`` (the number in
E.164 form, ``+4917012345678``), ``{number}`` (the same without the ``+``),
``{text}`` and ``{subject}`` (alerts only; empty for an SMS, as ``{to}`` and
``{number}`` are empty for an alert). Nothing else in a template is
interpreted: the substitution is one pass over exactly these names, so a
message containing ``{to}`` or ``{text.__class__}`` is sent as written. An
unknown ``{name}`` in a template is refused when the settings are made, so a
typo is found at start rather than sent.

For POST and PUT the fields are the JSON object or the form body; for GET they
go into the query string. Any status outside ``success_status`` (redirects
included: they are not followed, so the API key never goes to another host),
a connection or TLS failure, or no complete answer within ``timeout`` fails
with `GatewayError`. The gateway never retries: the provider may have sent the
SMS already (OOB-07). Nothing here is logged; error messages name the status
or the kind of failure, never the URL, the fields, the headers or the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import (
    Certificate, TLSVersion, optionsForClientTLS, platformTrust, trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mfaserver.gateways.base import GatewayError, check_e164

METHODS = ("POST", "PUT", "GET")
FORMATS = ("json", "form")
PLACEHOLDERS = ("to", "number", "text", "subject")

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]*)\}")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` for the names in ``values``; leave all other text alone.

    One regex pass: substituted values are never scanned again, and nothing
    is looked up beyond the plain names (unlike str.format, which would
    evaluate ``{text.__class__}`` in an admin's template).
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def unknown_placeholders(template: str, known: tuple[str, ...]) -> list[str]:
    """The ``{name}`` placeholders in ``template`` that are not in ``known``."""
    return [m.group(0) for m in _PLACEHOLDER.finditer(template) if m.group(1) not in known]


def trust_root(ca_file: Path | str | None):
    """The CAs to check servers against: the certificates in ``ca_file``, or the system's."""
    if ca_file is None:
        return platformTrust()
    pems = _PEM_CERT.findall(Path(ca_file).read_bytes())
    if not pems:
        raise ValueError(f"{str(ca_file)!r} contains no PEM certificate")
    return trustRootFromCertificates([Certificate.loadPEM(pem) for pem in pems])


def client_tls(hostname: str, trust):
    """TLS options for a connection to ``hostname``: name checked, TLS 1.2 or newer."""
    return optionsForClientTLS(
        hostname, trustRoot=trust,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Agent's connections: TCP on ``reactor`` within ``timeout``, TLS per `client_tls`.

    Instead of Agent's own factory, so that TLS, too, runs on ``reactor``
    (Agent's puts it on the global reactor's clock).
    """

    def __init__(self, reactor, trust, timeout: float):
        self._reactor = reactor
        self._trust = trust
        self._timeout = timeout

    def endpointForURI(self, uri):
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(client_tls(uri.host.decode("ascii"), self._trust),
                                     endpoint, clock=self._reactor)
        return endpoint


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written at once.

    treq's default producer writes through Twisted's global cooperator, which
    runs on the global reactor whatever reactor the Agent was given.
    """

    def __init__(self, data: bytes | str):
        self._data = data.encode("utf-8") if isinstance(data, str) else data
        self.length = len(self._data)

    def startProducing(self, consumer) -> Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def make_agent(reactor, *, trust, connect_timeout: float,
               pool: HTTPConnectionPool | None = None) -> Agent:
    """An Agent whose connections and TLS run on ``reactor``.

    Servers are checked against ``trust`` (`trust_root`) as `client_tls`
    says; ``pool`` as for Agent (None: a new connection per request).
    """
    return Agent.usingEndpointFactory(
        reactor, _Endpoints(reactor, trust, connect_timeout), pool=pool)


def treq_client(agent) -> HTTPClient:
    """A treq client over ``agent`` that writes request bodies at once (`BytesBody`)."""
    return HTTPClient(agent, data_to_body_producer=BytesBody)


class BodyTooLarge(Exception):
    """A response body went over the reader's limit."""


class _BodyReader(protocol.Protocol):
    """Reads a response body into ``done``: at most ``limit`` bytes, or drops it (None).

    Past the limit ``done`` fails with `BodyTooLarge`; cancelling ``done`` (a
    deadline passed) drops the connection, so a server that sends headers and
    then stalls does not keep it open.
    """

    def __init__(self, limit: int | None):
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda d: self._drop())

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called or self._limit is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._drop()
            self.done.errback(BodyTooLarge())
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        # PotentialDataLoss: no Content-Length, the body ended with the connection.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse, limit: int | None = None) -> Deferred[bytes]:
    """Read ``response``'s body to its end; fires with it (b"" when ``limit`` is None).

    With a ``limit``, fails with `BodyTooLarge` past that many bytes; with
    None the body is read and dropped, whatever its size. Cancelling drops
    the connection. Reading to the end lets a persistent connection be reused.
    """
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    return reader.done


@dataclass(frozen=True)
class HttpGatewaySettings:
    """``[gateways.NAME]`` of type ``http``; see the module docstring."""

    url: str
    method: str = "POST"
    format: str = "json"
    # Field values and headers usually hold API keys: kept out of repr().
    fields: Mapping[str, str] = field(
        default_factory=lambda: {"to": "{to}", "text": "{text}"}, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float = 10.0
    success_status: tuple[int, ...] = (200, 201, 202, 204)
    ca_file: Path | None = None

    def __post_init__(self):
        # Copies, read-only: the settings stay as they were checked. (TOML
        # gives lists and dicts.)
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))
        object.__setattr__(self, "success_status", tuple(self.success_status))
        if not self.url.lower().startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        if self.method.upper() not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        if not self.timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")
        if not self.success_status:
            raise ValueError("success_status must name at least one status")
        for name, value in {**self.fields, **self.headers}.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ValueError(f"{name}: fields and headers must be text")
        for name, template in self.fields.items():
            unknown = unknown_placeholders(template, PLACEHOLDERS)
            if unknown:
                raise ValueError(
                    f"fields.{name}: unknown placeholder {unknown[0]} "
                    f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")


def _reasons(failure: BaseException) -> list[BaseException]:
    """The exceptions inside Agent's wrappers (ResponseFailed and co.), or the one given."""
    reasons = getattr(failure, "reasons", None)  # ResponseFailed, RequestTransmissionFailed
    return [r.value for r in reasons] if reasons else [failure]


def was_cancelled(failure: BaseException) -> bool:
    """Whether the request failed because it was cancelled (our deadline or the caller)."""
    return any(isinstance(r, (defer.CancelledError, error.ConnectingCancelledError))
               for r in _reasons(failure))


def tls_problem(failure: BaseException) -> str:
    """What went wrong in a TLS handshake, for an error message."""
    if isinstance(failure, VerificationError):
        return "TLS failed: the certificate is not for this host"
    return f"TLS failed: {failure}"


def describe_failure(failure: BaseException) -> str:
    """A short, secret-free description of why a request failed."""
    reasons = _reasons(failure)
    reason = reasons[0]
    if isinstance(reason, (SSL.Error, VerificationError)):
        return tls_problem(reason)
    if isinstance(reason, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, error.DNSLookupError):
        return "host name not found"
    if isinstance(reason, error.TimeoutError):
        return "connect timed out"
    if isinstance(failure, ResponseFailed):  # also ResponseNeverReceived
        return "connection lost before a complete response"
    return f"request failed ({type(failure).__name__})"


class HttpGateway:
    """An `SmsGateway` and `AlertSink` that calls a configured webhook.

    ``reactor`` provides time and TCP (and TLS); a `MemoryReactorClock` in
    tests. ``http_client`` is a ``HTTPClient`` (for tests: ``StubTreq``, with
    ``reactor`` a `Clock` for the deadline); by default one over an Agent on
    ``reactor``, without persistent connections.
    """

    def __init__(self, settings: HttpGatewaySettings, reactor,
                 http_client: HTTPClient | None = None):
        self._settings = settings
        self._reactor = reactor
        if http_client is None:
            # Read the CA file now, so a bad one stops the daemon at start.
            http_client = treq_client(make_agent(
                reactor, trust=trust_root(settings.ca_file), connect_timeout=settings.timeout))
        self._client = http_client

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Send ``text`` to ``to`` (E.164); fires with None once the gateway accepted it."""
        try:
            check_e164(to, "http gateway")
        except GatewayError:
            return defer.fail()
        return self._send({"to": to, "number": to[1:], "text": text, "subject": ""})

    def send_alert(self, subject: str, text: str) -> Deferred[None]:
        """Post an admin alert to the webhook; fires with None once it is accepted."""
        return self._send({"to": "", "number": "", "text": text, "subject": subject})

    def _send(self, values: dict[str, str]) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._request(values))
        # One deadline for connecting, sending and reading the answer.
        d.addTimeout(self._settings.timeout, self._reactor)
        d.addErrback(self._timed_out)
        return d

    def _timed_out(self, failure):
        failure.trap(defer.TimeoutError)
        raise GatewayError(
            f"http gateway: no answer within {self._settings.timeout:g} seconds") from None

    async def _request(self, values: dict[str, str]) -> None:
        settings = self._settings
        fields = {name: substitute(template, values)
                  for name, template in settings.fields.items()}
        method = settings.method.upper()
        if method == "GET":
            body = {"params": fields}
        elif settings.format == "json":
            body = {"json": fields}
        else:
            body = {"data": fields}
        try:
            response = await self._client.request(
                method, settings.url, headers=dict(settings.headers),
                allow_redirects=False, unbuffered=True, **body)
            # Read to the end, so the server sees its answer taken.
            await read_body(response)
        except Exception as e:
            if was_cancelled(e):
                # The deadline or the caller: addTimeout and the caller
                # expect CancelledError, which Agent wraps in its own errors.
                raise defer.CancelledError() from None
            # "from None": a chained exception could carry the URL or fields.
            raise GatewayError(f"http gateway: {describe_failure(e)}") from None
        if response.code not in settings.success_status:
            raise GatewayError(f"http gateway: status {response.code}", status=response.code)
