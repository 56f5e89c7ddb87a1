"""Tests for mfaserver.factors.oath: RFC vectors, windows, replay, resync, DST, fuzz."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import time
from dataclasses import replace
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfaserver.auth.model import Token, TokenKind
from mfaserver.factors import oath

SEED_SHA1 = b"12345678901234567890"
SEED_SHA256 = b"12345678901234567890123456789012"
SEED_SHA512 = b"1234567890" * 6 + b"1234"
SEEDS = {"sha1": SEED_SHA1, "sha256": SEED_SHA256, "sha512": SEED_SHA512}

# RFC 4226 Appendix D: counters 0..9 with the 20-byte ASCII seed.
RFC4226_CODES = [
    "755224", "287082", "359152", "969429", "338314",
    "254676", "287922", "162583", "399871", "520489",
]

# RFC 6238 Appendix B: (time, sha1, sha256, sha512), 8 digits, 30 s step.
RFC6238_VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]

NOW = 1_700_000_000.0  # a fixed UTC instant; tests never read the clock


def totp_token(**changes) -> Token:
    base = Token(id=1, serial="T1", user="alice", kind=TokenKind.TOTP, secret=SEED_SHA1)
    return replace(base, **changes)


def hotp_token(**changes) -> Token:
    base = Token(id=2, serial="H1", user="alice", kind=TokenKind.HOTP, secret=SEED_SHA1)
    return replace(base, **changes)


def code_at_step(token: Token, step: int) -> str:
    return oath.hotp(token.secret, step, token.digits, token.algorithm)


# --- RFC vectors -----------------------------------------------------------

@pytest.mark.parametrize("counter,expected", list(enumerate(RFC4226_CODES)))
def test_hotp_rfc4226_appendix_d(counter, expected):
    assert oath.hotp(SEED_SHA1, counter) == expected


@pytest.mark.parametrize("vector", RFC6238_VECTORS)
def test_totp_rfc6238_appendix_b(vector):
    now, *codes = vector
    for algorithm, expected in zip(oath.ALGORITHMS, codes):
        token = totp_token(secret=SEEDS[algorithm], algorithm=algorithm, digits=8)
        step = oath.totp_step(now)
        assert oath.hotp(token.secret, step, 8, algorithm) == expected
        assert oath.match_totp(token, expected, now) == step


@pytest.mark.parametrize("algorithm", oath.ALGORITHMS)
@pytest.mark.parametrize("digits", [6, 7, 8])
def test_hotp_agrees_with_pyotp(algorithm, digits):
    digest = getattr(hashlib, algorithm)
    secret = SEEDS[algorithm]
    reference = pyotp.HOTP(base64.b32encode(secret).decode(), digits=digits, digest=digest)
    for counter in (0, 1, 59, 2**31, 2**40 + 7):
        assert oath.hotp(secret, counter, digits, algorithm) == reference.at(counter)


def test_hotp_keeps_leading_zeros():
    assert oath.hotp(SEED_SHA1, 1111111109 // 30, 8) == "07081804"


def test_hotp_rejects_unknown_algorithm_and_bad_arguments():
    with pytest.raises(ValueError):
        oath.hotp(SEED_SHA1, 0, 6, "md5")
    with pytest.raises(ValueError):
        oath.hotp(SEED_SHA1, -1)
    with pytest.raises(ValueError):
        oath.hotp(SEED_SHA1, 0, digits=11)


def test_totp_step():
    assert oath.totp_step(59) == 1
    assert oath.totp_step(59.999) == 1
    assert oath.totp_step(60) == 2
    assert oath.totp_step(119, period=60) == 1
    with pytest.raises(ValueError):
        oath.totp_step(NOW, period=0)


# --- TOTP window, drift, replay --------------------------------------------

def test_totp_accepts_one_step_either_side_by_default():
    token = totp_token()
    s = oath.totp_step(NOW)
    assert oath.match_totp(token, code_at_step(token, s), NOW) == s
    assert oath.match_totp(token, code_at_step(token, s - 1), NOW) == s - 1
    assert oath.match_totp(token, code_at_step(token, s + 1), NOW) == s + 1
    assert oath.match_totp(token, code_at_step(token, s - 2), NOW) is None
    assert oath.match_totp(token, code_at_step(token, s + 2), NOW) is None
    assert oath.match_totp(token, code_at_step(token, s + 1), NOW, window=0) is None


def test_totp_code_from_90s_ago_needs_recorded_drift():
    token = totp_token()
    old_code = code_at_step(token, oath.totp_step(NOW - 90))
    assert oath.match_totp(token, old_code, NOW) is None
    drifted = replace(token, drift=-2)
    assert oath.match_totp(drifted, old_code, NOW) == oath.totp_step(NOW - 90)


def test_totp_same_step_twice_is_rejected():
    token = totp_token()
    code = code_at_step(token, oath.totp_step(NOW))
    step = oath.match_totp(token, code, NOW)
    assert step is not None
    used = replace(token, last_step=step)  # what the store records
    assert oath.match_totp(used, code, NOW) is None
    assert oath.match_totp(used, code, NOW + 5) is None
    assert oath.totp_replayed(used, code, NOW)
    assert not oath.totp_replayed(token, code, NOW)


def test_totp_older_step_after_newer_one_is_rejected():
    token = totp_token()
    s = oath.totp_step(NOW)
    newer = oath.match_totp(token, code_at_step(token, s), NOW)
    used = replace(token, last_step=newer)
    older_code = code_at_step(token, s - 1)
    assert oath.match_totp(used, older_code, NOW) is None
    assert oath.totp_replayed(used, older_code, NOW)
    # The next step is still fine.
    assert oath.match_totp(used, code_at_step(token, s + 1), NOW) == s + 1


def test_totp_wrong_code_is_not_reported_as_replay():
    token = totp_token(last_step=oath.totp_step(NOW))
    wrong = "000000" if code_at_step(token, oath.totp_step(NOW)) != "000000" else "111111"
    assert not oath.totp_replayed(token, wrong, NOW)


def test_totp_uses_token_period_and_digits():
    token = totp_token(secret=SEED_SHA256, algorithm="sha256", digits=8, period=60)
    s = oath.totp_step(NOW, 60)
    assert oath.match_totp(token, code_at_step(token, s), NOW) == s
    assert oath.match_totp(token, code_at_step(token, s)[:6], NOW) is None


def test_resync_totp_learns_drift_then_match_works():
    token = totp_token()
    s = oath.totp_step(NOW)
    # The token's clock runs 25 minutes (50 steps) behind.
    code1, code2 = code_at_step(token, s - 50), code_at_step(token, s - 49)
    assert oath.match_totp(token, code1, NOW) is None
    assert oath.resync_totp(token, code1, code2, NOW) == (-50, s - 49)
    synced = replace(token, drift=-50, last_step=s - 49)
    later = NOW + 60
    code3 = code_at_step(token, oath.totp_step(later) - 50)
    assert oath.match_totp(synced, code3, later) == oath.totp_step(later) - 50
    # The resync codes themselves cannot be replayed afterwards.
    assert oath.match_totp(synced, code2, NOW) is None


def test_resync_totp_window_edges():
    token = totp_token()
    s = oath.totp_step(NOW)
    codes = lambda d: (code_at_step(token, s + d), code_at_step(token, s + d + 1))  # noqa: E731
    assert oath.resync_totp(token, *codes(120), NOW) == (120, s + 121)
    assert oath.resync_totp(token, *codes(-120), NOW) == (-120, s - 119)
    assert oath.resync_totp(token, *codes(121), NOW) is None
    assert oath.resync_totp(token, *codes(-121), NOW) is None
    # Not consecutive, or swapped: refused.
    c1, c2 = codes(3)
    assert oath.resync_totp(token, c2, c1, NOW) is None
    assert oath.resync_totp(token, c1, code_at_step(token, s + 5), NOW) is None


def test_resync_totp_refuses_already_used_steps():
    token = totp_token(last_step=oath.totp_step(NOW))
    s = oath.totp_step(NOW)
    old = (code_at_step(token, s - 10), code_at_step(token, s - 9))
    assert oath.resync_totp(token, *old, NOW) is None


def test_match_totp_dst_fall_back_hour_in_berlin():
    """T41: 2025-10-26 00:30 UTC is 02:30 CEST, the first pass through the
    repeated hour; pyotp's naive local-time round trip is 3600 s off there."""
    now = 1761438600.0  # 2025-10-26T00:30:00Z
    expected_step = 1761438600 // 30
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        token = totp_token()
        code = oath.hotp(SEED_SHA1, expected_step)  # RFC 6238 at that UTC time
        assert oath.totp_step(now) == expected_step
        assert oath.match_totp(token, code, now) == expected_step
        assert oath.match_totp(token, code, now, window=0) == expected_step
        if time.localtime(now).tm_isdst:  # tzdata present: show the pitfall
            # The naive local-time round trip older pyotp releases used (D3)
            # lands 3600 s (120 steps) late; totp_step does not go there.
            naive = datetime.datetime.fromtimestamp(int(now))
            assert int(time.mktime(naive.timetuple())) // 30 == expected_step + 120
    finally:
        if old_tz is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old_tz
        time.tzset()


