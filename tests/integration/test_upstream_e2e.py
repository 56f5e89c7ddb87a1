"""End to end with an upstream RADIUS server checking the password:
radclient -> daemon -> real FreeRADIUS, TOTP from the store, attributes passed through."""

from __future__ import annotations

import base64
import shutil
import time

import pytest

import freeradius_server
from mfaserver.factors import oath

from .conftest import start_daemon, stop_daemon

pytestmark = pytest.mark.integration

SEED = bytes(range(60, 80))
UPSTREAM_SECRET = b"upstream-shared-secret-0123456789"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    if not shutil.which(freeradius_server.FREERADIUS):
        pytest.fail("freeradius is missing: run scripts/test, which installs it")
    with freeradius_server.running_freeradius(tmp_path_factory.mktemp("upstream"),
                                              UPSTREAM_SECRET) as upstream:
        d = start_daemon(tmp_path_factory.mktemp("upstream-e2e"), freeradius_server.daemon_config(
            upstream, ("Class", "Framed-IP-Address")))
        for name in ("alice", "bob"):
            d.cli("user", "add", name, "--no-password")
            d.cli("token", "add", name, "--type", "totp", "--no-qr",
                  "--secret", base64.b32encode(SEED).decode())
        yield d
        stop_daemon(d)


def code(offset: int = 0) -> str:
    return oath.hotp(SEED, oath.totp_step(time.time()) + offset)


def test_upstream_password_plus_code_passes_chosen_attributes_through(daemon):
    reply = daemon.login("alice", f"alice-password,{code()}")
    assert reply.code == "Access-Accept", reply.output
    assert reply.get("Class") in ("vpn-users", "0x76706e2d7573657273")
    assert reply.get("Framed-IP-Address") == "10.1.2.3"
    assert reply.get("Filter-Id") is None  # not in pass_through


def test_upstream_reject_is_a_reject(daemon):
    reply = daemon.login("bob", f"wrong-password,{code()}")
    assert reply.code == "Access-Reject"


def test_challenge_flow_keeps_the_upstream_attributes(daemon):
    challenge = daemon.login("bob", "bob-password")
    assert challenge.code == "Access-Challenge", challenge.output
    reply = daemon.login("bob", code(), f"State = {challenge.get('State')}")
    assert reply.code == "Access-Accept", reply.output
