"""Tests for mfaserver.web: a real listener on 127.0.0.1, treq as the client."""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import defer, endpoints, reactor, ssl
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from mfaserver.web import (BadRequest, HttpError, Response, WebApp, WebSettings, listen,
                           validation as v)

MAX_BODY = 1024

TRANSACTION = v.object(
    required={"kind": v.enum("push", "code"), "amount": v.integer(1, 10)},
    optional={"note": v.string(8), "tags": v.array(v.string(4, pattern="[a-z]+"), 2)},
)


def client(**agent_kwargs) -> HTTPClient:
    """A treq client without kept-alive connections, so tests leave none behind."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool, **agent_kwargs))


@dataclass
class Server:
    url: str
    port: int
    pending: list = field(default_factory=list)


def make_app() -> tuple[WebApp, list]:
    app = WebApp(reactor)
    pending: list[defer.Deferred] = []

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

    app.route("GET", "/v1/devices/{device_id}/transactions/{tx_id}", show)
    app.route("POST", "/v1/devices/{device_id}/transactions", create)
    app.route("DELETE", "/v1/devices/{device_id}/transactions/{tx_id}", show)
    app.route("POST", "/callback", callback)
    app.route("GET", "/boom", boom)
    app.route("GET", "/list", lambda request: ["not", "a", "dict"])
    app.route("GET", "/forbidden", forbidden)
    app.route("GET", "/twiml", twiml)
    app.route("GET", "/wait", wait)
    return app, pending


@pytest_twisted.async_yield_fixture
async def server():
    app, pending = make_app()
    settings = WebSettings(listen="127.0.0.1", port=0, max_body=MAX_BODY,
                           request_timeout=0.5)
    port = await listen(reactor, settings, app)
    number = port.getHost().port
    yield Server(f"http://127.0.0.1:{number}", number, pending)
    await port.stopListening()


async def get_json(response, status: int) -> dict:
    assert response.code == status, await response.text()
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    return await response.json()


class _Collect(Protocol):
    """Sends ``data`` on connecting; ``done`` fires with all it got back at close."""

    def __init__(self, data: bytes, close: bool = False):
        self.data, self.close, self.received = data, close, b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)
        if self.close:
            self.transport.loseConnection()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


async def raw_exchange(port: int, data: bytes, close: bool = False) -> bytes:
    """Everything the server sends back for ``data`` until it closes the connection."""
    protocol = _Collect(data, close)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.connectProtocol(endpoint, protocol)
    return await protocol.done


@implementer(IBodyProducer)
class _ChunkedBody:
    """A body of unknown length, so the client sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes):
        self.data = data

    def startProducing(self, consumer):
        for i in range(0, len(self.data), 256):
            consumer.write(self.data[i:i + 256])
        return defer.succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


# --- Routing and responses -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_health_answers_ok(server):
    response = await client().get(server.url + "/health")
    assert await get_json(response, 200) == {"status": "ok"}
    assert response.headers.getRawHeaders("server") == ["mfaserver"]


@pytest_twisted.ensureDeferred
async def test_path_params_and_query_reach_the_handler(server):
    response = await client().get(server.url + "/v1/devices/dev_1-A/transactions/tx9?a=1&a=2&b=")
    body = await get_json(response, 200)
    assert body["params"] == {"device_id": "dev_1-A", "tx_id": "tx9"}
    assert body["query"] == {"a": ["1", "2"], "b": [""]}


@pytest_twisted.ensureDeferred
async def test_url_is_rebuilt_as_the_client_used_it(server):
    response = await client().get(
        server.url + "/v1/devices/d/transactions/t?x=%20y&z=1",
        headers={"Host": "mfa.example.org:8443"})
    body = await get_json(response, 200)
    assert body["url"] == "http://mfa.example.org:8443/v1/devices/d/transactions/t?x=%20y&z=1"


