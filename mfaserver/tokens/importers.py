"""Read OATH token seed files (PSKC XML or CSV) into `ImportedToken` values.

Nothing here touches the database: the CLI stores what these functions
return. Errors are `TokenImportError`, whose message names the file (when
read through `load_tokens`), the token or line, and what is wrong, and never
contains a secret.

PSKC (RFC 6030)
---------------
Supported: plain secrets (``Data/Secret/PlainValue``) and secrets encrypted
with a pre-shared key (``xenc`` AES-128/192/256-CBC, IV prepended to the
ciphertext). An encrypted secret must carry a ``ValueMAC`` (HMAC-SHA1/224/
256/384/512 keyed with the encrypted ``MACMethod/MACKey``) over IV ||
ciphertext, as RFC 6030 section 6.1.1 requires for algorithms without
integrity protection; a missing or wrong MAC, or a wrong PSK, fails the
whole import. Documents with a DOCTYPE are refused outright. Key wrap,
password-based (PBKDF2) and certificate-based encryption are not supported.

CSV
---
::

    # Lines starting with '#' and blank lines are ignored.
    serial,type,secret,digits,period,counter,algorithm,user
    TOTP0001,totp,JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP,6,30,,sha1,alice
    HOTP0002,hotp,hex:3132333435363738393031323334353637383930,8,,5,sha1,

* The first line that is neither blank nor a comment is the header. It must
  name the columns ``serial``, ``type`` and ``secret``; ``digits``,
  ``period``, ``counter``, ``algorithm`` and ``user`` are optional and the
  columns may come in any order. Unknown column names are an error.
* ``type`` is ``totp`` or ``hotp``.
* ``secret`` is base32 (case, spaces and ``=`` padding do not matter) or
  ``hex:`` followed by hex digits; it must be at least 128 bits (16 bytes).
* Defaults when a column is missing or a cell is empty: ``digits`` 6 (6 to 8
  allowed), ``period`` 30 seconds (TOTP only), ``counter`` 0 (HOTP only),
  ``algorithm`` sha1 (sha1, sha256 or sha512), ``user`` none (assign later).
* Fields follow the usual CSV quoting rules, but a record must fit on one
  line. The file must be UTF-8.
* A serial may appear only once per file. Every bad line is reported, with
  its line number, and nothing is imported if any line is bad.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import hmac
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mfaserver.auth.model import TokenKind
from mfaserver.factors.oath import ALGORITHMS, MIN_SECRET_BYTES, parse_base32_secret

# A token file of thousands of tokens is a few MB; anything far bigger is a mistake.
MAX_FILE_BYTES = 64 * 1024 * 1024

MIN_DIGITS, MAX_DIGITS = 6, 8
MAX_PERIOD = 3600
MAX_SERIAL_LENGTH = 128


class TokenImportError(ValueError):
    """A token file could not be imported; the message says where and why."""


@dataclass(frozen=True)
class ImportedToken:
    """One token read from a file, not yet stored."""

    serial: str
    kind: TokenKind
    secret: bytes = field(repr=False)
    digits: int = 6
    period: int = 30
    algorithm: str = "sha1"
    counter: int = 0
    user: str | None = None


def load_tokens(path: Path, *, psk: bytes | None = None) -> list[ImportedToken]:
    """Read a token file: XML content is parsed as PSKC, anything else as CSV.

    ``psk`` is the pre-shared key for encrypted PSKC files (ignored for CSV).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenImportError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        if len(data) > MAX_FILE_BYTES:
            raise TokenImportError(f"larger than {MAX_FILE_BYTES} bytes")
        if _looks_like_xml(data):
            return parse_pskc(data, psk=psk)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TokenImportError(f"not UTF-8 (byte {exc.start})") from None
        return parse_csv(text)
    except TokenImportError as exc:
        raise TokenImportError(f"{path}: {exc}") from None


def _looks_like_xml(data: bytes) -> bool:
    # UTF-8 BOM, UTF-16 BOMs, then the first non-blank byte.
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return data.lstrip(b"\xef\xbb\xbf\xff\xfe\x00 \t\r\n").startswith(b"<")
    return data.lstrip().startswith(b"<")


