"""Encryption of OATH seeds at rest (SEC-01, SEC-02).

Seeds are sealed with AES-256-GCM under a 32-byte key that lives in its own
file, outside the database, readable by the service user only. A stored blob
is ``version (1 byte) || nonce (12 bytes) || ciphertext+tag``; the token
serial is the associated data, so a blob copied onto another token row fails
to open. A missing, exposed or wrong key is always an error: there is no
plaintext fallback (F7).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The core handles this failure (it refuses the login and alarms), so it is
# defined with the store's contract in mfaserver.auth.interfaces.
from mfaserver.auth.interfaces import SeedIntegrityError
from mfaserver.keyfiles import KeyFileProblem, read_private, write_new_private

__all__ = [
    "KEY_SIZE",
    "KeyFileError",
    "SeedCipher",
    "SeedIntegrityError",
    "load_or_create_key",
]

KEY_SIZE = 32
_FORMAT_V1 = b"\x01"
_NONCE_SIZE = 12
_TAG_SIZE = 16


class KeyFileError(Exception):
    """The seed key file is missing, unreadable, the wrong size or too permissive."""


def load_or_create_key(path: Path, *, create: bool = True) -> bytes:
    """Return the 32-byte seed key stored at ``path``.

    When the file is missing and ``create`` is true, a new random key is
    written with mode 0600 (its directory is created 0700 if needed). An
    existing file that group or others may access is refused rather than
    used, because the key protects every seed in the database.
    """
    path = Path(path)
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            raise KeyFileError(
                f"seed key file {path} does not exist; restore it from backup "
                f"(a new key cannot decrypt the existing seeds)"
            ) from None
    try:
        return _create_key(path)
    except FileExistsError:
        # Another process (daemon or CLI) created it between our two calls.
        return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        data = read_private(path, "seed key file")
    except KeyFileProblem as e:
        raise KeyFileError(str(e)) from None
    if len(data) != KEY_SIZE:
        raise KeyFileError(
            f"seed key file {path} holds {len(data)} bytes, expected {KEY_SIZE}; "
            f"restore the original key file from backup"
        )
    return data


def _create_key(path: Path) -> bytes:
    key = AESGCM.generate_key(bit_length=256)
    # Never over a key that seeds may already be sealed under (FileExistsError).
    write_new_private(path, key)
    return key


class SeedCipher:
    """Seal and open OATH seeds with AES-256-GCM; the serial is the associated data."""

    def __init__(self, key: bytes):
        if len(key) != KEY_SIZE:
            raise ValueError(f"seed key must be {KEY_SIZE} bytes")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        return "<SeedCipher>"

    def encrypt(self, seed: bytes, *, serial: str) -> bytes:
        """Return the blob to store for ``seed`` on the token ``serial``."""
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, bytes(seed), serial.encode("utf-8"))
        return _FORMAT_V1 + nonce + sealed

    def decrypt(self, blob: bytes, *, serial: str) -> bytes:
        """Return the seed in ``blob``; SeedIntegrityError if it does not authenticate."""
        blob = bytes(blob)
        if len(blob) < 1 + _NONCE_SIZE + _TAG_SIZE or blob[:1] != _FORMAT_V1:
            raise SeedIntegrityError(f"seed of token {serial!r}: unknown format")
        nonce = blob[1:1 + _NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_SIZE:], serial.encode("utf-8"))
        except InvalidTag:
            raise SeedIntegrityError(
                f"seed of token {serial!r} failed authentication "
                f"(tampered row or wrong key file)"
            ) from None
