"""The http, smtp and console gateways, in memory.

The http gateway talks to a `WebhookStandIn` through treq's StubTreq, with a
`Clock` for its deadline; where connecting and TLS matter it uses its own
Agent on a `MemoryReactorClock`, whose connections iosim completes to a `Site`
(wrapped in TLS for https). The smtp gateway runs on a `MemoryReactorClock`
and talks to `fake_smtp.FakeSmtpServer` (Twisted's own ESMTP server) in
memory, STARTTLS and AUTH included. Certificates come from
`ldap_server.make_certificates` (a test CA, a server certificate for
127.0.0.1 and localhost, one for another name, and an unrelated CA). Over real sockets: tests/integration/test_gateways_network.py.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs

import pytest
from treq.testing import StubTreq
from twisted.internet import protocol
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

import ldap_server
from fake_smtp import FakeSmtpServer, Silent, connect_in_memory
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.console import ConsoleGateway
from mfaserver.gateways.http import HttpGateway, HttpGatewaySettings, substitute
from mfaserver.gateways.smtp import SmtpGateway, SmtpSettings
from mfaserver.testing import WebhookStandIn

NUMBER = "+4917012345678"
TEXT = "Your code is 493817"
URL = "https://sms.example.com/"
API_KEY = "key-5ecret-4pi-k3y"
TOKEN = "Bearer t0ken-in-a-header"
SMTP_PASSWORD = "sm7p-pa55word"
NOT_E164 = ["4917012345678", "+49 170 1234567", "+4917012345678\n", "+491701234567890123",
            "+0123456789", "+49170١٢٣٤٥٦٧", "+49170\r\nRCPT TO:<x@y>", ""]

# Twisted's server-side TLS options (the test servers) still pass pyOpenSSL objects.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def logged_text(events) -> str:
    """The formatted events and all their field values, as one string to search.

    Leaves out what the fake SMTP server logs itself (it names the recipients).
    """
    return "\n".join(formatEvent(e) + " " + repr(sorted(e.items(), key=lambda kv: kv[0]))
                     for e in events
                     if not str(e.get("log_system", "")).startswith("FakeSmtpProtocol"))


def exception_text(errors) -> str:
    """Everything an exception could show: its text, repr and what it was raised from."""
    return " ".join(f"{e!s} {e!r} {e.__cause__!r} {e.__context__!r}" for e in errors)


def tls_server_options(cert_file, key_file):
    return PrivateCertificate.loadPEM(cert_file.read_bytes() + key_file.read_bytes()).options()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> ldap_server.Certificates:
    return ldap_server.make_certificates(tmp_path_factory.mktemp("certificates"))


class GatewayTestCase(SynchronousTestCase):
    """Test certificates (``certs``), and how a Deferred fails."""

    @pytest.fixture(autouse=True)
    def _certificates(self, certificates):
        self.certs = certificates

    def gateway_error(self, d) -> GatewayError:
        """The GatewayError that ``d`` has failed with."""
        return self.failureResultOf(d, GatewayError).value


# --- http --------------------------------------------------------------------------------------

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


def http_settings(url: str = URL, **settings) -> HttpGatewaySettings:
    settings.setdefault("fields", {"to": "{to}", "text": "{text}", "api_key": API_KEY})
    settings.setdefault("headers", {"Authorization": TOKEN})
    return HttpGatewaySettings(url=url, **settings)


class HttpGatewayTests(GatewayTestCase):
    """The webhook's side through StubTreq; the deadline on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.web = WebhookStandIn()
        self.stub = StubTreq(self.web)

    def gateway(self, url: str = URL, **settings) -> HttpGateway:
        return HttpGateway(http_settings(url, **settings), self.clock, http_client=self.stub)

    def test_json_post_sends_the_templated_fields_and_headers(self):
        gateway = self.gateway(URL + "send", fields={
            "to": "{to}", "msisdn": "{number}", "message": "MFA: {text}", "api_key": API_KEY,
            "kind": "sms"})
        self.assertIsNone(self.successResultOf(gateway.send_sms(NUMBER, TEXT)))
        [request] = self.web.requests
        self.assertEqual((request.method, request.path), ("POST", "/send"))
        self.assertTrue(request.headers["content-type"].startswith("application/json"))
        self.assertEqual(request.headers["authorization"], TOKEN)
        self.assertEqual(json.loads(request.body), {
            "to": NUMBER, "msisdn": NUMBER[1:], "message": f"MFA: {TEXT}", "api_key": API_KEY,
            "kind": "sms"})

    def test_form_put_is_form_encoded_utf8(self):
        self.successResultOf(self.gateway(format="form", method="PUT").send_sms(
            NUMBER, "Code 123456 – grüße & a=b"))
        [request] = self.web.requests
        self.assertEqual(request.method, "PUT")
        self.assertEqual(request.headers["content-type"], "application/x-www-form-urlencoded")
        self.assertEqual(parse_qs(request.body.decode()), {
            "to": [NUMBER], "text": ["Code 123456 – grüße & a=b"], "api_key": [API_KEY]})

    def test_get_puts_the_fields_in_the_query_string(self):
        self.successResultOf(self.gateway(URL + "sms?fixed=1", method="GET").send_sms(
            NUMBER, "Code 123456 & more"))
        [request] = self.web.requests
        self.assertEqual((request.method, request.body), ("GET", b""))
        self.assertEqual(request.query, {"fixed": ["1"], "to": [NUMBER],
                                         "text": ["Code 123456 & more"], "api_key": [API_KEY]})

    def test_placeholders_in_the_message_are_sent_as_written(self):
        text = "{to} {number} {text} {text.__class__} {0} {subject} %(x)s {{"
        self.successResultOf(self.gateway().send_sms(NUMBER, text))
        self.assertEqual(json.loads(self.web.requests[0].body)["text"], text)

    def test_alert_fills_subject_and_text(self):
        gateway = self.gateway(fields={"title": "{subject}", "body": "{text}", "to": "{to}"})
        self.successResultOf(gateway.send_alert("Fraud report: alice",
                                                "alice denied a push from 192.0.2.7"))
        self.assertEqual(json.loads(self.web.requests[0].body), {
            "title": "Fraud report: alice", "body": "alice denied a push from 192.0.2.7",
            "to": ""})

    def test_non_success_status_is_a_gateway_error(self):
        self.web.status = 503
        error = self.gateway_error(self.gateway().send_sms(NUMBER, TEXT))
        self.assertEqual((str(error), error.status), ("http gateway: status 503", 503))

    def test_custom_success_status(self):
        self.web.status = 299
        self.successResultOf(self.gateway(success_status=(299,)).send_sms(NUMBER, TEXT))
        self.web.status = 200
        error = self.gateway_error(self.gateway(success_status=(299,)).send_sms(NUMBER, TEXT))
        self.assertEqual(error.status, 200)

    def test_redirect_is_not_followed(self):
        self.web.status = 302
        error = self.gateway_error(self.gateway().send_sms(NUMBER, TEXT))
        self.assertEqual(error.status, 302)
        self.assertEqual(len(self.web.requests), 1)  # the API key went nowhere else

    def test_server_that_never_answers_times_out_and_is_hung_up_on(self):
        self.web.hold = True
        d = self.gateway(timeout=0.5).send_sms(NUMBER, TEXT)
        self.clock.advance(0.5)
        self.assertEqual(str(self.gateway_error(d)), "http gateway: no answer within 0.5 seconds")
        self.stub.flush()
        self.assertEqual((len(self.web.requests), self.web.dropped), (1, 1))

    def test_server_that_stalls_in_the_body_times_out_and_is_hung_up_on(self):
        self.web.hold = self.web.partial = True
        d = self.gateway(timeout=0.5).send_sms(NUMBER, TEXT)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertEqual(str(self.gateway_error(d)), "http gateway: no answer within 0.5 seconds")
        self.stub.flush()
        self.assertEqual(self.web.dropped, 1)

    def test_caller_can_cancel(self):
        self.web.hold = True
        d = self.gateway().send_sms(NUMBER, TEXT)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(self.web.dropped, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the deadline went with it

    def test_number_not_in_e164_form_is_refused_before_any_request(self):
        for number in NOT_E164:
            with self.subTest(number=number):
                error = self.gateway_error(self.gateway().send_sms(number, TEXT))
                self.assertIn("E.164", str(error))
        self.assertEqual(self.web.requests, [])

    def test_no_secret_in_logs_or_errors(self):
        errors = []
        with capturedLogs() as events:
            gateway = self.gateway(method="GET")
            self.successResultOf(gateway.send_sms(NUMBER, TEXT))
            self.web.status = 500
            errors.append(self.gateway_error(gateway.send_sms(NUMBER, TEXT)))
            self.web.status, self.web.hold = 200, True
            d = self.gateway(timeout=0.3).send_sms(NUMBER, TEXT)
            self.clock.advance(0.3)
            errors.append(self.gateway_error(d))
            reactor = MemoryReactorClock()
            refused = HttpGateway(http_settings(f"http://127.0.0.1:1/?k={API_KEY}"), reactor)
            d = refused.send_sms(NUMBER, TEXT)
            ConnectionCompleter(reactor).failOnce(Failure(ConnectionRefusedError()))
            reactor.advance(1)
            errors.append(self.gateway_error(d))
        seen = logged_text(events) + exception_text(errors)
        for secret in (API_KEY, TOKEN, "493817", NUMBER[1:]):
            self.assertNotIn(secret, seen)


class HttpConnectionTests(GatewayTestCase):
    """The gateway's own Agent on a MemoryReactorClock: connecting, and TLS."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.web = WebhookStandIn()

    def gateway(self, url: str = URL, **settings) -> HttpGateway:
        return HttpGateway(http_settings(url, **settings), self.reactor)

    def serve_https(self, cert_file, key_file) -> None:
        """The stand-in on port 443 of every host, over TLS with this certificate."""
        site = Site(self.web, reactor=self.reactor)
        self.reactor.listenTCP(443, TLSMemoryBIOFactory(
            tls_server_options(cert_file, key_file), False, site, clock=self.reactor))

    def connect(self, d):
        """Complete the connection the gateway asked for; ``d``, once all is said."""
        ConnectionCompleter(self.reactor).succeedOnce().flush()
        return d

    def test_https_with_the_ca_file_delivers(self):
        self.serve_https(self.certs.cert_file, self.certs.key_file)
        d = self.gateway("https://127.0.0.1/", ca_file=self.certs.ca_file).send_sms(NUMBER, TEXT)
        self.successResultOf(self.connect(d))
        self.assertEqual(len(self.web.requests), 1)

    def test_https_by_host_name_with_the_ca_file_delivers(self):
        self.serve_https(self.certs.cert_file, self.certs.key_file)
        d = self.gateway("https://localhost/", ca_file=self.certs.ca_file).send_sms(NUMBER, TEXT)
        self.successResultOf(self.connect(d))

    def test_https_with_an_untrusted_certificate_fails_before_sending(self):
        self.serve_https(self.certs.cert_file, self.certs.key_file)
        d = self.gateway("https://127.0.0.1/", ca_file=self.certs.other_ca_file).send_sms(
            NUMBER, TEXT)
        self.assertTrue(str(self.gateway_error(self.connect(d))).startswith(
            "http gateway: TLS failed"))
        self.assertEqual(self.web.requests, [])

    def test_https_certificate_for_another_name_fails(self):
        self.serve_https(self.certs.wrong_cert_file, self.certs.wrong_key_file)
        d = self.gateway("https://127.0.0.1/", ca_file=self.certs.ca_file).send_sms(NUMBER, TEXT)
        self.assertEqual(str(self.gateway_error(self.connect(d))),
                         "http gateway: TLS failed: the certificate is not for this host")
        self.assertEqual(self.web.requests, [])

    def test_ca_file_without_certificates_is_refused_at_start(self):
        empty = self.certs.ca_file.parent / "empty.pem"
        empty.write_text("nothing here\n")
        with self.assertRaisesRegex(ValueError, "no PEM certificate"):
            self.gateway(ca_file=empty)

    def test_connection_refused_is_a_gateway_error(self):
        d = self.gateway("http://127.0.0.1:8080/").send_sms(NUMBER, TEXT)
        ConnectionCompleter(self.reactor).failOnce(Failure(ConnectionRefusedError()))
        self.reactor.advance(1)  # the endpoint's next attempt: there is none
        error = self.gateway_error(d)
        self.assertEqual((str(error), error.status), ("http gateway: connection refused", None))

    def test_silent_server_times_out_and_is_hung_up_on(self):
        factory = protocol.Factory.forProtocol(Silent)
        self.reactor.listenTCP(80, factory)
        d = self.gateway("http://127.0.0.1/", timeout=0.5).send_sms(NUMBER, TEXT)
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        self.reactor.advance(0.5)
        self.assertIn("no answer within 0.5 seconds", str(self.gateway_error(d)))
        pump.flush()
        self.assertTrue(pump.server.lost)

    def test_connection_that_never_completes_times_out(self):
        d = self.gateway(timeout=0.5).send_sms(NUMBER, TEXT)
        self.reactor.advance(0.5)
        self.assertIn("no answer within 0.5 seconds", str(self.gateway_error(d)))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)


# --- smtp --------------------------------------------------------------------------------------

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


class SmtpGatewayTests(GatewayTestCase):
    """The gateway on a MemoryReactorClock; `FakeSmtpServer.accept` completes its connection."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.server = FakeSmtpServer()

    def tls_server(self, cert_file=None, key_file=None, **options) -> FakeSmtpServer:
        self.server = FakeSmtpServer(cert_file=cert_file or self.certs.cert_file,
                                     key_file=key_file or self.certs.key_file, **options)
        return self.server

    def gateway(self, **settings) -> SmtpGateway:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("sender", "MFA server <mfa@example.com>")
        settings.setdefault("starttls", "none")
        settings.setdefault("sms_address", "{number}@sms.example.net")
        return SmtpGateway(SmtpSettings(**settings), self.reactor)

    def session(self, d):
        """Let the server take the connection and the session run; ``d`` afterwards."""
        self.server.accept(self.reactor)
        return d

    def test_sms_is_mailed_to_the_templated_address(self):
        self.assertIsNone(self.successResultOf(self.session(
            self.gateway().send_sms(NUMBER, TEXT))))
        [received] = self.server.received
        self.assertEqual((received.sender, received.recipient),
                         ("mfa@example.com", "4917012345678@sms.example.net"))
        message = received.message
        self.assertEqual(message["From"], "MFA server <mfa@example.com>")
        self.assertEqual(message["To"], "4917012345678@sms.example.net")
        self.assertIsNone(message["Subject"])
        self.assertTrue(message["Date"] and message["Message-ID"].endswith("@example.com>"))
        self.assertEqual(message.get_content(), TEXT + "\n")
        self.assertFalse(received.tls)

    def test_e164_placeholder_keeps_the_plus(self):
        self.successResultOf(self.session(self.gateway(
            sms_address="sms+{e164}@gw.example").send_sms(NUMBER, TEXT)))
        self.assertEqual(self.server.received[0].recipient, f"sms+{NUMBER}@gw.example")

    def test_sms_without_sms_address_fails_without_connecting(self):
        error = self.gateway_error(self.gateway(sms_address="").send_sms(NUMBER, TEXT))
        self.assertIn("sms_address", str(error))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_number_not_in_e164_form_is_refused_without_connecting(self):
        for number in NOT_E164:
            with self.subTest(number=number):
                self.assertIn("E.164", str(self.gateway_error(
                    self.gateway().send_sms(number, TEXT))))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_alert_goes_to_every_recipient_with_subject_and_utf8_body(self):
        text = "Benutzer ‚jürgen‘ meldet Betrug.\n.\nZeile nach einem Punkt.\n"
        self.successResultOf(self.session(self.gateway().send_alert(
            ["admin@example.com", "sec@example.com"], "Betrugsmeldung: jürgen", text)))
        self.assertEqual(sorted(r.recipient for r in self.server.received),
                         ["admin@example.com", "sec@example.com"])
        message = self.server.received[0].message
        self.assertEqual(message["Subject"], "Betrugsmeldung: jürgen")
        self.assertEqual(message["To"], "admin@example.com, sec@example.com")
        self.assertEqual(message.get_content_charset(), "utf-8")
        self.assertEqual(message.get_content(), text)
        # Non-ASCII goes encoded: the relay need not offer 8BITMIME.
        self.assertLess(max(self.server.received[0].data), 128)

    def test_line_breaks_in_a_subject_cannot_add_headers(self):
        self.successResultOf(self.session(self.gateway().send_alert(
            ["admin@example.com"], "user x\r\nBcc: evil@example.org", "text")))
        [received] = self.server.received
        self.assertIsNone(received.message["Bcc"])
        self.assertEqual(received.message["Subject"], "user x Bcc: evil@example.org")

    def test_alerts_to_is_an_alert_sink(self):
        sink = self.gateway().alerts_to(["admin@example.com"])
        self.successResultOf(self.session(sink.send_alert("Subject", "Text")))
        self.assertEqual(self.server.received[0].recipient, "admin@example.com")

    def test_alert_is_delivered_when_one_recipient_takes_it(self):
        self.server.refuse.add("gone@example.com")
        self.successResultOf(self.session(self.gateway().send_alert(
            ["gone@example.com", "Admin <admin@example.com>"], "s", "t")))
        [received] = self.server.received
        self.assertEqual(received.recipient, "admin@example.com")
        self.assertEqual(received.message["To"], "gone@example.com, Admin <admin@example.com>")

    def test_alert_to_a_malformed_recipient_fails(self):
        error = self.gateway_error(self.gateway().send_alert(["not an address"], "s", "t"))
        self.assertIn("not an e-mail address", str(error))

    def test_alert_without_recipients_fails(self):
        self.gateway_error(self.gateway().send_alert([], "s", "t"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_refused_recipient_fails_without_naming_it(self):
        self.server.refuse.add("4917012345678@sms.example.net")
        error = self.gateway_error(self.session(self.gateway().send_sms(NUMBER, TEXT)))
        self.assertTrue(str(error).startswith("smtp gateway: server answered"))
        self.assertNotIn(NUMBER[1:], f"{error} {error!r}")

    def test_starttls_required_against_a_server_without_it_fails(self):
        error = self.gateway_error(self.session(self.gateway(starttls="required").send_sms(
            NUMBER, TEXT)))
        self.assertEqual(str(error), "smtp gateway: the server does not offer STARTTLS")
        self.assertEqual(self.server.received, [])

    def test_starttls_optional_without_it_sends_in_clear_to_loopback(self):
        self.successResultOf(self.session(self.gateway(starttls="optional").send_sms(
            NUMBER, TEXT)))
        self.assertFalse(self.server.received[0].tls)

    def test_starttls_with_the_ca_file_delivers_over_tls(self):
        for starttls in ("required", "optional"):
            with self.subTest(starttls=starttls):
                server = self.tls_server()
                self.successResultOf(self.session(self.gateway(
                    starttls=starttls, ca_file=self.certs.ca_file).send_sms(NUMBER, TEXT)))
                [received] = server.received
                self.assertTrue(received.tls)

    def test_starttls_with_an_untrusted_certificate_fails(self):
        for starttls in ("required", "optional"):
            with self.subTest(starttls=starttls):
                server = self.tls_server()
                error = self.gateway_error(self.session(self.gateway(
                    starttls=starttls, ca_file=self.certs.other_ca_file).send_sms(NUMBER, TEXT)))
                self.assertTrue(str(error).startswith("smtp gateway: TLS failed"))
                self.assertEqual(server.received, [])

    def test_starttls_certificate_for_another_name_fails(self):
        self.tls_server(self.certs.wrong_cert_file, self.certs.wrong_key_file)
        error = self.gateway_error(self.session(self.gateway(
            starttls="required", ca_file=self.certs.ca_file).send_sms(NUMBER, TEXT)))
        self.assertEqual(str(error),
                         "smtp gateway: TLS failed: the certificate is not for this host")
        self.assertEqual(self.server.received, [])

    def test_starttls_none_never_starts_tls(self):
        server = self.tls_server()
        self.successResultOf(self.session(self.gateway(starttls="none").send_sms(NUMBER, TEXT)))
        self.assertFalse(server.received[0].tls)

    def test_login_after_starttls(self):
        server = self.tls_server(user="mfa", password=SMTP_PASSWORD)
        self.successResultOf(self.session(self.gateway(
            starttls="required", ca_file=self.certs.ca_file, username="mfa",
            password=SMTP_PASSWORD).send_sms(NUMBER, TEXT)))
        [received] = server.received
        self.assertTrue(received.tls)
        self.assertEqual(received.user, "mfa")

    def test_wrong_password_fails_without_leaking_it(self):
        server = self.tls_server(user="mfa", password="the-right-one")
        with capturedLogs() as events:
            error = self.gateway_error(self.session(self.gateway(
                starttls="required", ca_file=self.certs.ca_file, username="mfa",
                password=SMTP_PASSWORD).send_alert(["a@example.com"], "s", TEXT)))
        self.assertEqual(str(error), "smtp gateway: login refused (535)")
        encoded = [base64.b64encode(p).decode() for p in (
            SMTP_PASSWORD.encode(), b"mfa\0mfa\0" + SMTP_PASSWORD.encode(),
            b"\0mfa\0" + SMTP_PASSWORD.encode())]
        seen = exception_text([error]) + logged_text(events)
        for secret in [SMTP_PASSWORD, "493817", *encoded]:
            self.assertNotIn(secret, seen)
        self.assertEqual(server.received, [])

    def test_login_refused_when_the_server_offers_no_auth(self):
        error = self.gateway_error(self.session(self.gateway(
            starttls="none", username="mfa", password=SMTP_PASSWORD).send_sms(NUMBER, TEXT)))
        self.assertEqual(str(error), "smtp gateway: the server offers no login method we support")

    def test_silent_server_times_out_and_is_hung_up_on(self):
        d = self.gateway(timeout=0.5).send_sms(NUMBER, TEXT)
        silent = Silent()
        pump = connect_in_memory(self.reactor, silent)
        self.reactor.advance(0.499)
        self.assertNoResult(d)
        self.reactor.advance(0.001)
        self.assertEqual(str(self.gateway_error(d)),
                         "smtp gateway: no end of session within 0.5 seconds")
        pump.flush()
        self.assertTrue(silent.lost)

    def test_connection_that_never_completes_times_out(self):
        d = self.gateway(timeout=0.5).send_sms(NUMBER, TEXT)
        self.reactor.advance(0.5)
        self.assertIn("no end of session", str(self.gateway_error(d)))
        self.assertTrue(self.reactor.connectors[0]._disconnected)

    def test_caller_can_cancel_a_session(self):
        d = self.gateway().send_sms(NUMBER, TEXT)
        silent = Silent()
        pump = connect_in_memory(self.reactor, silent)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        pump.flush()
        self.assertTrue(silent.lost)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connection_refused_is_a_gateway_error(self):
        d = self.gateway().send_sms(NUMBER, TEXT)
        ConnectionCompleter(self.reactor).failOnce(Failure(ConnectionRefusedError()))
        self.assertEqual(str(self.gateway_error(d)), "smtp gateway: connection refused")

    def test_no_secret_in_logs(self):
        gateway = self.gateway()
        with capturedLogs() as events:
            self.successResultOf(self.session(gateway.send_sms(NUMBER, TEXT)))
            self.server.refuse.add("4917012345678@sms.example.net")
            self.gateway_error(self.session(gateway.send_sms(NUMBER, TEXT)))
        seen = logged_text(events)
        for secret in ("493817", NUMBER[1:]):
            self.assertNotIn(secret, seen)


# --- console -----------------------------------------------------------------------------------

class ConsoleGatewayTests(SynchronousTestCase):
    def test_logs_the_sms_with_its_text(self):
        with capturedLogs() as events:
            self.assertIsNone(self.successResultOf(ConsoleGateway().send_sms(NUMBER, TEXT)))
        [event] = [e for e in events if e.get("log_namespace") == "mfaserver.gateways.console"]
        self.assertEqual(formatEvent(event), f"SMS to {NUMBER}: {TEXT}")

    def test_logs_alerts_as_warnings(self):
        log = Logger(namespace="test.console")
        with capturedLogs() as events:
            self.assertIsNone(self.successResultOf(
                ConsoleGateway(log).send_alert("Fraud report", "alice denied a push")))
        [event] = [e for e in events if e.get("log_namespace") == "test.console"]
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(formatEvent(event), "Alert: Fraud report: alice denied a push")

    def test_message_braces_are_not_format_fields(self):
        with capturedLogs() as events:
            ConsoleGateway().send_sms(NUMBER, "{text} {0} {x.y}")
        [event] = [e for e in events if e.get("log_namespace") == "mfaserver.gateways.console"]
        self.assertEqual(formatEvent(event), f"SMS to {NUMBER}: {{text}} {{0}} {{x.y}}")
