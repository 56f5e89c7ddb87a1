"""Between validated RADIUS packets and the core's values.

Attributes read from an Access-Request:
    User-Name (1), User-Password (2), CHAP-Password (3), NAS-IP-Address (4),
    State (24), Calling-Station-Id (31), NAS-Identifier (32), Proxy-State (33),
    EAP-Message (79), NAS-IPv6-Address (95), Microsoft MS-CHAP-Challenge +
    MS-CHAP2-Response (26/311/11, 26/311/25: MS-CHAPv2, as opaque octets),
    MS-CHAP-Response (26/311/1: MS-CHAPv1, only to refuse it).
Attributes written to replies (Message-Authenticator is added first by the codec):
    Access-Accept:    Reply-Message (18), the attributes of `mfaserver.radius.attributes`
                      (from [[radius.reply]] rules and upstream pass-through),
                      for MS-CHAPv2: MS-CHAP2-Success (26/311/26) and MS-MPPE-Send-Key /
                      MS-MPPE-Recv-Key (26/311/16, 26/311/17), the keys salt-encrypted
                      with this NAS's secret and its Request Authenticator (RFC 2548)
    Access-Reject:    Reply-Message (18) only (RFC 5080 §2.6.1)
    Access-Challenge: Reply-Message (18), State (24)
    all replies:      every Proxy-State (33) of the request, unchanged, in order
"""

from __future__ import annotations

import ipaddress
import os

from mfaserver.auth.model import (MPPE_RECV_KEY, MPPE_SEND_KEY, MSCHAP2_SUCCESS, AuthRequest,
                                  Decision, MsChapV2, Outcome)
from mfaserver.radius import attributes as reply_attrs
from mfaserver.radius import codec
from mfaserver.radius.codec import Packet

MAX_TEXT = 253

REPLY_CODES = {
    Outcome.ACCEPT: codec.ACCESS_ACCEPT,
    Outcome.REJECT: codec.ACCESS_REJECT,
    Outcome.CHALLENGE: codec.ACCESS_CHALLENGE,
}


def _decode_text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace")


def _nas_ip(packet: Packet) -> str | None:
    v4 = packet.get(codec.NAS_IP_ADDRESS)
    if v4 is not None:
        return str(ipaddress.IPv4Address(v4))
    v6 = packet.get(codec.NAS_IPV6_ADDRESS)
    if v6 is not None and len(v6) == 16:
        return str(ipaddress.IPv6Address(v6))
    return None


def _is_pap(packet: Packet) -> bool:
    if not packet.has(codec.USER_PASSWORD):
        return False
    if packet.has(codec.CHAP_PASSWORD) or packet.has(codec.EAP_MESSAGE):
        return False
    for vendor_type, _ in packet.vendor_attributes(codec.VENDOR_MICROSOFT):
        if vendor_type in (1, 25):
            return False
    return True


MSCHAP_CHALLENGE_LENGTH = 16
MSCHAP2_RESPONSE_LENGTH = 50
EAP_TYPE_LEAP = 17


def _protocol(packet: Packet) -> tuple[str, MsChapV2 | None]:
    """What ``packet`` authenticates with, and its MS-CHAPv2 credentials if any."""
    if packet.has(codec.EAP_MESSAGE):
        eap = packet.get(codec.EAP_MESSAGE)
        # An EAP-Response (code 2) of type 17 is Cisco LEAP.
        if len(eap) >= 5 and eap[0] == 2 and eap[4] == EAP_TYPE_LEAP:
            return "leap", None
        return "eap", None
    if packet.has(codec.CHAP_PASSWORD):
        return "chap", None
    ms = packet.vendor_attributes(codec.VENDOR_MICROSOFT)
    types = {vendor_type for vendor_type, _ in ms}
    if codec.MS_CHAP_RESPONSE in types:
        return "mschapv1", None
    if codec.MS_CHAP2_RESPONSE in types:
        challenges = [v for t, v in ms if t == codec.MS_CHAP_CHALLENGE]
        responses = [v for t, v in ms if t == codec.MS_CHAP2_RESPONSE]
        if (len(challenges) == 1 and len(responses) == 1
                and len(challenges[0]) == MSCHAP_CHALLENGE_LENGTH
                and len(responses[0]) == MSCHAP2_RESPONSE_LENGTH
                and not packet.has(codec.USER_PASSWORD)):
            return "mschapv2", MsChapV2(challenges[0], responses[0])
        return "mschapv2 (malformed)", None
    return "pap", None


