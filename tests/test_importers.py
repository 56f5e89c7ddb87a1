"""Tests for mfaserver.tokens.importers: PSKC (plain and PSK-encrypted) and CSV."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mfaserver.auth.model import TokenKind
from mfaserver.factors import oath
from mfaserver.tokens.importers import (
    ImportedToken,
    TokenImportError,
    load_tokens,
    parse_csv,
    parse_pskc,
)

DATA = Path(__file__).parent / "data"
RFC_SEED = b"12345678901234567890"
# RFC 6030 section 6.1 (Figure 6) pre-shared key, test data only.
RFC6030_PSK = bytes.fromhex("12345678901234567890123456789012")
SECRET_B32 = base64.b32encode(RFC_SEED).decode()

PSKC_NS = "urn:ietf:params:xml:ns:keyprov:pskc"
XENC = "http://www.w3.org/2001/04/xmlenc#"


# --- PSKC fixtures ---------------------------------------------------------

def test_rfc6030_figure2_plain_hotp():
    [token] = load_tokens(DATA / "pskc_plain.xml")
    assert token == ImportedToken(
        serial="12345678", kind=TokenKind.HOTP, secret=RFC_SEED, digits=6,
        period=30, algorithm="sha1", counter=0, user=None,
    )
    assert oath.hotp(token.secret, 0) == "755224"


def test_plain_totp_and_hotp_with_parameters():
    totp, hotp = load_tokens(DATA / "pskc_totp.xml")
    assert (totp.serial, totp.kind, totp.algorithm, totp.digits, totp.period, totp.user) == (
        "TOTP-0001", TokenKind.TOTP, "sha256", 8, 60, "alice")
    assert totp.secret == b"12345678901234567890123456789012"
    assert (hotp.serial, hotp.kind, hotp.counter, hotp.digits, hotp.user) == (
        "HOTP-0002", TokenKind.HOTP, 42, 6, "bob")
    assert hotp.secret == RFC_SEED


def test_rfc6030_figure6_encrypted_with_right_psk():
    [token] = load_tokens(DATA / "pskc_psk.xml", psk=RFC6030_PSK)
    assert token.serial == "987654321"
    assert token.kind is TokenKind.HOTP
    assert token.secret == RFC_SEED
    assert token.digits == 8 and token.counter == 0


def test_encrypted_pskc_with_wrong_psk_fails():
    wrong = bytes.fromhex("00112233445566778899aabbccddeeff")
    with pytest.raises(TokenImportError, match="pskc_psk.xml") as info:
        load_tokens(DATA / "pskc_psk.xml", psk=wrong)
    assert_no_secret(str(info.value), RFC_SEED)


def test_encrypted_pskc_without_psk_asks_for_one():
    with pytest.raises(TokenImportError, match="pre-shared key is needed"):
        load_tokens(DATA / "pskc_psk.xml")


def test_encrypted_pskc_with_psk_of_wrong_size():
    with pytest.raises(TokenImportError, match="128-bit key"):
        load_tokens(DATA / "pskc_psk.xml", psk=RFC6030_PSK + b"\x00" * 16)


@pytest.mark.parametrize(
    "original,altered",
    [
        (b"Su+NvtQfmvfJzF6bmQiJqoLRExc=", b"Su+NvtQgmvfJzF6bmQiJqoLRExc="),  # the MAC
        (b"AAECAwQFBgcICQoLDA0OD+cI", b"AAECAwQFBgcICQoLDA0OD+cJ"),  # IV || ciphertext
    ],
)
def test_tampered_figure6_is_refused(original, altered):
    data = (DATA / "pskc_psk.xml").read_bytes()
    assert original in data
    with pytest.raises(TokenImportError, match="ValueMAC mismatch"):
        parse_pskc(data.replace(original, altered), psk=RFC6030_PSK)


# --- PSKC built programmatically: encrypt, then parse -----------------------

def encrypt(psk: bytes, plain: bytes, iv: bytes | None = None) -> bytes:
    iv = iv or os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(psk), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padded) + encryptor.finalize()


def build_pskc(psk, secret, *, mac_key=b"k" * 20, mac_alg="hmac-sha256", bad_mac=False,
               with_mac=True, kind="totp", cipher=None) -> bytes:
    cipher = cipher or f"aes{len(psk) * 8}-cbc"
    mac_uri = ("http://www.w3.org/2000/09/xmldsig#" if mac_alg == "hmac-sha1"
               else "http://www.w3.org/2001/04/xmldsig-more#") + mac_alg
    digest = getattr(hashlib, mac_alg.split("-")[1])
    raw = encrypt(psk, secret)
    value_mac = hmac.new(mac_key, raw, digest).digest()
    if bad_mac:
        value_mac = bytes([value_mac[0] ^ 1]) + value_mac[1:]

    def b64(b):
        return base64.b64encode(b).decode()

    mac_method = f"""
      <MACMethod Algorithm="{mac_uri}">
        <MACKey>
          <xenc:EncryptionMethod Algorithm="{XENC}{cipher}"/>
          <xenc:CipherData><xenc:CipherValue>{b64(encrypt(psk, mac_key))}</xenc:CipherValue>
          </xenc:CipherData>
        </MACKey>
      </MACMethod>""" if with_mac else ""
    value_mac_el = f"<ValueMAC>{b64(value_mac)}</ValueMAC>" if with_mac else ""
    return f"""<?xml version="1.0"?>
    <KeyContainer Version="1.0" xmlns="{PSKC_NS}" xmlns:xenc="{XENC}">
      {mac_method}
      <KeyPackage>
        <DeviceInfo><SerialNo>GEN-1</SerialNo></DeviceInfo>
        <Key Id="x" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:{kind}">
          <AlgorithmParameters><Suite>hmac-sha512</Suite>
            <ResponseFormat Length="6" Encoding="DECIMAL"/></AlgorithmParameters>
          <Data>
            <Secret>
              <EncryptedValue>
                <xenc:EncryptionMethod Algorithm="{XENC}{cipher}"/>
                <xenc:CipherData><xenc:CipherValue>{b64(raw)}</xenc:CipherValue></xenc:CipherData>
              </EncryptedValue>
              {value_mac_el}
            </Secret>
            <TimeInterval><PlainValue>30</PlainValue></TimeInterval>
          </Data>
          <UserId>carol</UserId>
        </Key>
      </KeyPackage>
    </KeyContainer>""".encode()


@pytest.mark.parametrize("key_size", [16, 24, 32])
@pytest.mark.parametrize("mac_alg", ["hmac-sha1", "hmac-sha256"])
def test_encrypt_then_parse_round_trip(key_size, mac_alg):
    psk = os.urandom(key_size)
    secret = os.urandom(64)
    [token] = parse_pskc(build_pskc(psk, secret, mac_alg=mac_alg), psk=psk)
    assert token.secret == secret
    assert (token.serial, token.kind, token.algorithm, token.user) == (
        "GEN-1", TokenKind.TOTP, "sha512", "carol")


def test_generated_file_with_wrong_psk_or_bad_mac_fails():
    psk, secret = os.urandom(32), os.urandom(32)
    data = build_pskc(psk, secret)
    for _ in range(20):  # a wrong key must never slip through, not even by luck
        with pytest.raises(TokenImportError):
            parse_pskc(data, psk=os.urandom(32))
    with pytest.raises(TokenImportError, match="ValueMAC mismatch") as info:
        parse_pskc(build_pskc(psk, secret, bad_mac=True), psk=psk)
    assert_no_secret(str(info.value), secret)


def test_encrypted_secret_without_mac_is_refused():
    psk = os.urandom(16)
    with pytest.raises(TokenImportError, match="cannot be verified"):
        parse_pskc(build_pskc(psk, os.urandom(20), with_mac=False), psk=psk)


def test_unsupported_cipher_is_named():
    psk = os.urandom(16)
    data = build_pskc(psk, os.urandom(20)).replace(b"aes128-cbc", b"kw-aes128")
    with pytest.raises(TokenImportError, match="kw-aes128"):
        parse_pskc(data, psk=psk)


# --- PSKC errors -----------------------------------------------------------

def minimal_pskc(key_body: str, algorithm="urn:ietf:params:xml:ns:keyprov:pskc:hotp",
                 serial="<DeviceInfo><SerialNo>S1</SerialNo></DeviceInfo>") -> bytes:
    return f"""<KeyContainer Version="1.0" xmlns="{PSKC_NS}">
      <KeyPackage>{serial}<Key Algorithm="{algorithm}">{key_body}</Key></KeyPackage>
    </KeyContainer>""".encode()


SECRET_DATA = "<Data><Secret><PlainValue>MTIzNDU2Nzg5MDEyMzQ1Njc4OTA=</PlainValue></Secret></Data>"


def test_minimal_pskc_is_accepted():
    [token] = parse_pskc(minimal_pskc(SECRET_DATA))
    assert token.serial == "S1" and token.secret == RFC_SEED


@pytest.mark.parametrize(
    "data,message",
    [
        (minimal_pskc("<Data></Data>"), "token 'S1': no Data/Secret"),
        (minimal_pskc(""), "token 'S1': no Data/Secret"),
        (minimal_pskc("<Data><Secret></Secret></Data>"), "neither PlainValue"),
        (minimal_pskc("<Data><Secret><PlainValue>MTIz!</PlainValue></Secret></Data>"),
         "invalid base64"),
        (minimal_pskc("<Data><Secret><PlainValue>MTIzNDU2Nzg=</PlainValue></Secret></Data>"),
         "at least 128"),
        (minimal_pskc(SECRET_DATA, algorithm="urn:ietf:params:xml:ns:keyprov:pskc#ocra"),
         "unsupported key algorithm"),
        (minimal_pskc(SECRET_DATA, serial=""), "no DeviceInfo/SerialNo and no Key Id"),
        (minimal_pskc('<AlgorithmParameters><ResponseFormat Length="4"/></AlgorithmParameters>'
                      + SECRET_DATA), "digits must be 6 to 8"),
        (minimal_pskc('<AlgorithmParameters><ResponseFormat Length="6" Encoding="HEX"/>'
                      "</AlgorithmParameters>" + SECRET_DATA), "not DECIMAL"),
        (minimal_pskc("<AlgorithmParameters><Suite>MD5</Suite></AlgorithmParameters>"
                      + SECRET_DATA), "unsupported Suite"),
        (minimal_pskc(SECRET_DATA.replace(
            "</Data>", "<Counter><PlainValue>-1</PlainValue></Counter></Data>")),
         "Counter: not a non-negative integer"),
        (b"<notpskc/>", "not a PSKC file"),
        (f'<KeyContainer xmlns="{PSKC_NS}"/>'.encode(), "no KeyPackage"),
        (b"<KeyContainer", "not well-formed XML"),
    ],
)
def test_pskc_errors(data, message):
    with pytest.raises(TokenImportError, match=message) as info:
        parse_pskc(data)
    assert_no_secret(str(info.value), RFC_SEED)


def test_duplicate_serial_in_pskc():
    one = f"<KeyPackage><Key Id='A' Algorithm='urn:ietf:params:xml:ns:keyprov:pskc:hotp'>" \
          f"{SECRET_DATA}</Key></KeyPackage>"
    data = f'<KeyContainer Version="1.0" xmlns="{PSKC_NS}">{one}{one}</KeyContainer>'.encode()
    with pytest.raises(TokenImportError, match="'A': serial appears twice"):
        parse_pskc(data)


@pytest.mark.parametrize(
    "doctype",
    [
        b'<!DOCTYPE KeyContainer [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>',
        b'<!DOCTYPE KeyContainer SYSTEM "file:///etc/passwd">',
        b"<!DOCTYPE KeyContainer>",
    ],
)
def test_doctype_is_refused(doctype):
    body = minimal_pskc(SECRET_DATA)
    data = b'<?xml version="1.0"?>\n' + doctype + b"\n" + body
    with pytest.raises(TokenImportError, match="DOCTYPE"):
        parse_pskc(data)


def test_doctype_is_refused_in_utf16_too(tmp_path):
    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "b">]>' \
           + minimal_pskc(SECRET_DATA).decode()
    path = tmp_path / "t.xml"
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(TokenImportError, match="DOCTYPE"):
        load_tokens(path)


# --- CSV -------------------------------------------------------------------

def test_csv_fixture():
    tokens = load_tokens(DATA / "tokens.csv")
    assert tokens == [
        ImportedToken("TOTP0001", TokenKind.TOTP, RFC_SEED, 6, 30, "sha1", 0, "alice"),
        ImportedToken("HOTP0002", TokenKind.HOTP, RFC_SEED, 8, 30, "sha1", 5, None),
        ImportedToken("TOTP0003", TokenKind.TOTP, b"12345678901234567890123456789012",
                      8, 60, "sha256", 0, "bob, jr"),
    ]


def test_csv_minimal_columns_in_any_order_with_defaults():
    [token] = parse_csv(f"secret,serial,type\r\n{SECRET_B32},X1,hotp\r\n")
    assert token == ImportedToken("X1", TokenKind.HOTP, RFC_SEED, 6, 30, "sha1", 0, None)


def test_csv_every_bad_line_is_reported_with_its_number():
    text = "\n".join([
        "# comment",
        "serial,type,secret,digits,period,counter,algorithm,user",
        f"OK1,totp,{SECRET_B32},6,30,0,sha1,alice",          # line 3
        f"BAD1,motp,{SECRET_B32},6,30,0,sha1,",              # line 4: type
        "BAD2,totp,NOT*BASE32*AT*ALL*XXXXXXXXXX,6,30,0,sha1,",  # line 5: secret
        f"BAD3,totp,{SECRET_B32},5,30,0,sha1,",              # line 6: digits
        f"BAD4,totp,{SECRET_B32},6,0,0,sha1,",               # line 7: period
        f"BAD5,hotp,{SECRET_B32},6,30,-3,sha1,",             # line 8: counter
        f"BAD6,totp,{SECRET_B32},6,30,0,md5,",               # line 9: algorithm
        f"BAD7,totp,{SECRET_B32}",                           # line 10: field count
        f"OK1,totp,{SECRET_B32},6,30,0,sha1,bob",            # line 11: duplicate
        "BAD8,totp,hex:zz,6,30,0,sha1,",                     # line 12: hex
        "BAD9,totp,hex:31323334,6,30,0,sha1,",               # line 13: short seed
        f",totp,{SECRET_B32},6,30,0,sha1,",                  # line 14: no serial
        'BAD10,"totp,x',                                     # line 15: bad quoting
        "",
    ])
    with pytest.raises(TokenImportError) as info:
        parse_csv(text)
    message = str(info.value)
    assert message.startswith("12 bad line(s): ")
    for fragment in [
        "line 4 (serial 'BAD1'): type must be totp or hotp",
        "line 5 (serial 'BAD2'): base32 secret contains characters",
        "line 6 (serial 'BAD3'): digits must be 6 to 8",
        "line 7 (serial 'BAD4'): period must be 1 to 3600",
        "line 8 (serial 'BAD5'): counter: not a non-negative integer",
        "line 9 (serial 'BAD6'): algorithm must be one of",
        "line 10: 3 fields, the header has 8",
        "line 11: serial 'OK1' already on line 3",
        "line 12 (serial 'BAD8'): secret is not valid hex",
        "line 13 (serial 'BAD9'): secret is 32 bits",
        "line 14: serial is empty",
        "line 15: malformed CSV",
    ]:
        assert fragment in message
    assert "line 3" not in message.replace("on line 3", "")
    assert_no_secret(message, RFC_SEED)
    assert "NOT*BASE32" not in message and "zz" not in message


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "header line is missing"),
        ("# only a comment\n\n", "header line is missing"),
        ("serial,type\nA,totp\n", "header lacks column.s. secret"),
        ("serial,type,secret,colour\n", "unknown column.s. 'colour'"),
        ("serial,type,secret,serial\n", "appears twice"),
        ("serial,type,secret\n", "no tokens after the header on line 1"),
        (f"{SECRET_B32},totp,X\n", "unknown column"),  # a forgotten header
    ],
)
def test_csv_header_problems(text, message):
    with pytest.raises(TokenImportError, match=message) as info:
        parse_csv(text)
    assert SECRET_B32 not in str(info.value)


def test_load_tokens_names_the_file_for_csv_errors(tmp_path):
    path = tmp_path / "batch.csv"
    path.write_text(f"serial,type,secret\nA,totp,{SECRET_B32[:-2]}\n")
    with pytest.raises(TokenImportError) as info:
        load_tokens(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "line 2 (serial 'A')" in message
    assert SECRET_B32[:-2] not in message


def test_load_tokens_missing_file(tmp_path):
    with pytest.raises(TokenImportError, match="cannot read"):
        load_tokens(tmp_path / "nope.csv")


def test_load_tokens_csv_with_bom_and_non_utf8(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfserial,type,secret\nA,totp," + SECRET_B32.encode() + b"\n")
    assert [t.serial for t in load_tokens(path)] == ["A"]
    path.write_bytes(b"serial,type,secret\n\xff\xfe\xfa,totp,x\n")
    with pytest.raises(TokenImportError, match="not UTF-8"):
        load_tokens(path)


def test_imported_token_repr_hides_secret():
    token = ImportedToken("A", TokenKind.TOTP, RFC_SEED, 6, 30, "sha1", 0, None)
    assert "secret" not in repr(token) and repr(RFC_SEED) not in repr(token)


def assert_no_secret(message: str, secret: bytes) -> None:
    """The seed must not appear in any common encoding."""
    for form in (secret.hex(), base64.b64encode(secret).decode(),
                 base64.b32encode(secret).decode().rstrip("="), repr(secret)):
        assert form not in message
    if secret.isascii():
        assert secret.decode() not in message
