"""The web listener on real sockets: what only a real port shows (TLS, a port in use).

Everything else about mfaserver.web is tested in memory (tests/test_web.py).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor, ssl
from twisted.internet.error import CannotListenError
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

import ldap_server
from mfaserver.web import WebApp, WebSettings, listen

pytestmark = pytest.mark.integration


def client(**agent_kwargs) -> HTTPClient:
    """A treq client without kept-alive connections, so tests leave none behind."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool, **agent_kwargs))


def make_app() -> WebApp:
    app = WebApp(reactor)
    app.route("GET", "/url", lambda request: {"url": request.url})
    return app


@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_https_urls(tmp_path):
    certs = ldap_server.make_certificates(tmp_path)
    settings = WebSettings(listen="127.0.0.1", port=0, tls_certificate=certs.cert_file,
                           tls_key=certs.key_file)
    port = await listen(reactor, settings, make_app())
    try:
        trusting = client(contextFactory=BrowserLikePolicyForHTTPS(
            trustRoot=ssl.Certificate.loadPEM(certs.ca_file.read_bytes())))
        url = f"https://127.0.0.1:{port.getHost().port}"
        response = await trusting.get(url + "/url?q=1")
        assert response.code == 200
        assert await response.json() == {"url": url + "/url?q=1"}
        # A client that does not trust the certificate gets no answer.
        with pytest.raises(Exception):
            await client().get(url + "/health")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_fails_to_listen():
    first = await listen(reactor, WebSettings(listen="127.0.0.1", port=0), make_app())
    try:
        taken = WebSettings(listen="127.0.0.1", port=first.getHost().port)
        with pytest.raises(CannotListenError):
            await listen(reactor, taken, make_app())
    finally:
        await first.stopListening()
