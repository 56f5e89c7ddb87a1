"""Shared fixtures: real OpenLDAP servers on 127.0.0.1 (see `ldap_server`).

The slapd fixtures skip their tests where slapd is not installed
(``scripts/test`` installs it).
"""

from __future__ import annotations

import pytest

import ldap_server


def _require_slapd() -> None:
    if not ldap_server.available():
        pytest.skip("slapd or its schema files are not installed (apt-get install slapd)")


@pytest.fixture(scope="session")
def ldap_certs(tmp_path_factory) -> ldap_server.Certificates:
    """A CA, server certificates signed by it, and an unrelated CA."""
    return ldap_server.make_certificates(tmp_path_factory.mktemp("ldap-certs"))


@pytest.fixture(scope="session")
def slapd(tmp_path_factory, ldap_certs):
    """slapd with the test data, its certificate valid for 127.0.0.1."""
    _require_slapd()
    server = ldap_server.start_slapd(
        tmp_path_factory.mktemp("slapd"),
        tls=(ldap_certs.ca_file, ldap_certs.cert_file, ldap_certs.key_file))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slapd_wrong_name(tmp_path_factory, ldap_certs):
    """A second slapd whose certificate (from the right CA) names another host."""
    _require_slapd()
    server = ldap_server.start_slapd(
        tmp_path_factory.mktemp("slapd-wrong-name"),
        tls=(ldap_certs.ca_file, ldap_certs.wrong_cert_file, ldap_certs.wrong_key_file))
    yield server
    server.stop()


@pytest.fixture
def hung_ldap():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = ldap_server.HungServer()
    yield server
    server.close()


@pytest.fixture
def closing_ldap():
    """A TCP server on 127.0.0.1 that closes every connection at once."""
    server = ldap_server.HungServer(hang=False)
    yield server
    server.close()


@pytest.fixture
def ldap_proxy(slapd):
    """A relay to slapd's plain port that records what clients send."""
    proxy = ldap_server.RecordingProxy(slapd.port)
    yield proxy
    proxy.close()