# --- PSKC -----------------------------------------------------------------

_NS = {
    "pskc": "urn:ietf:params:xml:ns:keyprov:pskc",
    "xenc": "http://www.w3.org/2001/04/xmlenc#",
    "ds": "http://www.w3.org/2000/09/xmldsig#",
}

_KEY_ALGORITHMS = {
    "urn:ietf:params:xml:ns:keyprov:pskc:hotp": TokenKind.HOTP,
    "urn:ietf:params:xml:ns:keyprov:pskc#hotp": TokenKind.HOTP,
    "http://www.ietf.org/keyprov/pskc#hotp": TokenKind.HOTP,
    "urn:ietf:params:xml:ns:keyprov:pskc:totp": TokenKind.TOTP,
    "urn:ietf:params:xml:ns:keyprov:pskc#totp": TokenKind.TOTP,
    "http://www.ietf.org/keyprov/pskc#totp": TokenKind.TOTP,
}

_CIPHERS = {  # xenc algorithm URI -> AES key length in bytes
    "http://www.w3.org/2001/04/xmlenc#aes128-cbc": 16,
    "http://www.w3.org/2001/04/xmlenc#aes192-cbc": 24,
    "http://www.w3.org/2001/04/xmlenc#aes256-cbc": 32,
}

_MACS = {
    "http://www.w3.org/2000/09/xmldsig#hmac-sha1": hashlib.sha1,
    "http://www.w3.org/2001/04/xmldsig-more#hmac-sha224": hashlib.sha224,
    "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256": hashlib.sha256,
    "http://www.w3.org/2001/04/xmldsig-more#hmac-sha384": hashlib.sha384,
    "http://www.w3.org/2001/04/xmldsig-more#hmac-sha512": hashlib.sha512,
}


def parse_pskc(data: bytes, *, psk: bytes | None = None) -> list[ImportedToken]:
    """Parse an RFC 6030 PSKC document; ``psk`` decrypts encrypted secrets."""
    root = _parse_xml(data)
    if root.tag != _q("pskc", "KeyContainer"):
        raise TokenImportError("not a PSKC file (no KeyContainer root element)")
    # Without a PSK there is nothing to decrypt the MAC key with; any
    # encrypted secret then fails with "a pre-shared key is needed".
    mac = _mac_from_container(root, psk) if psk is not None else None
    tokens: list[ImportedToken] = []
    seen: set[str] = set()
    for package_no, package in enumerate(root.findall("pskc:KeyPackage", _NS), 1):
        keys = package.findall("pskc:Key", _NS)
        if not keys:
            raise TokenImportError(f"KeyPackage #{package_no}: no Key element")
        for key in keys:
            token = _parse_key(package, key, package_no, psk, mac)
            if token.serial in seen:
                raise TokenImportError(f"token {token.serial!r}: serial appears twice")
            seen.add(token.serial)
            tokens.append(token)
    if not tokens:
        raise TokenImportError("no KeyPackage found")
    return tokens


def _q(prefix: str, name: str) -> str:
    return f"{{{_NS[prefix]}}}{name}"


def _parse_xml(data: bytes) -> ET.Element:
    """Parse XML, refusing any DOCTYPE (and so any entity declaration)."""

    def refuse_doctype(*args):
        raise TokenImportError("XML with a DOCTYPE is not accepted")

    # A first pass with plain expat sees the DOCTYPE before anything is
    # expanded, whatever the document's encoding; ElementTree then builds
    # the tree from a document known to be harmless.
    checker = expat.ParserCreate()
    checker.StartDoctypeDeclHandler = refuse_doctype
    checker.EntityDeclHandler = refuse_doctype
    try:
        checker.Parse(data, True)
        return ET.fromstring(data)
    except (expat.ExpatError, ET.ParseError) as exc:
        raise TokenImportError(f"not well-formed XML: {exc}") from None


