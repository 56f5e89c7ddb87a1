"""Tests for mfaserver.web: routing, JSON bodies and errors, limits, listening, settings.

Everything runs in memory on a `task.Clock`: requests go through treq's
`StubTreq` over the app's resource, or as raw HTTP bytes over a
`StringTransport` into the real Site from `make_site`, where the body-size and
slow-request limits live. tests/integration/test_web_listener.py listens on
real sockets.
"""

from __future__ import annotations

import json
import weakref
import shutil
import tempfile
from pathlib import Path

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import ldap_server
from mfaserver.web import (BadRequest, HttpError, Response, WebApp, WebSettings, listen,
                           make_site, validation as v)

MAX_BODY = 1024
TIMEOUT = 30
BASE = "http://mfa.example.org"

TRANSACTION = v.object(
    required={"kind": v.enum("push", "code"), "amount": v.integer(1, 10)},
    optional={"note": v.string(8), "tags": v.array(v.string(4, pattern="[a-z]+"), 2)},
)


def make_app(clock) -> tuple[WebApp, list]:
    """An app with a route for each kind of handler; ``pending`` records /wait."""
    app = WebApp(clock)
    pending: list = []

    def show(request):
        return {"params": request.params, "query": request.query, "url": request.url}

    def create(request):
        return 201, {"created": request.json(TRANSACTION), "device": request.params["device_id"]}

    def callback(request):
        form = request.form()
        return {"pairs": form.pairs, "fields": form.fields, "url": request.url}

    def boom(request):
        raise RuntimeError("secret detail")

    def forbidden(request):
        raise HttpError(403, "forbidden", "not yours")

    async def twiml(request):
        await defer.succeed(None)
        return Response(b"<Response><Say>hi</Say></Response>", "text/xml; charset=utf-8")

    def wait(request):
        # Records its own cancellation: the awaiting server consumes the failure.
        d = defer.Deferred(canceller=lambda d: pending.append("cancelled"))
        pending.append(d)
        return d

    app.route("GET", "/v1/devices/<device_id>/transactions/<tx_id>", show)
    app.route("POST", "/v1/devices/<device_id>/transactions", create)
    app.route("DELETE", "/v1/devices/<device_id>/transactions/<tx_id>", show)
    app.route("POST", "/callback", callback)
    app.route("GET", "/boom", boom)
    app.route("GET", "/list", lambda request: ["not", "a", "dict"])
    app.route("GET", "/forbidden", forbidden)
    app.route("GET", "/twiml", twiml)
    app.route("GET", "/wait", wait)
    app.route("GET", "/poll/<device_id>", wait, long_poll=True)
    app.route("GET", "/poll/<device_id>/now", show, long_poll=True)
    app.route("GET", "/poll/<device_id>/forbidden", forbidden, long_poll=True)
    return app, pending


