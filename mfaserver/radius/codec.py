"""Strict RADIUS codec: the only code that reads or writes RADIUS bytes.

Pure functions, no I/O. Decoding validates the whole packet (header, a
bounded single-pass attribute walk, per-attribute lengths and the
Message-Authenticator) before anything is handed out, and raises only
`MalformedPacket` on hostile input. Encoding always puts the
Message-Authenticator first (BlastRADIUS, CVE-2024-3596).

We do not use pyrad's decoder: it accepts attributes that overflow the packet
and loops forever on a VSA sub-attribute of length 0 (security checklist D1).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Iterable

# Packet codes (RFC 2865, RFC 2866, RFC 5997).
ACCESS_REQUEST = 1
ACCESS_ACCEPT = 2
ACCESS_REJECT = 3
ACCOUNTING_REQUEST = 4
ACCOUNTING_RESPONSE = 5
ACCESS_CHALLENGE = 11
STATUS_SERVER = 12

# Attribute types.
USER_NAME = 1
USER_PASSWORD = 2
CHAP_PASSWORD = 3
NAS_IP_ADDRESS = 4
NAS_PORT = 5
SERVICE_TYPE = 6
FILTER_ID = 11
REPLY_MESSAGE = 18
STATE = 24
CLASS = 25
VENDOR_SPECIFIC = 26
SESSION_TIMEOUT = 27
CALLED_STATION_ID = 30
CALLING_STATION_ID = 31
NAS_IDENTIFIER = 32
PROXY_STATE = 33
CHAP_CHALLENGE = 60
NAS_PORT_TYPE = 61
EAP_MESSAGE = 79
MESSAGE_AUTHENTICATOR = 80
NAS_IPV6_ADDRESS = 95
ERROR_CAUSE = 101

# Microsoft vendor attributes (RFC 2548).
VENDOR_MICROSOFT = 311
MS_CHAP_RESPONSE = 1
MS_CHAP_ERROR = 2
MS_CHAP_CHALLENGE = 11
MS_MPPE_SEND_KEY = 16
MS_MPPE_RECV_KEY = 17
MS_CHAP2_RESPONSE = 25
MS_CHAP2_SUCCESS = 26

MAX_PACKET = 4096
MAX_ATTRIBUTES = 200
MAX_VALUE = 253

_HEADER = struct.Struct("!BBH")
_VENDOR_ID = struct.Struct("!I")
_ZERO16 = bytes(16)
_MD5 = hashlib.md5
# An empty Message-Authenticator, ready to be put first in a response.
_MA_HEADER = bytes((MESSAGE_AUTHENTICATOR, 18))

_REQUEST_CODES = frozenset((ACCESS_REQUEST, STATUS_SERVER))
_RESPONSE_CODES = frozenset((ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE))

# Attribute types the walk looks at; every other type passes untouched.
_CHECKED = frozenset((
    USER_NAME, USER_PASSWORD, CHAP_PASSWORD, NAS_IP_ADDRESS, STATE,
    VENDOR_SPECIFIC, PROXY_STATE, EAP_MESSAGE, MESSAGE_AUTHENTICATOR,
    NAS_IPV6_ADDRESS,
))
# RFC 2865 §5.44 allows at most one of each of these in an Access-Request.
_SINGLE = frozenset((
    USER_NAME, USER_PASSWORD, CHAP_PASSWORD, STATE, MESSAGE_AUTHENTICATOR,
))
_FIXED_LENGTH = {
    CHAP_PASSWORD: 17,
    NAS_IP_ADDRESS: 4,
    MESSAGE_AUTHENTICATOR: 16,
    NAS_IPV6_ADDRESS: 16,
}
# RFC 2865 §4.1, plus EAP and MS-CHAP (checked separately) so that the
# server can answer them with a Reject instead of dropping them.
_CREDENTIALS = frozenset((USER_PASSWORD, CHAP_PASSWORD, STATE, EAP_MESSAGE))
_MS_CHAP_RESPONSES = frozenset((MS_CHAP_RESPONSE, MS_CHAP2_RESPONSE))


class MalformedPacket(Exception):
    """A datagram that must be dropped silently.

    ``reason`` is a short text for rate-limited logs; it never holds
    secrets or attribute values.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Packet:
    """A validated RADIUS packet with its attributes raw, in wire order."""

    code: int
    identifier: int
    authenticator: bytes
    attributes: tuple[tuple[int, bytes], ...]
    raw: bytes

    def get(self, attr_type: int) -> bytes | None:
        """Return the first value of ``attr_type``, or None."""
        for t, value in self.attributes:
            if t == attr_type:
                return value
        return None

    def get_all(self, attr_type: int) -> list[bytes]:
        """Return every value of ``attr_type`` in wire order."""
        return [value for t, value in self.attributes if t == attr_type]

    def has(self, attr_type: int) -> bool:
        """Tell whether the packet carries ``attr_type``."""
        for t, _ in self.attributes:
            if t == attr_type:
                return True
        return False

    def vendor_attributes(self, vendor_id: int) -> list[tuple[int, bytes]]:
        """Return (vendor-type, value) of every sub-attribute of that vendor."""
        return _vendor_attributes(self.attributes, vendor_id)


