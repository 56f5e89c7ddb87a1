"""The http, smtp and console gateways, over loopback on the real reactor.

The http gateway talks to a recording twisted.web server, the smtp gateway to
Twisted's own ESMTP server (`fake_smtp`), with STARTTLS and AUTH where a test
needs them; certificates come from the ``ldap_certs`` fixture (a test CA, a
server certificate for 127.0.0.1, and an unrelated CA).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet import reactor as real_reactor
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from fake_smtp import FakeSmtpServer
from ldap_server import free_tcp_port
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.console import ConsoleGateway
from mfaserver.gateways.http import HttpGateway, HttpGatewaySettings, substitute
from mfaserver.gateways.smtp import SmtpGateway, SmtpSettings

NUMBER = "+4917012345678"
TEXT = "Your code is 493817"

# Twisted's server-side TLS options (the test servers) still pass pyOpenSSL objects.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
API_KEY = "key-5ecret-4pi-k3y"
TOKEN = "Bearer t0ken-in-a-header"
SMTP_PASSWORD = "sm7p-pa55word"


async def gateway_error(d) -> GatewayError:
    """The GatewayError that ``d`` fails with."""
    with pytest.raises(GatewayError) as info:
        await d
    return info.value


@pytest.fixture
def log_events():
    """Every log event emitted during the test."""
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def logged_text(events) -> str:
    """The formatted events and all their field values, as one string to search.

    Leaves out what the fake SMTP server logs itself (it names the recipients).
    """
    return "\n".join(formatEvent(e) + " " + repr(sorted(e.items(), key=lambda kv: kv[0]))
                     for e in events
                     if not str(e.get("log_system", "")).startswith("FakeSmtpProtocol"))


# --- A recording web server and a silent TCP server ---------------------------------------------

@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes


class _Recorder(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests: list[Recorded] = []
        self.status = 200
        self.hang = False
        self.pending = []

    def render(self, request):
        self.requests.append(Recorded(
            request.method.decode(), request.path.decode(),
            parse_qs(urlsplit(request.uri.decode()).query),
            {k.decode().lower(): v[0].decode()
             for k, v in request.requestHeaders.getAllRawHeaders()},
            request.content.read()))
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        if 300 <= self.status < 400:
            request.setHeader(b"location", self.url.encode() + b"elsewhere")
        return b'{"result": "whatever"}'


class WebServer:
    """twisted.web on 127.0.0.1, plain or HTTPS; `requests` records what arrived."""

    def __init__(self, tls=None):
        self.resource = _Recorder()
        site = Site(self.resource)
        site.log = lambda request: None  # no access log: the query holds test secrets
        site.noisy = False
        if tls is None:
            self._port = real_reactor.listenTCP(0, site, interface="127.0.0.1")
            scheme = "http"
        else:
            self._port = real_reactor.listenSSL(0, site, tls, interface="127.0.0.1")
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._port.getHost().port}/"
        self.resource.url = self.url

    @property
    def requests(self) -> list[Recorded]:
        return self.resource.requests

    def close(self):
        for request in self.resource.pending:
            if request.channel is not None:  # else the client hung up already
                request.channel.transport.abortConnection()
        return defer.maybeDeferred(self._port.stopListening)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never says or reads anything."""

    def __init__(self):
        self.connections = []
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        factory.noisy = False
        outer = self

        class Silent(protocol.Protocol):
            def connectionMade(self):
                outer.connections.append(self)
                self.transport.pauseProducing()

        factory.protocol = Silent
        self._port = real_reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._port.getHost().port

    def close(self):
        for connection in self.connections:
            connection.transport.abortConnection()
        return defer.maybeDeferred(self._port.stopListening)


@pytest_twisted.async_yield_fixture
async def web():
    server = WebServer()
    yield server
    await server.close()


@pytest_twisted.async_yield_fixture
async def silent():
    server = SilentServer()
    yield server
    await server.close()