class AppCase(SynchronousTestCase):
    """The test app on a Clock, reached through StubTreq."""

    def setUp(self):
        self.clock = Clock()
        self.app, self.pending = make_app(self.clock)
        self.http = StubTreq(self.app.resource())

    def fetch(self, method: str, path: str, base: str = BASE, **kwargs):
        """The response to one request for ``base + path``, and its body."""
        d = self.http.request(method, base + path, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        return response, self.successResultOf(response.content())

    def fetch_json(self, method: str, path: str, status: int, **kwargs) -> dict:
        """The JSON body of a response that must have ``status`` and our headers."""
        response, body = self.fetch(method, path, **kwargs)
        self.assertEqual(response.code, status, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        return json.loads(body)

    def post_json(self, body: bytes, status: int, content_type="application/json") -> dict:
        return self.fetch_json("POST", "/v1/devices/d1/transactions", status, data=body,
                               headers={"Content-Type": content_type})


# --- Routing and responses -----------------------------------------------------------------------

class RoutingTests(AppCase):
    def test_health_answers_ok(self):
        self.assertEqual(self.fetch_json("GET", "/health", 200), {"status": "ok"})
        response, _ = self.fetch("GET", "/health")
        self.assertEqual(response.headers.getRawHeaders("server"), ["mfaserver"])

    def test_path_params_and_query_reach_the_handler(self):
        body = self.fetch_json("GET", "/v1/devices/dev_1-A/transactions/tx9?a=1&a=2&b=", 200)
        self.assertEqual(body["params"], {"device_id": "dev_1-A", "tx_id": "tx9"})
        self.assertEqual(body["query"], {"a": ["1", "2"], "b": [""]})

    def test_url_is_rebuilt_as_the_client_used_it(self):
        body = self.fetch_json("GET", "/v1/devices/d/transactions/t?x=%20y&z=1", 200,
                               headers={"Host": "mfa.example.org:8443"})
        self.assertEqual(body["url"],
                         "http://mfa.example.org:8443/v1/devices/d/transactions/t?x=%20y&z=1")

    def test_url_says_https_over_tls(self):
        body = self.fetch_json("GET", "/v1/devices/d/transactions/t", 200,
                               base="https://mfa.example.org")
        self.assertEqual(body["url"], "https://mfa.example.org/v1/devices/d/transactions/t")

    def test_unknown_path_is_404(self):
        for path in ["/nowhere", "/v1/devices/a.b/transactions/t",
                     "/v1/devices/d/transactions/" + "x" * 129,
                     "/v1/devices/%2e%2e/transactions/t", "/health/", "//health"]:
            self.assertEqual(self.fetch_json("GET", path, 404)["error"], "not_found", path)

    def test_path_param_of_128_characters_is_routed(self):
        body = self.fetch_json("GET", "/v1/devices/d/transactions/" + "x" * 128, 200)
        self.assertEqual(body["params"]["tx_id"], "x" * 128)

    def test_wrong_method_is_405_with_allow(self):
        body = self.fetch_json("PUT", "/v1/devices/d/transactions/t", 405, data=b"")
        self.assertEqual(body, {"error": "method_not_allowed", "message": "allowed: DELETE, GET"})
        response, _ = self.fetch("PUT", "/v1/devices/d/transactions/t", data=b"")
        self.assertEqual(response.headers.getRawHeaders("allow"), ["DELETE, GET"])

    def test_get_route_does_not_answer_head(self):
        response, _ = self.fetch("HEAD", "/health")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET"])

    def test_http_error_gives_its_status_and_code(self):
        self.assertEqual(self.fetch_json("GET", "/forbidden", 403),
                         {"error": "forbidden", "message": "not yours"})

    def test_handler_exception_is_500_without_traceback_and_logged(self):
        response, text = self.fetch("GET", "/boom")
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(text)["error"], "internal")
        for secret in (b"secret detail", b"Traceback", b"boom"):
            self.assertNotIn(secret, text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_handler_returning_something_else_is_500(self):
        self.assertEqual(self.fetch_json("GET", "/list", 500)["error"], "internal")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_async_handler_can_answer_raw_bytes(self):
        response, body = self.fetch("GET", "/twiml")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/xml; charset=utf-8"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertEqual(body, b"<Response><Say>hi</Say></Response>")

    def test_a_route_can_be_added_with_a_decorator(self):
        @self.app.route("GET", "/app/<path:name>")
        def asset(request):
            return Response(request.params["name"].encode(), "text/plain")

        response, body = self.fetch("GET", "/app/css/site.css")
        self.assertEqual((response.code, body), (200, b"css/site.css"))

    def test_a_route_cannot_be_given_twice_or_without_a_leading_slash(self):
        with self.assertRaises(ValueError):
            self.app.route("GET", "/health", lambda request: {})
        with self.assertRaises(ValueError):
            self.app.route("GET", "health", lambda request: {})

    def test_host_header_that_is_no_host_name_is_400(self):
        for host in ["a" * 64 + ".example.org", b"\xff.example.org"]:
            body = self.fetch_json("GET", "/health", 400, headers={"Host": host})
            self.assertEqual(body["error"], "invalid_host")


# --- JSON bodies ---------------------------------------------------------------------------------

class JsonBodyTests(AppCase):
    def test_valid_json_body_is_accepted(self):
        body = self.post_json(b'{"kind": "push", "amount": 3, "tags": ["ab"]}', 201)
        self.assertEqual(body, {"created": {"kind": "push", "amount": 3, "tags": ["ab"]},
                                "device": "d1"})

    def test_json_with_charset_is_accepted(self):
        self.post_json(b'{"kind": "code", "amount": 1}', 201, "application/json; charset=utf-8")

    def test_json_with_another_content_type_is_415(self):
        for content_type in ["text/plain", "application/x-www-form-urlencoded", ""]:
            body = self.post_json(b'{"kind": "push", "amount": 3}', 415, content_type)
            self.assertEqual(body["error"], "unsupported_media_type", content_type)

    def test_malformed_json_or_not_an_object_is_400(self):
        for text in [b"{", b"[1, 2]", b'"text"', b"\xff{}", b'{"a": NaN}', b""]:
            self.assertEqual(self.post_json(text, 400)["error"], "invalid_json", text)

    def test_schema_violation_is_400_naming_the_field(self):
        for text, message in [
            (b'{"amount": 3}', "kind: required"),
            (b'{"kind": "sms", "amount": 3}', "kind: must be one of 'push', 'code'"),
            (b'{"kind": "push", "amount": 11}', "amount: must be at most 10"),
            (b'{"kind": "push", "amount": true}', "amount: must be an integer"),
            (b'{"kind": "push", "amount": 1, "extra": 1}', "extra: unexpected field"),
            (b'{"kind": "push", "amount": 1, "tags": ["ok", "BAD"]}',
             "tags[1]: has an invalid format"),
        ]:
            self.assertEqual(self.post_json(text, 400), {"error": "invalid", "message": message})


# --- Forms ---------------------------------------------------------------------------------------

class FormTests(AppCase):
    def test_form_keeps_blank_values_and_order(self):
        body = b"To=%2B15550001111&Digits=&CallSid=CA1&Digits=2&Note=a+b%26c"
        result = self.fetch_json(
            "POST", "/callback?attempt=1", 200, data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(result["pairs"], [["To", "+15550001111"], ["Digits", ""],
                                           ["CallSid", "CA1"], ["Digits", "2"],
                                           ["Note", "a b&c"]])
        self.assertEqual(result["fields"], {"To": "+15550001111", "Digits": "", "CallSid": "CA1",
                                            "Note": "a b&c"})
        self.assertEqual(result["url"], f"{BASE}/callback?attempt=1")

    def test_form_with_another_content_type_is_415(self):
        body = self.fetch_json("POST", "/callback", 415, data=b"a=1",
                               headers={"Content-Type": "application/json"})
        self.assertEqual(body["error"], "unsupported_media_type")


# --- The Site: limits and connections ------------------------------------------------------------

class Connection:
    """One client connection to ``site``, in memory: raw HTTP in, raw HTTP out."""

    def __init__(self, site):
        self.transport = StringTransport(IPv4Address("TCP", "127.0.0.1", 8443),
                                         IPv4Address("TCP", "192.0.2.7", 40000))
        self.protocol = site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> Connection:
        self.protocol.dataReceived(data)
        return self

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The status, headers (names in lower case) and body of the response so far."""
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        return int(status_line.split()[1]), headers, body

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def hang_up(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def post(body: bytes, *headers: bytes) -> bytes:
    return (b"POST /v1/devices/d1/transactions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n" + b"".join(h + b"\r\n" for h in headers)
            + b"\r\n" + body)


def chunked(data: bytes, size: int = 256) -> bytes:
    chunks = (data[i:i + size] for i in range(0, len(data), size))
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


class SiteCase(SynchronousTestCase):
    """The real Site from make_site, on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.app, self.pending = make_app(self.clock)
        self.site = make_site(self.app, WebSettings(max_body=MAX_BODY, request_timeout=TIMEOUT))

    def connect(self) -> Connection:
        return Connection(self.site)

    def assertRefused(self, connection: Connection, status: int, code: str) -> None:
        answer_status, headers, body = connection.response()
        self.assertEqual((answer_status, json.loads(body)["error"]), (status, code))
        self.assertEqual((headers["content-type"], headers["cache-control"]),
                         ("application/json", "no-store"))
        self.assertTrue(connection.closed)


class SiteTests(SiteCase):
    def test_serves_the_app_with_our_headers(self):
        connection = self.connect().send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = connection.response()
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertEqual(headers["content-length"], str(len(body)))
        self.assertEqual(headers["server"], "mfaserver")

    def test_paths_are_matched_as_sent_not_percent_decoded(self):
        for path in [b"/heal%74h", b"/health\xa9", b"health"]:
            connection = self.connect().send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            status, _, body = connection.response()
            self.assertEqual((status, json.loads(body)["error"]), (404, "not_found"), path)

    def test_body_at_the_limit_is_read(self):
        body = json.dumps({"kind": "push", "amount": 1, "note": "x"}).encode()
        body += b" " * (MAX_BODY - len(body))
        connection = self.connect().send(post(body, b"Content-Length: %d" % len(body)))
        self.assertEqual(connection.response()[0], 201)

    def test_body_over_the_limit_is_413(self):
        body = b" " * (MAX_BODY + 1)
        connection = self.connect().send(post(body, b"Content-Length: %d" % len(body)))
        self.assertRefused(connection, 413, "too_large")

    def test_chunked_body_over_the_limit_is_413(self):
        connection = self.connect().send(post(chunked(b" " * (MAX_BODY + 1)),
                                              b"Transfer-Encoding: chunked"))
        self.assertRefused(connection, 413, "too_large")

    def test_chunked_body_under_the_limit_is_read(self):
        connection = self.connect().send(post(chunked(b'{"kind": "push", "amount": 2}', 8),
                                              b"Transfer-Encoding: chunked"))
        self.assertEqual(connection.response()[0], 201)

    def test_large_content_length_is_refused_before_the_body_is_sent(self):
        connection = self.connect().send(post(b"", b"Expect: 100-continue",
                                              b"Content-Length: 100000000"))
        self.assertNotIn(b"100 Continue", connection.transport.value())
        self.assertRefused(connection, 413, "too_large")

    def test_slow_request_times_out_with_408(self):
        connection = self.connect().send(b"POST /callback HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(TIMEOUT - 0.1)
        self.assertEqual(connection.transport.value(), b"")
        self.clock.advance(0.1)
        self.assertRefused(connection, 408, "timeout")

    def test_idle_connection_closes_a_second_after_the_request_timeout(self):
        connection = self.connect().send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(connection.response()[0], 200)
        self.clock.advance(TIMEOUT + 0.9)
        self.assertFalse(connection.closed)
        self.clock.advance(0.1)
        self.assertTrue(connection.closed)

    def test_client_hanging_up_cancels_its_handler(self):
        connection = self.connect().send(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(self.pending), 1)
        connection.hang_up()
        self.assertEqual(self.pending[1:], ["cancelled"])
        self.assertEqual(connection.transport.value(), b"")


def test_one_time_link_tokens_are_not_logged():
    from mfaserver.web.server import loggable_path
    assert loggable_path("/portal/invite/SECRET") == "/portal/invite/<token>"
    assert loggable_path("/v1/enroll/SECRET") == "/v1/enroll/<token>"
    assert loggable_path("/v1/devices/d1/transactions") == "/v1/devices/d1/transactions"
    assert loggable_path("/portal/invite/") == "/portal/invite/"


class LongPollTests(SiteCase):
    """Routes served without klein (WebApp.route(..., long_poll=True))."""

    def poll(self, path: bytes = b"/poll/d1", host: bytes = b"x") -> Connection:
        return self.connect().send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host))

    def test_answers_when_its_deferred_fires_with_our_headers(self):
        connection = self.poll()
        [d] = self.pending
        self.assertEqual(connection.transport.value(), b"")
        d.callback({"transactions": []})
        status, headers, body = connection.response()
        self.assertEqual((status, json.loads(body)), (200, {"transactions": []}))
        self.assertEqual((headers["content-type"], headers["cache-control"], headers["server"]),
                         ("application/json", "no-store", "mfaserver"))
        self.assertFalse(connection.closed)       # kept alive for the next poll

    def test_a_handler_that_answers_at_once_gets_its_params(self):
        status, _, body = self.poll(b"/poll/d-1_X/now?wait=3").response()
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["params"], {"device_id": "d-1_X"})
        self.assertEqual(json.loads(body)["query"], {"wait": ["3"]})

    def test_errors_are_the_same_json_errors_as_on_other_routes(self):
        status, _, body = self.poll(b"/poll/d1/forbidden").response()
        self.assertEqual((status, json.loads(body)["error"]), (403, "forbidden"))
        connection = self.poll()
        self.pending[0].errback(RuntimeError("secret detail"))
        status, _, body = connection.response()
        self.assertEqual((status, json.loads(body)), (500, {
            "error": "internal", "message": "internal server error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        connection = self.poll()
        self.pending[1].callback(["not", "a", "dict"])
        self.assertEqual(connection.response()[0], 500)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_another_method_or_a_parameter_that_is_no_identifier_goes_to_the_router(self):
        connection = self.connect().send(b"POST /poll/d1 HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 0\r\n\r\n")
        status, headers, _ = connection.response()
        self.assertEqual((status, headers["allow"]), (405, "GET"))
        for path in [b"/poll/a.b", b"/poll/" + b"a" * 129, b"/poll/d1/", b"/poll"]:
            status, _, body = self.poll(path).response()
            self.assertEqual((status, json.loads(body)["error"]), (404, "not_found"), path)
        self.assertEqual(self.pending, [])

    def test_a_host_header_that_is_no_host_name_is_400(self):
        status, _, body = self.poll(host=b"a" * 64 + b".example.org").response()
        self.assertEqual((status, json.loads(body)["error"]), (400, "invalid_host"))
        self.assertEqual(self.pending, [])

    def test_hanging_up_withdraws_the_poll(self):
        connection = self.poll()
        connection.hang_up()
        self.assertEqual(self.pending[1:], ["cancelled"])
        self.assertEqual(connection.transport.value(), b"")

    def test_an_answered_request_is_freed_at_once_without_the_cycle_collector(self):
        # A thousand open pages renew their polls every 30 s; requests tied
        # into reference cycles would wait for a full collection (a klein
        # route's do). Refcounting alone must free this one.
        connection = self.poll()
        [request] = connection.protocol._channel.requests
        gone = weakref.ref(request)
        del request
        self.pending[0].callback({"transactions": []})
        self.assertEqual(connection.response()[0], 200)
        self.assertIsNone(gone())

    def test_only_literal_and_name_segments(self):
        for path in ["/poll/<path:rest>", "/poll/<int:n>", "/poll/a<b>"]:
            with self.assertRaises(ValueError):
                self.app.route("GET", path, lambda request: {}, long_poll=True)


# --- Listening -----------------------------------------------------------------------------------

class ListenTests(SynchronousTestCase):
    """listen() on a MemoryReactor: which endpoint, with which TLS options."""

    def setUp(self):
        self.reactor = MemoryReactor()
        self.app, _ = make_app(Clock())
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        self.certs = ldap_server.make_certificates(Path(directory))

    def test_plain_http_listens_on_the_configured_address(self):
        self.successResultOf(listen(self.reactor, WebSettings(listen="127.0.0.1", port=8443),
                                    self.app))
        [(port, site, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, "127.0.0.1"))
        self.assertEqual(self.reactor.sslServers, [])

    def test_tls_listens_with_the_certificate(self):
        settings = WebSettings(listen="0.0.0.0", port=443, tls_certificate=self.certs.cert_file,
                               tls_key=self.certs.key_file)
        self.successResultOf(listen(self.reactor, settings, self.app))
        [(port, site, options, _, interface)] = self.reactor.sslServers
        self.assertEqual((port, interface), (443, "0.0.0.0"))
        self.assertIsNotNone(options.getContext())

    def test_bad_settings_are_refused_before_listening(self):
        with self.assertRaises(ValueError):
            listen(self.reactor, WebSettings(listen="0.0.0.0"), self.app)
        self.assertEqual(self.reactor.tcpServers, [])

    def test_tls_files_that_do_not_load_are_named(self):
        junk = self.certs.ca_file.parent / "junk.pem"
        junk.write_text("not a certificate")
        with self.assertRaisesRegex(ValueError, "^tls_certificate: "):
            listen(self.reactor, WebSettings(tls_certificate=junk,
                                             tls_key=self.certs.key_file), self.app)
        with self.assertRaisesRegex(ValueError, "^tls_key: "):
            listen(self.reactor, WebSettings(tls_certificate=self.certs.cert_file,
                                             tls_key=junk.parent / "missing.pem"), self.app)

    def test_tls_key_must_match_the_certificate(self):
        with self.assertRaisesRegex(ValueError, "^tls_key: does not fit"):
            listen(self.reactor, WebSettings(tls_certificate=self.certs.cert_file,
                                             tls_key=self.certs.wrong_key_file), self.app)


# --- Settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("listen_on", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_plain_http_is_allowed_on_loopback(listen_on):
    WebSettings(listen=listen_on, public_url="http://127.0.0.1:8443").validate()


@pytest.mark.parametrize("listen_on", ["0.0.0.0", "192.0.2.1", "::", "mfa.example.org"])
def test_plain_http_is_refused_off_loopback(listen_on):
    with pytest.raises(ValueError, match="^tls_certificate: required unless listen"):
        WebSettings(listen=listen_on).validate()


def test_tls_allows_any_listen_address(tmp_path):
    WebSettings(listen="0.0.0.0", tls_certificate=tmp_path / "c", tls_key=tmp_path / "k",
                public_url="https://mfa.example.org:8443").validate()


@pytest.mark.parametrize("settings, key", [
    (dict(tls_certificate="c.pem"), "tls_key"),
    (dict(tls_key="k.pem"), "tls_certificate"),
    (dict(public_url="mfa.example.org"), "public_url"),
    (dict(public_url="ftp://mfa.example.org/"), "public_url"),
    (dict(public_url="https://"), "public_url"),
    (dict(public_url="https://mfa.example.org:99999"), "public_url"),
    (dict(public_url="https://user@mfa.example.org"), "public_url"),
    (dict(public_url="https://mfa.example.org/?a=1"), "public_url"),
    (dict(public_url="http://mfa.example.org"), "public_url"),
    (dict(port=70000), "port"),
    (dict(port="8443"), "port"),
    (dict(listen=""), "listen"),
    (dict(max_body=0), "max_body"),
    (dict(request_timeout=0), "request_timeout"),
])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        WebSettings(**settings).validate()


def test_defaults_are_valid():
    WebSettings().validate()
    WebSettings(public_url="https://mfa.example.org:8443").validate()


# --- validation.py -------------------------------------------------------------------------------

def test_check_accepts_matching_values():
    schema = v.object(required={"name": v.string(5, pattern="[a-z]+"), "n": v.integer(0, 3),
                                "on": v.boolean(), "kind": v.enum("a", 1)},
                      optional={"list": v.array(v.integer(), 3), "sub": v.object(extra=True)})
    v.check({"name": "abc", "n": 0, "on": False, "kind": 1, "list": [1, 2],
             "sub": {"anything": [None]}}, schema)
    v.check({"name": "abcde", "n": 3, "on": True, "kind": "a"}, schema)


@pytest.mark.parametrize("value, schema, field, message", [
    (1, v.string(3), "", "must be a string"),
    ("abcd", v.string(3), "", "must be at most 3 characters"),
    ("", v.string(3, min_len=1), "", "must be at least 1 characters"),
    ("ab\n", v.string(3, pattern="[a-z]+"), "", "has an invalid format"),
    (1.0, v.integer(), "", "must be an integer"),
    (False, v.integer(), "", "must be an integer"),
    (-1, v.integer(0), "", "must be at least 0"),
    (1, v.boolean(), "", "must be true or false"),
    (True, v.enum(1, 2), "", "must be one of 1, 2"),
    ({}, v.array(v.integer(), 2), "", "must be an array"),
    ([1, 2, 3], v.array(v.integer(), 2), "", "must have at most 2 items"),
    ([1, "x"], v.array(v.integer(), 2), "[1]", "must be an integer"),
    ([], v.object(), "", "must be an object"),
    ({"a": {"b": [{"c": 1}]}},
     v.object(required={"a": v.object(required={"b": v.array(
         v.object(required={"c": v.string(3)}), 5)})}),
     "a.b[0].c", "must be a string"),
    ({"a": {}}, v.object(required={"a": v.object(required={"b": v.boolean()})}),
     "a.b", "required"),
    ({"x": 1}, v.object(optional={"y": v.integer()}), "x", "unexpected field"),
])
def test_check_names_the_field_that_breaks_the_schema(value, schema, field, message):
    with pytest.raises(BadRequest) as caught:
        v.check(value, schema)
    assert caught.value.field == field
    assert caught.value.status == 400 and caught.value.code == "invalid"
    assert caught.value.message == (f"{field}: {message}" if field else message)
