"""The push device protocol's cryptography: keys, signed messages, replay checks.

Pure functions and values, no I/O and no clock: time comes in as ``now``
(UTC epoch seconds). The server and the reference authenticator both use this
module, and ``docs/device-api.rst`` describes the same rules for app makers.

Every signed message is UTF-8 text, one field per line, starting with a
context line naming its purpose and version (``mfaserver-poll-v1`` ...), so a
signature made for one purpose never verifies as another. Fields are checked
before they are joined: none may contain a newline, which would make two
different field lists produce the same bytes.

Binary values travel as unpadded base64url (RFC 4648 section 5). Decoding is
strict and canonical, so one value has exactly one text form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import itertools
import re
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

KEY_TYPES = ("ed25519", "p256")
DECISIONS = ("approve", "deny", "fraud")

POLL_CONTEXT = "mfaserver-poll-v1"
ANSWER_CONTEXT = "mfaserver-answer-v1"
ENROLL_CONTEXT = "mfaserver-enroll-v1"

ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
P256_POINT_BYTES = 65          # 0x04 || X (32) || Y (32)
P256_MAX_SIGNATURE_BYTES = 72  # DER SEQUENCE of two INTEGERs of up to 33 bytes

# Identifiers (device id, transaction id, nonce) are base64url-alphabet
# tokens: no newline can hide in them, and they fit in a URL path unescaped.
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A nonce must carry at least 96 bits so two honest requests never collide.
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

# Longer than any valid key or signature text; refusing it first bounds work.
_MAX_TEXT = 256

# Ed25519 curve constants (RFC 8032 section 5.1).
_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Bytes of unpadded base64url ``text``; ValueError unless canonical.

    Canonical means no padding, no whitespace, and unused trailing bits zero:
    otherwise several texts would decode to the same bytes.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url text")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise ValueError("not unpadded base64url text") from e
    if b64url_encode(data) != text:
        raise ValueError("not canonical base64url text")
    return data


# -- keys -------------------------------------------------------------------


def generate_device_key(kind: str = "ed25519"):
    """A new private key of ``kind`` (one of KEY_TYPES), a cryptography object."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {kind!r}: use one of {', '.join(KEY_TYPES)}")


def public_key_text(key) -> str:
    """The wire form of the public half of ``key`` (a private or public key).

    ``ed25519:<base64url of the 32 raw bytes>`` or
    ``p256:<base64url of the 65-byte uncompressed point>``.
    """
    if isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519:" + b64url_encode(raw)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        raw = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return "p256:" + b64url_encode(raw)
    raise TypeError("only Ed25519 and ECDSA P-256 keys are supported")