def http_gateway(url: str, **settings) -> HttpGateway:
    settings.setdefault("fields", {"to": "{to}", "text": "{text}", "api_key": API_KEY})
    settings.setdefault("headers", {"Authorization": TOKEN})
    return HttpGateway(HttpGatewaySettings(url=url, **settings), real_reactor)


# --- http --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_http_json_post_sends_the_templated_fields_and_headers(web):
    gateway = http_gateway(web.url + "send", fields={
        "to": "{to}", "msisdn": "{number}", "message": "MFA: {text}", "api_key": API_KEY,
        "kind": "sms"})
    assert await gateway.send_sms(NUMBER, TEXT) is None
    [request] = web.requests
    assert (request.method, request.path) == ("POST", "/send")
    assert request.headers["content-type"].startswith("application/json")
    assert request.headers["authorization"] == TOKEN
    assert json.loads(request.body) == {
        "to": NUMBER, "msisdn": NUMBER[1:], "message": f"MFA: {TEXT}", "api_key": API_KEY,
        "kind": "sms"}


@pytest_twisted.ensureDeferred
async def test_http_form_post_is_form_encoded_utf8(web):
    gateway = http_gateway(web.url, format="form", method="PUT")
    await gateway.send_sms(NUMBER, "Code 123456 – grüße & a=b")
    [request] = web.requests
    assert request.method == "PUT"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request.body.decode()) == {
        "to": [NUMBER], "text": ["Code 123456 – grüße & a=b"], "api_key": [API_KEY]}


@pytest_twisted.ensureDeferred
async def test_http_get_puts_the_fields_in_the_query_string(web):
    gateway = http_gateway(web.url + "sms?fixed=1", method="GET")
    await gateway.send_sms(NUMBER, "Code 123456 & more")
    [request] = web.requests
    assert request.method == "GET"
    assert request.body == b""
    assert request.query == {"fixed": ["1"], "to": [NUMBER], "text": ["Code 123456 & more"],
                             "api_key": [API_KEY]}


@pytest_twisted.ensureDeferred
async def test_http_placeholders_in_the_message_are_sent_as_written(web):
    gateway = http_gateway(web.url)
    text = "{to} {number} {text} {text.__class__} {0} {subject} %(x)s {{"
    await gateway.send_sms(NUMBER, text)
    assert json.loads(web.requests[0].body)["text"] == text


def test_substitution_replaces_only_the_known_names_in_one_pass():
    values = {"to": "{text}", "text": "{to}.__class__"}
    assert substitute("{to}|{text}|{text.__class__}|{other}|{{to}}", values) == \
        "{text}|{to}.__class__|{text.__class__}|{other}|{{text}}"


@pytest.mark.parametrize("template", ["{text.__class__}", "{txt}", "{0}", "{to.real}", "{}"])
def test_http_unknown_placeholder_in_a_template_is_refused(template):
    with pytest.raises(ValueError, match="unknown placeholder"):
        HttpGatewaySettings(url="https://sms.example.com/", fields={"text": template})


@pytest.mark.parametrize("settings, message", [
    ({"url": "ftp://x/"}, "url"), ({"url": "https://x/", "method": "DELETE"}, "method"),
    ({"url": "https://x/", "format": "xml"}, "format"),
    ({"url": "https://x/", "timeout": 0}, "timeout"),
    ({"url": "https://x/", "fields": {"n": 1}}, "must be text"),
    ({"url": "https://x/", "success_status": []}, "success_status"),
])
def test_http_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        HttpGatewaySettings(**settings)


def test_http_settings_repr_hides_fields_and_headers():
    settings = HttpGatewaySettings(url="https://x/", fields={"k": API_KEY},
                                   headers={"Authorization": TOKEN})
    assert API_KEY not in repr(settings) and TOKEN not in repr(settings)


