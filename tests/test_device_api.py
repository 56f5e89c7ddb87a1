"""The push device API (docs/device-api.rst) over a real store and a Clock.

Every request goes over HTTP in memory (treq's `StubTreq` over the app's
resource), on a `task.Clock`, so long polls and expiry are deterministic.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.model import AuditEntry, Verdict
from mfaserver.factors import push_protocol as proto
from mfaserver.factors.push import PushTransactions
from mfaserver.store import Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import run_now
from mfaserver.web.devices import MAX_POLLS_PER_DEVICE, DeviceApi
from mfaserver.web.server import WebApp

NOW = 1_700_000_000
BASE = "https://mfa.example.com"


def open_store() -> tuple[Store, Path]:
    tmp = Path(tempfile.mkdtemp())
    store = Store.open(tmp / "db.sqlite3", tmp / "seed.key")
    return store, tmp


def add_token(db: Store, user: str, now: float, lifetime: float = 600) -> str:
    token = proto.new_enrollment_token()
    db.add_enrollment(user, proto.token_digest(token), now + lifetime, now=now)
    return token


def enroll_body(token: str, key, timestamp: int, notify: dict | None = None,
                public_key: str | None = None) -> dict:
    public_key = public_key or proto.public_key_text(key)
    message = proto.enroll_message(proto.token_digest(token), proto.public_key_text(key),
                                   timestamp)
    body = {"public_key": public_key, "timestamp": timestamp,
            "signature": proto.sign(key, message)}
    if notify is not None:
        body["notify"] = notify
    return body


def poll_headers(device_id: str, key, timestamp: int, nonce: str | None = None) -> dict:
    nonce = nonce or proto.new_nonce()
    return {"x-mfa-timestamp": str(timestamp), "x-mfa-nonce": nonce,
            "x-mfa-signature": proto.sign(key, proto.poll_message(device_id, timestamp, nonce))}


def answer_body(txid: str, device_id: str, key, decision: str, timestamp: int, *,
                signed_txid: str | None = None, signed_decision: str | None = None,
                number: str | None = None) -> dict:
    message = proto.answer_message(device_id, signed_txid or txid,
                                   signed_decision or decision, timestamp)
    body = {"device_id": device_id, "decision": decision, "timestamp": timestamp,
            "signature": proto.sign(key, message)}
    if number is not None:
        body["number"] = number
    return body


class DeviceApiCase(SynchronousTestCase):
    """A DeviceApi routed into a WebApp, over a real Store, on a Clock at NOW.

    Requests go through StubTreq; their answers arrive when it is flushed:
    `result` and `assertPending` flush before they look.
    """

    number_matching = False

    def setUp(self):
        self.db, tmp = open_store()
        self.addCleanup(shutil.rmtree, tmp, True)
        self.addCleanup(self.db.close)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.push = PushTransactions(self.clock)
        self.frauds: list[tuple[str, str]] = []
        self.audits: list[AuditEntry] = []
        self.api = DeviceApi(ThreadedStore(self.db, run_now), self.push, self.clock,
                             report_fraud=self.report_fraud, audit=self.audit)
        self.app = WebApp(self.clock)
        self.api.add_routes(self.app)
        self.http = StubTreq(self.app.resource())
        for name in ("alice", "bob"):
            self.db.add_user(name, password_hash=None, phone=None, now=NOW)

    def report_fraud(self, user: str, client: str) -> Deferred:
        self.frauds.append((user, client))
        return defer.succeed(None)

    def audit(self, entry: AuditEntry) -> Deferred:
        self.audits.append(entry)
        return defer.succeed(None)

    @property
    def now(self) -> int:
        return int(self.clock.seconds())

    # --- driving requests ---

    def request(self, method: str, path: str, *, body=None, headers=None,
                query=None) -> Deferred:
        """Send one request; fires with (status, JSON body) of the answer, which
        must be JSON with our headers."""
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        d = self.http.request(method, BASE + path, data=data, headers=headers, params=query)
        d.addCallback(self._answer)
        self.http.flush()
        return d

    def _answer(self, response) -> Deferred:
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        return response.json().addCallback(lambda body: (response.code, body))

    def result(self, d: Deferred):
        """What ``d`` fired with, once what the server wrote has reached the client."""
        self.http.flush()
        return self.successResultOf(d)

    def assertPending(self, d: Deferred) -> None:
        """The request of ``d`` has no answer yet, even with everything flushed."""
        self.http.flush()
        self.assertNoResult(d)

    def call(self, method: str, path: str, **kwargs) -> tuple[int, dict]:
        return self.result(self.request(method, path, **kwargs))

    def assertError(self, result, status: int, code: str) -> None:
        self.assertEqual((result[0], result[1].get("error")), (status, code), result)

    # --- the steps of the protocol ---

    def enroll(self, user: str = "alice", kind: str = "ed25519", notify=None):
        """Enroll a new device for ``user``; its id and private key."""
        key = proto.generate_device_key(kind)
        token = add_token(self.db, user, self.clock.seconds())
        status, data = self.call("POST", f"/v1/enroll/{token}",
                                 body=enroll_body(token, key, self.now, notify))
        self.assertEqual((status, data["user"]), (201, user))
        return data["device_id"], key

    def poll(self, device_id: str, key, *, timestamp: int | None = None,
             nonce: str | None = None, wait: str | None = "0", headers=None) -> Deferred:
        headers = headers or poll_headers(device_id, key,
                                          self.now if timestamp is None else timestamp, nonce)
        query = {} if wait is None else {"wait": [wait]}
        return self.request("GET", f"/v1/devices/{device_id}/transactions",
                            headers=headers, query=query)

    def poll_now(self, *args, **kwargs) -> tuple[int, dict]:
        return self.result(self.poll(*args, **kwargs))

    def answer(self, txid: str, device_id: str, key, decision: str = "approve", *,
               timestamp: int | None = None, body=None, **kwargs) -> tuple[int, dict]:
        body = body or answer_body(txid, device_id, key, decision,
                                   self.now if timestamp is None else timestamp, **kwargs)
        return self.call("POST", f"/v1/transactions/{txid}", body=body)

    def open(self, user: str = "alice", timeout: float = 60, **kwargs):
        kwargs.setdefault("client", "vpn")
        kwargs.setdefault("nas_ip", "192.0.2.10")
        kwargs.setdefault("calling_station_id", "203.0.113.7")
        if self.number_matching:
            kwargs.setdefault("number", proto.new_match_number())
        return self.push.open(user, timeout=timeout, **kwargs)


class EnrollTests(DeviceApiCase):
    def test_enrollment_stores_the_device_and_returns_its_id_and_user(self):
        key = proto.generate_device_key()
        token = add_token(self.db, "alice", NOW)
        status, data = self.call("POST", f"/v1/enroll/{token}",
                                 body=enroll_body(token, key, NOW))
        self.assertEqual(status, 201)
        self.assertEqual(set(data), {"device_id", "user"})
        self.assertEqual(data["user"], "alice")
        self.assertRegex(data["device_id"], r"\A[A-Za-z0-9_-]{22}\Z")
        device = self.db.get_device(data["device_id"])
        self.assertEqual((device.user, device.public_key, device.notify_type, device.notify_url),
                         ("alice", proto.public_key_text(key), None, None))
        self.assertEqual([d.id for d in self.db.list_devices("alice")], [data["device_id"]])

    def test_p256_device_enrolls(self):
        device_id, key = self.enroll(kind="p256")
        self.assertEqual(self.db.get_device(device_id).public_key, proto.public_key_text(key))

    def test_unknown_token_is_404(self):
        token = proto.new_enrollment_token()
        result = self.call("POST", f"/v1/enroll/{token}",
                           body=enroll_body(token, proto.generate_device_key(), NOW))
        self.assertError(result, 404, "not_found")

    def test_expired_token_is_410(self):
        token = add_token(self.db, "alice", NOW, lifetime=600)
        self.clock.advance(600)
        result = self.call("POST", f"/v1/enroll/{token}",
                           body=enroll_body(token, proto.generate_device_key(), self.now))
        self.assertError(result, 410, "expired")
        self.assertEqual(self.db.list_devices("alice"), [])

    def test_token_is_used_up_by_the_first_enrollment_second_use_is_410(self):
        token = add_token(self.db, "alice", NOW)
        first = self.call("POST", f"/v1/enroll/{token}",
                          body=enroll_body(token, proto.generate_device_key(), NOW))
        self.assertEqual(first[0], 201)
        again = self.call("POST", f"/v1/enroll/{token}",
                          body=enroll_body(token, proto.generate_device_key(), NOW))
        self.assertError(again, 410, "expired")
        self.assertEqual(len(self.db.list_devices("alice")), 1)

    def test_bad_key_text_is_400_invalid_request(self):
        token = add_token(self.db, "alice", NOW)
        key = proto.generate_device_key()
        for bad in ["ed25519:AAAA", "rsa:" + proto.public_key_text(key)[8:], "nonsense",
                    proto.public_key_text(key) + "=", "p256:" + proto.public_key_text(key)[8:]]:
            body = enroll_body(token, key, NOW, public_key=bad)
            result = self.call("POST", f"/v1/enroll/{token}", body=body)
            self.assertError(result, 400, "invalid_request")

    def test_malformed_body_is_400_invalid_request(self):
        token = add_token(self.db, "alice", NOW)
        good = enroll_body(token, proto.generate_device_key(), NOW)
        for body in [b"{not json", b"[]", {k: v for k, v in good.items() if k != "signature"},
                     {**good, "timestamp": "1700000000"}, {**good, "extra": 1}]:
            result = self.call("POST", f"/v1/enroll/{token}", body=body)
            self.assertError(result, 400, "invalid_request")

    def test_bad_signature_is_401_and_does_not_use_up_the_token(self):
        token = add_token(self.db, "alice", NOW)
        key = proto.generate_device_key()
        body = enroll_body(token, key, NOW)
        forged = {**body, "signature": enroll_body(token, proto.generate_device_key(),
                                                   NOW)["signature"]}
        self.assertError(self.call("POST", f"/v1/enroll/{token}", body=forged),
                         401, "unauthorized")
        self.assertEqual(self.call("POST", f"/v1/enroll/{token}", body=body)[0], 201)

    def test_signature_for_another_token_is_401(self):
        token, other = add_token(self.db, "alice", NOW), add_token(self.db, "alice", NOW)
        body = enroll_body(other, proto.generate_device_key(), NOW)
        self.assertError(self.call("POST", f"/v1/enroll/{token}", body=body),
                         401, "unauthorized")

    def test_stale_timestamp_is_401_stale_timestamp_and_does_not_use_up_the_token(self):
        token = add_token(self.db, "alice", NOW)
        key = proto.generate_device_key()
        for timestamp in (NOW - 61, NOW + 61):
            result = self.call("POST", f"/v1/enroll/{token}",
                               body=enroll_body(token, key, timestamp))
            self.assertError(result, 401, "stale_timestamp")
        self.assertEqual(self.call("POST", f"/v1/enroll/{token}",
                                   body=enroll_body(token, key, NOW - 60))[0], 201)

    def test_https_notify_is_stored(self):
        notify = {"type": "ntfy", "url": "https://ntfy.example.com/7Hk2mQ9vXc4pLr8sWz1d"}
        device_id, _ = self.enroll(notify=notify)
        device = self.db.get_device(device_id)
        self.assertEqual((device.notify_type, device.notify_url), ("ntfy", notify["url"]))

    def test_http_notify_to_loopback_is_allowed(self):
        notify = {"type": "webhook", "url": "http://127.0.0.1:8080/wake"}
        device_id, _ = self.enroll(notify=notify)
        self.assertEqual(self.db.get_device(device_id).notify_url, notify["url"])

    def test_bad_notify_is_400_and_enrolls_nothing(self):
        token = add_token(self.db, "alice", NOW)
        key = proto.generate_device_key()
        for notify in [{"type": "ntfy", "url": "http://ntfy.example.com/topic"},
                       {"type": "ntfy", "url": "ftp://ntfy.example.com/topic"},
                       {"type": "ntfy", "url": "https:///no-host"},
                       {"type": "ntfy", "url": ""},
                       {"type": "apns", "url": "https://push.example.com/"},
                       {"url": "https://push.example.com/"}]:
            result = self.call("POST", f"/v1/enroll/{token}",
                               body=enroll_body(token, key, NOW, notify))
            self.assertError(result, 400, "invalid_request")
        self.assertEqual(self.db.list_devices("alice"), [])


# A subscription as PushSubscription.toJSON() gives it (the keys of RFC 8291's example).
P256DH = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
ENDPOINT = "https://fcm.googleapis.com/fcm/send/dQ9wXk3pQ9vXc4pLr8sWz1d:APA91bH"


def webpush_notify(url: str = ENDPOINT, **keys) -> dict:
    return {"type": "webpush", "url": url, "keys": {"p256dh": P256DH, "auth": AUTH, **keys}}


class WebPushEnrollmentTests(DeviceApiCase):
    def test_a_webpush_subscription_is_stored_with_its_keys(self):
        device_id, _ = self.enroll(notify=webpush_notify())
        device = self.db.get_device(device_id)
        self.assertEqual((device.notify_type, device.notify_url), ("webpush", ENDPOINT))
        self.assertEqual(json.loads(device.notify_keys), {"p256dh": P256DH, "auth": AUTH})

    def test_padded_keys_are_stored_without_the_padding(self):
        device_id, _ = self.enroll(notify=webpush_notify(p256dh=P256DH + "=", auth=AUTH + "=="))
        self.assertEqual(json.loads(self.db.get_device(device_id).notify_keys),
                         {"p256dh": P256DH, "auth": AUTH})

    def test_an_endpoint_on_loopback_may_be_http_for_a_server_on_loopback(self):
        self.api = DeviceApi(ThreadedStore(self.db, run_now), self.push, self.clock,
                             report_fraud=self.report_fraud, audit=self.audit,
                             loopback_push=True)
        self.app = WebApp(self.clock)
        self.api.add_routes(self.app)
        self.http = StubTreq(self.app.resource())
        device_id, _ = self.enroll(notify=webpush_notify("http://127.0.0.1:8080/wpush/1"))
        self.assertEqual(self.db.get_device(device_id).notify_url,
                         "http://127.0.0.1:8080/wpush/1")

    def test_an_endpoint_inside_the_network_is_refused(self):
        # Every sign-in would make the daemon POST there.
        token = add_token(self.db, "alice", NOW)
        key = proto.generate_device_key()
        for url in ["http://127.0.0.1:8080/wpush/1", "https://127.0.0.1/wpush",
                    "https://10.0.0.5/x", "https://[fd00::1]/x", "https://intranet/x",
                    "https://push.example.net:9200/x", "https://wiki.corp.local/x",
                    "https://localhost/x", "https://push.example.net:99999/x"]:
            with self.subTest(url=url):
                status, data = self.call("POST", f"/v1/enroll/{token}",
                                         body=enroll_body(token, key, NOW, webpush_notify(url)))
                self.assertEqual((status, data["error"]), (400, "invalid_request"))
                self.assertIn("notify.url", data["message"])
        self.assertEqual(self.db.list_devices("alice"), [])

    def test_other_kinds_keep_no_keys(self):
        device_id, _ = self.enroll(notify={"type": "ntfy", "url": "https://ntfy.example.com/t"})
        self.assertIsNone(self.db.get_device(device_id).notify_keys)

    def test_a_bad_subscription_is_400_and_enrolls_nothing(self):
        token = add_token(self.db, "alice", NOW)
        key = proto.generate_device_key()
        point = proto.b64url_decode(P256DH)
        compressed = proto.b64url_encode(bytes([2 + point[-1] % 2]) + point[1:33])
        off_curve = proto.b64url_encode(point[:-1] + bytes([point[-1] ^ 1]))
        without_keys = webpush_notify()
        del without_keys["keys"]
        cases = [
            (webpush_notify("http://push.example.net/x"), "notify.url"),
            (webpush_notify("https://pūsh.example.net/x"), "notify.url"),
            (without_keys, "notify.keys: required"),
            (webpush_notify(p256dh=compressed), "notify.keys.p256dh"),
            (webpush_notify(p256dh=off_curve), "notify.keys.p256dh"),
            (webpush_notify(p256dh="not base64!"), "notify.keys.p256dh"),
            (webpush_notify(auth=proto.b64url_encode(bytes(15))), "notify.keys.auth"),
            (webpush_notify(auth=proto.b64url_encode(bytes(32))), "notify.keys.auth"),
            (webpush_notify(extra="x"), "notify.keys.extra"),
            ({"type": "webpush", "url": ENDPOINT, "keys": {"p256dh": P256DH}},
             "notify.keys.auth"),
            ({"type": "ntfy", "url": "https://ntfy.example.com/t",
              "keys": {"p256dh": P256DH, "auth": AUTH}}, "notify.keys: only for webpush"),
        ]
        for notify, message in cases:
            with self.subTest(notify=notify):
                status, data = self.call("POST", f"/v1/enroll/{token}",
                                         body=enroll_body(token, key, NOW, notify))
                self.assertEqual((status, data["error"]), (400, "invalid_request"))
                self.assertIn(message, data["message"])
        self.assertEqual(self.db.list_devices("alice"), [])
        # The token was not used up.
        self.assertEqual(self.call("POST", f"/v1/enroll/{token}",
                                   body=enroll_body(token, key, NOW, webpush_notify()))[0], 201)

class PollTests(DeviceApiCase):
    def test_poll_returns_the_pending_transactions_of_the_devices_user_only(self):
        device_id, key = self.enroll("alice")
        first = self.open("alice")
        self.open("bob")
        self.clock.advance(1)
        second = self.open("alice", calling_station_id=None)
        status, data = self.poll_now(device_id, key)
        self.assertEqual(status, 200)
        self.assertEqual(data, {"transactions": [first.to_json(), second.to_json()]})
        self.assertEqual(data["transactions"][0]["user"], "alice")

    def test_poll_with_nothing_pending_and_wait_0_is_an_immediate_empty_list(self):
        device_id, key = self.enroll()
        self.open("bob")
        self.assertEqual(self.poll_now(device_id, key, wait="0"), (200, {"transactions": []}))

    def test_poll_does_not_list_expired_or_answered_transactions(self):
        device_id, key = self.enroll()
        self.open(timeout=10)
        answered = self.open()
        self.push.answer(answered.txid, "alice", "approve")
        self.clock.advance(10)
        self.assertEqual(self.poll_now(device_id, key), (200, {"transactions": []}))

    def test_forged_signature_is_401(self):
        device_id, _ = self.enroll()
        headers = poll_headers(device_id, proto.generate_device_key(), NOW)
        self.assertError(self.poll_now(device_id, None, headers=headers), 401, "unauthorized")

    def test_signature_of_another_device_is_401(self):
        device_id, _ = self.enroll()
        other_id, other_key = self.enroll()
        headers = poll_headers(other_id, other_key, NOW)
        self.assertError(self.poll_now(device_id, None, headers=headers), 401, "unauthorized")

    def test_missing_signature_is_401(self):
        device_id, key = self.enroll()
        headers = poll_headers(device_id, key, NOW)
        del headers["x-mfa-signature"]
        self.assertError(self.poll_now(device_id, None, headers=headers), 401, "unauthorized")

    def test_replayed_nonce_is_401(self):
        device_id, key = self.enroll()
        headers = poll_headers(device_id, key, NOW)
        self.assertEqual(self.poll_now(device_id, None, headers=headers)[0], 200)
        self.assertError(self.poll_now(device_id, None, headers=headers), 401, "unauthorized")
        # A new signature over the same nonce at another time is refused too.
        self.clock.advance(1)
        again = poll_headers(device_id, key, self.now, nonce=headers["x-mfa-nonce"])
        self.assertError(self.poll_now(device_id, None, headers=again), 401, "unauthorized")

    def test_a_full_replay_window_is_503_busy_not_401(self):
        # A 401 tells the web authenticator its device was removed, and it
        # stops; one device filling the window must not stop every page.
        self.api._polls = proto.FreshnessWindow(skew=60, max_entries=1)
        device_id, key = self.enroll()
        self.assertEqual(self.poll_now(device_id, key)[0], 200)
        self.assertError(self.poll_now(device_id, key), 503, "busy")
        self.clock.advance(121)
        self.assertEqual(self.poll_now(device_id, key)[0], 200)

    def test_stale_timestamp_is_401_stale_timestamp(self):
        device_id, key = self.enroll()
        for timestamp in (NOW - 61, NOW + 61):
            self.assertError(self.poll_now(device_id, key, timestamp=timestamp),
                             401, "stale_timestamp")
        self.assertEqual(self.poll_now(device_id, key, timestamp=NOW - 60)[0], 200)

    def test_unknown_device_is_401(self):
        key = proto.generate_device_key()
        device_id = proto.new_device_id()
        self.assertError(self.poll_now(device_id, key), 401, "unauthorized")

    def test_deleted_device_is_401(self):
        device_id, key = self.enroll()
        self.db.delete_device("alice", device_id)
        self.assertError(self.poll_now(device_id, key), 401, "unauthorized")

    def test_missing_or_bad_headers_are_400(self):
        device_id, key = self.enroll()
        good = poll_headers(device_id, key, NOW)
        for headers in [{k: v for k, v in good.items() if k != "x-mfa-timestamp"},
                        {**good, "x-mfa-timestamp": "-5"},
                        {**good, "x-mfa-timestamp": "1e9"},
                        {**good, "x-mfa-timestamp": "\u0661\u0662"},
                        {k: v for k, v in good.items() if k != "x-mfa-nonce"},
                        {**good, "x-mfa-nonce": "short"}]:
            self.assertError(self.poll_now(device_id, None, headers=headers),
                             400, "invalid_request")

    def test_bad_wait_is_400(self):
        device_id, key = self.enroll()
        for wait in ["31", "-1", "abc", "", "1.5", "\u0661"]:
            self.assertError(self.poll_now(device_id, key, wait=wait), 400, "invalid_request")

    def test_long_poll_answers_at_once_when_something_is_pending(self):
        device_id, key = self.enroll()
        txn = self.open()
        status, data = self.poll_now(device_id, key, wait=None)
        self.assertEqual([t["txid"] for t in data["transactions"]], [txn.txid])

    def test_long_poll_fires_when_a_transaction_opens_for_the_user(self):
        device_id, key = self.enroll()
        d = self.poll(device_id, key, wait=None)
        self.assertPending(d)
        self.open("bob")
        self.clock.advance(10)
        self.assertPending(d)
        txn = self.open("alice")
        self.assertEqual(self.result(d), (200, {"transactions": [txn.to_json()]}))

    def test_long_poll_answers_an_empty_list_after_the_default_30_seconds(self):
        device_id, key = self.enroll()
        d = self.poll(device_id, key, wait=None)
        self.clock.advance(29)
        self.assertPending(d)
        self.clock.advance(1)
        self.assertEqual(self.result(d), (200, {"transactions": []}))

    def test_long_poll_honours_a_shorter_wait(self):
        device_id, key = self.enroll()
        d = self.poll(device_id, key, wait="5")
        self.clock.advance(4)
        self.assertPending(d)
        self.clock.advance(1)
        self.assertEqual(self.result(d), (200, {"transactions": []}))

    def test_one_poll_too_many_of_one_device_ends_its_oldest(self):
        device_id, key = self.enroll()
        other_id, other_key = self.enroll("bob")
        first, *others = (self.poll(device_id, key, wait="30")
                          for _ in range(MAX_POLLS_PER_DEVICE))
        theirs = self.poll(other_id, other_key, wait="30")
        self.assertPending(first)
        others.append(self.poll(device_id, key, wait="30"))
        self.assertEqual(self.result(first), (200, {"transactions": []}))
        for d in (*others, theirs):
            self.assertPending(d)
        txn = self.open("alice")
        for d in others:
            self.assertEqual(self.result(d)[1]["transactions"][0]["txid"], txn.txid)
        self.clock.advance(30)
        self.assertEqual(self.result(theirs), (200, {"transactions": []}))
        self.assertEqual(self.api._device_polls, {})

    def test_long_poll_ends_with_an_empty_list_at_shutdown(self):
        device_id, key = self.enroll()
        d = self.poll(device_id, key, wait=None)
        self.assertPending(d)
        self.push.close_all()
        self.assertEqual(self.result(d), (200, {"transactions": []}))

    def test_client_hanging_up_withdraws_its_long_poll_and_leaves_nothing_behind(self):
        device_id, key = self.enroll()
        d = self.poll(device_id, key, wait=None)
        self.assertPending(d)
        self.assertIn("alice", self.push._polls.users())
        d.cancel()          # the client closes the connection
        self.http.flush()
        self.failureResultOf(d)
        self.assertEqual(self.push._polls.users(), [])
        self.assertEqual(self.api._device_polls, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_held_poll_answers_when_a_sign_in_opens_and_its_answer_resolves_it(self):
        device_id, key = self.enroll()
        poll = self.poll(device_id, key, wait="10")
        self.assertPending(poll)
        txn = self.open("alice", calling_station_id=None)
        waiter = self.push.wait(txn.txid)
        self.assertEqual(self.result(poll), (200, {"transactions": [txn.to_json()]}))
        self.assertEqual(self.answer(txn.txid, device_id, key, "approve"),
                         (200, {"txid": txn.txid, "decision": "approve"}))
        self.assertIs(self.successResultOf(waiter), Verdict.APPROVE)


class AnswerTests(DeviceApiCase):
    def setUp(self):
        super().setUp()
        self.device_id, self.key = self.enroll("alice")
        self.txn = self.open("alice")
        self.waiter = self.push.wait(self.txn.txid)

    def test_approve_resolves_the_waiter_with_approve(self):
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve")
        self.assertEqual(result, (200, {"txid": self.txn.txid, "decision": "approve"}))
        self.assertIs(self.successResultOf(self.waiter), Verdict.APPROVE)
        self.assertEqual(self.txn.answered_by, self.device_id)
        self.assertEqual((self.frauds, self.audits), ([], []))

    def test_deny_resolves_the_waiter_with_deny(self):
        result = self.answer(self.txn.txid, self.device_id, self.key, "deny")
        self.assertEqual(result, (200, {"txid": self.txn.txid, "decision": "deny"}))
        self.assertIs(self.successResultOf(self.waiter), Verdict.DENY)
        self.assertEqual(self.frauds, [])

    def test_fraud_resolves_the_waiter_and_reports_the_user_and_client(self):
        result = self.answer(self.txn.txid, self.device_id, self.key, "fraud")
        self.assertEqual(result, (200, {"txid": self.txn.txid, "decision": "fraud"}))
        self.assertIs(self.successResultOf(self.waiter), Verdict.FRAUD)
        self.assertEqual(self.frauds, [("alice", "vpn")])

    def test_device_of_another_user_gets_404(self):
        bob_id, bob_key = self.enroll("bob")
        result = self.answer(self.txn.txid, bob_id, bob_key, "approve")
        self.assertError(result, 404, "not_found")
        self.assertNoResult(self.waiter)

    def test_unknown_transaction_is_404(self):
        txid = proto.new_transaction_id()
        self.assertError(self.answer(txid, self.device_id, self.key), 404, "not_found")

    def test_forged_signature_is_401(self):
        result = self.answer(self.txn.txid, self.device_id, proto.generate_device_key())
        self.assertError(result, 401, "unauthorized")
        self.assertNoResult(self.waiter)

    def test_empty_signature_is_401(self):
        body = answer_body(self.txn.txid, self.device_id, self.key, "approve", NOW)
        body["signature"] = ""
        self.assertError(self.answer(self.txn.txid, None, None, body=body), 401, "unauthorized")

    def test_missing_signature_is_400(self):
        body = answer_body(self.txn.txid, self.device_id, self.key, "approve", NOW)
        del body["signature"]
        self.assertError(self.answer(self.txn.txid, None, None, body=body),
                         400, "invalid_request")

    def test_malformed_answers_are_400(self):
        good = answer_body(self.txn.txid, self.device_id, self.key, "approve", NOW)
        for body in [b"nope", {**good, "decision": "no_answer"}, {**good, "decision": "maybe"},
                     {**good, "device_id": "a/b"}, {**good, "timestamp": True},
                     {**good, "number": "7"}, {**good, "number": 42}]:
            self.assertError(self.answer(self.txn.txid, None, None, body=body),
                             400, "invalid_request")
        self.assertNoResult(self.waiter)

    def test_unknown_device_is_401(self):
        result = self.answer(self.txn.txid, proto.new_device_id(), self.key)
        self.assertError(result, 401, "unauthorized")

    def test_deleted_device_is_401(self):
        self.db.delete_device("alice", self.device_id)
        self.assertError(self.answer(self.txn.txid, self.device_id, self.key),
                         401, "unauthorized")

    def test_signature_over_another_txid_is_401(self):
        other = self.open("alice")
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve",
                             signed_txid=other.txid)
        self.assertError(result, 401, "unauthorized")
        self.assertNoResult(self.waiter)

    def test_signature_over_another_decision_is_401(self):
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve",
                             signed_decision="deny")
        self.assertError(result, 401, "unauthorized")
        self.assertNoResult(self.waiter)

    def test_signature_by_another_device_of_the_same_user_is_401(self):
        _, other_key = self.enroll("alice")
        self.assertError(self.answer(self.txn.txid, self.device_id, other_key),
                         401, "unauthorized")

    def test_stale_timestamp_is_401_stale_timestamp(self):
        for timestamp in (NOW - 61, NOW + 61):
            result = self.answer(self.txn.txid, self.device_id, self.key, timestamp=timestamp)
            self.assertError(result, 401, "stale_timestamp")
        self.assertNoResult(self.waiter)

    def test_stale_is_checked_before_the_transaction(self):
        result = self.answer(proto.new_transaction_id(), self.device_id, self.key,
                             timestamp=NOW - 61)
        self.assertError(result, 401, "stale_timestamp")

    def test_second_answer_is_409_and_the_first_wins(self):
        other_id, other_key = self.enroll("alice")
        self.assertEqual(self.answer(self.txn.txid, self.device_id, self.key, "deny")[0], 200)
        result = self.answer(self.txn.txid, other_id, other_key, "approve")
        self.assertError(result, 409, "already_answered")
        self.assertIs(self.successResultOf(self.waiter), Verdict.DENY)
        self.assertEqual(self.txn.answered_by, self.device_id)

    def test_retried_answer_is_409(self):
        body = answer_body(self.txn.txid, self.device_id, self.key, "approve", NOW)
        self.assertEqual(self.answer(self.txn.txid, None, None, body=body)[0], 200)
        self.assertError(self.answer(self.txn.txid, None, None, body=body),
                         409, "already_answered")

    def test_answer_after_expiry_is_410_and_audited_as_late(self):
        self.clock.advance(60)
        self.failureResultOf(self.waiter, defer.TimeoutError)
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve")
        self.assertError(result, 410, "expired")
        self.assertEqual(self.audits, [AuditEntry(
            time=NOW + 60, user="alice", client="vpn", nas_ip="192.0.2.10",
            calling_station_id="203.0.113.7", factor="push", outcome="refused",
            reason="late_approve")])
        self.assertEqual(self.frauds, [])

    def test_late_fraud_still_reports_fraud(self):
        self.clock.advance(60)
        self.failureResultOf(self.waiter, defer.TimeoutError)
        self.assertError(self.answer(self.txn.txid, self.device_id, self.key, "fraud"),
                         410, "expired")
        self.assertEqual(self.frauds, [("alice", "vpn")])
        self.assertEqual([a.reason for a in self.audits], ["late_fraud"])

    def test_retried_fraud_answer_is_409_and_reports_fraud_only_once(self):
        body = answer_body(self.txn.txid, self.device_id, self.key, "fraud", NOW)
        self.assertEqual(self.answer(self.txn.txid, None, None, body=body)[0], 200)
        self.assertError(self.answer(self.txn.txid, None, None, body=body),
                         409, "already_answered")
        self.assertEqual(self.frauds, [("alice", "vpn")])

    def test_fraud_after_another_devices_approval_is_409_and_still_reported(self):
        other_id, other_key = self.enroll("alice")
        self.assertEqual(self.answer(self.txn.txid, other_id, other_key, "approve")[0], 200)
        self.assertError(self.answer(self.txn.txid, self.device_id, self.key, "fraud"),
                         409, "already_answered")
        self.assertEqual(self.frauds, [("alice", "vpn")])
        # Not a late answer (the sign-in had its answer): report_fraud audits it.
        self.assertEqual(self.audits, [])

    def test_answer_after_close_is_410(self):
        self.push.close(self.txn.txid)
        self.failureResultOf(self.waiter)
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve")
        self.assertError(result, 410, "expired")
        self.assertEqual([a.reason for a in self.audits], ["late_approve"])

    def test_failing_audit_of_a_late_answer_still_answers_410(self):
        def broken(entry):
            return defer.fail(RuntimeError("disk full"))

        self.api._audit = broken
        self.push.close(self.txn.txid)
        self.failureResultOf(self.waiter)
        self.assertError(self.answer(self.txn.txid, self.device_id, self.key), 410, "expired")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_answer_after_the_late_window_is_404(self):
        self.push.close(self.txn.txid)
        self.failureResultOf(self.waiter)
        self.clock.advance(self.push.late_window)
        self.assertError(self.answer(self.txn.txid, self.device_id, self.key),
                         404, "not_found")

    def test_p256_device_enrolls_polls_and_answers(self):
        device_id, key = self.enroll("alice", kind="p256")
        status, data = self.poll_now(device_id, key)
        self.assertEqual([t["txid"] for t in data["transactions"]], [self.txn.txid])
        self.assertEqual(self.answer(self.txn.txid, device_id, key, "approve")[0], 200)
        self.assertIs(self.successResultOf(self.waiter), Verdict.APPROVE)


class NumberMatchingAnswerTests(DeviceApiCase):
    number_matching = True

    def setUp(self):
        super().setUp()
        self.device_id, self.key = self.enroll("alice")
        self.txn = self.open("alice")
        self.waiter = self.push.wait(self.txn.txid)

    def test_poll_shows_the_number(self):
        status, data = self.poll_now(self.device_id, self.key)
        self.assertEqual(data["transactions"][0]["number"], self.txn.number)
        self.assertRegex(self.txn.number, r"\A[1-9][0-9]\Z")

    def test_right_number_approves(self):
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve",
                             number=self.txn.number)
        self.assertEqual(result[0], 200)
        self.assertIs(self.successResultOf(self.waiter), Verdict.APPROVE)

    def test_wrong_number_turns_the_approval_into_a_denial(self):
        wrong = "10" if self.txn.number != "10" else "11"
        result = self.answer(self.txn.txid, self.device_id, self.key, "approve", number=wrong)
        self.assertEqual(result[0], 200)
        self.assertIs(self.successResultOf(self.waiter), Verdict.DENY)

    def test_approval_without_a_number_approves_the_radius_side_checks_it(self):
        self.assertEqual(self.answer(self.txn.txid, self.device_id, self.key)[0], 200)
        self.assertIs(self.successResultOf(self.waiter), Verdict.APPROVE)
