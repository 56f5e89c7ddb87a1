"""Persistent state: the SQLite store and encryption of OATH seeds at rest.

The same store on PostgreSQL is `mfaserver.store.pg.PgStore`, imported from there
only, so that a node on SQLite never loads psycopg.
"""

from mfaserver.store.crypto import (
    KeyFileError,
    SeedCipher,
    SeedIntegrityError,
    load_or_create_key,
)
from mfaserver.store.db import (EnrollmentExpired, EnrollmentRefused, InviteExpired, InviteRefused,
                                NewToken, Store, StoreError, UnknownEnrollment, UnknownInvite,
                                UserInfo)
from mfaserver.store.migrations import SCHEMA_VERSION

__all__ = [
    "EnrollmentExpired",
    "EnrollmentRefused",
    "InviteExpired",
    "InviteRefused",
    "KeyFileError",
    "NewToken",
    "SCHEMA_VERSION",
    "SeedCipher",
    "SeedIntegrityError",
    "Store",
    "StoreError",
    "UnknownEnrollment",
    "UnknownInvite",
    "UserInfo",
    "load_or_create_key",
]
