"""Wake-ups by standard Web Push: RFC 8030 delivery, RFC 8291 encryption, RFC 8292 VAPID.

The web authenticator subscribes with the browser's push service (Google's,
Mozilla's, Apple's) under our VAPID public key and enrolls the subscription:
an endpoint URL on that service and two keys, ``p256dh`` (the browser's P-256
public key) and ``auth`` (a 16-byte secret). To wake it we POST the payload,
encrypted for those keys (aes128gcm, RFC 8188, one record), to the endpoint,
with a VAPID token: a JWT signed with our key that names the push service
(``aud``), a contact (``sub``) and an expiry. The push service can read
neither the payload nor anything about the sign-in; it learns only that this
server sent this subscription a message, of the same size every time.

Everything runs on the reactor: the encryption (a fresh key pair, ECDH,
AES-GCM) and the signature are a few `cryptography` calls, about a quarter
of a millisecond a message; the request goes through an `Agent` on the
reactor. pywebpush would block (it sends with ``requests``);
http_ece and py_vapid would not, but the RFCs take about sixty lines here
and the daemon keeps one dependency fewer. `encrypt` reproduces the example
of RFC 8291 section 5 byte for byte (tests/test_webpush.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import struct
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from mfaserver.addresses import is_loopback
from mfaserver.gateways.base import GatewayError
from mfaserver.gateways.http import (BodyTooLarge, BytesBody, describe_failure, was_cancelled,
                                     make_agent, read_body)
from mfaserver.keyfiles import KeyFileProblem, read_private, write_new_private

log = Logger(namespace="mfaserver.webpush")

RECORD_SIZE = 4096          # aes128gcm's rs: the payload is one record, far smaller
TTL = 60                    # seconds the push service keeps a wake-up for an offline device
TOKEN_LIFETIME = 12 * 3600  # a VAPID token's exp: RFC 8292 allows at most 24 hours
TOKEN_REUSE = 3600          # seconds a token is reused: Apple asks for at most one an hour
TOPIC = "sign-in"           # RFC 8030 5.4: a newer wake-up replaces one not yet delivered
MAX_PERSISTENT = 32         # idle connections kept per push service
MAX_ANSWER = 4096           # bytes of a refusal read for its reason
P256_POINT = 65             # an uncompressed P-256 point: 0x04 || X || Y
AUTH_SECRET = 16

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


class SubscriptionGone(GatewayError):
    """The push service answered 404 or 410: the subscription no longer exists.

    The browser unsubscribed (site data cleared, permission withdrawn) or the
    push service expired it; only a new subscription, enrolled again, helps.
    """


class VapidKeyError(Exception):
    """The VAPID key file is unreadable, not a P-256 key, or readable by others."""


def b64url(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Bytes of base64url ``text``, with or without ``=`` padding; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("not base64url text")
    text = text.rstrip("=")
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url text") from None


def subscription_keys(p256dh: str, auth: str) -> tuple[bytes, bytes]:
    """A subscription's keys as bytes: the browser's P-256 point and the auth secret.

    ValueError naming the key unless ``p256dh`` is base64url of an
    uncompressed point on P-256 and ``auth`` base64url of 16 bytes (what
    ``PushSubscription.toJSON()`` gives).
    """
    try:
        point = b64url_decode(p256dh)
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        point = b""
    if len(point) != P256_POINT or point[0] != 0x04:
        raise ValueError("p256dh: must be base64url of an uncompressed P-256 point"
                         " on the curve (65 bytes)")
    try:
        secret = b64url_decode(auth)
    except ValueError:
        secret = b""
    if len(secret) != AUTH_SECRET:
        raise ValueError(f"auth: must be base64url of {AUTH_SECRET} bytes")
    return point, secret


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def encrypt(payload: bytes, p256dh: bytes, auth: bytes, *,
            sender: ec.EllipticCurvePrivateKey | None = None,
            salt: bytes | None = None) -> bytes:
    """The aes128gcm body (RFC 8188) carrying ``payload`` to the subscription's keys.

    RFC 8291: an ECDH secret between a fresh key pair of ours (``sender``,
    for the RFC's example only) and the browser's ``p256dh``, mixed with the
    ``auth`` secret, gives with a random 16-byte ``salt`` the content key and
    nonce. The body is the header (salt, record size, our public key) and one
    record: the payload, the last-record delimiter 0x02, the GCM tag.
    """
    sender = sender or ec.generate_private_key(ec.SECP256R1())
    salt = os.urandom(16) if salt is None else salt
    ua_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    as_public = sender.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    ecdh_secret = sender.exchange(ec.ECDH(), ua_public)
    # HKDF-SHA-256 of RFC 5869; every output is at most one hash long, so
    # Expand is one HMAC over info || 0x01.
    prk_key = _hmac(auth, ecdh_secret)
    ikm = _hmac(prk_key, b"WebPush: info\x00" + p256dh + as_public + b"\x01")
    prk = _hmac(salt, ikm)
    cek = _hmac(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = _hmac(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    record = AESGCM(cek).encrypt(nonce, payload + b"\x02", None)
    if len(record) > RECORD_SIZE:
        raise ValueError(f"a Web Push payload must fit one record of {RECORD_SIZE} bytes")
    return salt + struct.pack("!IB", RECORD_SIZE, len(as_public)) + as_public + record


def origin(url: str) -> str:
    """The origin of ``url`` (RFC 6454): a VAPID token's ``aud`` for an endpoint there.

    ValueError unless it is an ASCII https URL, or http to this host (tests,
    a local relay).
    """
    if not url.isascii():
        raise ValueError("the endpoint must be an ASCII URL")
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    if not host or not (parts.scheme == "https"
                        or parts.scheme == "http" and is_loopback(host)):
        raise ValueError("the endpoint must be an https:// URL")
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class VapidKey:
    """The server's VAPID key pair (RFC 8292), ECDSA on P-256.

    ``public_key`` is what the browser's ``applicationServerKey`` wants and
    what goes into ``k=``: base64url of the uncompressed point. A push
    service ties each subscription to it, so the key is made once and kept:
    a new key orphans every subscription (`load_or_create`).
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise VapidKeyError("a VAPID key must be on P-256")
        self._private_key = private_key
        self.public_key = b64url(private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))

    def __repr__(self) -> str:
        return f"<VapidKey {self.public_key}>"

    @classmethod
    def load_or_create(cls, path: Path | str) -> VapidKey:
        """The key kept in the PEM file ``path``, made there (mode 0600) if missing.

        A file that group or others may access, a link, or anything but an
        EC P-256 private key is refused with `VapidKeyError`, as the seed key
        is: whoever holds the key can send to every subscription.
        """
        path = Path(path)
        try:
            return cls(_read_key(path))
        except FileNotFoundError:
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            # Never over a key that subscriptions are tied to (FileExistsError).
            write_new_private(path, pem)
        except FileExistsError:
            # Made by another process between our two calls: that one counts.
            return cls(_read_key(path))
        log.info("made a new VAPID key in {path}", path=str(path))
        return cls(key)

    def jwt(self, claims: dict) -> str:
        """A JWT of ``claims`` signed ES256 (RFC 7515: the signature is raw r || s)."""
        header = b64url(b'{"typ":"JWT","alg":"ES256"}')
        body = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{body}".encode("ascii")
        r, s = decode_dss_signature(
            self._private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return f"{header}.{body}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def authorization(self, audience: str, subject: str, now: float) -> str:
        """The ``Authorization`` header for a push service at ``audience`` (an origin)."""
        token = self.jwt({"aud": audience, "exp": int(now) + TOKEN_LIFETIME, "sub": subject})
        return f"vapid t={token}, k={self.public_key}"


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = read_private(path, "VAPID key file")
    except KeyFileProblem as e:
        raise VapidKeyError(str(e)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise VapidKeyError(f"VAPID key file {path} holds no unencrypted PEM private key")\
            from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                          ec.SECP256R1):
        raise VapidKeyError(f"VAPID key file {path} holds a key that is not EC P-256")
    return key


def _reason(body: bytes) -> str:
    """A push service's refusal as one short printable line (Apple: {"reason": ...})."""
    text = _PRINTABLE.sub(" ", body.decode("utf-8", "replace")).strip()
    return f": {text[:120]}" if text else ""


class WebPushSender:
    """Sends one Web Push message to a subscription; the wake-ups' ``webpush`` kind.

    ``reactor`` provides time and TCP; ``agent`` (an `IAgent`, for tests
    treq's ``RequestTraversalAgent`` with ``reactor`` a `Clock`) replaces the
    default Agent on a pool of persistent connections (there are few push
    services), which `close` closes. ``subject`` is the VAPID ``sub``
    (mailto: or https:), ``timeout`` the deadline of one send, ``ttl`` how
    long the push service may hold a message for an unreachable browser.
    """

    def __init__(self, reactor, key: VapidKey, *, subject: str, timeout: float,
                 agent=None, ttl: int = TTL):
        self._reactor = reactor
        self._key = key
        self.subject = subject
        self.timeout = timeout
        self.ttl = ttl
        self._pool = None
        if agent is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            # A burst of wake-ups goes to a few hosts (fcm.googleapis.com, ...):
            # keep as many connections as the wake-ups have requests in flight.
            self._pool.maxPersistentPerHost = MAX_PERSISTENT
            agent = make_agent(reactor, trust=platformTrust(), connect_timeout=timeout,
                               pool=self._pool)
        self._agent = agent
        self._tokens: dict[str, tuple[float, str]] = {}  # origin -> (made, Authorization)

    def send(self, endpoint: str, p256dh: str, auth: str, payload: bytes) -> Deferred[None]:
        """Encrypt ``payload`` for the subscription and POST it to ``endpoint``.

        Fires with None once the push service took it (2xx; RFC 8030 says
        201). Fails with `SubscriptionGone` on 404 or 410 (a `GatewayError`
        for the caller to log with the device it was for), with `GatewayError`
        on any other status, a bad subscription, a network error or no answer
        within ``timeout``. Cancelling abandons the request (CancelledError).
        Nothing is retried, and the endpoint (a capability) is never logged.
        """
        try:
            audience = origin(endpoint)
            body = encrypt(payload, *subscription_keys(p256dh, auth))
        except ValueError as e:
            return fail(GatewayError(f"web push: {e}"))
        headers = Headers({
            b"Authorization": [self._authorization(audience).encode("ascii")],
            b"Content-Type": [b"application/octet-stream"],
            b"Content-Encoding": [b"aes128gcm"],
            b"TTL": [str(self.ttl).encode("ascii")],
            b"Urgency": [b"high"],
            b"Topic": [TOPIC.encode("ascii")],
        })
        host = urlsplit(endpoint).hostname
        d = Deferred.fromCoroutine(self._post(endpoint.encode("ascii"), headers, body, host))

        def timed_out(result, timeout):
            return Failure(GatewayError(f"web push ({host}): no answer within {timeout:g} s"))
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)
        return d

    def _authorization(self, audience: str) -> str:
        """The VAPID header for ``audience``: one token an hour per push service."""
        now = self._reactor.seconds()
        made, header = self._tokens.get(audience, (None, ""))
        if made is None or not 0 <= now - made < TOKEN_REUSE:
            if len(self._tokens) >= 100:  # endpoints on many self-hosted services
                self._tokens.clear()
            header = self._key.authorization(audience, self.subject, now)
            self._tokens[audience] = (now, header)
        return header

    async def _post(self, url: bytes, headers: Headers, body: bytes, host: str) -> None:
        try:
            response = await self._agent.request(b"POST", url, headers, BytesBody(body))
            ok = 200 <= response.code < 300
            # A refusal's body says why; an acceptance's is read only to free
            # the connection for the pool.
            answer = await read_body(response, None if ok else MAX_ANSWER)
        except BodyTooLarge:
            answer = b""
        except Exception as e:
            if was_cancelled(e):
                raise CancelledError() from None
            raise GatewayError(f"web push ({host}): {describe_failure(e)}") from None
        if ok:
            return
        status = response.code
        if status in (404, 410):
            # Logged by the caller, which knows the device (WakeNotifier).
            raise SubscriptionGone(f"web push ({host}): subscription gone ({status})",
                                   status=status)
        raise GatewayError(f"web push ({host}): status {status}{_reason(answer)}",
                           status=status)

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections (none to close with a caller's agent)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()