def load_public_key(text: str):
    """Parse the wire form of a public key; ValueError saying what is wrong.

    Only the two forms ``public_key_text`` writes are accepted, in their
    canonical spelling. Ed25519 keys must decode to a curve point of large
    order; P-256 points must be uncompressed and on the curve.
    """
    if not isinstance(text, str):
        raise ValueError("public key must be text")
    if len(text) > _MAX_TEXT:
        raise ValueError("public key text is too long")
    kind, sep, encoded = text.partition(":")
    if not sep or kind not in KEY_TYPES:
        raise ValueError(
            f"public key must start with one of {', '.join(k + ':' for k in KEY_TYPES)}"
        )
    try:
        raw = b64url_decode(encoded)
    except ValueError as e:
        raise ValueError(f"{kind} public key: {e}") from None
    if kind == "ed25519":
        if len(raw) != ED25519_KEY_BYTES:
            raise ValueError(
                f"ed25519 public key must be {ED25519_KEY_BYTES} bytes, not {len(raw)}"
            )
        _check_ed25519_point(raw)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if len(raw) != P256_POINT_BYTES or raw[0] != 0x04:
        raise ValueError(
            f"p256 public key must be the {P256_POINT_BYTES}-byte uncompressed point"
            " (0x04 || X || Y)"
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise ValueError("p256 public key is not a point on the curve") from None


def _check_ed25519_point(raw: bytes) -> None:
    """ValueError unless ``raw`` decodes (RFC 8032 5.1.3) to a large-order point.

    cryptography accepts any 32 bytes as an Ed25519 public key and only fails
    at verification; checking here lets enrollment refuse junk with a clear
    message. Small-order keys are refused because a signature can verify
    under them for more than one message.
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        raise ValueError("ed25519 public key is not canonically encoded")
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x2 = u * pow(v, -1, _P) % _P  # pow(v, -1) is the inverse, 7x faster than v^(p-2)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        raise ValueError("ed25519 public key is not a point on the curve")
    if x == 0 and sign:
        raise ValueError("ed25519 public key is not canonically encoded")
    if x & 1 != sign:
        x = _P - x
    point = (x, y)
    for _ in range(3):  # multiply by the cofactor 8
        point = _ed25519_add(point, point)
    if point == (0, 1):
        raise ValueError("ed25519 public key is a small-order point")


def _ed25519_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Affine Edwards addition; complete on Ed25519 because d is not a square."""
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow((1 + t) % _P, -1, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow((1 - t) % _P, -1, _P) % _P
    return x3, y3


# -- random values ----------------------------------------------------------


def new_enrollment_token() -> str:
    """A one-time enrollment token: 32 random bytes, base64url (43 characters)."""
    return b64url_encode(secrets.token_bytes(32))


def token_digest(token: str) -> str:
    """Lowercase hex SHA-256 of the token's UTF-8 text: what the server stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_id() -> str:
    """16 random bytes, base64url (22 characters), never starting with "-".

    Admins and scripts pass these ids as command-line arguments, where a
    leading "-" reads as an option; drawing again costs 1 draw in 64.
    """
    while True:
        text = b64url_encode(secrets.token_bytes(16))
        if not text.startswith("-"):
            return text


def new_device_id() -> str:
    """A device id: 16 random bytes, base64url (22 characters)."""
    return _new_id()


def new_transaction_id() -> str:
    """A transaction id: 16 random bytes, base64url (22 characters)."""
    return _new_id()


def new_nonce() -> str:
    """A request nonce for a device: 16 random bytes, base64url (22 characters)."""
    return b64url_encode(secrets.token_bytes(16))


def new_match_number() -> str:
    """A number to match, "10" to "99", uniform; always two digits."""
    return str(10 + secrets.randbelow(90))


# -- signed messages --------------------------------------------------------


def _check_timestamp(timestamp: int) -> str:
    # bool is an int subclass; True is not a time.
    if type(timestamp) is not int or timestamp < 0:
        raise ValueError("timestamp must be a non-negative integer of epoch seconds")
    return str(timestamp)


def _check_id(name: str, value: str, pattern: re.Pattern = _ID) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{name} must match {pattern.pattern}")
    return value


def poll_message(device_id: str, timestamp: int, nonce: str) -> bytes:
    """The bytes a device signs to fetch its pending transactions."""
    fields = [
        POLL_CONTEXT,
        _check_id("device_id", device_id),
        _check_timestamp(timestamp),
        _check_id("nonce", nonce, _NONCE),
    ]
    return "\n".join(fields).encode("utf-8")


def answer_message(device_id: str, txid: str, decision: str, timestamp: int) -> bytes:
    """The bytes a device signs to answer transaction ``txid``.

    The number to match is not part of it: the app shows the number and the
    user types it at the VPN prompt, so the server checks the number on the
    RADIUS side and the device only approves, denies or reports fraud.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
    fields = [
        ANSWER_CONTEXT,
        _check_id("device_id", device_id),
        _check_id("txid", txid),
        decision,
        _check_timestamp(timestamp),
    ]
    return "\n".join(fields).encode("utf-8")


def enroll_message(token_digest: str, public_key: str, timestamp: int) -> bytes:
    """The bytes a device signs at enrollment: proof it holds the private key.

    ``token_digest`` is ``token_digest(token)``, binding the proof to one
    enrollment; ``public_key`` is the wire form, checked by load_public_key.
    """
    _check_id("token_digest", token_digest, _DIGEST)
    load_public_key(public_key)
    fields = [ENROLL_CONTEXT, token_digest, public_key, _check_timestamp(timestamp)]
    return "\n".join(fields).encode("utf-8")


# -- signatures -------------------------------------------------------------


def sign(private_key, message: bytes) -> str:
    """Base64url signature: Ed25519 (64 raw bytes) or DER ECDSA P-256 with SHA-256."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return b64url_encode(private_key.sign(message))
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return b64url_encode(private_key.sign(message, ec.ECDSA(hashes.SHA256())))
    raise TypeError("only Ed25519 and ECDSA P-256 keys are supported")


def verify(public_key, message: bytes, signature: str) -> bool:
    """Whether ``signature`` is valid for ``message`` under ``public_key``.

    Never raises: malformed text, wrong lengths, non-DER or non-minimal DER
    signatures and unsupported key types are all simply False.
    """
    try:
        if not isinstance(message, bytes) or len(signature) > _MAX_TEXT:
            return False
        raw = b64url_decode(signature)
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            if len(raw) != ED25519_SIGNATURE_BYTES:
                return False
            public_key.verify(raw, message)
            return True
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        ):
            if len(raw) > P256_MAX_SIGNATURE_BYTES:
                return False
            # Only the one minimal DER form, so a signature has one spelling.
            r, s = decode_dss_signature(raw)
            if encode_dss_signature(r, s) != raw:
                return False
            public_key.verify(raw, message, ec.ECDSA(hashes.SHA256()))
            return True
        return False
    except (InvalidSignature, ValueError, TypeError):
        return False


# -- replay protection ------------------------------------------------------


def is_fresh(timestamp: int, now: float, skew: int = 60) -> bool:
    """Whether integer ``timestamp`` is within ``skew`` seconds of ``now``."""
    return type(timestamp) is int and abs(timestamp - now) <= skew


class FreshnessWindow:
    """Server-side freshness and single-use check for signed device requests.

    A request is accepted once if its timestamp is within ``skew`` seconds of
    ``now`` and its key was not accepted before. A key is remembered until its
    timestamp leaves the window, after which the timestamp alone rejects it,
    so memory holds at most the keys of the last ``2 * skew`` seconds, and
    never more than ``max_entries``: when full, new requests are refused
    (fail closed) rather than forgetting a key that could then be replayed.

    Call it after the signature verified, so only enrolled devices can fill
    it. Keys must not contain the signature: ECDSA signatures are malleable
    (``s`` and ``n - s`` both verify), so a replay could pass as new. Use
    ``(device_id, nonce)`` for polls. Answers and enrollments need only
    ``is_fresh``: they are single use through the store (a transaction is
    answered once, a token consumed once, atomically), and a retry of an
    answer must get "already answered", not "replayed".
    """

    def __init__(self, skew: int = 60, max_entries: int = 100_000):
        if skew < 0 or max_entries < 1:
            raise ValueError("skew must be >= 0 and max_entries >= 1")
        self.skew = skew
        self.max_entries = max_entries
        self._expiry: dict[tuple, float] = {}
        # (expiry, sequence, key): the sequence keeps keys from being compared.
        self._heap: list[tuple[float, int, tuple]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._expiry)

    @property
    def full(self) -> bool:
        """True while no new key can be remembered (`check` refuses every one)."""
        return len(self._expiry) >= self.max_entries

    def check(self, key: tuple, timestamp: int, now: float) -> bool:
        """True the first time ``key`` is seen with a fresh ``timestamp``; else False."""
        self._expire(now)
        if not is_fresh(timestamp, now, self.skew):
            return False
        if key in self._expiry or len(self._expiry) >= self.max_entries:
            return False
        expiry = timestamp + self.skew
        self._expiry[key] = expiry
        heapq.heappush(self._heap, (expiry, next(self._sequence), key))
        return True

    def _expire(self, now: float) -> None:
        # A timestamp t is fresh while now <= t + skew; past that, forget it.
        while self._heap and self._heap[0][0] < now:
            _, _, key = heapq.heappop(self._heap)
            del self._expiry[key]
