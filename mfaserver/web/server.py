"""The HTTP listener: settings, routing, request limits and JSON error handling.

`WebApp` maps ``METHOD /path/{param}`` to handlers, which see a `WebRequest`
and return a dict (200 JSON), ``(status, dict)``, a `Response` (raw bytes,
e.g. TwiML), or a Deferred or coroutine of one of those. Whatever goes wrong
becomes a JSON error, never a traceback: `HttpError` gives its own status,
any other exception a 500 ``{"error": "internal"}`` and a ``log.failure``.

Limits, enforced before a handler runs:

* the body: at most ``max_body`` bytes. A larger Content-Length is refused
  with 413 before the body is read; a chunked body is counted as it arrives
  and refused as soon as it goes over. Refusals close the connection.
* the time to send a request (headers and body): ``request_timeout`` seconds
  from its first line, then 408; the same value is the idle timeout of a
  kept-alive connection.
* headers: Twisted's own limits (``HTTPChannel``): the request line and all
  headers together at most 16 KiB, each line at most 16 KiB, at most 500
  headers; beyond that Twisted answers a bare 400 and disconnects.

Only HTTP/1.1 is served: the TLS context offers no ALPN, so no HTTP/2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, parse_qsl, urlsplit

from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server

from mfaserver.addresses import is_loopback
from mfaserver.web.validation import HttpError, check

log = Logger()

# Path parameters are identifiers we issue: no escaping, no slashes, no dots.
_PARAM = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MAX_FIELDS = 200           # query or form fields, against hash-flooding and waste

_REASONS = {408: b"Request Timeout", 413: b"Content Too Large"}


@dataclass(frozen=True)
class WebSettings:
    """The ``[web]`` section: where to listen, how the world reaches us, limits."""

    listen: str = "127.0.0.1"
    port: int = 8443
    public_url: str = ""        # empty: not configured (features needing it refuse)
    tls_certificate: Path | None = None     # PEM: the certificate, then its chain
    tls_key: Path | None = None             # PEM: the unencrypted private key
    max_body: int = 64 * 1024
    request_timeout: float = 30.0

    def validate(self) -> None:
        """Raise ValueError("key: message") for a setting that cannot work or is unsafe."""
        if not self.listen:
            raise ValueError("listen: must be an address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 <= self.port <= 65535:
            raise ValueError("port: must be an integer from 0 to 65535")
        if (self.tls_certificate is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_certificate"
            raise ValueError(f"{missing}: tls_certificate and tls_key go together")
        if self.tls_certificate is None and not is_loopback(self.listen):
            raise ValueError("tls_certificate: required unless listen is a loopback "
                             f"address (listen = {self.listen!r})")
        if self.public_url:
            _check_public_url(self.public_url)
        if isinstance(self.max_body, bool) or not isinstance(self.max_body, int) \
                or self.max_body <= 0:
            raise ValueError("max_body: must be a positive number of bytes")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout: must be a positive number of seconds")


def _check_public_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port          # raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(f"public_url: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("public_url: must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError("public_url: must not contain a user name, query or fragment")
    # Phones and gateways send secrets to this URL: clear text only on this host.
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError("public_url: must be https:// unless it names a loopback address")


@dataclass(frozen=True)
class Response:
    """A non-JSON answer from a handler, e.g. TwiML: raw bytes and their type."""

    body: bytes
    content_type: str
    status: int = 200


@dataclass(frozen=True)
class Form:
    """An application/x-www-form-urlencoded body.

    ``pairs`` keeps every field in order, blank values included, as signature
    checks (X-Twilio-Signature) need; ``fields`` maps each name to its first value.
    """

    pairs: tuple[tuple[str, str], ...]
    fields: dict[str, str]


class WebRequest:
    """What a handler sees of one HTTP request; all text is already decoded."""

    def __init__(self, method: str, path: str, params: dict[str, str],
                 query: dict[str, list[str]], headers: dict[str, str], body: bytes,
                 url: str):
        self.method = method
        self.path = path
        self.params = params
        self.query = query
        self.headers = headers
        self.body = body
        self.url = url

    def json(self, schema: dict | None = None) -> dict:
        """The body as a JSON object, checked against ``schema`` if given.

        Raises HttpError 415 unless the Content-Type is application/json,
        400 for malformed JSON or anything but an object, `BadRequest` (400,
        the field named) for a schema violation.
        """
        self._require_type("application/json")
        try:
            value = json.loads(self.body.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise HttpError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise HttpError(400, "invalid_json", "the body must be a JSON object")
        if schema is not None:
            check(value, schema)
        return value

    def form(self) -> Form:
        """The body as a form; HttpError 415 for another Content-Type, 400 if malformed."""
        self._require_type("application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(self.body.decode("utf-8"), keep_blank_values=True,
                              max_num_fields=_MAX_FIELDS, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "invalid_form", "the body is not a valid form") from None
        fields: dict[str, str] = {}
        for name, value in pairs:
            fields.setdefault(name, value)
        return Form(tuple(pairs), fields)

    def _require_type(self, wanted: str) -> None:
        media_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != wanted:
            raise HttpError(415, "unsupported_media_type", f"Content-Type must be {wanted}")


def _no_constant(name: str) -> None:
    # json accepts NaN and Infinity by default; JSON itself does not.
    raise ValueError(f"{name} is not JSON")


Handler = Callable[[WebRequest], Any]


class WebApp:
    """Routes requests to handlers and turns every outcome into an HTTP response.

    ``clock`` times out requests that are sent too slowly (see `make_site`).
    ``GET /health`` is built in.
    """

    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self._routes: list[tuple[re.Pattern, str, dict[str, Handler]]] = []
        self.route("GET", "/health", self._health)

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Call ``handler`` for ``method`` on paths matching ``pattern``.

        ``pattern`` is a path with ``{name}`` placeholders, each matching one
        segment of 1 to 128 letters, digits, ``_`` or ``-``, e.g.
        ``/v1/devices/{device_id}/transactions``.
        """
        if not pattern.startswith("/"):
            raise ValueError(f"pattern must start with /: {pattern!r}")
        for _, text, handlers in self._routes:
            if text == pattern:
                if method in handlers:
                    raise ValueError(f"{method} {pattern} is already routed")
                handlers[method] = handler
                return
        regex, end = "", 0
        for m in _PLACEHOLDER.finditer(pattern):
            regex += re.escape(pattern[end:m.start()]) + f"(?P<{m.group(1)}>{_PARAM.pattern})"
            end = m.end()
        regex += re.escape(pattern[end:])
        self._routes.append((re.compile(regex), pattern, {method: handler}))

    def resource(self) -> resource.IResource:
        """The twisted.web resource serving every path."""
        return _AppResource(self)

    def _health(self, request: WebRequest) -> dict:
        return {"status": "ok"}

    def _find(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters for a request, or HttpError 404/405."""
        allowed: set[str] = set()
        for compiled, _, handlers in self._routes:
            m = compiled.fullmatch(path)
            if m is None:
                continue
            if method in handlers:
                return handlers[method], m.groupdict()
            allowed.update(handlers)
        if allowed:
            raise _MethodNotAllowed(sorted(allowed))
        raise HttpError(404, "not_found", "no such resource")


class _MethodNotAllowed(HttpError):
    def __init__(self, allowed: list[str]):
        super().__init__(405, "method_not_allowed", "allowed: " + ", ".join(allowed))
        self.allowed = allowed


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str


def _json_reply(status: int, value: dict) -> _Reply:
    return _Reply(status, json.dumps(value, separators=(",", ":")).encode(),
                  "application/json")


def _error_reply(error: HttpError) -> _Reply:
    return _json_reply(error.status, {"error": error.code, "message": error.message})


class _AppResource(resource.Resource):
    """Adapts twisted.web requests to `WebApp` handlers."""

    isLeaf = True

    def __init__(self, app: WebApp):
        super().__init__()
        self._app = app

    def render(self, request: server.Request) -> int:
        finished = []
        request.notifyFinish().addBoth(finished.append)
        d = defer.Deferred.fromCoroutine(self._handle(request))
        # A client that hangs up withdraws its request (e.g. a long poll).
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallback(self._write, request, finished)
        d.addErrback(lambda f: None if f.check(defer.CancelledError) else
                     log.failure("Writing the response failed", f))
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> _Reply:
        try:
            web_request, handler = self._parse(request)
            result = handler(web_request)
            if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
                result = await result
            return _to_reply(result)
        except defer.CancelledError:
            raise
        except _MethodNotAllowed as e:
            request.setHeader(b"Allow", ", ".join(e.allowed).encode())
            return _error_reply(e)
        except HttpError as e:
            return _error_reply(e)
        except Exception:
            log.failure("Web request {method} {path} failed",
                        method=request.method, path=request.path)
            return _json_reply(500, {"error": "internal",
                                     "message": "internal server error"})

    def _parse(self, request: server.Request) -> tuple[WebRequest, Handler]:
        try:
            method = request.method.decode("ascii")
            path = request.path.decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(404, "not_found", "no such resource") from None
        handler, params = self._app._find(method, path)
        max_body = getattr(request, "max_body", WebSettings.max_body)
        body = request.content.read(max_body + 1)
        # _LimitedRequest refuses these before they get here; this covers any
        # other request factory.
        if len(body) > max_body:
            raise HttpError(413, "too_large", f"the body exceeds {max_body} bytes")
        headers = {name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        query_string = request.uri.partition(b"?")[2]
        try:
            query = parse_qs(query_string.decode("utf-8"), keep_blank_values=True,
                             max_num_fields=_MAX_FIELDS, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "invalid_query", "the query string is malformed") from None
        return WebRequest(method, path, params, query, headers, body,
                          _request_url(request)), handler

    def _write(self, reply: _Reply, request: server.Request, finished: list) -> None:
        if finished:        # the client has gone; nobody to answer
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(reply.body))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Server", b"mfaserver")   # not Twisted's version
        request.write(reply.body)
        request.finish()


def _to_reply(result: Any) -> _Reply:
    if isinstance(result, Response):
        return _Reply(result.status, result.body, result.content_type)
    if isinstance(result, dict):
        return _json_reply(200, result)
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], int)
            and isinstance(result[1], dict)):
        return _json_reply(*result)
    raise TypeError(f"a handler returned {type(result).__name__}, not a dict or Response")


def _request_url(request: server.Request) -> str:
    """The URL as the client used it: scheme, Host header, path and query."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if host is not None:
        host = host.decode("latin-1")
    else:
        # HTTP/1.0 without Host: the address the client connected to.
        address = request.getHost()
        host = f"[{address.host}]" if ":" in address.host else address.host
        host = f"{host}:{address.port}"
    return f"{scheme}://{host}{request.uri.decode('latin-1')}"


class _LimitedRequest(server.Request):
    """A request that refuses an oversized body, and a request sent too slowly.

    twisted.web reads the whole body into ``content`` before a resource sees
    the request, so the limits have to act here, while it arrives.
    """

    def __init__(self, channel, *args, **kwargs):
        super().__init__(channel, *args, **kwargs)
        site = channel.site
        self.max_body = site.max_body
        self._received = 0
        self._refused = False
        self._deadline = site.clock.callLater(
            site.request_timeout, self._refuse, 408, "timeout",
            "the request was not received in time")

    def gotLength(self, length):
        super().gotLength(length)
        if length is not None and length > self.max_body:
            # Without this, Twisted would send "100 Continue" after our answer.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse(413, "too_large", f"the body exceeds {self.max_body} bytes")

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse(413, "too_large", f"the body exceeds {self.max_body} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        self._stop_deadline()
        if not self._refused:
            super().requestReceived(command, path, version)

    def connectionLost(self, reason):
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self):
        if self._deadline.active():
            self._deadline.cancel()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer at once and hang up, the way Twisted answers a malformed request."""
        if self._refused:
            return
        self._refused = True
        self._stop_deadline()
        body = json.dumps({"error": code, "message": message}).encode()
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
            + b"Content-Type: application/json\r\n"
            + b"Content-Length: %d\r\n" % len(body)
            + b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            + b"Connection: close\r\n\r\n" + body)
        self.channel.loseConnection()


class _Site(server.Site):
    requestFactory = _LimitedRequest
    displayTracebacks = False

    def log(self, request) -> None:
        # No access log: handlers log what matters (enrollments, answers,
        # refusals) as structured events, and a line per long poll is noise.
        pass


def make_site(app: WebApp, settings: WebSettings) -> server.Site:
    """The twisted.web Site serving ``app`` with the limits from ``settings``."""
    # WebRequest.form() parses form bodies itself, for the handlers that want
    # one; Twisted's own parse (through the email package) would cost every POST.
    # The connection's idle timeout runs a second longer than a request's
    # deadline, so a request sent too slowly gets our 408 rather than a bare
    # hang-up (both timers would otherwise race).
    site = _Site(app.resource(), timeout=settings.request_timeout + 1,
                 parsePOSTFormSubmission=False)
    site.max_body = settings.max_body
    site.request_timeout = settings.request_timeout
    site.clock = app.clock
    site.noisy = False
    return site


def tls_options(certificate: Path, key: Path) -> ssl.CertificateOptions:
    """Server TLS options (TLS 1.2 or newer) from PEM files; ValueError names the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import crypto

    try:
        chain = x509.load_pem_x509_certificates(Path(certificate).read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"tls_certificate: cannot load {certificate}: {e}") from None
    try:
        private_key = load_pem_private_key(Path(key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"tls_key: cannot load {key}: {e}") from None
    try:
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(private_key),
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        options.getContext()    # checks now that the key matches the certificate
    except Exception as e:
        raise ValueError(f"tls_key: does not fit tls_certificate: {e}") from None
    return options


def listen(reactor, settings: WebSettings, app: WebApp) -> defer.Deferred[IListeningPort]:
    """Serve ``app`` on ``settings.listen``:``settings.port``, with TLS if configured.

    Raises ValueError for bad settings or unreadable TLS files; the Deferred
    fires with the listening port, or fails if the address cannot be bound.
    """
    settings.validate()
    site = make_site(app, settings)
    if settings.tls_certificate is not None:
        options = tls_options(settings.tls_certificate, settings.tls_key)
        endpoint = endpoints.SSL4ServerEndpoint(reactor, settings.port, options,
                                                interface=settings.listen)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, settings.port,
                                                interface=settings.listen)
    return endpoint.listen(site)