def peek_code(data: bytes) -> int | None:
    """Return the code byte of something that may be a packet, for stats."""
    return data[0] if len(data) >= 20 else None


def decode_request(
    data: bytes, secret: bytes, *, require_message_authenticator: bool = True
) -> Packet:
    """Validate and decode an Access-Request or Status-Server datagram.

    Raise MalformedPacket if the datagram must be dropped.
    ``require_message_authenticator=False`` is for legacy NASes only; even
    then a request carrying Proxy-State must have a Message-Authenticator
    (BlastRADIUS mitigation, "limit_proxy_state").
    """
    raw = _trim(data)
    code = raw[0]
    if code not in _REQUEST_CODES:
        raise MalformedPacket(f"unexpected code {code}")
    attributes, ma_offset, seen = _walk(raw)

    if ma_offset:
        expected = hmac.new(
            secret, raw[:ma_offset] + _ZERO16 + raw[ma_offset + 16:], _MD5
        ).digest()
        if not hmac.compare_digest(expected, raw[ma_offset:ma_offset + 16]):
            raise MalformedPacket("bad message-authenticator")
    elif code == STATUS_SERVER:
        # RFC 5997 §2: Status-Server without Message-Authenticator is dropped.
        raise MalformedPacket("status-server without message-authenticator")
    elif require_message_authenticator:
        raise MalformedPacket("missing message-authenticator")
    elif PROXY_STATE in seen:
        raise MalformedPacket("proxy-state without message-authenticator")

    if code == ACCESS_REQUEST:
        if USER_PASSWORD in seen and CHAP_PASSWORD in seen:
            raise MalformedPacket("both user-password and chap-password")
        if not (seen & _CREDENTIALS) and not _has_ms_chap(attributes):
            raise MalformedPacket("no password, state or eap-message")

    return Packet(code, raw[1], raw[4:20], attributes, raw)


def decode_response(data: bytes, secret: bytes, request_authenticator: bytes) -> Packet:
    """Validate and decode an Access-Accept, -Reject or -Challenge.

    Verify the Response Authenticator and the (required) Message-Authenticator
    against the Request Authenticator we sent; the caller matches the
    identifier. Raise MalformedPacket if the reply must be dropped.
    """
    raw = _trim(data)
    code = raw[0]
    if code not in _RESPONSE_CODES:
        raise MalformedPacket(f"unexpected code {code}")
    attributes, ma_offset, _ = _walk(raw)

    expected = _MD5(raw[:4] + request_authenticator + raw[20:] + secret).digest()
    if not hmac.compare_digest(expected, raw[4:20]):
        raise MalformedPacket("bad response authenticator")
    if not ma_offset:
        raise MalformedPacket("missing message-authenticator")
    signed = raw[:4] + request_authenticator + raw[20:ma_offset] + _ZERO16 + raw[ma_offset + 16:]
    if not hmac.compare_digest(
        hmac.new(secret, signed, _MD5).digest(), raw[ma_offset:ma_offset + 16]
    ):
        raise MalformedPacket("bad message-authenticator")
    return Packet(code, raw[1], raw[4:20], attributes, raw)


def _trim(data: bytes) -> bytes:
    """Check the header lengths and drop the padding beyond Length."""
    if len(data) < 20:
        raise MalformedPacket("short packet")
    length = (data[2] << 8) | data[3]
    if length < 20 or length > MAX_PACKET:
        raise MalformedPacket(f"bad length field {length}")
    if length > len(data):
        raise MalformedPacket("length field beyond datagram")
    # RFC 2865 §3: octets beyond Length are padding and are ignored.
    return data[:length]