@pytest_twisted.ensureDeferred
async def test_http_alert_fills_subject_and_text(web):
    gateway = http_gateway(web.url, fields={"title": "{subject}", "body": "{text}", "to": "{to}"})
    await gateway.send_alert("Fraud report: alice", "alice denied a push from 192.0.2.7")
    assert json.loads(web.requests[0].body) == {
        "title": "Fraud report: alice", "body": "alice denied a push from 192.0.2.7", "to": ""}


@pytest_twisted.ensureDeferred
async def test_http_non_success_status_is_a_gateway_error(web):
    web.resource.status = 503
    failure = await gateway_error(http_gateway(web.url).send_sms(NUMBER, TEXT))
    assert str(failure) == "http gateway: status 503"
    assert failure.status == 503


@pytest_twisted.ensureDeferred
async def test_http_custom_success_status(web):
    web.resource.status = 299
    await http_gateway(web.url, success_status=(299,)).send_sms(NUMBER, TEXT)
    web.resource.status = 200
    failure = await gateway_error(http_gateway(web.url, success_status=(299,))
                                  .send_sms(NUMBER, TEXT))
    assert failure.status == 200


@pytest_twisted.ensureDeferred
async def test_http_redirect_is_not_followed(web):
    web.resource.status = 302
    failure = await gateway_error(http_gateway(web.url).send_sms(NUMBER, TEXT))
    assert failure.status == 302
    assert len(web.requests) == 1  # the API key went nowhere else


@pytest_twisted.ensureDeferred
async def test_http_server_that_never_answers_times_out(web):
    web.resource.hang = True
    started = time.monotonic()
    failure = await gateway_error(http_gateway(web.url, timeout=0.5).send_sms(NUMBER, TEXT))
    assert 0.4 < time.monotonic() - started < 3
    assert str(failure) == "http gateway: no answer within 0.5 seconds"
    assert len(web.requests) == 1


@pytest_twisted.ensureDeferred
async def test_http_silent_server_times_out(silent):
    failure = await gateway_error(
        http_gateway(f"http://127.0.0.1:{silent.port}/", timeout=0.5).send_sms(NUMBER, TEXT))
    assert "no answer within 0.5 seconds" in str(failure)


@pytest_twisted.ensureDeferred
async def test_http_connection_refused_is_a_gateway_error():
    gateway = http_gateway(f"http://127.0.0.1:{free_tcp_port()}/")
    failure = await gateway_error(gateway.send_sms(NUMBER, TEXT))
    assert str(failure) == "http gateway: connection refused"
    assert failure.status is None


@pytest.mark.parametrize("number", ["4917012345678", "+49 170 1234567", "+4917012345678\n",
                                    "+491701234567890123", "+0123456789", "+49170١٢٣٤٥٦٧"])
@pytest_twisted.ensureDeferred
async def test_http_number_not_in_e164_form_is_refused_before_any_request(web, number):
    failure = await gateway_error(http_gateway(web.url).send_sms(number, TEXT))
    assert "E.164" in str(failure)
    assert web.requests == []


@pytest_twisted.ensureDeferred
async def test_http_caller_can_cancel(web):
    web.resource.hang = True
    d = http_gateway(web.url).send_sms(NUMBER, TEXT)
    while not web.requests:
        await task.deferLater(real_reactor, 0.01, lambda: None)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d


@pytest_twisted.ensureDeferred
async def test_http_no_secret_in_logs_or_errors(web, log_events):
    failures = []
    gateway = http_gateway(web.url, method="GET")
    await gateway.send_sms(NUMBER, TEXT)
    web.resource.status = 500
    failures.append(await gateway_error(gateway.send_sms(NUMBER, TEXT)))
    web.resource.status, web.resource.hang = 200, True
    failures.append(await gateway_error(http_gateway(web.url, timeout=0.3)
                                        .send_sms(NUMBER, TEXT)))
    failures.append(await gateway_error(
        http_gateway(f"http://127.0.0.1:{free_tcp_port()}/?k={API_KEY}").send_sms(NUMBER, TEXT)))
    seen = logged_text(log_events) + " ".join(
        f"{f!s} {f!r} {f.__cause__!r} {f.__context__!r}" for f in failures)
    for secret in (API_KEY, TOKEN, "493817", NUMBER[1:]):
        assert secret not in seen


