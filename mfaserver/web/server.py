"""The HTTP listener: settings, routing, request limits and JSON error handling.

`WebApp` routes requests with klein (werkzeug's rules) to handlers, which see
a `WebRequest` and return a dict (200 JSON), ``(status, dict)``, a `Response`
(raw bytes, e.g. TwiML or a page), or a Deferred or coroutine of one of those.
Whatever goes wrong becomes a JSON error, never a traceback: `HttpError` gives
its own status, an unknown path 404, a known path with another method 405 and
an Allow header, any other exception a 500 ``{"error": "internal"}`` and a
``log.failure``. A client that hangs up cancels its handler's Deferred (a long
poll is withdrawn). Routes given with ``long_poll=True`` (the devices' poll,
held open by every open web authenticator) are matched here and served
without klein, the same way, holding less for the wait.

Paths are matched as the client sent them, percent escapes not decoded, and
methods exactly (GET does not imply HEAD). A ``<name>`` in a route matches one
segment of 1 to 128 letters, digits, ``_`` or ``-``: the identifiers we issue;
werkzeug's converters are there for other needs, e.g. ``<path:name>``.

Limits, enforced before a handler runs:

* the body: at most ``max_body`` bytes. A larger Content-Length is refused
  with 413 before the body is read; a chunked body is counted as it arrives
  and refused as soon as it goes over. Refusals close the connection.
* the time to send a request (headers and body): ``request_timeout`` seconds
  from its first line, then 408; a kept-alive connection idle for a second
  longer is closed.
* headers: Twisted's own limits (``HTTPChannel``): the request line and all
  headers together at most 16 KiB, each line at most 16 KiB, at most 500
  headers; beyond that Twisted answers a bare 400 and disconnects.

Only HTTP/1.1 is served: the TLS context offers no ALPN, so no HTTP/2.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, parse_qsl, urlsplit

from klein import Klein
from klein.resource import KleinResource
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource
from werkzeug.exceptions import BadHost, HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter

from mfaserver.addresses import is_loopback
from mfaserver.web.validation import HttpError, check

log = Logger()

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
    """A non-JSON answer from a handler (TwiML, a page, an asset): raw bytes, their
    type, and any headers of its own (e.g. ``("Location", "/app/")``, or a
    ``Cache-Control`` that replaces the default ``no-store``)."""

    body: bytes
    content_type: str
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


# What a page may load and do: only this server's own scripts, styles and
# images, no inline script or style, no framing, no form posts elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; manifest-src 'self'; worker-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)
# Browsers keep to https for a year once they have seen this over TLS.
HSTS = ("Strict-Transport-Security", "max-age=31536000")

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".json": "application/json",
    ".webmanifest": "application/manifest+json", ".png": "image/png",
    ".svg": "image/svg+xml", ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8",
}


def static_files(directory: Path) -> Callable[[WebRequest], Response]:
    """A handler for ``<path:name>`` routes serving the files below ``directory``.

    The files are read once, now (assets are small, and the reactor never
    waits on the disk); a name that is not one of them, or has a type not
    listed above, is a 404. Assets may be cached by the browser for an hour.
    """
    files: dict[str, Response] = {}
    for path in sorted(Path(directory).rglob("*")):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            name = path.relative_to(directory).as_posix()
            headers = (("Cache-Control", "max-age=3600"),)
            if content_type.startswith("text/html"):
                headers = PAGE_HEADERS
            files[name] = Response(path.read_bytes(), content_type, headers=headers)

    def serve(request: WebRequest) -> Response:
        reply = files.get(request.params.get("name", ""))
        if reply is None:
            raise HttpError(404, "not_found", "no such resource")
        return reply

    serve.files = files
    return serve


@dataclass(frozen=True)
class Form:
    """An application/x-www-form-urlencoded body.

    ``pairs`` keeps every field in order, blank values included, as signature
    checks (X-Twilio-Signature) need; ``fields`` maps each name to its first value.
    """

    pairs: tuple[tuple[str, str], ...]
    fields: dict[str, str]


class WebRequest:
    """What a handler sees of one HTTP request; all text is already decoded.

    ``client_address`` is the peer's IP address ("" when unknown), as the
    connection shows it (a reverse proxy in front would be that address).
    """

    def __init__(self, method: str, path: str, params: dict[str, str],
                 query: dict[str, list[str]], headers: dict[str, str], body: bytes,
                 url: str, client_address: str = ""):
        self.method = method
        self.path = path
        self.params = params
        self.query = query
        self.headers = headers
        self.body = body
        self.url = url
        self.client_address = client_address

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


class _Identifier(BaseConverter):
    """A path parameter: an identifier we issue, so no escaping, slashes or dots."""

    regex = "[A-Za-z0-9_-]{1,128}"


_IDENTIFIER = re.compile(_Identifier.regex)


class WebApp:
    """Routes requests to handlers and turns every outcome into an HTTP response.

    ``clock`` times out requests that are sent too slowly (see `make_site`).
    ``GET /health`` is built in.
    """

    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self._klein = Klein()
        self._klein.url_map.converters["default"] = _Identifier
        self._klein.handle_errors(Exception)(_failed)
        self._long_polls: list[_LongPollRoute] = []
        self.route("GET", "/health", lambda request: {"status": "ok"})

    def route(self, method: str, path: str, handler: Handler | None = None, *,
              long_poll: bool = False):
        """Call ``handler`` for ``method`` (upper case) on paths matching ``path``.

        ``path`` is a werkzeug rule such as ``/v1/devices/<device_id>/transactions``.
        Without ``handler``, a decorator::

            @app.route("GET", "/app/<path:name>")
            def asset(request): ...

        ``long_poll``: a route that thousands of clients hold open at once (every
        open web authenticator has its poll out). It is matched and served
        without klein, which holds some 5 KB more per waiting request and ties
        each request into reference cycles that only a full garbage collection
        frees. Its ``path`` may have only literal and ``<name>`` segments; the
        handler should return a Deferred, not a coroutine, whose suspended
        frames would be held for the wait too.

        Raises ValueError for a route already given or a path without a leading /.
        """
        if handler is None:
            return functools.partial(self.route, method, path, long_poll=long_poll)
        endpoint = f"{method} {path}"
        if endpoint in self._klein.endpoints:
            raise ValueError(f"{endpoint} is already routed")
        if long_poll:
            self._long_polls.append(_LongPollRoute(method, path, handler))

        async def serve(request: server.Request, **params: str) -> bytes:
            result = handler(_web_request(request, params))
            if hasattr(result, "__await__"):
                result = await result
            return _send(request, _reply(result))

        self._klein.route(path, methods=[method], endpoint=endpoint)(serve)
        for rule in self._klein.url_map.iter_rules(endpoint):
            rule.methods = {method}     # werkzeug adds HEAD to every GET
        return handler

    def resource(self) -> IResource:
        """The twisted.web resource serving every path."""
        return _AppResource(self._klein, tuple(self._long_polls))


class _LongPollRoute:
    """A route served without klein (see `WebApp.route`).

    It stays routed in klein too, where the requests it does not take (another
    method on its path) get klein's 405.
    """

    def __init__(self, method: str, path: str, handler: Handler):
        self.method = method.encode("ascii")
        self.handler = handler
        self.segments: list[tuple[str, bool]] = []     # (literal or name, is a name)
        for segment in path.split("/")[1:]:
            if segment.startswith("<") and segment.endswith(">"):
                name = segment[1:-1]
                if not name.isidentifier():
                    raise ValueError(f"{path}: a long poll takes only <name> parameters")
                self.segments.append((name, True))
            elif "<" in segment or ">" in segment:
                raise ValueError(f"{path}: a long poll takes only <name> parameters")
            else:
                self.segments.append((segment, False))

    def match(self, request: server.Request, segments: list[bytes]) -> dict | None:
        """The path parameters when ``request`` is for this route, else None."""
        if request.method != self.method or len(segments) != len(self.segments):
            return None
        params = {}
        for sent, (text, is_name) in zip(segments, self.segments):
            value = sent.decode("ascii")
            if is_name:
                if _IDENTIFIER.fullmatch(value) is None:
                    return None
                params[text] = value
            elif value != text:
                return None
        return params

    def serve(self, request: server.Request, params: dict) -> object:
        try:
            result = self.handler(_web_request(request, params))
            if not isinstance(result, defer.Deferred):
                if not hasattr(result, "__await__"):
                    return _send(request, _reply(result))
                result = defer.ensureDeferred(result)
        except Exception:
            return _failed(request, Failure())
        # The client hanging up withdraws the poll. Nothing here refers back
        # to the request once the answer is written: no cycle to collect.
        request.notifyFinish().addErrback(_cancel, result)
        result.addCallback(_reply).addCallback(self._write, request)
        result.addErrback(self._write_failure, request)
        return server.NOT_DONE_YET

    @staticmethod
    def _write(reply: Response, request: server.Request) -> None:
        if _answerable(request):
            request.write(_send(request, reply))
            request.finish()

    @staticmethod
    def _write_failure(failure: Failure, request: server.Request) -> None:
        if _answerable(request):
            request.write(_failed(request, failure))
            request.finish()


def _answerable(request: server.Request) -> bool:
    """False once the client hung up (Twisted drops the channel) or the answer went."""
    return getattr(request, "channel", None) is not None and not request.finished


def _cancel(_reason: Failure, d: defer.Deferred) -> None:
    d.cancel()


class _AppResource(KleinResource):
    """Klein's resource, routing the path as sent, JSON errors for what it cannot route."""

    def __init__(self, klein: Klein, long_polls: tuple[_LongPollRoute, ...]):
        super().__init__(klein)
        self._long_polls = long_polls

    def render(self, request: server.Request):
        path = request.path
        # Twisted percent-decodes postpath, which klein routes on, and werkzeug
        # folds a leading "//": neither is how the client named the resource.
        if not (path.isascii() and path[:1] == b"/" and path[1:2] != b"/"):
            return _send(request, _error_reply(_NOT_FOUND, request))
        request.postpath = path[1:].split(b"/")
        try:
            # As werkzeug checks it, for the long polls that klein does not see.
            request.getRequestHostname().decode("utf-8").encode("idna")
        except UnicodeError:
            return _send(request, _error_reply(_BAD_HOST, request))
        for route in self._long_polls:
            params = route.match(request, request.postpath)
            if params is not None:
                return route.serve(request, params)
        try:
            return super().render(request)
        except (UnicodeError, BadHost):      # klein and werkzeug check the Host
            return _send(request, _error_reply(_BAD_HOST, request))