@pytest.mark.parametrize("path", [
    "/nowhere", "/v1/devices/a.b/transactions/t", "/v1/devices/d/transactions/" + "x" * 129,
    "/v1/devices/%2e%2e/transactions/t", "/health/",
])
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(server, path):
    response = await client().get(server.url + path)
    assert (await get_json(response, 404))["error"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(server):
    response = await client().put(server.url + "/v1/devices/d/transactions/t", data=b"")
    assert (await get_json(response, 405))["error"] == "method_not_allowed"
    assert response.headers.getRawHeaders("allow") == ["DELETE, GET"]


@pytest_twisted.ensureDeferred
async def test_http_error_gives_its_status_and_code(server):
    response = await client().get(server.url + "/forbidden")
    assert await get_json(response, 403) == {"error": "forbidden", "message": "not yours"}


@pytest_twisted.ensureDeferred
async def test_handler_exception_is_500_without_traceback(server):
    failures = []

    def observer(event):
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    try:
        response = await client().get(server.url + "/boom")
        text = await response.text()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert response.code == 500
    assert json.loads(text)["error"] == "internal"
    assert "secret detail" not in text and "Traceback" not in text and "boom" not in text
    assert [f.type for f in failures] == [RuntimeError]


@pytest_twisted.ensureDeferred
async def test_handler_returning_something_else_is_500(server):
    response = await client().get(server.url + "/list")
    assert (await get_json(response, 500))["error"] == "internal"


@pytest_twisted.ensureDeferred
async def test_async_handler_can_answer_raw_bytes(server):
    response = await client().get(server.url + "/twiml")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/xml; charset=utf-8"]
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert await response.content() == b"<Response><Say>hi</Say></Response>"


@pytest_twisted.ensureDeferred
async def test_deferred_handler_is_cancelled_when_the_client_hangs_up(server):
    await raw_exchange(server.port, b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n", close=True)
    for _ in range(50):
        if server.pending:
            break
        await deferLater(reactor, 0.01)
    for _ in range(50):
        if len(server.pending) == 2:
            break
        await deferLater(reactor, 0.01)
    assert server.pending[1:] == ["cancelled"]


# --- JSON bodies ---------------------------------------------------------------------------------

async def post_json(server, body: bytes, content_type: str = "application/json"):
    return await client().post(server.url + "/v1/devices/d1/transactions", data=body,
                               headers={"Content-Type": content_type})


@pytest_twisted.ensureDeferred
async def test_valid_json_body_is_accepted(server):
    response = await post_json(server, b'{"kind": "push", "amount": 3, "tags": ["ab"]}')
    assert await get_json(response, 201) == {
        "created": {"kind": "push", "amount": 3, "tags": ["ab"]}, "device": "d1"}


@pytest_twisted.ensureDeferred
async def test_json_with_charset_is_accepted(server):
    response = await post_json(server, b'{"kind": "code", "amount": 1}',
                               "application/json; charset=utf-8")
    assert response.code == 201


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
@pytest_twisted.ensureDeferred
async def test_json_with_another_content_type_is_415(server, content_type):
    response = await post_json(server, b'{"kind": "push", "amount": 3}', content_type)
    assert (await get_json(response, 415))["error"] == "unsupported_media_type"


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", b'"text"', b"\xff{}", b'{"a": NaN}', b""])
@pytest_twisted.ensureDeferred
async def test_malformed_json_or_not_an_object_is_400(server, body):
    response = await post_json(server, body)
    assert (await get_json(response, 400))["error"] == "invalid_json"


@pytest.mark.parametrize("body, message", [
    (b'{"amount": 3}', "kind: required"),
    (b'{"kind": "sms", "amount": 3}', "kind: must be one of 'push', 'code'"),
    (b'{"kind": "push", "amount": 11}', "amount: must be at most 10"),
    (b'{"kind": "push", "amount": true}', "amount: must be an integer"),
    (b'{"kind": "push", "amount": 1, "extra": 1}', "extra: unexpected field"),
    (b'{"kind": "push", "amount": 1, "tags": ["ok", "BAD"]}', "tags[1]: has an invalid format"),
])
@pytest_twisted.ensureDeferred
async def test_schema_violation_is_400_naming_the_field(server, body, message):
    response = await post_json(server, body)
    assert await get_json(response, 400) == {"error": "invalid", "message": message}


# --- Forms ---------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_form_keeps_blank_values_and_order(server):
    body = b"To=%2B15550001111&Digits=&CallSid=CA1&Digits=2&Note=a+b%26c"
    response = await client().post(
        server.url + "/callback?attempt=1", data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    result = await get_json(response, 200)
    assert result["pairs"] == [["To", "+15550001111"], ["Digits", ""], ["CallSid", "CA1"],
                               ["Digits", "2"], ["Note", "a b&c"]]
    assert result["fields"] == {"To": "+15550001111", "Digits": "", "CallSid": "CA1",
                                "Note": "a b&c"}
    assert result["url"] == f"{server.url}/callback?attempt=1"


@pytest_twisted.ensureDeferred
async def test_form_with_another_content_type_is_415(server):
    response = await client().post(server.url + "/callback", data=b"a=1",
                                   headers={"Content-Type": "application/json"})
    assert (await get_json(response, 415))["error"] == "unsupported_media_type"


# --- Limits --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_body_at_the_limit_is_read(server):
    body = json.dumps({"kind": "push", "amount": 1, "note": "x"}).encode()
    body += b" " * (MAX_BODY - len(body))
    response = await post_json(server, body)
    assert response.code == 201


@pytest_twisted.ensureDeferred
async def test_body_over_the_limit_is_413(server):
    response = await post_json(server, b" " * (MAX_BODY + 1))
    assert (await get_json(response, 413))["error"] == "too_large"


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_413(server):
    response = await client().post(server.url + "/v1/devices/d1/transactions",
                                   data=_ChunkedBody(b" " * (MAX_BODY + 1)),
                                   headers={"Content-Type": "application/json"})
    assert (await get_json(response, 413))["error"] == "too_large"


@pytest_twisted.ensureDeferred
async def test_chunked_body_under_the_limit_is_read(server):
    response = await client().post(server.url + "/v1/devices/d1/transactions",
                                   data=_ChunkedBody(b'{"kind": "push", "amount": 2}'),
                                   headers={"Content-Type": "application/json"})
    assert response.code == 201


@pytest_twisted.ensureDeferred
async def test_large_content_length_is_refused_before_the_body_is_sent(server):
    answer = await raw_exchange(server.port, (
        b"POST /v1/devices/d1/transactions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: 100000000\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too_large"


@pytest_twisted.ensureDeferred
async def test_slow_request_times_out_with_408(server):
    answer = await raw_exchange(server.port, b"POST /callback HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "timeout"


# --- TLS -----------------------------------------------------------------------------------------

def self_signed(directory):
    """A self-signed certificate for 127.0.0.1 and its key, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file, cert_pem


@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_https_urls(tmp_path):
    cert_file, key_file, cert_pem = self_signed(tmp_path)
    app, _ = make_app()
    settings = WebSettings(listen="127.0.0.1", port=0, tls_certificate=cert_file,
                           tls_key=key_file)
    port = await listen(reactor, settings, app)
    try:
        trusting = client(contextFactory=BrowserLikePolicyForHTTPS(
            trustRoot=ssl.Certificate.loadPEM(cert_pem)))
        url = f"https://127.0.0.1:{port.getHost().port}"
        response = await trusting.get(url + "/v1/devices/d/transactions/t?q=1")
        body = await get_json(response, 200)
        assert body["url"] == url + "/v1/devices/d/transactions/t?q=1"
        # A client that does not trust the certificate gets no answer.
        with pytest.raises(Exception):
            await client().get(url + "/health")
    finally:
        await port.stopListening()


def test_tls_files_that_do_not_load_are_named(tmp_path):
    cert_file, key_file, _ = self_signed(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    app, _ = make_app()
    with pytest.raises(ValueError, match="^tls_certificate: "):
        listen(reactor, WebSettings(tls_certificate=tmp_path / "junk.pem",
                                    tls_key=key_file), app)
    with pytest.raises(ValueError, match="^tls_key: "):
        listen(reactor, WebSettings(tls_certificate=cert_file,
                                    tls_key=tmp_path / "missing.pem"), app)


def test_tls_key_must_match_the_certificate(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert_a, _, _ = self_signed(tmp_path / "a")
    _, key_b, _ = self_signed(tmp_path / "b")
    app, _ = make_app()
    with pytest.raises(ValueError, match="^tls_key: does not fit"):
        listen(reactor, WebSettings(tls_certificate=cert_a, tls_key=key_b), app)


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


# --- Routes --------------------------------------------------------------------------------------

def test_a_route_cannot_be_given_twice():
    app = WebApp(reactor)
    with pytest.raises(ValueError):
        app.route("GET", "/health", lambda request: {})
    with pytest.raises(ValueError):
        app.route("GET", "health", lambda request: {})


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
