"""Web Push (gateways/webpush.py): RFC 8291 encryption, RFC 8292 VAPID, the key file, the sender.

The sender talks to a `FakePushService` (tests/fake_push_service.py, written
apart) through treq's RequestTraversalAgent, in memory, its deadline on a
`Clock`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase

from fake_push_service import FakePushService
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.webpush import (
    TOKEN_REUSE, SubscriptionGone, VapidKey, VapidKeyError, WebPushSender, b64url_decode,
    encrypt, origin, subscription_keys,
)

NOW = 1_700_000_000
ORIGIN = "https://push.example.net"
SUBJECT = "mailto:mfa-admin@example.org"
TEXT = b"A sign-in needs you"


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Rfc8291ExampleTests(SynchronousTestCase):
    """RFC 8291 section 5 (and appendix A): its keys, salt and text give its body."""

    PLAINTEXT = b"When I grow up, I want to be a watermelon"
    AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
    AS_PUBLIC = ("BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK"
                 "6PBru3jl7A8")
    UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
    UA_PUBLIC = ("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6S"
                 "RpkNtoIAiw4")
    AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
    SALT = "DGv6ra1nlYgDCS1FRnbzlw"
    BODY = ("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
            "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT"
            "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN")

    def test_the_rfc_example_is_reproduced_byte_for_byte(self):
        sender = ec.derive_private_key(int.from_bytes(unb64(self.AS_PRIVATE), "big"),
                                       ec.SECP256R1())
        body = encrypt(self.PLAINTEXT, unb64(self.UA_PUBLIC), unb64(self.AUTH),
                       sender=sender, salt=unb64(self.SALT))
        self.assertEqual(body, unb64(self.BODY))
        # The header: salt, rs 4096, the 65-byte key of the application server.
        self.assertEqual(body[16:21], b"\x00\x00\x10\x00\x41")
        self.assertEqual(body[21:86], unb64(self.AS_PUBLIC))

    def test_the_browser_of_the_example_decrypts_a_message_with_a_fresh_key_and_salt(self):
        from fake_push_service import Subscription
        ua = ec.derive_private_key(int.from_bytes(unb64(self.UA_PRIVATE), "big"),
                                   ec.SECP256R1())
        browser = Subscription("s", ORIGIN + "/s", ua, unb64(self.AUTH))
        self.assertEqual(browser.p256dh, self.UA_PUBLIC)
        self.assertEqual(browser.decrypt(unb64(self.BODY)), self.PLAINTEXT)
        first = encrypt(TEXT, unb64(self.UA_PUBLIC), unb64(self.AUTH))
        second = encrypt(TEXT, unb64(self.UA_PUBLIC), unb64(self.AUTH))
        self.assertNotEqual(first[:86], second[:86])  # a new salt and key each time
        self.assertEqual((browser.decrypt(first), len(first)), (TEXT, 86 + len(TEXT) + 1 + 16))


class SubscriptionKeyTests(SynchronousTestCase):
    P256DH = Rfc8291ExampleTests.UA_PUBLIC
    AUTH = Rfc8291ExampleTests.AUTH

    def test_the_keys_of_a_subscription_decode(self):
        self.assertEqual(subscription_keys(self.P256DH, self.AUTH),
                         (unb64(self.P256DH), unb64(self.AUTH)))
        # Padding, which some encoders add, is dropped.
        self.assertEqual(subscription_keys(self.P256DH + "=", self.AUTH + "=="),
                         (unb64(self.P256DH), unb64(self.AUTH)))

    def test_keys_that_are_not_a_point_and_a_16_byte_secret_are_refused(self):
        point = unb64(self.P256DH)
        compressed = bytes([2 + point[-1] % 2]) + point[1:33]
        off_curve = point[:-1] + bytes([point[-1] ^ 1])
        b64 = lambda data: base64.urlsafe_b64encode(data).decode().rstrip("=")  # noqa: E731
        for p256dh in [b64(compressed), b64(off_curve), b64(point[:64]), "",
                       self.P256DH.replace("_", "/"), self.P256DH + "!"]:
            with self.assertRaisesRegex(ValueError, "^p256dh: "):
                subscription_keys(p256dh, self.AUTH)
        for auth in [b64(bytes(15)), b64(bytes(17)), "", "BTBZMqHH6r4Tts7J+aSIgg"]:
            with self.assertRaisesRegex(ValueError, "^auth: "):
                subscription_keys(self.P256DH, auth)

    def test_b64url_refuses_what_is_not_base64url(self):
        for text in ["a", "ab+c", "ab c", None]:
            with self.assertRaises(ValueError):
                b64url_decode(text)


class OriginTests(SynchronousTestCase):
    def test_the_origin_of_an_endpoint_is_its_scheme_host_and_port(self):
        for url, expected in [
                ("https://fcm.googleapis.com/fcm/send/abc:def", "https://fcm.googleapis.com"),
                ("https://Web.Push.Apple.com:443/QO2P", "https://web.push.apple.com"),
                ("https://push.example.net:8443/x?y#z", "https://push.example.net:8443"),
                ("https://user:pw@push.example.net/x", "https://push.example.net"),
                ("http://127.0.0.1:8080/wpush", "http://127.0.0.1:8080"),
                ("http://[::1]:8080/wpush", "http://[::1]:8080")]:
            self.assertEqual(origin(url), expected)

    def test_plain_http_off_this_host_and_odd_urls_are_refused(self):
        for url in ["http://push.example.net/x", "ftp://push.example.net/x", "https:///x",
                    "https://püsh.example.net/x", "/relative"]:
            with self.assertRaises(ValueError):
                origin(url)


class VapidKeyTests(SynchronousTestCase):
    def setUp(self):
        self.key = VapidKey(ec.generate_private_key(ec.SECP256R1()))

    def test_the_public_key_is_the_uncompressed_point_in_base64url(self):
        raw = unb64(self.key.public_key)
        self.assertEqual((len(self.key.public_key), len(raw), raw[0]), (87, 65, 4))
        self.assertNotIn("=", self.key.public_key)
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)

    def test_the_token_is_an_es256_jwt_for_the_audience_that_verifies(self):
        header = self.key.authorization(ORIGIN, SUBJECT, NOW + 0.7)
        scheme, token, k = header.partition(" t=")[0], *header.partition(" t=")[2].split(", k=")
        self.assertEqual((scheme, k), ("vapid", self.key.public_key))
        head, claims, signature = token.split(".")
        self.assertEqual(json.loads(unb64(head)), {"typ": "JWT", "alg": "ES256"})
        claims = json.loads(unb64(claims))
        self.assertEqual((claims["aud"], claims["sub"]), (ORIGIN, SUBJECT))
        self.assertIsInstance(claims["exp"], int)
        self.assertTrue(NOW < claims["exp"] <= NOW + 24 * 3600)
        raw = unb64(signature)
        self.assertEqual(len(raw), 64)
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(k))
        public.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                           int.from_bytes(raw[32:], "big")),
                      token.rpartition(".")[0].encode(), ec.ECDSA(hashes.SHA256()))

    def test_a_key_on_another_curve_is_refused(self):
        with self.assertRaises(VapidKeyError):
            VapidKey(ec.generate_private_key(ec.SECP384R1()))


class VapidKeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = self.dir / "state" / "vapid.pem"

    def test_the_key_is_made_once_owner_only_and_reused(self):
        first = VapidKey.load_or_create(self.path)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.path.parent.stat().st_mode), 0o700)
        self.assertIn(b"-----BEGIN PRIVATE KEY-----", self.path.read_bytes())
        again = VapidKey.load_or_create(self.path)
        self.assertEqual(again.public_key, first.public_key)
        self.assertEqual(os.listdir(self.path.parent), ["vapid.pem"])

    def test_a_file_group_or_others_can_read_is_refused_and_left_alone(self):
        VapidKey.load_or_create(self.path)
        before = self.path.read_bytes()
        for mode in (0o640, 0o604, 0o660):
            os.chmod(self.path, mode)
            with self.assertRaisesRegex(VapidKeyError, "chmod 600"):
                VapidKey.load_or_create(self.path)
        self.assertEqual(self.path.read_bytes(), before)

    def test_a_link_in_place_of_the_key_is_refused(self):
        target = self.dir / "elsewhere.pem"
        VapidKey.load_or_create(target)
        self.path.parent.mkdir()
        self.path.symlink_to(target)
        with self.assertRaises(VapidKeyError):
            VapidKey.load_or_create(self.path)

    def test_a_file_that_is_not_an_ec_p256_key_is_refused(self):
        self.path.parent.mkdir()
        other = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        for content in (b"not a key", other):
            self.path.write_bytes(content)
            os.chmod(self.path, 0o600)
            with self.assertRaises(VapidKeyError):
                VapidKey.load_or_create(self.path)


class SenderCase(SynchronousTestCase):
    """A WebPushSender against a FakePushService, on a Clock at NOW."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = FakePushService(self.clock, ORIGIN, subject=SUBJECT)
        self.agent = RequestTraversalAgent(self.service)
        self.key = VapidKey(ec.generate_private_key(ec.SECP256R1()))
        self.sender = WebPushSender(self.clock, self.key, subject=SUBJECT, timeout=5,
                                    agent=self.agent)
        self.subscription = self.service.subscribe(self.key.public_key)

    def send(self, subscription=None, payload: bytes = TEXT):
        s = subscription or self.subscription
        return self.sender.send(s.endpoint, s.p256dh, s.auth, payload)


