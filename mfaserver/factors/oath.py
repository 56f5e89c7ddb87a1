"""HOTP (RFC 4226) and TOTP (RFC 6238) maths: pure functions, no I/O, no clock.

Time is always passed in as ``now``, UTC epoch seconds. The time step is
computed here as ``int(now) // period``; pyotp's ``TOTP.at``/``verify``/``now``
are deliberately not used because they round-trip through naive local time
and are an hour off during the DST fall-back hour (security checklist D3).

Replay protection is split: the ``match_*`` functions never accept a TOTP step
at or before ``token.last_step`` nor an HOTP counter below ``token.counter``;
recording the newly accepted step or counter, atomically with the check, is
the store's job (OTP-02, OTP-07).

Codes are always strings: leading zeros matter and are kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from urllib.parse import quote, urlencode

from mfaserver.auth.model import OATH_ALGORITHMS, Token, TokenKind

ALGORITHMS = OATH_ALGORITHMS

# Seed sizes for generated secrets: the HMAC output length of each hash,
# as RFC 6238 Appendix B uses (and RFC 4226 R6 recommends 160 bits for SHA-1).
SECRET_SIZES = {"sha1": 20, "sha256": 32, "sha512": 64}

# RFC 4226 R6: the shared secret MUST be at least 128 bits (OTP-01).
MIN_SECRET_BYTES = 16

# Anything longer than this cannot be a code, however much whitespace
# surrounds it; refusing it first keeps 1 MB junk from being scanned.
MAX_CODE_INPUT = 64

# A base32 seed longer than this is not an OATH seed (a 64-byte SHA-512
# seed is 104 characters); refusing it first bounds the work done.
MAX_BASE32_INPUT = 1024

_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
_ASCII_DIGITS = frozenset("0123456789")
_BASE32_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def normalize_code(code: str, digits: int) -> str | None:
    """Return ``code`` without surrounding whitespace if it is exactly ``digits``
    ASCII digits, else None.

    Full-width or other non-ASCII digits, letters, inner spaces and codes of
    the wrong length are refused rather than "fixed": a code either is in the
    expected form or it is wrong.
    """
    if not isinstance(code, str) or len(code) > MAX_CODE_INPUT:
        return None
    code = code.strip()
    if len(code) != digits or not _ASCII_DIGITS.issuperset(code):
        return None
    return code


def hotp(secret: bytes, counter: int, digits: int = 6, algorithm: str = "sha1") -> str:
    """The RFC 4226 HOTP value for ``counter``, as a zero-padded string.

    ``algorithm`` selects the HMAC hash as RFC 6238 allows (sha1, sha256, sha512).
    """
    digest = _DIGESTS.get(algorithm)
    if digest is None:
        raise ValueError(f"unsupported OATH algorithm {algorithm!r}")
    if not 0 <= counter < 2**64:
        raise ValueError("counter must fit in 8 unsigned bytes")
    # Dynamic truncation yields 31 bits, so at most 10 decimal digits.
    if not 6 <= digits <= 10:
        raise ValueError("digits must be between 6 and 10")
    mac = hmac.new(secret, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def totp_step(now: float, period: int = 30) -> int:
    """The RFC 6238 time step ``T`` for UTC epoch seconds ``now`` (T0 = 0)."""
    if period <= 0:
        raise ValueError("period must be positive")
    return int(now) // period


def _code_at(token: Token, counter: int) -> str:
    return hotp(token.secret, counter, token.digits, token.algorithm)


def _search_order(center: int, window: int):
    """Yield center, center-1, center+1, ..., center-window, center+window."""
    yield center
    for distance in range(1, window + 1):
        yield center - distance
        yield center + distance


def _totp_candidates(token: Token, now: float, window: int):
    center = totp_step(now, token.period) + token.drift
    for step in _search_order(center, window):
        if step >= 0:
            yield step


def match_totp(token: Token, code: str, now: float, window: int = 1) -> int | None:
    """Check a TOTP code; return the matched absolute time step, or None.

    Steps are tried nearest first around ``totp_step(now) + token.drift``,
    up to ``window`` steps either side (OTP-03: one step of network delay).
    A step at or before ``token.last_step`` never matches (replay guard); the
    caller must store the returned step as the new ``last_step`` atomically.
    """
    code = normalize_code(code, token.digits)
    if code is None:
        return None
    for step in _totp_candidates(token, now, window):
        if token.last_step is not None and step <= token.last_step:
            continue
        if hmac.compare_digest(_code_at(token, step), code):
            return step
    return None


def totp_replayed(token: Token, code: str, now: float, window: int = 1) -> bool:
    """True when ``code`` is valid for an already used step (<= ``last_step``).

    Lets the caller tell "OTP already used" apart from a wrong code, so the
    user can be warned (OTP-09). Call it only after ``match_totp`` failed.
    """
    code = normalize_code(code, token.digits)
    if code is None or token.last_step is None:
        return False
    return any(
        step <= token.last_step and hmac.compare_digest(_code_at(token, step), code)
        for step in _totp_candidates(token, now, window)
    )


def match_hotp(token: Token, code: str, look_ahead: int = 10) -> int | None:
    """Check an HOTP code; return the matched counter, or None.

    ``token.counter`` is the next counter expected. Counters ``token.counter``
    through ``token.counter + look_ahead`` inclusive are tried (so the default
    accepts the expected code and 10 skipped presses). The caller must store
    ``matched + 1`` as the new counter atomically; counters below
    ``token.counter`` are never tried, which is what stops re-use.
    """
    code = normalize_code(code, token.digits)
    if code is None:
        return None
    for counter in range(token.counter, token.counter + look_ahead + 1):
        if hmac.compare_digest(_code_at(token, counter), code):
            return counter
    return None


def hotp_replayed(token: Token, code: str, look_back: int = 10) -> bool:
    """True when ``code`` matches one of the ``look_back`` counters before
    ``token.counter`` (already used or skipped): a likely re-use (OTP-09)."""
    code = normalize_code(code, token.digits)
    if code is None:
        return False
    return any(
        hmac.compare_digest(_code_at(token, counter), code)
        for counter in range(max(0, token.counter - look_back), token.counter)
    )


def resync_hotp(token: Token, code1: str, code2: str, window: int = 1000) -> int | None:
    """Resynchronise an HOTP token from two consecutive codes.

    Finds ``c`` in ``[token.counter, token.counter + window)`` with
    ``hotp(c) == code1`` and ``hotp(c + 1) == code2`` and returns the new next
    counter ``c + 2``, or None. Starting at ``token.counter`` means old codes
    can never move the counter backwards.
    """
    code1 = normalize_code(code1, token.digits)
    code2 = normalize_code(code2, token.digits)
    if code1 is None or code2 is None:
        return None
    current = _code_at(token, token.counter)
    for c in range(token.counter, token.counter + window):
        following = _code_at(token, c + 1)
        # Both comparisons always run: no shortcut that says which code was right.
        first_ok = hmac.compare_digest(current, code1)
        second_ok = hmac.compare_digest(following, code2)
        if first_ok and second_ok:
            return c + 2
        current = following
    return None


def resync_totp(
    token: Token, code1: str, code2: str, now: float, window: int = 120
) -> tuple[int, int] | None:
    """Learn a TOTP token's clock drift from two consecutive codes.

    With ``s = totp_step(now)``, finds the offset ``d`` in ``[-window, window]``
    (nearest to zero first) where ``code1`` is valid at ``s + d`` and ``code2``
    at ``s + d + 1``, and returns ``(new_drift, last_used_step)`` =
    ``(d, s + d + 1)``, or None. The stored drift is ignored here: resync is
    what you do when it is wrong. Steps at or before ``token.last_step`` are
    not considered, so replayed old codes cannot wind the token back.
    """
    code1 = normalize_code(code1, token.digits)
    code2 = normalize_code(code2, token.digits)
    if code1 is None or code2 is None:
        return None
    s = totp_step(now, token.period)
    lowest = s - window
    if token.last_step is not None:
        lowest = max(lowest, token.last_step + 1)
    lowest = max(lowest, 0)
    # One HMAC per step, computed once, instead of two per candidate offset.
    codes = {step: _code_at(token, step) for step in range(lowest, s + window + 2)}
    for d in _search_order(0, window):
        step = s + d
        if step not in codes:
            continue
        first_ok = hmac.compare_digest(codes[step], code1)
        second_ok = hmac.compare_digest(codes[step + 1], code2)
        if first_ok and second_ok:
            return d, step + 1
    return None


def generate_secret(algorithm: str = "sha1") -> bytes:
    """A fresh random seed from the OS CSPRNG: 20, 32 or 64 bytes by algorithm."""
    try:
        size = SECRET_SIZES[algorithm]
    except KeyError:
        raise ValueError(f"unsupported OATH algorithm {algorithm!r}") from None
    return os.urandom(size)


def otpauth_uri(token: Token, issuer: str = "mfaserver", account: str | None = None) -> str:
    """The ``otpauth://`` provisioning URI (Google Authenticator key URI format).

    ``account`` defaults to the token's user, then its serial. The label and
    every parameter are percent-encoded; the secret is unpadded base32.
    The URI contains the seed: show it once (QR code), never log it.
    """
    if account is None:
        account = token.user or token.serial
    kind = TokenKind(token.kind).value
    label = f"{quote(issuer, safe='')}:{quote(account, safe='')}"
    params = [
        ("secret", base64.b32encode(token.secret).decode("ascii").rstrip("=")),
        ("issuer", issuer),
        ("algorithm", token.algorithm.upper()),
        ("digits", str(token.digits)),
    ]
    if kind == TokenKind.TOTP.value:
        params.append(("period", str(token.period)))
    else:
        params.append(("counter", str(token.counter)))
    return f"otpauth://{kind}/{label}?{urlencode(params, quote_via=quote)}"


def parse_base32_secret(text: str) -> bytes:
    """Decode a base32 seed as typed by an admin or printed on a token sheet.

    Accepts lower case, spaces (and other whitespace), dashes between groups
    and missing ``=`` padding. Raises ValueError if the text is not base32 or
    the seed is shorter than 128 bits (RFC 4226 R6 MUST; OTP-01). Messages
    never repeat the input, which is a secret.
    """
    if len(text) > MAX_BASE32_INPUT:
        raise ValueError("base32 secret is too long")
    cleaned = "".join(text.split()).replace("-", "").upper().rstrip("=")
    if not cleaned:
        raise ValueError("base32 secret is empty")
    if not _BASE32_ALPHABET.issuperset(cleaned):
        raise ValueError("base32 secret contains characters outside A-Z and 2-7")
    padded = cleaned + "=" * (-len(cleaned) % 8)
    try:
        secret = base64.b32decode(padded)
    except binascii.Error:
        raise ValueError("base32 secret has an impossible length") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret is {len(secret) * 8} bits; at least {MIN_SECRET_BYTES * 8} bits "
            "are required (RFC 4226 R6)"
        )
    return secret