# Path segments that are secrets: what follows them is a one-time link's token.
_SECRET_AFTER = ("enroll", "invite")


def loggable_path(path: str) -> str:
    """``path`` for a log line: a one-time link's token (an enrollment link, a
    portal invite) replaced by ``<token>``; it would still work for whoever reads it."""
    segments = path.split("/")
    for i in range(1, len(segments)):
        if segments[i - 1] in _SECRET_AFTER and segments[i]:
            segments[i] = "<token>"
    return "/".join(segments)


_NOT_FOUND = HttpError(404, "not_found", "no such resource")
_BAD_HOST = HttpError(400, "invalid_host", "the Host header is not a host name")
_INTERNAL = HttpError(500, "internal", "internal server error")


def _failed(request: server.Request, failure: Failure) -> bytes:
    """Klein's error handler: the JSON error for a routing miss or a failed handler."""
    error = failure.value
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(error.valid_methods or ()))
        request.setHeader(b"Allow", allowed.encode())
        error = HttpError(405, "method_not_allowed", f"allowed: {allowed}")
    elif isinstance(error, HTTPException):      # NotFound (or a redirect werkzeug offers)
        error = _NOT_FOUND
    elif not isinstance(error, HttpError):
        log.failure("Web request {method} {path} failed", failure,
                    method=request.method, path=loggable_path(request.path.decode("latin-1")))
        error = _INTERNAL
    return _send(request, _error_reply(error, request))


