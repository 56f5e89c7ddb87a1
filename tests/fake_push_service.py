"""A stand-in for a browser maker's Web Push service, in memory or on 127.0.0.1.

It plays both ends the server cannot see: the push service (RFC 8030: it
takes a POST to a subscription's endpoint, checks the VAPID token of
RFC 8292) and the browser (it holds the subscription's private key and auth
secret, and decrypts the RFC 8291 payload). It is written apart from
`mfaserver.gateways.webpush`, with cryptography's HKDF rather than the
sender's HMACs, so that a mistake in one does not hide in both.

In memory: ``FakePushService(clock, "https://push.example.net")`` served by
treq's ``RequestTraversalAgent`` (or ``StubTreq``); on a port: a `Site` over
it on the reactor, with the origin ``http://127.0.0.1:PORT``.

`subscribe` makes a subscription (its endpoint and keys, as
``PushSubscription.toJSON()`` gives them). A message that passes every check
is answered 201 and recorded in ``received`` (a `PushMessage`, with the
plaintext); one that fails is answered 400, 401 or 403 and its reason
recorded in ``refused``. ``status`` (e.g. 500) makes it refuse everything,
`unsubscribe` makes an endpoint answer 410, ``hold`` leaves requests
unanswered after the checks (``dropped`` counts the ones whose sender hung
up).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.web.resource import Resource

from mfaserver.testing import hold_request

MAX_EXP = 24 * 3600   # RFC 8292 section 2: exp no more than 24 hours ahead


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _point(key) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


@dataclass
class Subscription:
    """What a browser's ``PushManager.subscribe()`` makes, with its private half."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    auth_secret: bytes = field(repr=False)
    application_server_key: str | None = None   # the VAPID key it was made for
    gone: bool = False

    @property
    def p256dh(self) -> str:
        return _encode(_point(self.private_key.public_key()))

    @property
    def auth(self) -> str:
        return _encode(self.auth_secret)

    def to_json(self) -> dict:
        """As PushSubscription.toJSON()."""
        return {"endpoint": self.endpoint, "expirationTime": None,
                "keys": {"p256dh": self.p256dh, "auth": self.auth}}

    def decrypt(self, body: bytes) -> bytes:
        """The plaintext of an aes128gcm body (RFC 8188) of one record, as RFC 8291
        derives its key; ValueError if it is not one."""
        if len(body) < 21:
            raise ValueError("shorter than the aes128gcm header")
        salt, (rs, idlen) = body[:16], struct.unpack("!IB", body[16:21])
        keyid, records = body[21:21 + idlen], body[21 + idlen:]
        if idlen != 65 or len(records) > rs or rs < 18:
            raise ValueError(f"header: rs {rs}, idlen {idlen}, {len(records)} bytes of records")
        sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), keyid)
        shared = self.private_key.exchange(ec.ECDH(), sender)
        ua_public = _point(self.private_key.public_key())
        ikm = HKDF(hashes.SHA256(), 32, salt=self.auth_secret,
                   info=b"WebPush: info\x00" + ua_public + keyid).derive(shared)
        cek = HKDF(hashes.SHA256(), 16, salt=salt,
                   info=b"Content-Encoding: aes128gcm\x00").derive(ikm)
        nonce = HKDF(hashes.SHA256(), 12, salt=salt,
                     info=b"Content-Encoding: nonce\x00").derive(ikm)
        try:
            padded = AESGCM(cek).decrypt(nonce, records, None)
        except InvalidTag:
            raise ValueError("the record does not decrypt") from None
        unpadded = padded.rstrip(b"\x00")
        if not unpadded.endswith(b"\x02"):
            raise ValueError("no last-record delimiter")
        return unpadded[:-1]


@dataclass
class PushMessage:
    """One message that passed the checks: to whom, what, and how it came."""

    subscription: Subscription
    plaintext: bytes
    claims: dict          # the VAPID JWT's
    public_key: str       # its k=
    headers: dict[str, str]