# --- HOTP -----------------------------------------------------------------

def test_hotp_look_ahead_boundary():
    token = hotp_token(counter=5)
    assert oath.match_hotp(token, RFC4226_CODES[5]) == 5
    assert oath.match_hotp(token, code_at_step(token, 15)) == 15  # counter + 10
    assert oath.match_hotp(token, code_at_step(token, 16)) is None  # counter + 11
    assert oath.match_hotp(token, code_at_step(token, 8), look_ahead=2) is None
    assert oath.match_hotp(token, code_at_step(token, 7), look_ahead=2) == 7


def test_hotp_accepted_counter_cannot_be_reused():
    token = hotp_token(counter=0)
    matched = oath.match_hotp(token, RFC4226_CODES[3])
    assert matched == 3
    advanced = replace(token, counter=matched + 1)  # what the store records
    assert oath.match_hotp(advanced, RFC4226_CODES[3]) is None
    assert oath.match_hotp(advanced, RFC4226_CODES[1]) is None  # skipped codes die too
    assert oath.hotp_replayed(advanced, RFC4226_CODES[3])
    assert oath.match_hotp(advanced, RFC4226_CODES[4]) == 4


def test_resync_hotp_found_and_not_found_at_window_edge():
    token = hotp_token(counter=0)
    window = 50
    last_c = window - 1  # the highest c tried: c + 1 may lie outside the window
    c1, c2 = code_at_step(token, last_c), code_at_step(token, last_c + 1)
    assert oath.resync_hotp(token, c1, c2, window=window) == last_c + 2
    c1, c2 = code_at_step(token, window), code_at_step(token, window + 1)
    assert oath.resync_hotp(token, c1, c2, window=window) is None
    assert oath.resync_hotp(token, RFC4226_CODES[2], RFC4226_CODES[4]) is None