class SenderTests(SenderCase):
    def test_a_push_arrives_verified_and_decrypted_with_the_headers_of_the_rfcs(self):
        self.assertIsNone(self.successResultOf(self.send()))
        self.assertEqual(self.service.refused, [])
        [message] = self.service.received
        self.assertEqual((message.subscription, message.plaintext),
                         (self.subscription, TEXT))
        self.assertEqual((message.claims["aud"], message.claims["sub"], message.public_key),
                         (ORIGIN, SUBJECT, self.key.public_key))
        self.assertTrue(NOW < message.claims["exp"] <= NOW + 24 * 3600)
        headers = message.headers
        self.assertEqual(
            {name: headers[name] for name in ("ttl", "urgency", "topic", "content-encoding",
                                               "content-type")},
            {"ttl": "60", "urgency": "high", "topic": "sign-in",
             "content-encoding": "aes128gcm", "content-type": "application/octet-stream"})
        self.assertTrue(headers["authorization"].startswith("vapid t="))
        self.assertEqual(headers["content-length"], str(86 + len(TEXT) + 1 + 16))

    def test_the_token_is_reused_for_an_hour_then_renewed(self):
        self.send()
        self.clock.advance(TOKEN_REUSE - 1)
        self.send()
        self.clock.advance(1)
        self.send()
        tokens = [m.headers["authorization"] for m in self.service.received]
        self.assertEqual(tokens[0], tokens[1])
        self.assertNotEqual(tokens[1], tokens[2])
        self.assertEqual(len(self.service.received), 3)

    def test_each_push_service_gets_a_token_for_its_own_origin(self):
        other = FakePushService(self.clock, "https://updates.push.example.org:8443",
                                subject=SUBJECT)
        sender = WebPushSender(self.clock, self.key, subject=SUBJECT, timeout=5,
                               agent=RequestTraversalAgent(other))
        s = other.subscribe()
        self.successResultOf(sender.send(s.endpoint, s.p256dh, s.auth, TEXT))
        self.assertEqual(other.received[0].claims["aud"], "https://updates.push.example.org:8443")

    def test_a_refusal_fails_with_gateway_error_naming_the_status_and_reason(self):
        self.service.status = 500
        error = self.failureResultOf(self.send(), GatewayError).value
        self.assertNotIsInstance(error, SubscriptionGone)
        self.assertEqual(error.status, 500)
        self.assertEqual(str(error), 'web push (push.example.net): status 500:'
                                     ' {"reason": "refusing everything"}')

    def test_a_token_for_another_key_is_refused_by_the_push_service(self):
        stranger = VapidKey(ec.generate_private_key(ec.SECP256R1()))
        sender = WebPushSender(self.clock, stranger, subject=SUBJECT, timeout=5,
                               agent=self.agent)
        s = self.subscription
        error = self.failureResultOf(sender.send(s.endpoint, s.p256dh, s.auth, TEXT),
                                     GatewayError).value
        self.assertEqual(error.status, 403)
        self.assertEqual(self.service.received, [])

    def test_410_and_404_mean_the_subscription_is_gone(self):
        self.service.unsubscribe(self.subscription)
        error = self.failureResultOf(self.send(), SubscriptionGone).value
        self.assertIsInstance(error, GatewayError)
        self.assertEqual((error.status, str(error)),
                         (410, "web push (push.example.net): subscription gone (410)"))
        unknown = self.service.subscribe()
        del self.service.subscriptions[unknown.id]
        self.assertEqual(self.failureResultOf(self.send(unknown), SubscriptionGone).value.status,
                         404)

    def test_no_answer_within_the_deadline_fails_with_gateway_error_and_hangs_up(self):
        self.service.hold = True
        d = self.send()
        self.clock.advance(4.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        error = self.failureResultOf(d, GatewayError).value
        self.assertIn("no answer within 5 s", str(error))
        self.agent.flush()
        self.assertEqual(self.service.dropped, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_abandons_the_request(self):
        self.service.hold = True
        d = self.send()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.agent.flush()
        self.assertEqual(self.service.dropped, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_unreachable_push_service_fails_with_gateway_error_at_once(self):
        reactor = MemoryReactorClock()
        sender = WebPushSender(reactor, self.key, subject=SUBJECT, timeout=5)
        s = self.subscription
        d = sender.send("https://127.0.0.1:8443/wpush/x", s.p256dh, s.auth, TEXT)
        ConnectionCompleter(reactor).failOnce(Failure(ConnectionRefusedError()))
        reactor.advance(0.5)  # a HostnameEndpoint's next attempt: there is none
        error = self.failureResultOf(d, GatewayError).value
        self.assertEqual((str(error), error.status),
                         ("web push (127.0.0.1): connection refused", None))
        self.assertIsNone(self.successResultOf(sender.close()))

    def test_a_bad_subscription_fails_with_gateway_error_and_sends_nothing(self):
        s = self.subscription
        for endpoint, p256dh, auth in [
                ("http://push.example.net/x", s.p256dh, s.auth),
                (s.endpoint, s.p256dh[:-2], s.auth),
                (s.endpoint, s.p256dh, "")]:
            self.failureResultOf(self.sender.send(endpoint, p256dh, auth, TEXT), GatewayError)
        self.assertEqual(self.service.requests, 0)

    def test_failures_never_name_the_endpoint(self):
        self.service.status = 500
        message = str(self.failureResultOf(self.send(), GatewayError).value)
        self.assertNotIn(self.subscription.id, message)
        self.assertNotIn("wpush", message)

    def test_close_with_a_callers_agent_has_nothing_to_close(self):
        self.assertIsNone(self.successResultOf(self.sender.close()))
