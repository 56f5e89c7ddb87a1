"""Versioned schema migrations for the mfaserver SQLite database.

The schema version lives in ``PRAGMA user_version``. ``MIGRATIONS[n]`` takes
the schema from version ``n`` to ``n + 1``; pending steps run in order inside
one ``BEGIN IMMEDIATE`` transaction, so a crash leaves the old schema intact
and two processes starting together cannot both migrate. Append new steps;
never edit a released one.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "MigrationError", "migrate", "schema_version"]


class MigrationError(Exception):
    """The database cannot be brought to this code's schema (e.g. it is newer)."""


def _v1_initial(db: sqlite_utils.Database) -> None:
    """Users, OATH tokens, one-time bypasses, the audit log and a key check."""
    from sqlite_utils.db import ForeignKey

    # meta holds small named values; "key_check" is a blob sealed under the
    # seed key so that opening with the wrong key file fails at start (F7).
    db.create_table("meta", {"name": str, "value": bytes}, pk="name", not_null=["value"])

    db.create_table(
        "users",
        {
            "id": int,
            "name": str,
            "password_hash": str,
            "phone": str,
            "blocked": int,
            "failures": int,
            "locked_until": float,
            "created": float,
        },
        pk="id",
        not_null=["name", "blocked", "failures", "created"],
        defaults={"blocked": 0, "failures": 0},
    )
    db["users"].create_index(["name"], index_name="users_name", unique=True)

    db.create_table(
        "tokens",
        {
            "id": int,
            "serial": str,
            "user_id": int,
            "kind": str,
            "secret": bytes,
            "digits": int,
            "period": int,
            "algorithm": str,
            "counter": int,
            "last_step": int,
            "drift": int,
            "created": float,
        },
        pk="id",
        foreign_keys=[ForeignKey("tokens", "user_id", "users", "id", on_delete="CASCADE")],
        not_null=[
            "serial", "kind", "secret", "digits", "period", "algorithm",
            "counter", "drift", "created",
        ],
        defaults={"digits": 6, "period": 30, "algorithm": "sha1", "counter": 0, "drift": 0},
    )
    db["tokens"].create_index(["serial"], index_name="tokens_serial", unique=True)
    db["tokens"].create_index(["user_id"], index_name="tokens_user_id")

    db.create_table(
        "bypass",
        {"user_id": int, "expires": float},
        pk="user_id",
        foreign_keys=[ForeignKey("bypass", "user_id", "users", "id", on_delete="CASCADE")],
        not_null=["expires"],
    )

    db.create_table(
        "audit",
        {
            "id": int,
            "time": float,
            "user": str,
            "client": str,
            "nas_ip": str,
            "calling_station_id": str,
            "factor": str,
            "outcome": str,
            "reason": str,
        },
        pk="id",
        not_null=["time", "user", "client", "factor", "outcome", "reason"],
    )
    db["audit"].create_index(["time"], index_name="audit_time")
    db["audit"].create_index(["user", "time"], index_name="audit_user_time")


def _v2_directory_sync(db: sqlite_utils.Database) -> None:
    """Where each user comes from, and since when a synced user is disabled.

    ``source`` is 'local' (added with the CLI) or 'ldap' (imported by the
    directory sync, which only ever changes 'ldap' users). ``disabled_since``
    is set when an 'ldap' user leaves the directory; NULL means enabled.
    """
    # Plain ALTER TABLE: existing rows get the defaults without a table rebuild.
    db.execute("ALTER TABLE users ADD COLUMN source TEXT NOT NULL DEFAULT 'local'")
    db.execute("ALTER TABLE users ADD COLUMN disabled_since REAL")


def _v3_out_of_band(db: sqlite_utils.Database) -> None:
    """Push devices, their one-time enrollment tokens, the user's default
    method and voice PIN.

    A device row holds the device's public key (text form, see
    docs/device-api.rst) and an optional wake-up target. An enrollment row
    holds only the SHA-256 digest of its token; ``device_id`` is set when it
    is used, so a second use is told apart from an unknown token.
    """
    db.execute("ALTER TABLE users ADD COLUMN default_method TEXT")
    db.execute("ALTER TABLE users ADD COLUMN pin_hash TEXT")
    db.execute(
        "CREATE TABLE devices ("
        " id TEXT PRIMARY KEY,"
        " user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
        " public_key TEXT NOT NULL,"
        " notify_type TEXT,"
        " notify_url TEXT,"
        " created REAL NOT NULL,"
        " last_used REAL)")
    db.execute("CREATE INDEX devices_user_id ON devices (user_id)")
    db.execute(
        "CREATE TABLE enrollments ("
        " digest TEXT PRIMARY KEY,"
        " user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
        " expires REAL NOT NULL,"
        " device_id TEXT)")


def _v4_phone_side(db: sqlite_utils.Database) -> None:
    """The web authenticator and the self-service portal.

    ``tokens.active``: 0 for an authenticator app enrolled in the portal until
    the user types a first correct code (logins ignore it until then).
    ``devices.notify_keys``: the keys of a Web Push subscription (JSON:
    ``p256dh`` and ``auth``, base64url), with ``notify_url`` its endpoint.
    ``invites``: one-time links (by digest) for a user's first enrollment in
    the portal; ``used`` is when the link was used, NULL until then.
    """
    db.execute("ALTER TABLE tokens ADD COLUMN active INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE devices ADD COLUMN notify_keys TEXT")
    db.execute(
        "CREATE TABLE invites ("
        " digest TEXT PRIMARY KEY,"
        " user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
        " expires REAL NOT NULL,"
        " used REAL)")


def _v5_enrollment_purge(db: sqlite_utils.Database) -> None:
    """Each new enrollment link purges the expired ones: by this index, not by a
    scan of every link ever made (enrolling 100,000 devices took 14 minutes)."""
    db.execute("CREATE INDEX enrollments_expires ON enrollments (expires)")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1_initial,
    _v2_directory_sync,
    _v3_out_of_band,
    _v4_phone_side,
    _v5_enrollment_purge,
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """Return the schema version recorded in the database file."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _check_not_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise MigrationError(
            f"database schema version {version} is newer than this mfaserver "
            f"supports ({SCHEMA_VERSION}); upgrade mfaserver"
        )


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations to ``conn`` and return the resulting version.

    ``conn`` must be in autocommit mode (``isolation_level=None``) with no
    transaction open.
    """
    version = schema_version(conn)
    _check_not_newer(version)
    if version == SCHEMA_VERSION:
        # The common case takes no write lock, so opening never waits on the daemon.
        return version
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated meanwhile.
        version = schema_version(conn)
        _check_not_newer(version)
        # Imported only when a migration runs: the daemon's usual start (schema
        # already current) should not carry sqlite-utils in memory.
        import sqlite_utils

        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        for number in range(version, SCHEMA_VERSION):
            MIGRATIONS[number](db)
            conn.execute(f"PRAGMA user_version = {number + 1:d}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION
