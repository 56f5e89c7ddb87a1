"""The reference authenticator over real HTTPS: `device_server.DeviceServer` behind a TLS socket.

The unit tests (tests/test_authenticator_cli.py) speak to the same server in
memory; these check what only a real connection shows: certificate checks
against the CA file kept in the store, through ``http.client`` and ``ssl``.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from click.testing import CliRunner

from device_server import DeviceServer, encode_reply
from mfaserver.cli.authenticator import authenticator
from mfaserver.cli.common import CliState

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def serving_https(server: DeviceServer, certs) -> Iterator[DeviceServer]:
    """Serve ``server`` over HTTPS on 127.0.0.1 (the certificate of ``certs``) from a thread."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self._answer(None)

        def do_POST(self):
            self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

        def _answer(self, raw):
            with lock:
                status, reply = server.handle(self.command, self.path, dict(self.headers), raw)
            data = encode_reply(reply)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    server.base = f"https://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


def run(*args):
    return CliRunner().invoke(authenticator, list(args), obj=CliState())


def test_https_with_a_ca_file_kept_in_the_store(ldap_certs, tmp_path):
    with serving_https(DeviceServer(), ldap_certs) as server:
        path = tmp_path / "d.json"
        result = run("enroll", server.enroll_url, "--store", str(path),
                     "--ca-file", str(ldap_certs.ca_file))
        assert result.exit_code == 0, result.output
        assert json.loads(path.read_text())["ca_file"] == str(ldap_certs.ca_file.resolve())
        result = run("pending", "--store", str(path))
        assert result.exit_code == 0, result.output
        assert result.output == "no pending sign-ins\n"


def test_https_refuses_an_untrusted_certificate(ldap_certs, tmp_path):
    with serving_https(DeviceServer(), ldap_certs) as server:
        path = tmp_path / "d.json"
        result = run("enroll", server.enroll_url, "--store", str(path),
                     "--ca-file", str(ldap_certs.other_ca_file))
        assert result.exit_code != 0
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "cannot verify the TLS certificate of 127.0.0.1" in result.output
        assert not path.exists() and server.tokens
