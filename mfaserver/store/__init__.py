"""Persistent state: the SQLite store and encryption of OATH seeds at rest."""

from mfaserver.store.crypto import (
    KeyFileError,
    SeedCipher,
    SeedIntegrityError,
    load_or_create_key,
)
from mfaserver.store.db import EnrollmentRefused, NewToken, Store, StoreError, UserInfo
from mfaserver.store.migrations import SCHEMA_VERSION

__all__ = [
    "EnrollmentRefused",
    "KeyFileError",
    "NewToken",
    "SCHEMA_VERSION",
    "SeedCipher",
    "SeedIntegrityError",
    "Store",
    "StoreError",
    "UserInfo",
    "load_or_create_key",
]
