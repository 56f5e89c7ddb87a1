"""An MS-CHAPv2 peer for tests (RFC 2759) and its MPPE keys (RFC 3079).

The test client of the MS-CHAPv2 tests computes what a VPN client does:
the NT-Response to an authenticator challenge, the authenticator response it
expects in MS-CHAP2-Success, and the MPPE keys the server must hand the NAS.
MD4 and DES come from pycryptodome (OpenSSL 3 has no MD4 by default); the
SHA-1 steps after PasswordHashHash are `mfaserver.directory.ntlm`'s. All are
checked against the test vectors of RFC 2759 §9.2 and RFC 3079 §3.5.3 in
tests/test_mschap.py, so the client is no less independent for sharing them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from Crypto.Cipher import DES
from Crypto.Hash import MD4

from mfaserver.directory import ntlm
from mfaserver.directory.ntlm import challenge_hash  # noqa: F401 - part of the client




def nt_password_hash(password: str) -> bytes:
    return MD4.new(password.encode("utf-16-le")).digest()


def hash_nt_password_hash(password_hash: bytes) -> bytes:
    return MD4.new(password_hash).digest()


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
    return ntlm.authenticator_response(
        hash_nt_password_hash(nt_password_hash(password)), nt_resp,
        challenge_hash(peer_challenge, authenticator_challenge, username))


def server_keys(password: str, nt_resp: bytes) -> tuple[bytes, bytes]:
    """The server's (send, receive) MPPE keys, RFC 3079."""
    return ntlm.mppe_keys(hash_nt_password_hash(nt_password_hash(password)), nt_resp)


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
        return server_keys(self.password, self.nt_response)
