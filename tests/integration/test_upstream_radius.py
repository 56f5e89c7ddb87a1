"""The upstream RADIUS directory against a real FreeRADIUS 3.2 on 127.0.0.1."""

from __future__ import annotations

import contextlib
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

from freeradius_server import running_freeradius
from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials
from mfaserver.config import UpstreamRadiusConfig
from mfaserver.directory.radius import RadiusDirectory

pytestmark = pytest.mark.integration

SECRET = b"upstream-integration-secret-0123456789"


@pytest.fixture(scope="module")
def freeradius(tmp_path_factory):
    with running_freeradius(tmp_path_factory.mktemp("freeradius"), SECRET) as server:
        yield server


def config(*servers, **changes) -> UpstreamRadiusConfig:
    values = dict(servers=servers, secret=SECRET, timeout=0.5, retries=1,
                  pass_through=("Class", "Framed-IP-Address", "Session-Timeout"),
                  nas_identifier="mfaserver-test", retry_dead_after=30.0)
    values.update(changes)
    return UpstreamRadiusConfig(**values)


@contextlib.asynccontextmanager
async def started(cfg: UpstreamRadiusConfig):
    directory = RadiusDirectory(cfg, reactor)
    directory.start()
    try:
        yield directory
    finally:
        await directory.stop()


class SilentServer(DatagramProtocol):
    """A UDP socket that takes requests and never answers."""

    def __init__(self):
        self.received: list[bytes] = []

    def datagramReceived(self, data, addr):
        self.received.append(data)


@pytest_twisted.ensureDeferred
async def test_accept_passes_through_the_configured_attributes(freeradius):
    async with started(config(freeradius.address)) as directory:
        principal = await directory.authenticate("alice", "alice-password")
    assert principal.username == "alice"
    # Filter-Id is in the Accept but not in pass_through.
    assert principal.attributes == (
        ("Class", b"vpn-users"),
        ("Framed-IP-Address", bytes((10, 1, 2, 3))),
        ("Session-Timeout", struct.pack("!I", 3600)),
    )


@pytest_twisted.ensureDeferred
async def test_only_configured_names_pass_through(freeradius):
    async with started(config(freeradius.address, pass_through=("Filter-Id",))) as directory:
        principal = await directory.authenticate("alice", "alice-password")
        nothing = await directory.authenticate("bob", "bob-password")
    assert principal.attributes == (("Filter-Id", b"staff"),)
    assert nothing.attributes == (("Filter-Id", b"guests"),)


@pytest_twisted.ensureDeferred
async def test_multi_block_utf8_password(freeradius):
    async with started(config(freeradius.address)) as directory:
        principal = await directory.authenticate("carol", "pässwörd, longer than one block")
    assert principal.attributes == (("Class", b"carol"),)


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_rejected(freeradius):
    async with started(config(freeradius.address)) as directory:
        with pytest.raises(InvalidCredentials) as caught:
            await directory.authenticate("alice", "wrong-password")
    assert caught.value.detail == "upstream reject"


@pytest_twisted.ensureDeferred
async def test_upstream_challenge_is_refused(freeradius):
    async with started(config(freeradius.address)) as directory:
        with pytest.raises(InvalidCredentials) as caught:
            await directory.authenticate("dave", "dave-password")
    assert caught.value.detail == "upstream challenge not supported"


@pytest_twisted.ensureDeferred
async def test_silent_first_server_fails_over_to_freeradius(freeradius):
    silent = SilentServer()
    port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    try:
        dead = ("127.0.0.1", port.getHost().port)
        async with started(config(dead, freeradius.address)) as directory:
            started_at = reactor.seconds()
            principal = await directory.authenticate("alice", "alice-password")
            waited = reactor.seconds() - started_at
            # The next login goes straight to the live server.
            await directory.authenticate("bob", "bob-password")
    finally:
        await port.stopListening()
    assert principal.username == "alice"
    assert len(silent.received) == 2          # the request and one retransmission
    assert silent.received[0] == silent.received[1]
    assert 1.0 <= waited < 3.0


@pytest_twisted.ensureDeferred
async def test_no_server_answering_is_unavailable(freeradius):
    silent = SilentServer()
    port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    try:
        async with started(config(("127.0.0.1", port.getHost().port), retries=0)) as directory:
            with pytest.raises(DirectoryUnavailable):
                await directory.authenticate("alice", "alice-password")
    finally:
        await port.stopListening()
    assert len(silent.received) == 1


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_not_trusted(freeradius):
    # FreeRADIUS drops the request (bad Message-Authenticator): no answer, fail closed.
    cfg = config(freeradius.address, secret=b"not-the-shared-secret-at-all", retries=0)
    async with started(cfg) as directory:
        with pytest.raises(DirectoryUnavailable):
            await directory.authenticate("alice", "alice-password")
