"""Tests for mfaserver.store.crypto: the seed key file and SeedCipher."""

from __future__ import annotations

import os
import stat

import pytest

from mfaserver.store.crypto import (
    KEY_SIZE,
    KeyFileError,
    SeedCipher,
    SeedIntegrityError,
    load_or_create_key,
)

SEED = b"12345678901234567890"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- key file ---


def test_key_is_created_0600_in_a_0700_directory(tmp_path):
    path = tmp_path / "state" / "seed.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_SIZE
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_bytes() == key


def test_existing_key_is_loaded_not_replaced(tmp_path):
    path = tmp_path / "seed.key"
    first = load_or_create_key(path)
    assert load_or_create_key(path) == first
    assert load_or_create_key(path, create=False) == first


def test_two_new_keys_differ(tmp_path):
    assert load_or_create_key(tmp_path / "a") != load_or_create_key(tmp_path / "b")


def test_missing_key_without_create_names_the_path(tmp_path):
    path = tmp_path / "seed.key"
    with pytest.raises(KeyFileError, match="seed.key does not exist"):
        load_or_create_key(path, create=False)
    assert not path.exists()


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_group_or_others_is_refused(tmp_path, bad_mode):
    path = tmp_path / "seed.key"
    load_or_create_key(path)
    os.chmod(path, bad_mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    assert f"{bad_mode:04o}" in message


def test_owner_only_read_mode_is_accepted(tmp_path):
    path = tmp_path / "seed.key"
    key = load_or_create_key(path)
    os.chmod(path, 0o400)
    assert load_or_create_key(path) == key


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_size_is_refused(tmp_path, size):
    path = tmp_path / "seed.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"k" * size)
    os.close(fd)
    with pytest.raises(KeyFileError, match=f"holds {size} bytes, expected 32"):
        load_or_create_key(path)


def test_key_path_that_is_a_directory_is_refused(tmp_path):
    path = tmp_path / "seed.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_key(path)


def test_symlinked_key_is_refused(tmp_path):
    real = tmp_path / "real.key"
    load_or_create_key(real)
    link = tmp_path / "seed.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="seed.key"):
        load_or_create_key(link)


# --- SeedCipher ---


@pytest.fixture
def cipher():
    return SeedCipher(bytes(range(32)))


def test_round_trip(cipher):
    blob = cipher.encrypt(SEED, serial="TOTP-0001")
    assert cipher.decrypt(blob, serial="TOTP-0001") == SEED


def test_blob_layout_is_version_nonce_ciphertext_and_hides_the_seed(cipher):
    blob = cipher.encrypt(SEED, serial="TOTP-0001")
    assert blob[:1] == b"\x01"
    assert len(blob) == 1 + 12 + len(SEED) + 16
    assert SEED not in blob


def test_nonce_is_fresh_each_time(cipher):
    first = cipher.encrypt(SEED, serial="S")
    second = cipher.encrypt(SEED, serial="S")
    assert first[1:13] != second[1:13]
    assert first != second


def test_every_flipped_byte_is_detected(cipher):
    blob = cipher.encrypt(SEED, serial="S")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(SeedIntegrityError):
            cipher.decrypt(bytes(tampered), serial="S")


def test_blob_moved_to_another_serial_fails(cipher):
    blob = cipher.encrypt(SEED, serial="TOTP-0001")
    with pytest.raises(SeedIntegrityError, match="TOTP-0002"):
        cipher.decrypt(blob, serial="TOTP-0002")


def test_wrong_key_fails(cipher):
    blob = cipher.encrypt(SEED, serial="S")
    with pytest.raises(SeedIntegrityError):
        SeedCipher(bytes(32)).decrypt(blob, serial="S")


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01" + bytes(27), b"\x02" + bytes(60)])
def test_truncated_or_unknown_version_fails(cipher, blob):
    with pytest.raises(SeedIntegrityError):
        cipher.decrypt(blob, serial="S")


def test_error_messages_and_repr_do_not_leak_key_or_seed(cipher):
    key = bytes(range(32))
    assert key.hex() not in repr(cipher)
    blob = cipher.encrypt(SEED, serial="S")
    with pytest.raises(SeedIntegrityError) as info:
        SeedCipher(bytes(32)).decrypt(blob, serial="S")
    assert SEED.decode() not in str(info.value)


def test_key_of_wrong_length_is_a_programming_error():
    with pytest.raises(ValueError):
        SeedCipher(b"short")
