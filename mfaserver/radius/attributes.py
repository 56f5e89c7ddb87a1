"""The RADIUS attributes mfaserver can put in an Access-Accept, by dictionary name.

Used by the config (to check names in ``[[radius.reply]]`` and
``[directory.radius] pass_through``), by the upstream RADIUS client (to pick
pass-through attributes out of an upstream Access-Accept) and by
`mfaserver.radius.translate` (to encode them).
"""

from __future__ import annotations

import ipaddress
import struct


def _string(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _integer(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        if len(value) != 4:
            raise ValueError("an integer attribute is 4 octets")
        return value
    number = int(value)
    if not 0 <= number < 2**32:
        raise ValueError(f"{value!r} is out of range for an integer attribute")
    return struct.pack("!I", number)


def _ipaddr(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        if len(value) != 4:
            raise ValueError("an ipaddr attribute is 4 octets")
        return value
    return ipaddress.IPv4Address(value).packed


# name -> (attribute number, encoder). Values from config are text; values
# passed through from an upstream server are the raw octets.
REPLY_ATTRIBUTES = {
    "Service-Type": (6, _integer),
    "Framed-Protocol": (7, _integer),
    "Framed-IP-Address": (8, _ipaddr),
    "Framed-IP-Netmask": (9, _ipaddr),
    "Filter-Id": (11, _string),
    "Framed-MTU": (12, _integer),
    "Class": (25, _string),
    "Session-Timeout": (27, _integer),
    "Idle-Timeout": (28, _integer),
    "Acct-Interim-Interval": (85, _integer),
    "Framed-Pool": (88, _string),
}

NUMBERS = {name: number for name, (number, _) in REPLY_ATTRIBUTES.items()}
NAMES = {number: name for name, number in NUMBERS.items()}


def encode(name: str, value: str | bytes) -> tuple[int, bytes]:
    """``(number, octets)`` for a reply attribute; ValueError for a bad value."""
    number, encoder = REPLY_ATTRIBUTES[name]
    return number, encoder(value)