def _text(element: ET.Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    return element.text.strip()


def _b64(text: str | None, what: str) -> bytes:
    try:
        return base64.b64decode("".join((text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise TokenImportError(f"{what}: invalid base64") from None


def _cipher_value(encrypted: ET.Element, psk: bytes | None, what: str) -> bytes:
    """Check an xenc EncryptedValue against the PSK; return IV || ciphertext."""
    if psk is None:
        raise TokenImportError(f"{what} is encrypted: a pre-shared key is needed")
    method = encrypted.find("xenc:EncryptionMethod", _NS)
    uri = (method.get("Algorithm") or "").strip() if method is not None else ""
    key_size = _CIPHERS.get(uri)
    if key_size is None:
        raise TokenImportError(f"{what}: unsupported encryption method {uri or '(none)'!r}")
    if len(psk) != key_size:
        raise TokenImportError(
            f"{what}: {uri.rsplit('#', 1)[-1]} needs a {key_size * 8}-bit key, "
            f"the pre-shared key has {len(psk) * 8} bits"
        )
    raw = _b64(_text(encrypted.find("xenc:CipherData/xenc:CipherValue", _NS)), what)
    if len(raw) < 32 or len(raw) % 16:
        raise TokenImportError(f"{what}: CipherValue is not an IV plus whole AES blocks")
    return raw


def _aes_cbc_decrypt(psk: bytes, raw: bytes, what: str) -> bytes:
    """Decrypt IV || ciphertext (xenc AES-CBC) and strip the padding."""
    iv, ciphertext = raw[:16], raw[16:]
    decryptor = Cipher(algorithms.AES(psk), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise TokenImportError(f"{what}: decryption failed (wrong pre-shared key?)") from None


def _mac_from_container(root: ET.Element, psk: bytes | None):
    """Return (hash constructor, MAC key) from MACMethod, or None if absent."""
    method = root.find("pskc:MACMethod", _NS)
    if method is None:
        return None
    uri = method.get("Algorithm", "").strip()
    digest = _MACS.get(uri)
    if digest is None:
        raise TokenImportError(f"MACMethod: unsupported algorithm {uri or '(none)'!r}")
    mac_key = method.find("pskc:MACKey", _NS)
    if mac_key is None:
        raise TokenImportError("MACMethod: no MACKey")
    key = _aes_cbc_decrypt(psk, _cipher_value(mac_key, psk, "MACKey"), "MACKey")
    if not key:
        raise TokenImportError("MACKey is empty")
    return digest, key


def _parse_key(package, key, package_no, psk, mac) -> ImportedToken:
    serial = _text(package.find("pskc:DeviceInfo/pskc:SerialNo", _NS)) or (
        key.get("Id") or ""
    ).strip()
    where = f"token {serial!r}" if serial else f"KeyPackage #{package_no}"
    if not serial:
        raise TokenImportError(f"{where}: no DeviceInfo/SerialNo and no Key Id")
    _check_serial(serial, where)

    uri = (key.get("Algorithm") or "").strip()
    kind = _KEY_ALGORITHMS.get(uri)
    if kind is None:
        raise TokenImportError(f"{where}: unsupported key algorithm {uri or '(none)'!r}")

    params = key.find("pskc:AlgorithmParameters", _NS)
    digits, algorithm = 6, "sha1"
    if params is not None:
        fmt = params.find("pskc:ResponseFormat", _NS)
        if fmt is not None:
            encoding = (fmt.get("Encoding") or "DECIMAL").strip().upper()
            if encoding != "DECIMAL":
                raise TokenImportError(f"{where}: response encoding {encoding} is not DECIMAL")
            digits = _int(fmt.get("Length"), f"{where}: ResponseFormat Length")
        suite = _text(params.find("pskc:Suite", _NS))
        if suite:
            algorithm = _hash_from_suite(suite, where)
    _check_digits(digits, where)

    data = key.find("pskc:Data", _NS)
    secret_el = data.find("pskc:Secret", _NS) if data is not None else None
    if secret_el is None:
        raise TokenImportError(f"{where}: no Data/Secret")
    secret = _secret(secret_el, psk, mac, where)

    counter = _plain_int(data, "Counter", 0, where)
    period = _plain_int(data, "TimeInterval", 30, where)
    if counter < 0 or counter >= 2**64:
        raise TokenImportError(f"{where}: Counter out of range")
    _check_period(period, where)

    user = _text(key.find("pskc:UserId", _NS)) or _text(
        package.find("pskc:DeviceInfo/pskc:UserId", _NS)
    )
    return ImportedToken(serial, kind, secret, digits, period, algorithm, counter, user or None)


def _secret(secret_el, psk, mac, where) -> bytes:
    plain = secret_el.find("pskc:PlainValue", _NS)
    encrypted = secret_el.find("pskc:EncryptedValue", _NS)
    if plain is not None:
        secret = _b64(_text(plain), f"{where}: Secret PlainValue")
    elif encrypted is not None:
        raw = _cipher_value(encrypted, psk, f"{where}: Secret")
        # RFC 6030 6.1.1: CBC has no integrity, so a MAC over IV || ciphertext
        # is required; it tells a wrong key or an altered file from a real
        # seed. It is checked before decrypting (encrypt-then-MAC).
        value_mac = secret_el.find("pskc:ValueMAC", _NS)
        if mac is None or value_mac is None:
            raise TokenImportError(
                f"{where}: encrypted Secret without MACMethod/ValueMAC cannot be verified"
            )
        digest, mac_key = mac
        expected = hmac.new(mac_key, raw, digest).digest()
        if not hmac.compare_digest(expected, _b64(_text(value_mac), f"{where}: ValueMAC")):
            raise TokenImportError(f"{where}: ValueMAC mismatch (wrong key or altered file)")
        secret = _aes_cbc_decrypt(psk, raw, f"{where}: Secret")
    else:
        raise TokenImportError(f"{where}: Secret has neither PlainValue nor EncryptedValue")
    _check_secret(secret, where)
    return secret


def _plain_int(data, name: str, default: int, where: str) -> int:
    element = data.find(f"pskc:{name}", _NS)
    if element is None:
        return default
    if element.find("pskc:PlainValue", _NS) is None:
        raise TokenImportError(f"{where}: only a PlainValue {name} is supported")
    return _int(_text(element.find("pskc:PlainValue", _NS)), f"{where}: {name}")


def _hash_from_suite(suite: str, where: str) -> str:
    # Seen in the wild: "HMAC-SHA256", "hmac-sha256", "SHA256", "SHA-256".
    name = suite.strip().lower().removeprefix("hmac-").replace("-", "")
    if name not in ALGORITHMS:
        raise TokenImportError(f"{where}: unsupported Suite {suite!r}")
    return name


# --- checks shared by both formats ----------------------------------------

def _int(text: str | None, what: str) -> int:
    text = (text or "").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise TokenImportError(f"{what}: not a non-negative integer")
    return int(text)


def _check_serial(serial: str, where: str) -> None:
    if len(serial) > MAX_SERIAL_LENGTH or not serial.isprintable():
        raise TokenImportError(f"{where}: serial is too long or has control characters")


def _check_digits(digits: int, where: str) -> None:
    if not MIN_DIGITS <= digits <= MAX_DIGITS:
        raise TokenImportError(f"{where}: digits must be {MIN_DIGITS} to {MAX_DIGITS}")


def _check_period(period: int, where: str) -> None:
    if not 1 <= period <= MAX_PERIOD:
        raise TokenImportError(f"{where}: period must be 1 to {MAX_PERIOD} seconds")


def _check_secret(secret: bytes, where: str) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise TokenImportError(
            f"{where}: secret is {len(secret) * 8} bits, at least {MIN_SECRET_BYTES * 8} "
            "are required (RFC 4226 R6)"
        )


# --- CSV ------------------------------------------------------------------

CSV_COLUMNS = ("serial", "type", "secret", "digits", "period", "counter", "algorithm", "user")
_REQUIRED = ("serial", "type", "secret")


def parse_csv(text: str) -> list[ImportedToken]:
    """Parse the CSV format described in this module's docstring."""
    header: list[str] | None = None
    header_line = 0
    tokens: list[ImportedToken] = []
    first_seen: dict[str, int] = {}
    errors: list[str] = []
    # Split on \n only: str.splitlines() also breaks on form feeds and
    # Unicode separators, which would shift line numbers from an editor's.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            fields = [f.strip() for f in next(csv.reader([line], strict=True))]
        except csv.Error as exc:
            if header is None:
                raise TokenImportError(f"line {lineno}: malformed CSV header ({exc})") from None
            errors.append(f"line {lineno}: malformed CSV ({exc})")
            continue
        if header is None:
            header, header_line = _csv_header(fields, lineno), lineno
            continue
        if len(fields) != len(header):
            errors.append(f"line {lineno}: {len(fields)} fields, the header has {len(header)}")
            continue
        try:
            token = _csv_token(dict(zip(header, fields)), lineno)
        except TokenImportError as exc:
            errors.append(str(exc))
            continue
        if token.serial in first_seen:
            errors.append(
                f"line {lineno}: serial {token.serial!r} already on line {first_seen[token.serial]}"
            )
            continue
        first_seen[token.serial] = lineno
        tokens.append(token)
    if header is None:
        raise TokenImportError("empty CSV: the header line is missing")
    if errors:
        raise TokenImportError(f"{len(errors)} bad line(s): " + "; ".join(errors))
    if not tokens:
        raise TokenImportError(f"no tokens after the header on line {header_line}")
    return tokens


def _csv_header(fields: list[str], lineno: int) -> list[str]:
    names = [f.lower() for f in fields]
    unknown = [n for n in names if n not in CSV_COLUMNS]
    if unknown:
        raise TokenImportError(
            f"line {lineno}: unknown column(s) {', '.join(map(repr, unknown))} in the header "
            f"(known: {','.join(CSV_COLUMNS)})"
        )
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise TokenImportError(f"line {lineno}: header lacks column(s) {', '.join(missing)}")
    if len(set(names)) != len(names):
        raise TokenImportError(f"line {lineno}: a column appears twice in the header")
    return names


def _csv_token(row: dict[str, str], lineno: int) -> ImportedToken:
    serial = row["serial"]
    where = f"line {lineno}" + (f" (serial {serial!r})" if serial else "")
    if not serial:
        raise TokenImportError(f"{where}: serial is empty")
    _check_serial(serial, where)
    try:
        kind = TokenKind(row["type"].lower())
    except ValueError:
        raise TokenImportError(f"{where}: type must be totp or hotp") from None
    secret = _csv_secret(row["secret"], where)
    digits = _int(row["digits"], f"{where}: digits") if row.get("digits") else 6
    period = _int(row["period"], f"{where}: period") if row.get("period") else 30
    counter = _int(row["counter"], f"{where}: counter") if row.get("counter") else 0
    algorithm = (row.get("algorithm") or "sha1").lower()
    if algorithm not in ALGORITHMS:
        raise TokenImportError(f"{where}: algorithm must be one of {', '.join(ALGORITHMS)}")
    _check_digits(digits, where)
    _check_period(period, where)
    if counter >= 2**64:
        raise TokenImportError(f"{where}: counter out of range")
    user = row.get("user") or None
    return ImportedToken(serial, kind, secret, digits, period, algorithm, counter, user)


def _csv_secret(text: str, where: str) -> bytes:
    if not text:
        raise TokenImportError(f"{where}: secret is empty")
    if text[:4].lower() == "hex:":
        try:
            secret = bytes.fromhex(text[4:])
        except ValueError:
            raise TokenImportError(f"{where}: secret is not valid hex") from None
        _check_secret(secret, where)
        return secret
    try:
        return parse_base32_secret(text)
    except ValueError as exc:
        # parse_base32_secret never puts the input in its messages.
        raise TokenImportError(f"{where}: {exc}") from None
