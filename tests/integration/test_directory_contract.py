"""The `Directory` contract (tests/directory_contract.py) over the real directories.

`LdapDirectory` against slapd (its worker processes started once for the
module) and `RadiusDirectory` against FreeRADIUS, on the real reactor run by
pytest-twisted.
The in-memory directories run the same contract in
tests/test_directory_contract.py.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred

import ldap_server
from directory_contract import (
    DirectoryContract,
    GroupContract,
    PhoneContract,
    UnavailableContract,
)
from freeradius_server import free_udp_port, running_freeradius
from mfaserver.auth.interfaces import InvalidCredentials
from mfaserver.config import LdapConfig, UpstreamRadiusConfig
from mfaserver.directory.libldap import LibldapDirectory as LdapDirectory
from mfaserver.directory.radius import RadiusDirectory

pytestmark = pytest.mark.integration

RADIUS_SECRET = b"contract-test-secret-0123456789"


class OnTheReactor:
    """The real directories: `directory` and `unavailable_directory` are the module's
    fixtures named by `fixture` and `down_fixture`; pytest-twisted waits for
    the Deferred that `run` returns, while the reactor runs."""

    fixture: str
    down_fixture: str

    @pytest.fixture(autouse=True)
    def _directories(self, request):
        self._up = request.getfixturevalue(self.fixture)
        self._down = request.getfixturevalue(self.down_fixture)

    def directory(self):
        return self._up

    def unavailable_directory(self):
        return self._down

    def run(self, test):
        return Deferred.fromCoroutine(test)


def stopped_after(directory):
    """Yield the started ``directory`` (for a fixture), then stop it."""
    yield directory
    pytest_twisted.blockon(defer.maybeDeferred(directory.stop))


# --- LDAP -----------------------------------------------------------------------------------------

def started_ldap(*servers: str) -> LdapDirectory:
    config = LdapConfig(servers=servers, base_dn=ldap_server.BASE_DN,
                        bind_dn=ldap_server.SERVICE_DN,
                        bind_password=ldap_server.SERVICE_PASSWORD, timeout=1.0, pool_size=2)
    directory = LdapDirectory(config, reactor, groups=[ldap_server.VPN_GROUP], processes=1)
    pytest_twisted.blockon(directory.start())
    return directory


@pytest.fixture(scope="module")
def ldap(slapd):
    yield from stopped_after(started_ldap(slapd.url))


@pytest.fixture(scope="module")
def ldap_down():
    yield from stopped_after(started_ldap(ldap_server.dead_url()))


class TestLdapDirectory(OnTheReactor, DirectoryContract, UnavailableContract, PhoneContract,
                        GroupContract):
    user = "user000"
    password = ldap_server.user_password(0)
    unknown = "nobody"
    phone = ldap_server.MOBILE
    group = ldap_server.VPN_GROUP
    fixture, down_fixture = "ldap", "ldap_down"


# --- Upstream RADIUS ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def freeradius(tmp_path_factory):
    users = 'alice   Cleartext-Password := "alice-password"\n'
    with running_freeradius(tmp_path_factory.mktemp("freeradius"), RADIUS_SECRET,
                            users) as server:
        yield server


def started_radius(*servers: tuple[str, int]) -> RadiusDirectory:
    directory = RadiusDirectory(UpstreamRadiusConfig(servers=servers, secret=RADIUS_SECRET,
                                                     timeout=0.2, retries=0), reactor)
    directory.start()
    return directory


@pytest.fixture(scope="module")
def radius(freeradius):
    yield from stopped_after(started_radius(freeradius.address))


@pytest.fixture(scope="module")
def radius_down():
    yield from stopped_after(started_radius(("127.0.0.1", free_udp_port())))  # nobody there


class TestRadiusDirectory(OnTheReactor, DirectoryContract, UnavailableContract):
    # An upstream RADIUS server answers Access-Reject alike for an unknown user
    # and a wrong password: RadiusDirectory cannot tell them apart. It keeps no
    # phone numbers and no groups (it passes reply attributes through instead).
    unknown_user_error = InvalidCredentials
    fixture, down_fixture = "radius", "radius_down"
