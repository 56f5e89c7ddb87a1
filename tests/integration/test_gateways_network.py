"""The gateways over real sockets on 127.0.0.1: what the in-memory unit tests cannot show.

TLS through the reactor's own TCP transports (an https webhook, SMTP
STARTTLS with a login), and connections the operating system refuses. Every
other behaviour is tested in memory (tests/test_gateways.py, test_twilio.py,
test_gateway_contracts.py).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.ssl import PrivateCertificate
from twisted.web.server import Site

import ldap_server
from fake_smtp import FakeSmtpServer
from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, unused_port
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.http import HttpGateway, HttpGatewaySettings
from mfaserver.gateways.smtp import SmtpGateway, SmtpSettings
from mfaserver.gateways.twilio import TwilioGateway, TwilioSettings
from mfaserver.testing import WebhookStandIn

pytestmark = [
    pytest.mark.integration,
    # Twisted's server-side TLS options (the test servers) still pass pyOpenSSL objects.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]

NUMBER = "+4917012345678"
TEXT = "Your code is 493817"
SMTP_PASSWORD = "sm7p-pa55word"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> ldap_server.Certificates:
    return ldap_server.make_certificates(tmp_path_factory.mktemp("certificates"))


async def gateway_error(d) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await d
    return info.value


@pytest_twisted.async_yield_fixture
async def https(certs):
    """A `WebhookStandIn` on https://127.0.0.1 with the test CA's certificate."""
    web = WebhookStandIn()
    options = PrivateCertificate.loadPEM(
        certs.cert_file.read_bytes() + certs.key_file.read_bytes()).options()
    site = Site(web)
    site.log = lambda request: None
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    web.url = f"https://127.0.0.1:{port.getHost().port}/"
    yield web
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_webhook_with_the_ca_file_delivers(https, certs):
    gateway = HttpGateway(HttpGatewaySettings(url=https.url, ca_file=certs.ca_file), reactor)
    assert await gateway.send_sms(NUMBER, TEXT) is None
    assert len(https.requests) == 1


@pytest_twisted.ensureDeferred
async def test_https_webhook_with_an_untrusted_certificate_fails_before_sending(https, certs):
    gateway = HttpGateway(HttpGatewaySettings(url=https.url, ca_file=certs.other_ca_file),
                          reactor)
    error = await gateway_error(gateway.send_sms(NUMBER, TEXT))
    assert str(error).startswith("http gateway: TLS failed")
    assert https.requests == []


@pytest_twisted.ensureDeferred
async def test_smtp_starttls_and_login_over_a_socket(certs):
    server = FakeSmtpServer(reactor, cert_file=certs.cert_file, key_file=certs.key_file,
                            user="mfa", password=SMTP_PASSWORD)
    try:
        gateway = SmtpGateway(SmtpSettings(
            host="127.0.0.1", port=server.port, sender="mfa@example.com", starttls="required",
            ca_file=certs.ca_file, username="mfa", password=SMTP_PASSWORD,
            sms_address="{number}@sms.example.net"), reactor)
        assert await gateway.send_sms(NUMBER, TEXT) is None
        [received] = server.received
        assert received.tls and received.user == "mfa"
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_fails_each_gateway_at_once():
    port = unused_port()
    twilio = TwilioGateway(TwilioSettings(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_number=FROM_NUMBER,
        api_base=f"http://127.0.0.1:{port}", timeout=30), reactor)
    http = HttpGateway(HttpGatewaySettings(url=f"http://127.0.0.1:{port}/", timeout=30), reactor)
    smtp = SmtpGateway(SmtpSettings(host="127.0.0.1", port=port, sender="mfa@example.com",
                                    starttls="none", timeout=30,
                                    sms_address="{number}@sms.example.net"), reactor)
    started = reactor.seconds()
    errors = [await gateway_error(g.send_sms(NUMBER, TEXT)) for g in (twilio, http, smtp)]
    assert reactor.seconds() - started < 10  # refused, not timed out
    assert str(errors[0]).startswith("twilio unreachable")
    assert str(errors[1]) == "http gateway: connection refused"
    assert str(errors[2]) == "smtp gateway: connection refused"
    await twilio.close()
