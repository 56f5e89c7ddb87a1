"""RADIUS test vectors from the RFCs and a minimal pyrad dictionary."""

from __future__ import annotations


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 2865 §7.1: user "nemo", password "arctangent", secret "xyzzy5461".
RFC2865_SECRET = b"xyzzy5461"
RFC2865_ACCESS_REQUEST = _hex("""
    01 00 00 38 0f 40 3f 94 73 97 80 57 bd 83 d5 cb
    98 f4 22 7a 01 06 6e 65 6d 6f 02 12 0d be 70 8d
    93 d4 13 ce 31 96 e4 3f 78 2a 0a ee 04 06 c0 a8
    01 10 05 06 00 00 00 03
""")
RFC2865_REQUEST_AUTHENTICATOR = _hex("0f403f9473978057bd83d5cb98f4227a")
RFC2865_HIDDEN_PASSWORD = _hex("0dbe708d93d413ce3196e43f782a0aee")
# The Access-Accept answering it (Service-Type, Login-Service, Login-IP-Host),
# without Message-Authenticator as RADIUS was in 2000.
RFC2865_ACCESS_ACCEPT = _hex("""
    02 00 00 26 86 fe 22 0e 76 24 ba 2a 10 05 f6 bf
    9b 55 e0 b2 06 06 00 00 00 01 0f 06 00 00 00 00
    0e 06 c0 a8 01 03
""")

# RFC 5997 §6: Status-Server with Message-Authenticator, secret "xyzzy5461".
RFC5997_STATUS_SERVER = _hex("""
    0c da 00 26 8a 54 f4 68 6f b3 94 c5 28 66 e3 02
    18 5d 06 23 50 12 5a 66 5e 2e 1e 84 11 f3 e2 43
    82 20 97 c8 4f a3
""")

# Enough of the standard dictionary for pyrad to build and parse our packets.
PYRAD_DICTIONARY = """\
ATTRIBUTE User-Name 1 string
ATTRIBUTE User-Password 2 string encrypt=1
ATTRIBUTE CHAP-Password 3 octets
ATTRIBUTE NAS-IP-Address 4 ipaddr
ATTRIBUTE NAS-Port 5 integer
ATTRIBUTE Service-Type 6 integer
ATTRIBUTE Filter-Id 11 string
ATTRIBUTE Reply-Message 18 string
ATTRIBUTE State 24 octets
ATTRIBUTE Class 25 octets
ATTRIBUTE Vendor-Specific 26 octets
ATTRIBUTE Session-Timeout 27 integer
ATTRIBUTE Called-Station-Id 30 string
ATTRIBUTE Calling-Station-Id 31 string
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Proxy-State 33 octets
ATTRIBUTE NAS-Port-Type 61 integer
ATTRIBUTE EAP-Message 79 octets
ATTRIBUTE Message-Authenticator 80 octets
ATTRIBUTE Error-Cause 101 integer
"""
