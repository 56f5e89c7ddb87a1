"""End to end: wake-ups by Web Push, from the real daemon to a stand-in push service.

The daemon runs with ``[push] notify = "webpush"``; a device enrolls over
HTTP with a Web Push subscription whose endpoint is the `FakePushService`
on 127.0.0.1 (served by this test's reactor) and whose keys the test made.
radclient sends ``password,push``; the stand-in checks the VAPID token
against the daemon's key and decrypts what it got, as a push service and a
browser would. The device polls and answers over the device API, signed.
"""

from __future__ import annotations

import re
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from fake_push_service import FakePushService
from ldap_server import free_tcp_port
from mfaserver.factors import push_protocol as proto
from mfaserver.gateways.webpush import VapidKey

from .conftest import start_daemon, stop_daemon
from .test_push_e2e import PASSWORD, Login, _http, push_config

pytestmark = pytest.mark.integration

SUBJECT = "mailto:mfa-admin@example.org"
NOTIFY_TIMEOUT = 3


class WebDevice:
    """A web authenticator: a device key, its Web Push subscription, the device API."""

    def __init__(self, daemon, user: str, notify: dict):
        out = daemon.cli("device", "enroll", user, "--no-qr").stdout
        url = re.search(r"http://\S+/v1/enroll/\S+", out).group(0)
        self.base = url.partition("/v1/enroll/")[0]
        token = url.rpartition("/")[2]
        self.key = proto.generate_device_key("p256")
        public_key = proto.public_key_text(self.key)
        now = int(time.time())
        signature = proto.sign(self.key, proto.enroll_message(proto.token_digest(token),
                                                              public_key, now))
        status, body = _http("POST", url, {"public_key": public_key, "timestamp": now,
                                           "signature": signature, "notify": notify})
        assert status == 201, body
        self.device_id = body["device_id"]

    def pending(self) -> list[dict]:
        now, nonce = int(time.time()), proto.new_nonce()
        headers = {"X-MFA-Timestamp": str(now), "X-MFA-Nonce": nonce,
                   "X-MFA-Signature": proto.sign(self.key, proto.poll_message(
                       self.device_id, now, nonce))}
        status, body = _http("GET", f"{self.base}/v1/devices/{self.device_id}/transactions"
                                    "?wait=2", headers=headers)
        assert status == 200, body
        return body["transactions"]

    def wait_for_transaction(self, seconds: float = 15) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = self.pending()
            if found:
                return found[0]
        raise AssertionError("no transaction reached the device")

    def approve(self, txid: str) -> None:
        now = int(time.time())
        signature = proto.sign(self.key, proto.answer_message(self.device_id, txid,
                                                              "approve", now))
        status, body = _http("POST", f"{self.base}/v1/transactions/{txid}",
                             {"device_id": self.device_id, "decision": "approve",
                              "timestamp": now, "signature": signature})
        assert status == 200, body


async def _setup(tmp_path):
    """The stand-in on a port, the daemon, alice, and her device subscribed there."""
    service = FakePushService(reactor, "", subject=SUBJECT)
    port = reactor.listenTCP(0, Site(service), interface="127.0.0.1")
    service.origin = f"http://127.0.0.1:{port.getHost().port}"
    config = push_config(free_tcp_port(), notify="webpush") + (
        f'vapid_subject = "{SUBJECT}"\nnotify_timeout = {NOTIFY_TIMEOUT}\n')
    daemon = await deferToThread(start_daemon, tmp_path, config)
    try:
        await deferToThread(daemon.cli, "user", "add", "alice", "--password-stdin",
                            input=PASSWORD + "\n")
        # The daemon made its VAPID key at start; the browser subscribes with it.
        vapid = VapidKey.load_or_create(tmp_path / "state" / "vapid.pem")
        subscription = service.subscribe(application_server_key=vapid.public_key)
        notify = {"type": "webpush", "url": subscription.endpoint,
                  "keys": subscription.to_json()["keys"]}
        device = await deferToThread(WebDevice, daemon, "alice", notify)
    except BaseException:
        await deferToThread(stop_daemon, daemon)
        await port.stopListening()
        raise
    return service, port, daemon, device, subscription


async def _login_approved(daemon, device: WebDevice) -> tuple[dict, float]:
    """One ``password,push`` login that the device approves; the transaction and
    how long the login took."""
    started = time.monotonic()
    login = Login(daemon, "alice", PASSWORD + ",push")
    txn = await deferToThread(device.wait_for_transaction)
    await deferToThread(device.approve, txn["txid"])
    reply = await deferToThread(login.reply)
    assert reply.code == "Access-Accept", reply.output
    return txn, time.monotonic() - started


async def _settle(seconds: float = 0.5) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_each_login_wakes_the_browser_once_with_a_verified_encrypted_push(tmp_path):
    service, port, daemon, device, subscription = await _setup(tmp_path)
    try:
        for n in (1, 2):
            txn, _ = await _login_approved(daemon, device)
            await _settle()  # best effort, beside the login; a duplicate would come now
            assert service.refused == [], service.refused
            assert len(service.received) == n, daemon.log_text()[-3000:]
            message = service.received[-1]
            assert message.subscription is subscription
            assert message.plaintext == b"A sign-in needs you"
            assert (message.claims["aud"], message.claims["sub"]) == (service.origin, SUBJECT)
            assert message.headers["urgency"] == "high"
            assert int(message.headers["ttl"]) > 0
            # Nothing about the sign-in, even inside the encryption.
            for secret in ("alice", txn["txid"], "127.0.0.1"):
                assert secret.encode() not in message.plaintext
        assert "Traceback" not in daemon.log_text()
    finally:
        await deferToThread(stop_daemon, daemon)
        await port.stopListening()


@pytest.mark.parametrize("trouble", ["down", "refusing", "gone", "silent"])
@pytest_twisted.ensureDeferred
async def test_a_push_service_in_trouble_neither_fails_nor_delays_the_login(tmp_path,
                                                                            trouble):
    service, port, daemon, device, subscription = await _setup(tmp_path)
    try:
        if trouble == "down":
            await port.stopListening()
        elif trouble == "refusing":
            service.status = 503
        elif trouble == "gone":
            service.unsubscribe(subscription)
        else:
            service.hold = True
        _, took = await _login_approved(daemon, device)
        # Approved at once: the login waits for neither the push service nor
        # the notify_timeout.
        assert took < NOTIFY_TIMEOUT, took
        await _settle(NOTIFY_TIMEOUT + 0.5 if trouble == "silent" else 0.5)
        log = daemon.log_text()
        if trouble == "gone":
            assert f"device {device.device_id} of alice has no Web Push subscription" in log
        else:
            assert "a wake-up notification failed" in log
        assert service.received == [] or trouble == "silent"
        assert subscription.endpoint not in log
        # And the next login goes just as well.
        await _login_approved(daemon, device)
    finally:
        await deferToThread(stop_daemon, daemon)
        if trouble != "down":
            await port.stopListening()