def _walk(raw: bytes) -> tuple[tuple[tuple[int, bytes], ...], int, set[int]]:
    """Walk and check the attributes in one bounded pass.

    Return the attributes, the offset of the Message-Authenticator value
    (0 if absent) and the set of checked attribute types present.
    """
    attributes = []
    append = attributes.append
    seen: set[int] = set()
    ma_offset = 0
    sub_count = 0
    end = len(raw)
    i = 20
    while i < end:
        if i + 2 > end:
            raise MalformedPacket("truncated attribute header")
        t = raw[i]
        n = raw[i + 1]
        if n < 2:
            raise MalformedPacket(f"attribute {t} length {n}")
        if i + n > end:
            raise MalformedPacket(f"attribute {t} overflows packet")
        if t == 0:
            raise MalformedPacket("attribute type 0")
        if len(attributes) == MAX_ATTRIBUTES:
            raise MalformedPacket("too many attributes")
        if t in _CHECKED:
            size = n - 2
            if t in seen and t in _SINGLE:
                raise MalformedPacket(f"repeated attribute {t}")
            seen.add(t)
            if t in _FIXED_LENGTH and size != _FIXED_LENGTH[t]:
                raise MalformedPacket(f"attribute {t} length {n}")
            if t == MESSAGE_AUTHENTICATOR:
                ma_offset = i + 2
            elif t == USER_PASSWORD:
                if size < 16 or size > 128 or size % 16:
                    raise MalformedPacket(f"user-password length {n}")
            elif t == VENDOR_SPECIFIC:
                sub_count += _check_vsa(raw, i + 2, i + n)
                if sub_count > MAX_ATTRIBUTES:
                    raise MalformedPacket("too many vendor sub-attributes")
            elif size == 0 and (t == USER_NAME or t == STATE):
                raise MalformedPacket(f"empty attribute {t}")
        append((t, raw[i + 2:i + n]))
        i += n
    return tuple(attributes), ma_offset, seen


def _check_vsa(raw: bytes, start: int, end: int) -> int:
    """Check a Vendor-Specific value in the RFC 2865 §5.26 layout.

    Return the number of sub-attributes. Each one takes at least two
    octets, so the loop is bounded by the attribute length.
    """
    if end - start < 5:
        raise MalformedPacket("short vendor-specific")
    count = 0
    i = start + 4
    while i < end:
        if i + 2 > end:
            raise MalformedPacket("truncated vendor sub-attribute")
        n = raw[i + 1]
        if n < 2:
            raise MalformedPacket(f"vendor sub-attribute length {n}")
        i += n
        count += 1
    if i != end:
        raise MalformedPacket("vendor sub-attribute overflows")
    return count


def _vendor_attributes(
    attributes: tuple[tuple[int, bytes], ...], vendor_id: int
) -> list[tuple[int, bytes]]:
    # Only for attributes that _walk has validated.
    found = []
    for t, value in attributes:
        if t == VENDOR_SPECIFIC and _VENDOR_ID.unpack_from(value)[0] == vendor_id:
            i = 4
            while i < len(value):
                end = i + value[i + 1]
                found.append((value[i], value[i + 2:end]))
                i = end
    return found


def _has_ms_chap(attributes: tuple[tuple[int, bytes], ...]) -> bool:
    """Tell whether a Microsoft MS-CHAP(v2)-Response sub-attribute is present."""
    return any(
        t in _MS_CHAP_RESPONSES for t, _ in _vendor_attributes(attributes, VENDOR_MICROSOFT)
    )


