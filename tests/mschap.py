"""An MS-CHAPv2 peer for tests (RFC 2759) and its MPPE keys (RFC 3079).

The test client of the MS-CHAPv2 tests computes what a VPN client does:
the NT-Response to an authenticator challenge, the authenticator response it
expects in MS-CHAP2-Success, and the MPPE keys the server must hand the NAS.
MD4 and DES come from pycryptodome (OpenSSL 3 has no MD4 by default); the
functions are checked against the test vectors of RFC 2759 §9.2 and
RFC 3079 §3.5.3 in tests/test_mschap.py.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from Crypto.Cipher import DES
from Crypto.Hash import MD4

MAGIC1 = b"Magic server to client signing constant"
MAGIC2 = b"Pad to make it do more than one iteration"
# RFC 3079 §3.4
KEY_MAGIC1 = b"This is the MPPE Master Key"
KEY_MAGIC2 = (b"On the client side, this is the send key; "
              b"on the server side, it is the receive key.")
KEY_MAGIC3 = (b"On the client side, this is the receive key; "
              b"on the server side, it is the send key.")
SHS_PAD1 = bytes(40)
SHS_PAD2 = b"\xf2" * 40


def nt_password_hash(password: str) -> bytes:
    return MD4.new(password.encode("utf-16-le")).digest()


def hash_nt_password_hash(password_hash: bytes) -> bytes:
    return MD4.new(password_hash).digest()


def challenge_hash(peer_challenge: bytes, authenticator_challenge: bytes,
                   username: str) -> bytes:
    return hashlib.sha1(peer_challenge + authenticator_challenge
                        + username.encode("utf-8")).digest()[:8]


def _des_key(seven: bytes) -> bytes:
    bits = int.from_bytes(seven, "big")
    return bytes(((bits >> (49 - 7 * i)) & 0x7F) << 1 for i in range(8))


def challenge_response(challenge: bytes, password_hash: bytes) -> bytes:
    padded = password_hash.ljust(21, b"\0")
    return b"".join(DES.new(_des_key(padded[i:i + 7]), DES.MODE_ECB).encrypt(challenge)
                    for i in (0, 7, 14))


def nt_response(authenticator_challenge: bytes, peer_challenge: bytes, username: str,
                password: str) -> bytes:
    return challenge_response(challenge_hash(peer_challenge, authenticator_challenge, username),
                              nt_password_hash(password))


def authenticator_response(password: str, nt_resp: bytes, peer_challenge: bytes,
                           authenticator_challenge: bytes, username: str) -> bytes:
    """The ``S=`` text (42 octets) the server proves it knows the password with."""
    hash_hash = hash_nt_password_hash(nt_password_hash(password))
    digest = hashlib.sha1(hash_hash + nt_resp + MAGIC1).digest()
    digest = hashlib.sha1(digest + challenge_hash(peer_challenge, authenticator_challenge,
                                                  username) + MAGIC2).digest()
    return b"S=" + digest.hex().upper().encode("ascii")


def master_key(password: str, nt_resp: bytes) -> bytes:
    hash_hash = hash_nt_password_hash(nt_password_hash(password))
    return hashlib.sha1(hash_hash + nt_resp + KEY_MAGIC1).digest()[:16]


def asymmetric_start_key(master: bytes, length: int, is_send: bool, is_server: bool) -> bytes:
    if is_send:
        magic = KEY_MAGIC3 if is_server else KEY_MAGIC2
    else:
        magic = KEY_MAGIC2 if is_server else KEY_MAGIC3
    return hashlib.sha1(master + SHS_PAD1 + magic + SHS_PAD2).digest()[:length]


@dataclass
class MsChapLogin:
    """One MS-CHAPv2 attempt as a VPN client makes it."""

    username: str
    password: str
    authenticator_challenge: bytes
    peer_challenge: bytes
    ident: int = 1

    @classmethod
    def new(cls, username: str, password: str) -> "MsChapLogin":
        return cls(username, password, os.urandom(16), os.urandom(16))

    @property
    def nt_response(self) -> bytes:
        return nt_response(self.authenticator_challenge, self.peer_challenge, self.username,
                           self.password)

    def response_attribute(self) -> bytes:
        """MS-CHAP2-Response (RFC 2548 §2.3.2): ident, flags, peer challenge,
        8 reserved octets, NT-Response."""
        return (bytes((self.ident, 0)) + self.peer_challenge + bytes(8) + self.nt_response)

    def expected_success(self) -> bytes:
        """MS-CHAP2-Success as the server must send it: ident, then ``S=...``."""
        return bytes((self.ident,)) + authenticator_response(
            self.password, self.nt_response, self.peer_challenge,
            self.authenticator_challenge, self.username)

    def server_keys(self) -> tuple[bytes, bytes]:
        """(MS-MPPE-Send-Key, MS-MPPE-Recv-Key) a server sends: 16-octet keys."""
        master = master_key(self.password, self.nt_response)
        return (asymmetric_start_key(master, 16, True, True),
                asymmetric_start_key(master, 16, False, True))