class Refused(Exception):
    """A check failed: answered with ``status``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class FakePushService(Resource):
    """A Web Push service at ``origin`` whose clock is ``clock`` (an `IReactorTime`).

    With ``subject`` set, a token's ``sub`` must be exactly that.
    """

    isLeaf = True

    def __init__(self, clock, origin: str, *, subject: str | None = None):
        super().__init__()
        self.clock = clock
        self.origin = origin
        self.subject = subject
        self.status: int | None = None   # set: refuse every request with it
        self.hold = False
        self.dropped = 0
        self.requests = 0
        self.received: list[PushMessage] = []
        self.refused: list[str] = []
        self.subscriptions: dict[str, Subscription] = {}
        self._ids = itertools.count(1)

    def subscribe(self, application_server_key: str | None = None) -> Subscription:
        """A new subscription, tied to ``application_server_key`` if given."""
        sid = f"{next(self._ids)}-{_encode(os.urandom(16))}"
        subscription = Subscription(
            sid, f"{self.origin}/wpush/v2/{sid}", ec.generate_private_key(ec.SECP256R1()),
            os.urandom(16), application_server_key)
        self.subscriptions[sid] = subscription
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """The browser dropped it: its endpoint answers 410 from now on."""
        subscription.gone = True

    def render_POST(self, request):
        self.requests += 1
        try:
            message = self._check(request)
        except Refused as e:
            self.refused.append(str(e))
            if self.hold:
                return hold_request(request, partial=False, dropped=self._dropped)
            request.setResponseCode(e.status)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"reason": str(e)}).encode()
        self.received.append(message)
        if self.hold:
            # Taken (and delivered, for all the sender knows) but never answered.
            return hold_request(request, partial=False, dropped=self._dropped)
        request.setResponseCode(201)
        request.setHeader(b"location", f"{self.origin}/m/{len(self.received)}".encode())
        return b""

    def _dropped(self) -> None:
        self.dropped += 1

    def _check(self, request) -> PushMessage:
        if self.status is not None:
            raise Refused(self.status, "refusing everything")
        sid = request.path.decode().rpartition("/")[2]
        subscription = self.subscriptions.get(sid)
        if subscription is None:
            raise Refused(404, "no such subscription")
        if subscription.gone:
            raise Refused(410, "the subscription is gone")
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        claims, public_key = self._check_vapid(headers.get("authorization", ""))
        if subscription.application_server_key not in (None, public_key):
            raise Refused(403, "k is not the key the subscription was made with")
        if not headers.get("ttl", "").isdigit():
            raise Refused(400, "TTL missing")   # RFC 8030 5.2: a TTL is required
        if headers.get("content-encoding") != "aes128gcm":
            raise Refused(400, "Content-Encoding is not aes128gcm")
        try:
            plaintext = subscription.decrypt(request.content.read())
        except ValueError as e:
            raise Refused(400, f"payload: {e}") from None
        return PushMessage(subscription, plaintext, claims, public_key, headers)

    def _check_vapid(self, authorization: str) -> tuple[dict, str]:
        """The claims and key of a valid ``vapid t=..., k=...``; else Refused 401/403."""
        scheme, _, params = authorization.partition(" ")
        values = dict(p.strip().partition("=")[::2] for p in params.split(","))
        if scheme.lower() != "vapid" or "t" not in values or "k" not in values:
            raise Refused(401, "no vapid authorization")
        try:
            header, claims, signature = (
                json.loads(_decode(part)) if i < 2 else _decode(part)
                for i, part in enumerate(values["t"].split(".")))
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                               _decode(values["k"]))
        except ValueError:
            raise Refused(401, "malformed token or key") from None
        if header.get("alg") != "ES256" or len(signature) != 64:
            raise Refused(401, "not an ES256 JWS")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                   int.from_bytes(signature[32:], "big"))
        signed = values["t"].rpartition(".")[0].encode()
        try:
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Refused(403, "bad signature") from None
        now = self.clock.seconds()
        exp = claims.get("exp")
        if not isinstance(exp, int) or not now < exp <= now + MAX_EXP:
            raise Refused(403, f"exp {exp} is not within 24 hours of {now:.0f}")
        if claims.get("aud") != self.origin:
            raise Refused(403, f"aud {claims.get('aud')!r} is not {self.origin!r}")
        sub = claims.get("sub")
        if not (isinstance(sub, str) and sub.startswith(("mailto:", "https://", "http://"))
                and (self.subject is None or sub == self.subject)):
            raise Refused(403, f"sub {sub!r}")
        return claims, values["k"]