def _web_request(request: server.Request, params: dict[str, str]) -> WebRequest:
    """What a handler sees of ``request``; HttpError 400 or 413 if it cannot."""
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
    return WebRequest(request.method.decode("ascii"), request.path.decode("ascii"), params,
                      query, headers, body, _request_url(request),
                      getattr(request.getClientAddress(), "host", ""))


def _json_reply(status: int, value: dict) -> Response:
    return Response(json.dumps(value, separators=(",", ":")).encode(), "application/json",
                    status)


def _error_reply(error: HttpError, request: server.Request | None = None) -> Response:
    """The error as JSON, or as a page for what a browser shows (the web
    authenticator, the portal, a page asked for with Accept: text/html)."""
    if request is not None and _wants_page(request):
        from mfaserver.web.pages import error_page
        return error_page(error.status, error.message)
    return _json_reply(error.status, {"error": error.code, "message": error.message})


def _wants_page(request: server.Request) -> bool:
    path = request.path
    if path.startswith((b"/app/", b"/portal/")) or path in (b"/app", b"/portal", b"/"):
        return True
    return request.method == b"GET" and b"text/html" in (request.getHeader(b"accept") or b"")


def _reply(result: Any) -> Response:
    """A handler's result as a Response; TypeError for anything else."""
    if isinstance(result, Response):
        return result
    if isinstance(result, dict):
        return _json_reply(200, result)
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], int)
            and isinstance(result[1], dict)):
        return _json_reply(*result)
    raise TypeError(f"a handler returned {type(result).__name__}, not a dict or Response")


def _send(request: server.Request, reply: Response) -> bytes:
    """Set the status and headers of ``reply``; its body, for klein or Twisted to write."""
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
    request.setHeader(b"Content-Length", b"%d" % len(reply.body))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Server", b"mfaserver")   # not Twisted's version
    if reply.content_type.startswith("text/html"):
        for name, value in PAGE_HEADERS:
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
    if request.isSecure():
        request.setHeader(HSTS[0].encode("ascii"), HSTS[1].encode("ascii"))
    for name, value in reply.headers:
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    return reply.body


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
        self._deadline = site.reactor.callLater(
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
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()

    def _cleanup(self):
        super()._cleanup()
        # Break the request's reference cycles (klein's adapter and the
        # deadline timer both point back at it), so that refcounting frees it
        # the moment it is answered. Left to the cyclic collector, a thousand
        # open pages' long polls, each answered every 30 s, pile up for
        # minutes in the oldest generation and double the daemon's memory.
        self._adapterCache = {}
        self._deadline = None

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
    """The twisted.web Site serving ``app`` with the limits from ``settings``.

    Its timers (the request deadline, the idle timeout) run on ``app.clock``.
    """
    # WebRequest.form() parses form bodies itself, for the handlers that want
    # one; Twisted's own parse (through the email package) would cost every POST.
    # The connection's idle timeout runs a second longer than a request's
    # deadline, so a request sent too slowly gets our 408 rather than a bare
    # hang-up (both timers would otherwise race).
    site = _Site(app.resource(), timeout=settings.request_timeout + 1,
                 parsePOSTFormSubmission=False, reactor=app.clock)
    site.max_body = settings.max_body
    site.request_timeout = settings.request_timeout
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
