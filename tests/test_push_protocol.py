"""Tests for mfaserver.factors.push_protocol: keys, signed messages, replay window."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st

from mfaserver.factors import push_protocol as pp

NOW = 1_700_000_000
DEVICE = "dev-0123456789abcdef"
TXID = "tx_0123456789abcdefXY"
NONCE = "n0nce-0123456789abcd"
DIGEST = hashlib.sha256(b"token").hexdigest()

# RFC 8032 section 7.1, TEST 1.
RFC8032_SECRET = bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")

# Canonical encodings of Ed25519's small-order points (libsodium's blocklist).
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(params=pp.KEY_TYPES)
def key(request):
    return pp.generate_device_key(request.param)


# -- keys -------------------------------------------------------------------


def test_public_key_text_forms():
    ed = pp.generate_device_key("ed25519")
    p256 = pp.generate_device_key("p256")
    ed_text = pp.public_key_text(ed)
    p256_text = pp.public_key_text(p256)
    assert ed_text.startswith("ed25519:") and len(pp.b64url_decode(ed_text[8:])) == 32
    assert p256_text.startswith("p256:")
    point = pp.b64url_decode(p256_text[5:])
    assert len(point) == 65 and point[0] == 4
    # The public half gives the same text as the private key.
    assert pp.public_key_text(ed.public_key()) == ed_text


def test_public_key_text_round_trips(key):
    text = pp.public_key_text(key)
    assert pp.public_key_text(pp.load_public_key(text)) == text


def test_generate_unknown_kind():
    with pytest.raises(ValueError, match="unknown key type"):
        pp.generate_device_key("rsa")


def test_rfc8032_vector_verifies():
    public = pp.load_public_key("ed25519:" + b64(RFC8032_PUBLIC))
    assert pp.verify(public, b"", b64(RFC8032_SIGNATURE))
    private = ed25519.Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)
    assert pp.sign(private, b"") == b64(RFC8032_SIGNATURE)


@pytest.mark.parametrize("text, message", [
    ("", "must start with"),
    ("ed25519", "must start with"),
    ("rsa:AAAA", "must start with"),
    ("ED25519:" + b64(RFC8032_PUBLIC), "must start with"),
    (" ed25519:" + b64(RFC8032_PUBLIC), "must start with"),
    ("ed25519:" + b64(RFC8032_PUBLIC) + "=", "base64url"),
    ("ed25519:" + b64(RFC8032_PUBLIC) + "\n", "base64url"),
    ("ed25519:" + base64.b64encode(b"\xff" * 32).decode(), "base64url"),
    ("ed25519:" + b64(RFC8032_PUBLIC[:31]), "32 bytes"),
    ("ed25519:" + b64(RFC8032_PUBLIC + b"\0"), "32 bytes"),
    ("ed25519:" + "A" * 300, "too long"),
])
def test_load_public_key_rejects_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        pp.load_public_key(text)


def test_load_public_key_rejects_non_text():
    with pytest.raises(ValueError):
        pp.load_public_key(RFC8032_PUBLIC)


def test_load_public_key_rejects_non_canonical_base64():
    # 32 bytes take 43 characters; the last carries 4 unused bits that must
    # be zero, else a second spelling of the same key would be accepted.
    good = b64(RFC8032_PUBLIC)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bad = good[:-1] + alphabet[alphabet.index(good[-1]) ^ 1]
    assert base64.urlsafe_b64decode(bad + "=") == RFC8032_PUBLIC
    with pytest.raises(ValueError, match="canonical"):
        pp.load_public_key("ed25519:" + bad)


def _ed25519_on_curve(y: int) -> bool:
    """Euler's criterion on x^2 = (y^2 - 1) / (d y^2 + 1): independent of the module."""
    p = 2**255 - 19
    d = -121665 * pow(121666, p - 2, p) % p
    x2 = (y * y - 1) * pow(d * y * y + 1, p - 2, p) % p
    return x2 == 0 or pow(x2, (p - 1) // 2, p) == 1


def test_load_public_key_rejects_ed25519_off_curve():
    y = next(y for y in range(2, 100) if not _ed25519_on_curve(y))
    with pytest.raises(ValueError, match="not a point on the curve"):
        pp.load_public_key("ed25519:" + b64(y.to_bytes(32, "little")))


def test_load_public_key_rejects_ed25519_y_out_of_range():
    p = 2**255 - 19
    with pytest.raises(ValueError, match="canonical"):
        pp.load_public_key("ed25519:" + b64((p + 1).to_bytes(32, "little")))


@pytest.mark.parametrize("hex_point", SMALL_ORDER)
def test_load_public_key_rejects_ed25519_small_order(hex_point):
    with pytest.raises(ValueError, match="small-order"):
        pp.load_public_key("ed25519:" + b64(bytes.fromhex(hex_point)))


def test_load_public_key_accepts_many_ed25519_keys():
    for _ in range(50):
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        pp.load_public_key("ed25519:" + b64(raw))


def test_load_public_key_rejects_p256_off_curve():
    point = bytearray(pp.b64url_decode(pp.public_key_text(pp.generate_device_key("p256"))[5:]))
    point[-1] ^= 1
    with pytest.raises(ValueError, match="not a point on the curve"):
        pp.load_public_key("p256:" + b64(bytes(point)))


def test_load_public_key_rejects_p256_compressed_and_wrong_lengths():
    public = pp.generate_device_key("p256").public_key()
    compressed = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    uncompressed = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    for raw in (compressed, uncompressed[:-1], uncompressed + b"\0", b"\0",
                b"\x05" + uncompressed[1:]):
        with pytest.raises(ValueError, match="uncompressed point"):
            pp.load_public_key("p256:" + b64(raw))


def test_load_public_key_rejects_other_curves():
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    raw = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    with pytest.raises(ValueError):
        pp.load_public_key("p256:" + b64(raw))


def test_load_public_key_rejects_rsa():
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    openssh = public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    for text in (pem, "rsa:" + b64(der), "ed25519:" + b64(der), "p256:" + b64(der), openssh):
        with pytest.raises(ValueError):
            pp.load_public_key(text)
    with pytest.raises(TypeError):
        pp.public_key_text(public)


# -- random values ----------------------------------------------------------


def test_enrollment_token_is_32_random_bytes():
    tokens = {pp.new_enrollment_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(pp.b64url_decode(token)) == 32


def test_token_digest_is_stable_and_not_the_token():
    token = pp.new_enrollment_token()
    digest = pp.token_digest(token)
    assert digest == pp.token_digest(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert token not in digest and len(digest) == 64
    assert pp.token_digest(pp.new_enrollment_token()) != digest


def test_ids_and_nonces_are_16_random_bytes():
    for make in (pp.new_transaction_id, pp.new_device_id, pp.new_nonce):
        values = {make() for _ in range(100)}
        assert len(values) == 100
        assert all(len(pp.b64url_decode(v)) == 16 for v in values)
    # Generated values are accepted by the message builders.
    pp.poll_message(pp.new_device_id(), NOW, pp.new_nonce())
    pp.answer_message(pp.new_device_id(), pp.new_transaction_id(), "approve", NOW)


def test_match_numbers_are_two_digits_covering_10_to_99():
    numbers = [pp.new_match_number() for _ in range(5000)]
    assert all(len(n) == 2 and n.isdigit() and 10 <= int(n) <= 99 for n in numbers)
    # 5000 draws from 90 values miss one with probability about 90 * e^-55.
    assert {int(n) for n in numbers} == set(range(10, 100))


# -- messages ---------------------------------------------------------------


def test_message_formats_are_exact():
    assert pp.poll_message(DEVICE, NOW, NONCE) == (
        f"mfaserver-poll-v1\n{DEVICE}\n{NOW}\n{NONCE}".encode())
    assert pp.answer_message(DEVICE, TXID, "fraud", NOW) == (
        f"mfaserver-answer-v1\n{DEVICE}\n{TXID}\nfraud\n{NOW}".encode())
    public = "ed25519:" + b64(RFC8032_PUBLIC)
    assert pp.enroll_message(DIGEST, public, NOW) == (
        f"mfaserver-enroll-v1\n{DIGEST}\n{public}\n{NOW}".encode())


@pytest.mark.parametrize("build", [
    lambda: pp.poll_message("dev\nice", NOW, NONCE),
    lambda: pp.poll_message("", NOW, NONCE),
    lambda: pp.poll_message(DEVICE, NOW, "short"),
    lambda: pp.poll_message(DEVICE, NOW, NONCE + "\n"),
    lambda: pp.poll_message(DEVICE, -1, NONCE),
    lambda: pp.poll_message(DEVICE, True, NONCE),
    lambda: pp.poll_message(DEVICE, float(NOW), NONCE),
    lambda: pp.poll_message(DEVICE, str(NOW), NONCE),
    lambda: pp.answer_message(DEVICE, TXID, "yes", NOW),
    lambda: pp.answer_message(DEVICE, TXID, "approve\n", NOW),
    lambda: pp.answer_message(DEVICE, "tx/1", "approve", NOW),
    lambda: pp.answer_message(DEVICE, "x" * 129, "approve", NOW),
    lambda: pp.enroll_message(DIGEST.upper(), "ed25519:" + b64(RFC8032_PUBLIC), NOW),
    lambda: pp.enroll_message("token", "ed25519:" + b64(RFC8032_PUBLIC), NOW),
    lambda: pp.enroll_message(DIGEST, "ed25519:AAAA", NOW),
])
def test_message_fields_are_checked(build):
    with pytest.raises(ValueError):
        build()


# -- signatures -------------------------------------------------------------


def test_sign_verify_round_trip(key):
    public = pp.load_public_key(pp.public_key_text(key))
    for message in (pp.poll_message(DEVICE, NOW, NONCE),
                    pp.answer_message(DEVICE, TXID, "approve", NOW),
                    pp.enroll_message(DIGEST, pp.public_key_text(key), NOW)):
        assert pp.verify(public, message, pp.sign(key, message))


def test_signature_encodings(key):
    raw = pp.b64url_decode(pp.sign(key, b"m"))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        assert len(raw) == 64
    else:
        decode_dss_signature(raw)  # DER
        assert len(raw) <= 72


def test_tampered_message_fails(key):
    public = key.public_key()
    message = pp.answer_message(DEVICE, TXID, "deny", NOW)
    signature = pp.sign(key, message)
    assert not pp.verify(public, pp.answer_message(DEVICE, TXID, "approve", NOW), signature)
    assert not pp.verify(public, pp.answer_message(DEVICE, TXID, "deny", NOW + 1), signature)
    assert not pp.verify(public, message + b"\n", signature)


def test_tampered_signature_fails(key):
    public = key.public_key()
    message = pp.poll_message(DEVICE, NOW, NONCE)
    raw = bytearray(pp.b64url_decode(pp.sign(key, message)))
    for i in (0, len(raw) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        assert not pp.verify(public, message, b64(bytes(bad)))


def test_wrong_key_fails(key):
    kind = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "p256"
    same_kind = pp.generate_device_key(kind)
    other = pp.generate_device_key("p256" if kind == "ed25519" else "ed25519")
    message = pp.poll_message(DEVICE, NOW, NONCE)
    signature = pp.sign(key, message)
    assert not pp.verify(other.public_key(), message, signature)
    assert not pp.verify(same_kind.public_key(), message, signature)


def test_cross_purpose_replay_fails(key):
    public = key.public_key()
    # Same field values, different purposes: the context line differs.
    poll_signature = pp.sign(key, pp.poll_message(DEVICE, NOW, TXID))
    assert not pp.verify(public, pp.answer_message(DEVICE, TXID, "approve", NOW), poll_signature)
    answer_signature = pp.sign(key, pp.answer_message(DEVICE, TXID, "approve", NOW))
    assert not pp.verify(public, pp.poll_message(DEVICE, NOW, TXID), answer_signature)
    enroll_signature = pp.sign(key, pp.enroll_message(DIGEST, pp.public_key_text(key), NOW))
    assert not pp.verify(public, pp.poll_message(DEVICE, NOW, NONCE), enroll_signature)
    # An answer for one transaction or device is not one for another.
    assert not pp.verify(
        public, pp.answer_message(DEVICE, TXID + "2", "approve", NOW), answer_signature)
    assert not pp.verify(
        public, pp.answer_message(DEVICE + "2", TXID, "approve", NOW), answer_signature)


@pytest.mark.parametrize("signature", [
    "", "!!!!", "AAAA=", "A", "A" * 86 + "=", "A" * 1000, " " + "A" * 86, None, 42, b"AAAA",
])
def test_verify_never_raises_on_junk_signatures(key, signature):
    assert pp.verify(key.public_key(), b"m", signature) is False


def test_verify_rejects_wrong_lengths(key):
    message = b"m"
    raw = pp.b64url_decode(pp.sign(key, message))
    assert not pp.verify(key.public_key(), message, b64(raw[:-1]))
    assert not pp.verify(key.public_key(), message, b64(raw + b"\0"))
    assert not pp.verify(key.public_key(), message, b64(b"\0" * 64))


def test_verify_rejects_non_minimal_der():
    key = pp.generate_device_key("p256")
    raw = pp.b64url_decode(pp.sign(key, b"m"))
    r, s = decode_dss_signature(raw)
    assert encode_dss_signature(r, s) == raw
    # Same r and s, r with one redundant leading zero byte: BER, not DER.
    r_der = raw[4:4 + raw[3]]
    s_der = raw[4 + raw[3]:]
    body = b"\x02" + bytes([len(r_der) + 1]) + b"\x00" + r_der + s_der
    padded = b"\x30" + bytes([len(body)]) + body
    assert not pp.verify(key.public_key(), b"m", b64(padded))


def test_verify_rejects_bad_inputs_quietly():
    key = pp.generate_device_key("ed25519")
    signature = pp.sign(key, b"m")
    assert not pp.verify(key.public_key(), "m", signature)
    assert not pp.verify(None, b"m", signature)
    assert not pp.verify(key, b"m", signature)  # a private key is not a public key
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert not pp.verify(rsa_public, b"m", signature)
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert not pp.verify(p384.public_key(), b"m",
                         b64(p384.sign(b"m", ec.ECDSA(hashes.SHA256()))))


def test_sign_rejects_unsupported_keys():
    with pytest.raises(TypeError):
        pp.sign(ec.generate_private_key(ec.SECP384R1()), b"m")


ED_KEY = pp.generate_device_key("ed25519")


@given(st.text(max_size=120))
def test_verify_never_raises_on_any_text(text):
    key = ED_KEY.public_key()
    assert pp.verify(key, b"m", text) is False


@given(st.text(max_size=120))
def test_load_public_key_raises_only_value_error(text):
    try:
        pp.load_public_key(text)
    except ValueError:
        pass


# -- freshness --------------------------------------------------------------


def test_fresh_request_accepted_once():
    window = pp.FreshnessWindow()
    assert window.check((DEVICE, NONCE), NOW, NOW)
    assert not window.check((DEVICE, NONCE), NOW, NOW + 1)
    assert not window.check((DEVICE, NONCE), NOW + 5, NOW + 5)
    assert window.check((DEVICE, "other-nonce-123456"), NOW, NOW)
    assert window.check(("other-device", NONCE), NOW, NOW)


def test_skew_edges():
    window = pp.FreshnessWindow(skew=60)
    assert window.check(("a",), NOW - 60, NOW)
    assert window.check(("b",), NOW + 60, NOW)
    assert not window.check(("c",), NOW - 61, NOW)
    assert not window.check(("d",), NOW + 61, NOW)
    assert not window.check(("e",), NOW - 60, NOW + 0.5)


def test_stale_and_future_are_not_remembered():
    window = pp.FreshnessWindow()
    assert not window.check(("a",), NOW - 3600, NOW)
    assert not window.check(("b",), NOW + 3600, NOW)
    assert len(window) == 0


def test_non_integer_timestamps_refused():
    window = pp.FreshnessWindow()
    assert not window.check(("a",), float(NOW), NOW)
    assert not window.check(("b",), True, 1)
    assert not window.check(("c",), str(NOW), NOW)


def test_replay_refused_for_whole_window_then_forgotten():
    window = pp.FreshnessWindow(skew=60)
    assert window.check(("k",), NOW, NOW)
    for later in (NOW + 1, NOW + 30, NOW + 60):
        assert not window.check(("k",), NOW, later)
    # Past the window the timestamp alone refuses it, and the entry is gone.
    assert not window.check(("k",), NOW, NOW + 61)
    assert len(window) == 0


def test_entries_expire_so_memory_tracks_the_window():
    window = pp.FreshnessWindow(skew=10)
    for t in range(1000):
        assert window.check(("d", t), NOW + t, NOW + t)
        assert len(window) <= 11


def test_entries_expire_by_their_own_timestamp():
    window = pp.FreshnessWindow(skew=60)
    assert window.check(("future",), NOW + 60, NOW)   # kept until NOW + 120
    assert window.check(("past",), NOW - 60, NOW)     # kept until NOW
    window.check(("tick",), NOW + 61, NOW + 61)
    assert len(window) == 2
    assert not window.check(("future",), NOW + 60, NOW + 100)


def test_bounded_memory_fails_closed():
    window = pp.FreshnessWindow(skew=60, max_entries=3)
    for n in range(3):
        assert window.check(("d", n), NOW, NOW)
    # Full: a new key is refused rather than an old one being forgotten.
    assert not window.check(("d", 3), NOW, NOW)
    assert not window.check(("d", 0), NOW, NOW)
    assert len(window) == 3
    # Once the old entries leave the window there is room again.
    assert window.check(("d", 3), NOW + 61, NOW + 61)
    assert len(window) == 1


def test_window_arguments_checked():
    with pytest.raises(ValueError):
        pp.FreshnessWindow(skew=-1)
    with pytest.raises(ValueError):
        pp.FreshnessWindow(max_entries=0)


# -- the test vectors in docs/device-api.rst --------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "device-api.rst"
DOC_DEVICE = "Xq7pD2mVtY1kLs9wB4nR0g"
DOC_TOKEN = "q3Jd0l6X7c1v0nZkq8mWn2bB0yQ5cH3tR9sLwE4aF1U"
DOC_VECTORS = [
    ("enroll", "etAaZBEKiTFkuJnPuUXMZP29wuLKumE4GJxJBnXiURj"
              "QpE4Rrfa6itUIAKvuNkqfhd2xsl4yY_09dLhoi8U5BA"),
    ("poll", "LjAiU9ZVMiHwZI7ttxFxn75X8QnljnekLhcqUDdpPCP"
            "hQ_Zs79FPtYvWuOkzWctnqve5OMtZtgU7sVkLGJqrDQ"),
    ("answer", "WuXIRMoWjvcqEx0C38ZbyoctgV6quUFGRSvco0_gv7G"
              "g3nDo5wzw-rC8NZ_RqscxfpD2Xt1o_dCI7XiYCfDNCw"),
]


def _doc_message(purpose: str) -> bytes:
    public = "ed25519:" + b64(RFC8032_PUBLIC)
    if purpose == "enroll":
        return pp.enroll_message(pp.token_digest(DOC_TOKEN), public, 1700000000)
    if purpose == "poll":
        return pp.poll_message(DOC_DEVICE, 1700000000, "mN3bV5cX7zL9kJ1hG2fD4s")
    return pp.answer_message(DOC_DEVICE, "T0pQ9rS8uV7wX6yZ5aB4cA", "approve", 1700000005)


@pytest.mark.parametrize("purpose, signature", DOC_VECTORS)
def test_documented_vectors(purpose, signature):
    private = ed25519.Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)
    message = _doc_message(purpose)
    assert pp.sign(private, message) == signature
    assert pp.verify(private.public_key(), message, signature)
    text = DOC.read_text(encoding="utf-8")
    assert signature in text
    # The message as printed there, one field per indented line.
    assert "\n".join("    " + line for line in message.decode().split("\n")) in text


def test_documented_token_and_key():
    text = DOC.read_text(encoding="utf-8")
    assert len(pp.b64url_decode(DOC_TOKEN)) == 32
    assert pp.token_digest(DOC_TOKEN) in text
    assert pp.public_key_text(pp.load_public_key("ed25519:" + b64(RFC8032_PUBLIC))) in text


def test_is_fresh():
    assert pp.is_fresh(NOW, NOW)
    assert pp.is_fresh(NOW - 60, NOW) and pp.is_fresh(NOW + 60, NOW)
    assert not pp.is_fresh(NOW - 61, NOW) and not pp.is_fresh(NOW + 61, NOW)
    assert pp.is_fresh(NOW - 5, NOW, skew=5) and not pp.is_fresh(NOW - 6, NOW, skew=5)
    assert not pp.is_fresh(float(NOW), NOW) and not pp.is_fresh(True, 1)


def test_server_made_ids_never_start_with_a_dash():
    # They are command-line arguments (device delete, authenticator approve).
    from mfaserver.factors.push_protocol import new_device_id, new_transaction_id
    ids = [new_device_id() for _ in range(2000)] + [new_transaction_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids)
