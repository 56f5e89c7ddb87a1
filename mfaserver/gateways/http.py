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
from typing import Protocol

import treq
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.ssl import (
    Certificate, TLSVersion, optionsForClientTLS, platformTrust, trustRootFromCertificates,
)
from twisted.web.client import Agent, ResponseFailed
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from mfaserver.addresses import is_loopback
from mfaserver.gateways.base import GatewayError, is_e164

METHODS = ("POST", "PUT", "GET")
FORMATS = ("json", "form")
PLACEHOLDERS = ("to", "number", "text", "subject")

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]*)\}")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class AlertSink(Protocol):
    """Where admin alerts go (fraud reports, ...): a webhook, mail, the log."""

    def send_alert(self, subject: str, text: str) -> Deferred[None]:
        """Fires with None once the alert is handed over, or fails with GatewayError."""


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


def check_e164(to: str, gateway: str) -> str:
    """``to`` if it is an E.164 number, else GatewayError.

    Numbers end up in URLs, JSON and mail addresses: anything else is refused
    rather than escaped.
    """
    if not isinstance(to, str) or not is_e164(to):
        raise GatewayError(f"{gateway} gateway: the number is not in E.164 form")
    return to


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


@implementer(IPolicyForHTTPS)
class _TlsPolicy:
    """Agent's TLS policy: `client_tls` with the configured CAs."""

    def __init__(self, trust):
        self._trust = trust

    def creatorForNetloc(self, hostname: bytes, port: int):
        return client_tls(hostname.decode("ascii"), self._trust)


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


def _cancelled(failure: BaseException) -> bool:
    """Whether the request failed because it was cancelled (our deadline or the caller)."""
    return any(isinstance(r, (defer.CancelledError, error.ConnectingCancelledError))
               for r in _reasons(failure))


def tls_problem(failure: BaseException) -> str:
    """What went wrong in a TLS handshake, for an error message."""
    if isinstance(failure, VerificationError):
        return "TLS failed: the certificate is not for this host"
    return f"TLS failed: {failure}"


def _describe(failure: BaseException) -> str:
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


def _discard(data: bytes) -> None:
    """The response body is not needed: the status says it all."""


class HttpGateway:
    """An `SmsGateway` and `AlertSink` that calls a configured webhook.

    ``reactor`` provides time and TCP. ``http_client`` is a
    ``HTTPClient`` (for tests); by default one over an Agent on
    ``reactor``, without persistent connections.
    """

    def __init__(self, settings: HttpGatewaySettings, reactor,
                 http_client: HTTPClient | None = None):
        self._settings = settings
        self._reactor = reactor
        if http_client is None:
            # Read the CA file now, so a bad one stops the daemon at start.
            policy = _TlsPolicy(trust_root(settings.ca_file))
            http_client = HTTPClient(
                Agent(reactor, contextFactory=policy, connectTimeout=settings.timeout))
        self._client = http_client

    def send_sms(self, to: str, text: str) -> Deferred[None]:
        """Send ``text`` to ``to`` (E.164); fires with None once the gateway accepted it."""
        try:
            check_e164(to, "http")
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
            # Read the body to the end so the connection is released.
            await treq.collect(response, _discard)
        except Exception as e:
            if _cancelled(e):
                # The deadline or the caller: addTimeout and the caller
                # expect CancelledError, which Agent wraps in its own errors.
                raise defer.CancelledError() from None
            # "from None": a chained exception could carry the URL or fields.
            raise GatewayError(f"http gateway: {_describe(e)}") from None
        if response.code not in settings.success_status:
            raise GatewayError(f"http gateway: status {response.code}", status=response.code)
