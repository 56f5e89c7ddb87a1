"""Password hashing for local users: scrypt from the standard library.

The encoded form is ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`` so the
parameters can be raised later without breaking stored hashes. Both calls are
CPU-bound (tens of milliseconds by design): the daemon runs them in a thread
pool, never on the reactor thread. OpenSSL's scrypt releases the GIL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

LOG2_N = 14
R = 8
P = 1
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, log2_n: int = LOG2_N) -> str:
    """Return the encoded scrypt hash of ``password`` with a fresh salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << log2_n,
                            r=R, p=P, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${log2_n}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str | None) -> bool:
    """True if ``password`` matches ``encoded``; False for any malformed hash."""
    if not encoded or not password:
        return False
    try:
        scheme, log2_n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt),
                                n=1 << int(log2_n), r=int(r), p=int(p),
                                maxmem=_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_dummy: list[str] = []


def dummy_hash() -> str:
    """A hash of a random password, checked when the user does not exist, so
    that "unknown user" costs as much time as "wrong password"."""
    if not _dummy:
        _dummy.append(hash_password(os.urandom(12).hex()))
    return _dummy[0]