# --- https -------------------------------------------------------------------------------------

def tls_options(certs):
    pem = certs.cert_file.read_bytes() + certs.key_file.read_bytes()
    return PrivateCertificate.loadPEM(pem).options()


@pytest_twisted.async_yield_fixture
async def https(ldap_certs):
    server = WebServer(tls=tls_options(ldap_certs))
    yield server
    await server.close()


@pytest_twisted.ensureDeferred
async def test_https_with_the_ca_file_delivers(https, ldap_certs):
    await http_gateway(https.url, ca_file=ldap_certs.ca_file).send_sms(NUMBER, TEXT)
    assert len(https.requests) == 1


@pytest_twisted.ensureDeferred
async def test_https_with_an_untrusted_certificate_fails_before_sending(https, ldap_certs):
    gateway = http_gateway(https.url, ca_file=ldap_certs.other_ca_file)
    failure = await gateway_error(gateway.send_sms(NUMBER, TEXT))
    assert str(failure).startswith("http gateway: TLS failed")
    assert https.requests == []


@pytest_twisted.ensureDeferred
async def test_https_certificate_for_another_name_fails(ldap_certs):
    server = WebServer(tls=PrivateCertificate.loadPEM(
        ldap_certs.wrong_cert_file.read_bytes() + ldap_certs.wrong_key_file.read_bytes()
    ).options())
    try:
        failure = await gateway_error(
            http_gateway(server.url, ca_file=ldap_certs.ca_file).send_sms(NUMBER, TEXT))
        assert str(failure) == "http gateway: TLS failed: the certificate is not for this host"
        assert server.requests == []
    finally:
        await server.close()