def decrypt_password(hidden: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """Reveal a User-Password hidden as in RFC 2865 §5.2.

    ``hidden`` must have a validated length (a multiple of 16, 16..128).
    Trailing NUL padding is removed; a wrong secret gives garbage, not an
    error.
    """
    if len(hidden) % 16 or not 16 <= len(hidden) <= 128:
        raise ValueError("hidden password length must be a multiple of 16 in 16..128")
    plain = []
    salt = authenticator
    for i in range(0, len(hidden), 16):
        block = hidden[i:i + 16]
        pad = _MD5(secret + salt).digest()
        plain.append(_xor16(block, pad))
        salt = block
    return b"".join(plain).rstrip(b"\0")


def encrypt_password(password: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """Hide a User-Password as in RFC 2865 §5.2 (NUL-padded to 16 octets)."""
    if len(password) > 128:
        raise ValueError("password longer than 128 octets")
    padded = password.ljust(max(16, (len(password) + 15) // 16 * 16), b"\0")
    hidden = []
    salt = authenticator
    for i in range(0, len(padded), 16):
        salt = _xor16(padded[i:i + 16], _MD5(secret + salt).digest())
        hidden.append(salt)
    return b"".join(hidden)


def encrypt_salted(value: bytes, secret: bytes, authenticator: bytes, salt: bytes) -> bytes:
    """Hide ``value`` (an MPPE key) as in RFC 2548 §2.4.2: ``salt`` + ciphertext.

    ``authenticator`` is the Request Authenticator of the Access-Request
    this value answers; ``salt`` is two octets, the first with its high bit
    set, unique among the salted attributes of one packet.
    """
    if len(salt) != 2 or not salt[0] & 0x80:
        raise ValueError("salt must be 2 octets with the high bit set")
    if len(value) > 239:
        raise ValueError("salted value longer than 239 octets")
    plain = bytes((len(value),)) + value
    plain = plain.ljust((len(plain) + 15) // 16 * 16, b"\0")
    hidden = []
    previous = authenticator + salt
    for i in range(0, len(plain), 16):
        block = _xor16(plain[i:i + 16], _MD5(secret + previous).digest())
        hidden.append(block)
        previous = block
    return salt + b"".join(hidden)


def decrypt_salted(hidden: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """Reveal a value hidden as in RFC 2548 §2.4.2 (salt, then 16-octet blocks).

    Raise ValueError on a malformed value (bad length, a key length beyond
    the data): with a wrong secret that is the usual outcome.
    """
    if len(hidden) < 18 or (len(hidden) - 2) % 16:
        raise ValueError("salted value length must be 2 plus a multiple of 16")
    salt, data = hidden[:2], hidden[2:]
    plain = []
    previous = authenticator + salt
    for i in range(0, len(data), 16):
        block = data[i:i + 16]
        plain.append(_xor16(block, _MD5(secret + previous).digest()))
        previous = block
    plain_bytes = b"".join(plain)
    length = plain_bytes[0]
    if length > len(plain_bytes) - 1:
        raise ValueError("salted value length octet beyond the data")
    return plain_bytes[1:1 + length]


def _xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(16, "big")


def vsa(vendor_id: int, vendor_type: int, value: bytes) -> tuple[int, bytes]:
    """Build a Vendor-Specific attribute holding one sub-attribute."""
    if len(value) > MAX_VALUE - 6:
        raise ValueError("vendor attribute value longer than 247 octets")
    sub_attribute = bytes((vendor_type, len(value) + 2)) + value
    return VENDOR_SPECIFIC, _VENDOR_ID.pack(vendor_id) + sub_attribute


def encode_response(
    code: int,
    request: Packet | tuple[int, bytes],
    secret: bytes,
    attributes: Iterable[tuple[int, bytes]],
) -> bytes:
    """Encode an Access-Accept, -Reject or -Challenge answering ``request``.

    ``request`` is the decoded request or its (identifier, authenticator).
    The Message-Authenticator is added first; ``attributes`` must not hold
    one. Raise ValueError on an attribute or packet that cannot be encoded.
    """
    if code not in _RESPONSE_CODES:
        raise ValueError(f"not an access response code: {code}")
    if isinstance(request, Packet):
        identifier, request_authenticator = request.identifier, request.authenticator
    else:
        identifier, request_authenticator = request
    body = _encode_attributes(attributes)
    head = _HEADER.pack(code, identifier, _length(38 + len(body))) + request_authenticator
    # The M-A is computed first, over the Request Authenticator; the
    # Response Authenticator then covers the filled-in M-A.
    ma = hmac.new(secret, head + _MA_HEADER + _ZERO16 + body, _MD5).digest()
    attrs = _MA_HEADER + ma + body
    return head[:4] + _MD5(head + attrs + secret).digest() + attrs


def encode_request(
    code: int,
    identifier: int,
    authenticator: bytes,
    secret: bytes,
    attributes: Iterable[tuple[int, bytes]],
    *,
    message_authenticator: bool = True,
) -> bytes:
    """Encode an Access-Request or Status-Server with a random authenticator.

    The caller passes ``os.urandom(16)`` as ``authenticator`` and hides any
    User-Password with `encrypt_password` first. The Message-Authenticator,
    if wanted, is added first.
    """
    if code not in _REQUEST_CODES:
        raise ValueError(f"not a request code this codec encodes: {code}")
    if len(authenticator) != 16:
        raise ValueError("authenticator must be 16 octets")
    body = _encode_attributes(attributes)
    if not message_authenticator:
        return _HEADER.pack(code, identifier, _length(20 + len(body))) + authenticator + body
    head = _HEADER.pack(code, identifier, _length(38 + len(body))) + authenticator
    ma = hmac.new(secret, head + _MA_HEADER + _ZERO16 + body, _MD5).digest()
    return head + _MA_HEADER + ma + body


def _encode_attributes(attributes: Iterable[tuple[int, bytes]]) -> bytes:
    parts = []
    for t, value in attributes:
        if t == MESSAGE_AUTHENTICATOR:
            raise ValueError("the codec adds the message-authenticator itself")
        if not 1 <= t <= 255:
            raise ValueError(f"bad attribute type {t}")
        if not 1 <= len(value) <= MAX_VALUE:
            # RFC 2865 §5: values are 1..253 octets; longer text must be split.
            raise ValueError(f"attribute {t} value of {len(value)} octets")
        parts.append(bytes((t, len(value) + 2)))
        parts.append(value)
    return b"".join(parts)


def _length(length: int) -> int:
    if length > MAX_PACKET:
        raise ValueError(f"packet of {length} octets exceeds {MAX_PACKET}")
    return length