def test_resync_hotp_default_window_and_no_going_back():
    token = hotp_token(counter=100)
    c1, c2 = code_at_step(token, 900), code_at_step(token, 901)
    assert oath.resync_hotp(token, c1, c2) == 902
    assert oath.resync_hotp(token, RFC4226_CODES[5], RFC4226_CODES[6]) is None


# --- code format fuzz (T44) -------------------------------------------------

@pytest.mark.parametrize(
    "code",
    ["", "12345", "1234567", "12345a", "abcdef", "123 456", " ", "\t\n",
     "１２３４５６", "١٢٣٤٥٦", "+12345", "-12345", "12345\x00", "1" * 10**6, " " * 10**6],
)
def test_bad_code_formats_are_rejected_without_exception(code):
    assert oath.normalize_code(code, 6) is None
    token = totp_token()
    assert oath.match_totp(token, code, NOW) is None
    assert oath.match_hotp(hotp_token(), code) is None
    assert oath.resync_hotp(hotp_token(), code, code, window=5) is None
    assert oath.resync_totp(token, code, code, NOW, window=2) is None


def test_normalize_code_strips_whitespace_and_keeps_leading_zeros():
    assert oath.normalize_code(" 012345\r\n", 6) == "012345"
    assert oath.normalize_code("00000000", 8) == "00000000"
    assert oath.normalize_code(123456, 6) is None  # ints lose leading zeros: refused