def to_auth_request(packet: Packet, client_name: str, secret: bytes,
                    source: tuple[str, int]) -> AuthRequest:
    """Build the core's view of a validated Access-Request.

    ``password`` is None when User-Password is not valid UTF-8 (usually a
    wrong shared secret); the core rejects it and says so in the log.
    """
    pap = _is_pap(packet)
    protocol, mschap = ("pap", None) if pap else _protocol(packet)
    password = None
    if pap:
        plain = codec.decrypt_password(packet.get(codec.USER_PASSWORD), secret,
                                       packet.authenticator)
        try:
            password = plain.decode("utf-8")
        except UnicodeDecodeError:
            password = None
    return AuthRequest(
        client_name=client_name,
        username=_decode_text(packet.get(codec.USER_NAME)) or "",
        password=password,
        state=packet.get(codec.STATE),
        nas_ip=_nas_ip(packet),
        nas_identifier=_decode_text(packet.get(codec.NAS_IDENTIFIER)),
        calling_station_id=_decode_text(packet.get(codec.CALLING_STATION_ID)),
        source=f"{source[0]}:{source[1]}",
        pap=pap,
        mschap=mschap,
        protocol=protocol,
    )


def split_text(text: str) -> list[bytes]:
    """UTF-8 encode ``text`` into chunks of at most 253 octets, not splitting a character."""
    data = text.encode("utf-8")
    chunks = []
    while data:
        cut = min(len(data), MAX_TEXT)
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        chunks.append(data[:cut])
        data = data[cut:]
    return chunks


def _salts() -> tuple[bytes, bytes]:
    """Two distinct RFC 2548 salts (high bit set) for the two MPPE keys of one reply."""
    first = bytes((os.urandom(1)[0] | 0x80,)) + os.urandom(1)
    second = bytes(((first[0] + 1) & 0x7F | 0x80, first[1]))
    return first, second


def _mschap_item(name: str, value: bytes, secret: bytes, request: Packet,
                 salts: list[bytes]) -> tuple[int, bytes]:
    if name == MSCHAP2_SUCCESS:
        return codec.vsa(codec.VENDOR_MICROSOFT, codec.MS_CHAP2_SUCCESS, bytes(value))
    vendor_type = codec.MS_MPPE_SEND_KEY if name == MPPE_SEND_KEY else codec.MS_MPPE_RECV_KEY
    hidden = codec.encrypt_salted(bytes(value), secret, request.authenticator, salts.pop())
    return codec.vsa(codec.VENDOR_MICROSOFT, vendor_type, hidden)


def reply_attributes(decision: Decision, request: Packet,
                     secret: bytes | None = None) -> list[tuple[int, bytes]]:
    """The attributes of the reply to ``request`` (Message-Authenticator excluded).

    ``secret`` (the NAS's) is needed only for MS-CHAPv2 items in an Accept.
    """
    attributes = [(codec.REPLY_MESSAGE, chunk) for chunk in split_text(decision.reply_message)]
    if decision.outcome is Outcome.CHALLENGE:
        attributes.append((codec.STATE, decision.state))
    elif decision.outcome is Outcome.ACCEPT:
        salts = list(_salts())
        for name, value in decision.attributes:
            if name in (MSCHAP2_SUCCESS, MPPE_SEND_KEY, MPPE_RECV_KEY):
                if secret is None:
                    raise ValueError("MS-CHAPv2 reply items need the client's secret")
                attributes.append(_mschap_item(name, value, secret, request, salts))
            else:
                attributes.append(reply_attrs.encode(name, value))
    attributes.extend((codec.PROXY_STATE, value)
                      for value in request.get_all(codec.PROXY_STATE))
    return attributes


def reply_context(request: Packet) -> Packet:
    """What the reply to ``request`` needs of it (identifier, authenticator,
    Proxy-State), without the rest: a request held for a push keeps only this."""
    return Packet(request.code, request.identifier, request.authenticator,
                  tuple(pair for pair in request.attributes if pair[0] == codec.PROXY_STATE),
                  b"")


def encode_decision(decision: Decision, request: Packet, secret: bytes) -> bytes:
    """The reply datagram for ``decision``."""
    return codec.encode_response(REPLY_CODES[decision.outcome], request, secret,
                                 reply_attributes(decision, request, secret))