def test_ca_file_without_certificates_is_refused_at_start(tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        http_gateway("https://sms.example.com/", ca_file=empty)


# --- smtp --------------------------------------------------------------------------------------

@pytest_twisted.async_yield_fixture
async def smtp_server():
    """A plain (no STARTTLS) SMTP server; pass options through `make_smtp` instead."""
    server = FakeSmtpServer(real_reactor)
    yield server
    await server.close()


@pytest_twisted.async_yield_fixture
async def make_smtp():
    servers = []

    def make(**options):
        server = FakeSmtpServer(real_reactor, **options)
        servers.append(server)
        return server
    yield make
    for server in servers:
        await server.close()


def smtp_gateway(port: int, **settings) -> SmtpGateway:
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("sender", "MFA server <mfa@example.com>")
    settings.setdefault("starttls", "none")
    settings.setdefault("sms_address", "{number}@sms.example.net")
    return SmtpGateway(SmtpSettings(port=port, **settings), real_reactor)


@pytest_twisted.ensureDeferred
async def test_smtp_sms_is_mailed_to_the_templated_address(smtp_server):
    assert await smtp_gateway(smtp_server.port).send_sms(NUMBER, TEXT) is None
    [received] = smtp_server.received
    assert received.sender == "mfa@example.com"
    assert received.recipient == "4917012345678@sms.example.net"
    message = received.message
    assert message["From"] == "MFA server <mfa@example.com>"
    assert message["To"] == "4917012345678@sms.example.net"
    assert message["Subject"] is None
    assert message["Date"] and message["Message-ID"].endswith("@example.com>")
    assert message.get_content() == TEXT + "\n"
    assert not received.tls


@pytest_twisted.ensureDeferred
async def test_smtp_e164_placeholder_keeps_the_plus(smtp_server):
    await smtp_gateway(smtp_server.port, sms_address="sms+{e164}@gw.example").send_sms(
        NUMBER, TEXT)
    assert smtp_server.received[0].recipient == f"sms+{NUMBER}@gw.example"


@pytest_twisted.ensureDeferred
async def test_smtp_sms_without_sms_address_fails(smtp_server):
    failure = await gateway_error(
        smtp_gateway(smtp_server.port, sms_address="").send_sms(NUMBER, TEXT))
    assert "sms_address" in str(failure)


@pytest_twisted.ensureDeferred
async def test_smtp_number_not_in_e164_form_is_refused(smtp_server):
    failure = await gateway_error(
        smtp_gateway(smtp_server.port).send_sms("+49170\r\nRCPT TO:<x@y>", TEXT))
    assert "E.164" in str(failure)
    assert smtp_server.received == []


@pytest_twisted.ensureDeferred
async def test_smtp_alert_goes_to_every_recipient_with_subject_and_utf8_body(smtp_server):
    gateway = smtp_gateway(smtp_server.port)
    text = "Benutzer ‚jürgen‘ meldet Betrug.\n.\nZeile nach einem Punkt.\n"
    await gateway.send_alert(["admin@example.com", "sec@example.com"],
                             "Betrugsmeldung: jürgen", text)
    assert sorted(r.recipient for r in smtp_server.received) == [
        "admin@example.com", "sec@example.com"]
    message = smtp_server.received[0].message
    assert message["Subject"] == "Betrugsmeldung: jürgen"
    assert message["To"] == "admin@example.com, sec@example.com"
    assert message.get_content_charset() == "utf-8"
    assert message.get_content() == text
    # Non-ASCII goes encoded: the relay need not offer 8BITMIME.
    assert max(smtp_server.received[0].data) < 128


@pytest_twisted.ensureDeferred
async def test_smtp_line_breaks_in_a_subject_cannot_add_headers(smtp_server):
    await smtp_gateway(smtp_server.port).send_alert(
        ["admin@example.com"], "user x\r\nBcc: evil@example.org", "text")
    [received] = smtp_server.received
    assert received.message["Bcc"] is None
    assert received.message["Subject"] == "user x Bcc: evil@example.org"


@pytest_twisted.ensureDeferred
async def test_smtp_alerts_to_is_an_alert_sink(smtp_server):
    sink = smtp_gateway(smtp_server.port).alerts_to(["admin@example.com"])
    await sink.send_alert("Subject", "Text")
    assert smtp_server.received[0].recipient == "admin@example.com"


@pytest_twisted.ensureDeferred
async def test_smtp_alert_is_delivered_when_one_recipient_takes_it(smtp_server):
    smtp_server.refuse.add("gone@example.com")
    await smtp_gateway(smtp_server.port).send_alert(
        ["gone@example.com", "Admin <admin@example.com>"], "s", "t")
    [received] = smtp_server.received
    assert received.recipient == "admin@example.com"
    assert received.message["To"] == "gone@example.com, Admin <admin@example.com>"


@pytest_twisted.ensureDeferred
async def test_smtp_alert_to_a_malformed_recipient_fails(smtp_server):
    failure = await gateway_error(smtp_gateway(smtp_server.port).send_alert(
        ["not an address"], "s", "t"))
    assert "not an e-mail address" in str(failure)


@pytest_twisted.ensureDeferred
async def test_smtp_alert_without_recipients_fails(smtp_server):
    await gateway_error(smtp_gateway(smtp_server.port).send_alert([], "s", "t"))


@pytest_twisted.ensureDeferred
async def test_smtp_refused_recipient_fails_without_naming_it(smtp_server):
    smtp_server.refuse.add("4917012345678@sms.example.net")
    failure = await gateway_error(smtp_gateway(smtp_server.port).send_sms(NUMBER, TEXT))
    assert str(failure).startswith("smtp gateway: server answered")
    assert NUMBER[1:] not in f"{failure} {failure!r}"


@pytest_twisted.ensureDeferred
async def test_smtp_starttls_required_against_a_server_without_it_fails(smtp_server):
    failure = await gateway_error(
        smtp_gateway(smtp_server.port, starttls="required").send_sms(NUMBER, TEXT))
    assert str(failure) == "smtp gateway: the server does not offer STARTTLS"
    assert smtp_server.received == []


@pytest_twisted.ensureDeferred
async def test_smtp_starttls_optional_without_it_sends_in_clear_to_loopback(smtp_server):
    await smtp_gateway(smtp_server.port, starttls="optional").send_sms(NUMBER, TEXT)
    assert not smtp_server.received[0].tls


@pytest.mark.parametrize("starttls", ["required", "optional"])
@pytest_twisted.ensureDeferred
async def test_smtp_starttls_with_the_ca_file_delivers_over_tls(make_smtp, ldap_certs, starttls):
    server = make_smtp(cert_file=ldap_certs.cert_file, key_file=ldap_certs.key_file)
    await smtp_gateway(server.port, starttls=starttls, ca_file=ldap_certs.ca_file).send_sms(
        NUMBER, TEXT)
    [received] = server.received
    assert received.tls


@pytest.mark.parametrize("starttls", ["required", "optional"])
@pytest_twisted.ensureDeferred
async def test_smtp_starttls_with_an_untrusted_certificate_fails(make_smtp, ldap_certs, starttls):
    server = make_smtp(cert_file=ldap_certs.cert_file, key_file=ldap_certs.key_file)
    failure = await gateway_error(smtp_gateway(
        server.port, starttls=starttls, ca_file=ldap_certs.other_ca_file).send_sms(NUMBER, TEXT))
    assert str(failure).startswith("smtp gateway: TLS failed")
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_smtp_starttls_certificate_for_another_name_fails(make_smtp, ldap_certs):
    server = make_smtp(cert_file=ldap_certs.wrong_cert_file, key_file=ldap_certs.wrong_key_file)
    failure = await gateway_error(smtp_gateway(
        server.port, starttls="required", ca_file=ldap_certs.ca_file).send_sms(NUMBER, TEXT))
    assert str(failure) == "smtp gateway: TLS failed: the certificate is not for this host"
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_smtp_starttls_none_never_starts_tls(make_smtp, ldap_certs):
    server = make_smtp(cert_file=ldap_certs.cert_file, key_file=ldap_certs.key_file)
    await smtp_gateway(server.port, starttls="none").send_sms(NUMBER, TEXT)
    assert not server.received[0].tls


@pytest_twisted.ensureDeferred
async def test_smtp_login_after_starttls(make_smtp, ldap_certs):
    server = make_smtp(cert_file=ldap_certs.cert_file, key_file=ldap_certs.key_file,
                       user="mfa", password=SMTP_PASSWORD)
    await smtp_gateway(server.port, starttls="required", ca_file=ldap_certs.ca_file,
                       username="mfa", password=SMTP_PASSWORD).send_sms(NUMBER, TEXT)
    [received] = server.received
    assert received.tls and received.user == "mfa"


@pytest_twisted.ensureDeferred
async def test_smtp_wrong_password_fails_without_leaking_it(make_smtp, ldap_certs, log_events):
    server = make_smtp(cert_file=ldap_certs.cert_file, key_file=ldap_certs.key_file,
                       user="mfa", password="the-right-one")
    failure = await gateway_error(smtp_gateway(
        server.port, starttls="required", ca_file=ldap_certs.ca_file,
        username="mfa", password=SMTP_PASSWORD).send_alert(["a@example.com"], "s", TEXT))
    assert str(failure) == "smtp gateway: login refused (535)"
    encoded = [base64.b64encode(p).decode() for p in (
        SMTP_PASSWORD.encode(), b"mfa\0mfa\0" + SMTP_PASSWORD.encode(),
        b"\0mfa\0" + SMTP_PASSWORD.encode())]
    seen = f"{failure} {failure!r} {failure.__cause__!r} {failure.__context__!r} " + \
        logged_text(log_events)
    for secret in [SMTP_PASSWORD, "493817", *encoded]:
        assert secret not in seen
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_smtp_login_refused_when_the_server_offers_no_auth(smtp_server):
    failure = await gateway_error(smtp_gateway(
        smtp_server.port, starttls="none", username="mfa",
        password=SMTP_PASSWORD).send_sms(NUMBER, TEXT))
    assert str(failure) == "smtp gateway: the server offers no login method we support"


@pytest_twisted.ensureDeferred
async def test_smtp_silent_server_times_out(silent):
    started = time.monotonic()
    failure = await gateway_error(smtp_gateway(silent.port, timeout=0.5).send_sms(NUMBER, TEXT))
    assert 0.4 < time.monotonic() - started < 3
    assert str(failure) == "smtp gateway: no end of session within 0.5 seconds"


@pytest_twisted.ensureDeferred
async def test_smtp_connection_refused_is_a_gateway_error():
    failure = await gateway_error(smtp_gateway(free_tcp_port()).send_sms(NUMBER, TEXT))
    assert str(failure) == "smtp gateway: connection refused"


@pytest_twisted.ensureDeferred
async def test_smtp_no_secret_in_logs(smtp_server, log_events):
    gateway = smtp_gateway(smtp_server.port)
    await gateway.send_sms(NUMBER, TEXT)
    smtp_server.refuse.add("4917012345678@sms.example.net")
    await gateway_error(gateway.send_sms(NUMBER, TEXT))
    seen = logged_text(log_events)
    for secret in ("493817", NUMBER[1:]):
        assert secret not in seen


@pytest.mark.parametrize("settings, message", [
    ({"host": "mail.example.com", "starttls": "none"}, "only allowed to a relay on this"),
    ({"host": "192.0.2.1", "starttls": "optional", "username": "u", "password": "p"},
     "needs starttls"),
    ({"host": "127.0.0.1", "username": "u"}, "go together"),
    ({"host": "127.0.0.1", "starttls": "maybe"}, "starttls must be"),
    ({"host": "127.0.0.1", "sender": "nobody"}, "sender"),
    ({"host": "127.0.0.1", "sms_address": "{to}@sms.example.net"}, "unknown placeholder"),
    ({"host": "127.0.0.1", "sms_address": "{number}"}, "e-mail address"),
    ({"host": "127.0.0.1", "port": 0}, "port"),
])
def test_smtp_bad_settings_are_refused(settings, message):
    settings.setdefault("sender", "mfa@example.com")
    with pytest.raises(ValueError, match=message):
        SmtpSettings(**settings)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "::1"])