def test_match_accepts_surrounding_whitespace():
    token = totp_token()
    code = code_at_step(token, oath.totp_step(NOW))
    assert oath.match_totp(token, f" {code}\n", NOW) == oath.totp_step(NOW)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(min_value=6, max_value=8))
def test_normalize_code_never_raises(text, digits):
    result = oath.normalize_code(text, digits)
    assert result is None or (len(result) == digits and result.isascii() and result.isdigit())


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=20), st.from_regex(r"\A\s*[0-9]{6}\s*\Z")),
       st.floats(min_value=0, max_value=2**40, allow_nan=False))
def test_matchers_never_raise(text, now):
    step = oath.match_totp(totp_token(), text, now)
    assert step is None or abs(step - oath.totp_step(now)) <= 1
    counter = oath.match_hotp(hotp_token(counter=7), text)
    assert counter is None or 7 <= counter <= 17


# --- secrets and URIs ------------------------------------------------------

@pytest.mark.parametrize("algorithm,size", [("sha1", 20), ("sha256", 32), ("sha512", 64)])
def test_generate_secret_sizes(algorithm, size):
    first, second = oath.generate_secret(algorithm), oath.generate_secret(algorithm)
    assert len(first) == size and first != second


def test_generate_secret_unknown_algorithm():
    with pytest.raises(ValueError):
        oath.generate_secret("md5")


def test_parse_base32_secret_is_forgiving_about_layout():
    b32 = base64.b32encode(SEED_SHA1).decode()  # GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ
    assert oath.parse_base32_secret(b32) == SEED_SHA1
    spaced = " ".join(b32[i:i + 4] for i in range(0, len(b32), 4)).lower()
    assert oath.parse_base32_secret(spaced) == SEED_SHA1
    unpadded = base64.b32encode(SEED_SHA256).decode().rstrip("=")
    assert oath.parse_base32_secret(unpadded) == SEED_SHA256


@pytest.mark.parametrize(
    "text,message",
    [("", "empty"), ("   ", "empty"), ("GEZDGNBVGY3TQOJ1", "A-Z"),
     ("GEZDGNBVGY3TQOJQ", "at least 128 bits"), ("A" * 33, "length"),
     ("A" * 5000, "too long"), ("ＧＥＺＤＧＮＢＶＧＹ３ＴＱＯＪＱＧＥＺＤ", "A-Z")],
)
def test_parse_base32_secret_rejects(text, message):
    with pytest.raises(ValueError, match=message) as info:
        oath.parse_base32_secret(text)
    if text.strip():
        assert text[:16] not in str(info.value)


def test_otpauth_uri_totp():
    token = totp_token(secret=SEED_SHA256, algorithm="sha256", digits=8, period=60,
                       user="alice smith@example.com")
    uri = oath.otpauth_uri(token, issuer="ACME Co")
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert parts.path == "/ACME%20Co:alice%20smith%40example.com"
    assert unquote(parts.path) == "/ACME Co:alice smith@example.com"
    query = parse_qs(parts.query)
    assert query == {
        "secret": [base64.b32encode(SEED_SHA256).decode().rstrip("=")],
        "issuer": ["ACME Co"], "algorithm": ["SHA256"], "digits": ["8"], "period": ["60"],
    }
    assert "=" not in query["secret"][0]
    # pyotp reads it back to the same generator.
    parsed = pyotp.parse_uri(uri)
    assert parsed.at(int(NOW)) == oath.hotp(SEED_SHA256, oath.totp_step(NOW, 60), 8, "sha256")


def test_otpauth_uri_hotp_and_account_fallbacks():
    token = hotp_token(counter=42, user=None, serial="HW:0001")
    uri = oath.otpauth_uri(token, issuer="a&b=c")
    parts = urlsplit(uri)
    assert parts.netloc == "hotp"
    assert parts.path == "/a%26b%3Dc:HW%3A0001"
    query = parse_qs(parts.query)
    assert query["counter"] == ["42"] and "period" not in query
    assert query["issuer"] == ["a&b=c"]
    assert oath.otpauth_uri(token, account="bob").split("?")[0] == "otpauth://hotp/mfaserver:bob"