def test_smtp_starttls_none_is_allowed_to_this_machine(host):
    SmtpSettings(host=host, sender="mfa@example.com", starttls="none",
                 username="u", password="p")


def test_smtp_settings_repr_hides_the_password():
    settings = SmtpSettings(host="mail.example.com", sender="mfa@example.com",
                            username="u", password=SMTP_PASSWORD)
    assert SMTP_PASSWORD not in repr(settings)


# --- console -----------------------------------------------------------------------------------

def test_console_logs_the_sms_with_its_text(log_events):
    d = ConsoleGateway().send_sms(NUMBER, TEXT)
    assert d.called and d.result is None
    [event] = [e for e in log_events if e.get("log_namespace") == "mfaserver.gateways.console"]
    assert formatEvent(event) == f"SMS to {NUMBER}: {TEXT}"


def test_console_logs_alerts_as_warnings(log_events):
    log = Logger(namespace="test.console")
    d = ConsoleGateway(log).send_alert("Fraud report", "alice denied a push")
    assert d.called and d.result is None
    [event] = [e for e in log_events if e.get("log_namespace") == "test.console"]
    assert event["log_level"].name == "warn"
    assert formatEvent(event) == "Alert: Fraud report: alice denied a push"


def test_console_message_braces_are_not_format_fields(log_events):
    ConsoleGateway().send_sms(NUMBER, "{text} {0} {x.y}")
    [event] = [e for e in log_events if e.get("log_namespace") == "mfaserver.gateways.console"]
    assert formatEvent(event) == f"SMS to {NUMBER}: {{text}} {{0}} {{x.y}}"
