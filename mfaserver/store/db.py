"""The SQLite store: users, OATH tokens, bypass codes and the audit log.

One database file in WAL mode is shared by the daemon (one ``Store`` used
from one dedicated thread) and by CLI processes (their own ``Store``). So
every write is one short transaction, every check-and-set on the login path
is a single conditional statement judged by its row count (OTP-07), and
multi-statement writes use ``BEGIN IMMEDIATE`` so they take the write lock up
front instead of failing with SQLITE_BUSY on upgrade (AVL-10). A writer that
holds the lock longer than the busy timeout (5 s) makes the call fail with
``StoreError``; callers on the login path reject (F6).

User names are stored exactly as given and looked up by exact match (no case
folding or trimming): normalise before calling if the deployment needs it.

Lockout: ``locked_until`` is a wall-clock timestamp set by
``register_failure``; the store never compares it with the time, the caller
does (``locked_until is not None and now < locked_until``). ``blocked`` is a
separate administrative/fraud flag that only ``set_blocked`` changes.

Directory sync: a user's ``source`` is 'local' (the CLI) or 'ldap' (imported
by ``sync_users``, which never changes a 'local' user). An 'ldap' user who
left the directory has ``disabled_since`` set; ``load_account`` reports such
a user as ``blocked`` so the login path refuses them, while ``UserInfo``
keeps the two apart (``blocked`` is the admin's flag only).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import sqlite3
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from mfaserver.auth.interfaces import StoreUnavailable
from mfaserver.auth.model import (OATH_ALGORITHMS, Account, AuditEntry, CodeUse, Device,
                                  Token, TokenKind)
from mfaserver.phones import is_e164
from mfaserver.store.crypto import (
    KeyFileError,
    SeedCipher,
    SeedIntegrityError,
    load_or_create_key,
)
from mfaserver.store.migrations import MigrationError, migrate

__all__ = ["Dialect", "NewToken", "Store", "StoreError", "SyncResult", "UserInfo",
           "check_user_name"]

BUSY_TIMEOUT_MS = 5000
MAX_NAME_BYTES = 253          # the longest User-Name a RADIUS attribute can carry
MAX_SERIAL_BYTES = 128
# A method name as the factors name themselves (which ones exist is the CLI's to check).
_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_KEY_CHECK_AAD = "\x00key-check"  # not a possible serial: serials reject control chars
_KEY_CHECK_PLAINTEXT = b"mfaserver seed key check v1"
_PURGE_BATCH = 5000


class StoreError(Exception):
    """A store operation failed; the message is one line fit for an operator."""


class StoreUnavailableError(StoreError, StoreUnavailable):
    """The database cannot be reached (connection refused or lost, failing over):
    the login path fails closed and the daemon reports the outage once."""


class EnrollmentRefused(StoreError):
    """A device enrollment token cannot be used (see the two kinds below)."""


class UnknownEnrollment(EnrollmentRefused):
    """No enrollment has this token."""


class EnrollmentExpired(EnrollmentRefused):
    """The enrollment token expired, or a device was enrolled with it already."""


class InviteRefused(StoreError):
    """A portal invite cannot be used (one of the two kinds below)."""


class UnknownInvite(InviteRefused):
    """No invite has this token."""


class InviteExpired(InviteRefused):
    """The invite expired, or was used already."""


@dataclass(frozen=True)
class UserInfo:
    """A user as the CLI shows it (no secrets)."""

    name: str
    phone: str | None
    blocked: bool
    failures: int
    locked_until: float | None
    has_password: bool
    created: float
    token_count: int
    source: str = "local"                 # 'local' or 'ldap' (see the module docstring)
    disabled_since: float | None = None   # set while an 'ldap' user is gone from LDAP


@dataclass(frozen=True)
class SyncResult:
    """What `Store.sync_users` changed (in a dry run: would change).

    Every directory entry lands in exactly one of added, updated, reenabled,
    unchanged and conflicts; disabled and removed count users not in it.
    """

    added: int = 0
    updated: int = 0        # phone number changed
    reenabled: int = 0      # back in the directory (their phone is refreshed too)
    disabled: int = 0       # newly gone from the directory
    removed: int = 0        # disabled for longer than keep_days, deleted
    unchanged: int = 0
    conflicts: tuple[str, ...] = ()   # names held by 'local' users, left alone


@dataclass(frozen=True)
class NewToken:
    """A token to enrol; ``serial=None`` lets the store generate one."""

    kind: TokenKind
    secret: bytes = field(repr=False)
    digits: int = 6
    period: int = 30
    algorithm: str = "sha1"
    counter: int = 0
    serial: str | None = None


@dataclass(frozen=True)
class Dialect:
    """What differs between the engines in `Store`'s statements, beyond placeholders.

    The statements are written once, in SQL both engines accept, with SQLite's
    ``?`` and ``:name`` placeholders; `mfaserver.store.pg` rewrites those (and
    ``BEGIN IMMEDIATE``) for psycopg. What cannot be written alike is here.
    """

    error: type[Exception]            # any database error: becomes StoreError
    integrity_error: type[Exception]  # a constraint refused a write
    temp_schema: str                  # the connection's private schema
    # A row lock to append to a SELECT that is followed by a write of the rows read,
    # formatted with the table alias. SQLite needs none: BEGIN IMMEDIATE holds the
    # database's write lock from the first statement.
    lock_rows: str
    # Whether an integrity error is a duplicate in the unique index on table.column.
    is_duplicate: Callable[[Exception, str, str], bool]
    # Run first in a directory sync's write transaction so that two syncs (two
    # nodes) run one after the other; None where BEGIN IMMEDIATE does it already.
    serialise_sync: str | None = None
    # Starts a read-only transaction that sees one snapshot (`mfaserver store copy`).
    begin_snapshot: str = "BEGIN"
    # Run per table (formatted with ``table``) after rows were inserted with their
    # ids, so that the next generated id follows them; None where that is automatic.
    after_explicit_ids: str | None = None


SQLITE = Dialect(
    error=sqlite3.Error,
    integrity_error=sqlite3.IntegrityError,
    temp_schema="temp",
    lock_rows="",
    is_duplicate=lambda e, table, column: f"{table}.{column}" in str(e),
)


def _guarded(method):
    """Serialise use of the connection and turn database errors into StoreError."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._conn is None:
                raise StoreError("the store is closed")
            try:
                return method(self, *args, **kwargs)
            except self._dialect.error as e:  # looked up only when something failed
                raise self._failure(e) from e

    return wrapper


def _check_label(what: str, value: str, max_bytes: int) -> None:
    """A user name or token serial: non-empty, bounded, valid Unicode, no control characters."""
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError(f"{what} {value!r} is not valid Unicode") from None
    if size > max_bytes:
        raise StoreError(f"{what} is too long ({size} bytes, at most {max_bytes})")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise StoreError(f"{what} {value!r} contains control characters")


def _check_name(name: str) -> None:
    _check_label("user name", name, MAX_NAME_BYTES)


def check_user_name(name: str) -> None:
    """Raise StoreError unless the store would accept ``name`` as a user name."""
    _check_name(name)


def _check_serial(serial: str) -> None:
    _check_label("token serial", serial, MAX_SERIAL_BYTES)


def _check_phone(phone: str | None) -> None:
    if phone is not None and not is_e164(phone):
        raise StoreError("phone number must be in E.164 form, e.g. +14155550123")


def _check_new_token(token: NewToken) -> tuple[TokenKind, str]:
    """Validate ``token``; return its kind and normalised algorithm name."""
    try:
        kind = TokenKind(token.kind)
    except ValueError:
        raise StoreError(f"unknown token kind {token.kind!r} (expected totp or hotp)") from None
    if not isinstance(token.secret, (bytes, bytearray)) or not token.secret:
        raise StoreError("token secret must be non-empty bytes")
    if not 6 <= token.digits <= 8:
        raise StoreError(f"token digits must be 6, 7 or 8, not {token.digits}")
    if not 1 <= token.period <= 300:
        raise StoreError(f"token period must be 1 to 300 seconds, not {token.period}")
    algorithm = str(token.algorithm).lower()
    if algorithm not in OATH_ALGORITHMS:
        raise StoreError(f"token algorithm must be one of {', '.join(OATH_ALGORITHMS)},"
                         f" not {token.algorithm!r}")
    if not 0 <= token.counter < 2**63:
        raise StoreError(f"token counter out of range: {token.counter}")
    if token.serial is not None:
        _check_serial(token.serial)
    return kind, algorithm


_USER_INFO_SQL = """
    SELECT name, phone, blocked, failures, locked_until, password_hash IS NOT NULL,
           created, (SELECT count(*) FROM tokens WHERE tokens.user_id = users.id),
           source, disabled_since
    FROM users
"""

_TOKEN_SQL = """
    SELECT t.id, t.serial, u.name, t.kind, t.secret, t.digits, t.period, t.algorithm,
           t.counter, t.last_step, t.drift, t.active
    FROM tokens t LEFT JOIN users u ON u.id = t.user_id
"""

# One statement reads the user and all their tokens from one snapshot.
# A user disabled by the directory sync is reported as blocked.
ACCOUNT_SQL = """
    SELECT u.name, u.phone, u.blocked != 0 OR u.disabled_since IS NOT NULL,
           u.failures, u.locked_until,
           u.password_hash IS NOT NULL,
           t.id, t.serial, t.kind, t.secret, t.digits, t.period, t.algorithm,
           t.counter, t.last_step, t.drift,
           u.default_method, (SELECT count(*) FROM devices d WHERE d.user_id = u.id),
           u.pin_hash IS NOT NULL,
           (SELECT b.expires FROM bypass b WHERE b.user_id = u.id)
    FROM users u LEFT JOIN tokens t ON t.user_id = u.id AND t.active = 1
    WHERE u.name = ?
    ORDER BY t.id
"""


DEVICE_SQL = """
    SELECT d.id, u.name, d.public_key, d.notify_type, d.notify_url, d.created, d.last_used,
           d.notify_keys
    FROM devices d JOIN users u ON u.id = d.user_id
"""


# The login path's single-statement writes (OTP-07: each judged by its row count).
_USE_TOTP_STEP = ("UPDATE tokens SET last_step = ?, drift = ?"
                  " WHERE id = ? AND kind = 'totp' AND (last_step IS NULL OR last_step < ?)")
_USE_HOTP_COUNTER = "UPDATE tokens SET counter = ? WHERE id = ? AND kind = 'hotp' AND counter <= ?"
_CLEAR_FAILURES = "UPDATE users SET failures = 0 WHERE name = ? AND failures != 0"

AUDIT_INSERT = (
    "INSERT INTO audit (time, \"user\", client, nas_ip, calling_station_id, factor,"
    " outcome, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def audit_row(entry: AuditEntry) -> tuple:
    return (entry.time, entry.user, entry.client, entry.nas_ip, entry.calling_station_id,
            entry.factor, entry.outcome, entry.reason)


def _user_info(row) -> UserInfo:
    return UserInfo(
        name=row[0], phone=row[1], blocked=bool(row[2]), failures=row[3],
        locked_until=row[4], has_password=bool(row[5]), created=row[6], token_count=row[7],
        source=row[8], disabled_since=row[9],
    )


class Store:
    """Synchronous access to the mfaserver database; see the module docstring.

    Calls on one instance are serialised by a lock, but the daemon should
    still make them from one dedicated thread. Seeds are decrypted only when
    a ``Token`` is built; encrypted blobs never leave this class.

    `mfaserver.store.pg.PgStore` is the same class on PostgreSQL: the
    statements are shared, what differs goes through ``_dialect``.
    """

    _dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection, cipher: SeedCipher, path: Path):
        """Use ``Store.open``; this takes an already configured connection."""
        self._conn: sqlite3.Connection | None = conn
        self._cipher = cipher
        self._path = path
        self._lock = threading.RLock()

    @classmethod
    def open(cls, database_path: Path, key_path: Path, *, create: bool = True) -> "Store":
        """Open (and with ``create``, create) the database and its seed key.

        Creates the state directory 0700 and the database file 0600 (SQLite
        gives the -wal/-shm files the same mode), applies migrations and
        loads the key. Raises StoreError for database problems and
        KeyFileError for key problems, including a key that does not match
        the database. A key is only ever created for a database that has
        never had one, so a lost key file is not silently replaced.
        """
        database_path = Path(database_path)
        key_path = Path(key_path)
        if create:
            database_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.close(os.open(database_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"cannot create database {database_path}: {e.strerror}") from None
        elif not database_path.exists():
            raise StoreError(f"database {database_path} does not exist")
        try:
            conn = sqlite3.connect(
                database_path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {database_path}: {e}") from e

        def prepare(conn):
            _configure(conn, database_path)
            migrate(conn)
        return cls._opened(conn, database_path, key_path, prepare, create=create)

    @classmethod
    def _opened(cls, conn, label, key_path: Path, prepare: Callable, *, create: bool):
        """The store on ``conn`` once ``prepare(conn)`` configured and migrated it and
        the seed key is loaded; closes ``conn`` and raises StoreError or KeyFileError
        if any of that fails."""
        try:
            prepare(conn)
            cipher = _load_cipher(conn, key_path, create=create)
        except MigrationError as e:
            conn.close()
            raise StoreError(f"database {label}: {e}") from None
        except cls._dialect.error as e:
            conn.close()
            raise StoreError(f"cannot open database {label}: {cls._message(e)}") from e
        except BaseException:
            conn.close()
            raise
        return cls(conn, cipher, label)

    @staticmethod
    def _message(error: Exception) -> str:
        """A database error's message, for StoreError."""
        return str(error)

    def _failure(self, error: Exception) -> StoreError:
        """The StoreError for a database error raised by a method."""
        return StoreError(f"database {self._path}: {self._message(error)}")

    def close(self) -> None:
        """Close the connection; later calls raise StoreError. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                # Keeps the query planner's statistics current; cheap when nothing changed.
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its first statement."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _user_id(self, name: str) -> int | None:
        row = self._conn.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def _require_user_id(self, name: str) -> int:
        user_id = self._user_id(name)
        if user_id is None:
            raise StoreError(f"no such user {name!r}")
        return user_id

    def _token(self, row) -> Token:
        (token_id, serial, user, kind, blob, digits, period, algorithm,
         counter, last_step, drift, *active) = row
        return Token(
            id=token_id, serial=serial, user=user, kind=TokenKind(kind),
            secret=self._cipher.decrypt(blob, serial=serial),
            digits=digits, period=period, algorithm=algorithm, counter=counter,
            last_step=last_step, drift=drift, active=bool(active[0]) if active else True,
        )

    # --- users (CLI) ---

    @_guarded
    def add_user(
        self, name: str, *, password_hash: str | None, phone: str | None, now: float
    ) -> UserInfo:
        """Create a user; StoreError if the name is taken or invalid."""
        _check_name(name)
        _check_phone(phone)
        try:
            self._conn.execute(
                "INSERT INTO users (name, password_hash, phone, blocked, failures, created)"
                " VALUES (?, ?, ?, 0, 0, ?)",
                (name, password_hash, phone, now),
            )
        except self._dialect.integrity_error:
            raise StoreError(f"user {name!r} already exists") from None
        return UserInfo(
            name=name, phone=phone, blocked=False, failures=0, locked_until=None,
            has_password=password_hash is not None, created=now, token_count=0,
        )

    @_guarded
    def get_user(self, name: str) -> UserInfo | None:
        """Return the user called exactly ``name``, or None."""
        row = self._conn.execute(_USER_INFO_SQL + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _user_info(row)

    @_guarded
    def list_users(self) -> list[UserInfo]:
        """Return all users ordered by name."""
        rows = self._conn.execute(_USER_INFO_SQL + " ORDER BY name").fetchall()
        return [_user_info(row) for row in rows]

    def _update_user(self, name: str, sql: str, params: tuple) -> None:
        cursor = self._conn.execute(sql, params + (name,))
        if cursor.rowcount != 1:
            raise StoreError(f"no such user {name!r}")

    @_guarded
    def set_password(self, name: str, password_hash: str) -> None:
        """Replace the user's password hash."""
        if not isinstance(password_hash, str) or not password_hash:
            raise StoreError("password hash must not be empty")
        self._update_user(
            name, "UPDATE users SET password_hash = ? WHERE name = ?", (password_hash,)
        )

    @_guarded
    def set_phone(self, name: str, phone: str | None) -> None:
        """Set (E.164) or clear the user's phone number."""
        _check_phone(phone)
        self._update_user(name, "UPDATE users SET phone = ? WHERE name = ?", (phone,))

    @_guarded
    def set_blocked(self, name: str, blocked: bool) -> None:
        """Block or unblock; unblocking also clears failures and any lockout."""
        if blocked:
            self._update_user(name, "UPDATE users SET blocked = 1 WHERE name = ?", ())
        else:
            self._update_user(
                name,
                "UPDATE users SET blocked = 0, failures = 0, locked_until = NULL WHERE name = ?",
                (),
            )

    @_guarded
    def delete_user(self, name: str) -> None:
        """Delete the user with their tokens and bypass (audit rows are kept)."""
        self._update_user(name, "DELETE FROM users WHERE name = ?", ())

    @_guarded
    def count_users(self, *, source: str | None = None) -> int:
        """How many users there are (only those from ``source`` if given)."""
        if source is None:
            return self._conn.execute("SELECT count(*) FROM users").fetchone()[0]
        return self._conn.execute(
            "SELECT count(*) FROM users WHERE source = ?", (source,)
        ).fetchone()[0]

    # --- directory sync ---

    @_guarded
    def sync_users(
        self,
        entries: Iterable[tuple[str, str | None]],
        *,
        now: float,
        keep_days: int,
        dry_run: bool = False,
    ) -> SyncResult:
        """Make the 'ldap' users match ``entries``, the directory's ``(name, E.164 phone)``.

        In one transaction: adds missing users (source 'ldap', no password),
        sets changed phones, re-enables users who came back, disables
        'ldap' users not in ``entries`` and deletes those disabled at least
        ``keep_days`` days (tokens and bypass go with them; with 0, the next
        sync deletes them). A 'local' user with a name in ``entries`` is left
        alone and reported as a conflict. ``dry_run`` rolls everything back.

        An empty ``entries`` disables every 'ldap' user: callers must guard
        against a failed fetch. Invalid or duplicate names and non-E.164
        phones raise StoreError before anything is written.
        """
        rows = []
        seen: set[str] = set()
        for name, phone in entries:
            _check_name(name)
            _check_phone(phone)
            if name in seen:
                raise StoreError(f"user {name!r} appears twice in the sync entries")
            seen.add(name)
            rows.append((name, phone))
        if keep_days < 0:
            raise StoreError(f"keep_days must not be negative, not {keep_days}")
        conn = self._conn
        entries_table = f"{self._dialect.temp_schema}.sync_entries"
        # The temp table is private to this connection: filling it before
        # BEGIN IMMEDIATE keeps the write lock (which logins wait on) short.
        conn.execute(f"DROP TABLE IF EXISTS {entries_table}")
        conn.execute("CREATE TEMP TABLE sync_entries (name TEXT PRIMARY KEY NOT NULL, phone TEXT)")
        try:
            conn.execute("BEGIN")
            conn.executemany(f"INSERT INTO {entries_table} VALUES (?, ?)", rows)
            conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
            if self._dialect.serialise_sync is not None:
                conn.execute(self._dialect.serialise_sync)
            result = _apply_sync(conn, now=now, cutoff=now - keep_days * 86400.0,
                                 entries=entries_table)
            conn.execute("ROLLBACK" if dry_run else "COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute(f"DROP TABLE IF EXISTS {entries_table}")
        return result

    # --- tokens (CLI) ---

    @_guarded
    def add_token(self, user: str | None, token: NewToken, *, now: float,
                  active: bool = True) -> Token:
        """Enrol ``token`` for ``user`` (None: unassigned) and return it with its id.

        The seed is sealed with the serial as associated data. A generated
        serial is ``TOTP-``/``HOTP-`` plus 8 hex digits, retried on collision.
        An inactive token (``active=False``) is ignored by logins until
        `activate_token`.
        """
        kind, algorithm = _check_new_token(token)
        secret = bytes(token.secret)
        # last_step and drift take their defaults (NULL, 0).
        columns = ("serial, user_id, kind, secret, digits, period, algorithm, counter,"
                   " created, active")
        for _attempt in range(20):
            serial = token.serial or f"{kind.value.upper()}-{secrets.token_hex(4).upper()}"
            values = (
                kind.value, self._cipher.encrypt(secret, serial=serial), token.digits,
                token.period, algorithm, token.counter, now, int(active),
            )
            try:
                if user is None:
                    rows = self._conn.execute(
                        f"INSERT INTO tokens ({columns})"
                        " VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                        (serial,) + values,
                    ).fetchall()
                else:
                    # INSERT ... SELECT: the user lookup and insert are one statement.
                    rows = self._conn.execute(
                        f"INSERT INTO tokens ({columns})"
                        " SELECT ?, id, ?, ?, ?, ?, ?, ?, ?, ? FROM users WHERE name = ?"
                        " RETURNING id",
                        (serial,) + values + (user,),
                    ).fetchall()
            except self._dialect.integrity_error as e:
                if not self._dialect.is_duplicate(e, "tokens", "serial"):
                    raise
                if token.serial is not None:
                    raise StoreError(f"token serial {serial!r} already exists") from None
                continue
            if not rows:
                raise StoreError(f"no such user {user!r}")
            return Token(
                id=rows[0][0], serial=serial, user=user, kind=kind, secret=secret,
                digits=token.digits, period=token.period, algorithm=algorithm,
                counter=token.counter, last_step=None, drift=0, active=active,
            )
        raise StoreError("could not generate a unique token serial")

    @_guarded
    def activate_token(self, user: str, serial: str) -> None:
        """Let logins use ``user``'s token ``serial`` (enrolled inactive)."""
        cursor = self._conn.execute(
            "UPDATE tokens SET active = 1"
            " WHERE serial = ? AND user_id = (SELECT id FROM users WHERE name = ?)",
            (serial, user))
        if cursor.rowcount != 1:
            raise StoreError(f"user {user!r} has no token {serial!r}")

    @_guarded
    def assign_token(self, serial: str, user: str) -> None:
        """Give an unassigned token to ``user``.

        A token already held by another user is refused: moving a second
        factor between people should be a deliberate delete and re-enrol.
        Assigning to its current holder is a no-op.
        """
        with self._immediate() as conn:
            user_id = self._require_user_id(user)
            row = conn.execute(
                "SELECT t.user_id, u.name FROM tokens t LEFT JOIN users u ON u.id = t.user_id"
                " WHERE t.serial = ?" + self._dialect.lock_rows.format("t"),
                (serial,),
            ).fetchone()
            if row is None:
                raise StoreError(f"no token {serial!r}")
            if row[0] is not None and row[0] != user_id:
                raise StoreError(f"token {serial!r} is already assigned to user {row[1]!r}")
            conn.execute("UPDATE tokens SET user_id = ? WHERE serial = ?", (user_id, serial))

    @_guarded
    def list_tokens(self, user: str) -> list[Token]:
        """Return the user's tokens (seeds decrypted) in enrolment order."""
        user_id = self._require_user_id(user)
        rows = self._conn.execute(_TOKEN_SQL + " WHERE t.user_id = ? ORDER BY t.id", (user_id,))
        return [self._token(row) for row in rows.fetchall()]

    @_guarded
    def list_unassigned_tokens(self) -> list[Token]:
        """Return tokens that belong to nobody yet, ordered by serial."""
        rows = self._conn.execute(_TOKEN_SQL + " WHERE t.user_id IS NULL ORDER BY t.serial")
        return [self._token(row) for row in rows.fetchall()]

    @_guarded
    def delete_token(self, user: str | None, serial: str) -> None:
        """Delete ``user``'s token ``serial`` (user None: an unassigned token)."""
        if user is None:
            cursor = self._conn.execute(
                "DELETE FROM tokens WHERE serial = ? AND user_id IS NULL", (serial,)
            )
            if cursor.rowcount != 1:
                raise StoreError(f"no unassigned token {serial!r}")
            return
        cursor = self._conn.execute(
            "DELETE FROM tokens WHERE serial = ?"
            " AND user_id = (SELECT id FROM users WHERE name = ?)",
            (serial, user),
        )
        if cursor.rowcount != 1:
            self._require_user_id(user)
            raise StoreError(f"no token {serial!r} for user {user!r}")

    @_guarded
    def set_hotp_counter(self, token_id: int, counter: int) -> None:
        """Resync: set the next HOTP counter expected."""
        if not 0 <= counter < 2**63:
            raise StoreError(f"HOTP counter out of range: {counter}")
        cursor = self._conn.execute(
            "UPDATE tokens SET counter = ? WHERE id = ? AND kind = 'hotp'", (counter, token_id)
        )
        if cursor.rowcount != 1:
            raise StoreError(f"no HOTP token with id {token_id}")

    @_guarded
    def set_totp_sync(self, token_id: int, drift: int, last_step: int) -> None:
        """Resync: set the learned drift and the last step used.

        Pass the step just verified; a lower ``last_step`` than before would
        re-open older codes to replay.
        """
        cursor = self._conn.execute(
            "UPDATE tokens SET drift = ?, last_step = ? WHERE id = ? AND kind = 'totp'",
            (drift, last_step, token_id),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"no TOTP token with id {token_id}")

    @_guarded
    def add_bypass(self, user: str, expires: float) -> None:
        """Allow ``user`` one login without a second factor until ``expires``."""
        cursor = self._conn.execute(
            "INSERT INTO bypass (user_id, expires) SELECT id, ? FROM users WHERE name = ?"
            " ON CONFLICT (user_id) DO UPDATE SET expires = excluded.expires",
            (expires, user),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"no such user {user!r}")

    # --- out-of-band methods: default method, voice PIN, push devices ---

    @_guarded
    def set_default_method(self, name: str, method: str | None) -> None:
        """Set the user's default second factor (push, phone, sms, totp) or clear it."""
        if method is not None and not (isinstance(method, str)
                                       and _METHOD_NAME.fullmatch(method)):
            raise StoreError(f"not a method name: {method!r}")
        self._update_user(name, "UPDATE users SET default_method = ? WHERE name = ?", (method,))

    @_guarded
    def set_pin(self, name: str, pin_hash: str | None) -> None:
        """Set (a `mfaserver.passwords` hash) or clear the user's voice-call PIN."""
        self._update_user(name, "UPDATE users SET pin_hash = ? WHERE name = ?", (pin_hash,))

    @_guarded
    def get_pin_hash(self, name: str) -> str | None:
        row = self._conn.execute("SELECT pin_hash FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    @_guarded
    def add_enrollment(self, user: str, digest: str, expires: float, *, now: float) -> None:
        """Record a one-time enrollment token (by its digest) for ``user``.

        Expired ones are purged on the way: they are small but never used again.
        """
        user_id = self._require_user_id(user)
        with self._immediate() as conn:
            conn.execute("DELETE FROM enrollments WHERE expires < ?", (now - 86400,))
            conn.execute("INSERT INTO enrollments (digest, user_id, expires) VALUES (?, ?, ?)",
                         (digest, user_id, expires))

    @_guarded
    def enrollment_user(self, digest: str, *, now: float) -> str:
        """The user a live enrollment token (by its digest) is for; nothing is used up.

        Raises `UnknownEnrollment` or `EnrollmentExpired` (expired or used).
        """
        row = self._conn.execute(
            "SELECT e.expires, e.device_id, u.name FROM enrollments e"
            " JOIN users u ON u.id = e.user_id WHERE e.digest = ?", (digest,)).fetchone()
        if row is None:
            raise UnknownEnrollment("no such enrollment")
        expires, used_by, name = row
        if used_by is not None or expires <= now:
            raise EnrollmentExpired("the enrollment link expired or was used")
        return name

    @_guarded
    def enroll_device(self, digest: str, device: Device, *, now: float) -> str:
        """Use the enrollment token with ``digest`` to add ``device``; return its user.

        Atomic: of two uses of one token exactly one succeeds. Raises
        `UnknownEnrollment` or `EnrollmentExpired` (expired or already used).
        """
        with self._immediate() as conn:
            row = conn.execute(
                "SELECT e.user_id, e.expires, e.device_id, u.name FROM enrollments e"
                " JOIN users u ON u.id = e.user_id WHERE e.digest = ?"
                + self._dialect.lock_rows.format("e"), (digest,)).fetchone()
            if row is None:
                raise UnknownEnrollment("no such enrollment")
            user_id, expires, used_by, name = row
            if used_by is not None or expires <= now:
                raise EnrollmentExpired("the enrollment link expired or was used")
            conn.execute("UPDATE enrollments SET device_id = ? WHERE digest = ?",
                         (device.id, digest))
            conn.execute(
                "INSERT INTO devices (id, user_id, public_key, notify_type, notify_url,"
                " notify_keys, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (device.id, user_id, device.public_key, device.notify_type, device.notify_url,
                 device.notify_keys, now))
        return name

    # --- portal invites ---

    @_guarded
    def add_invite(self, user: str, digest: str, expires: float, *, now: float) -> None:
        """Record a one-time portal invite (by its token's digest) for ``user``.

        Invites expired for a day are purged on the way.
        """
        user_id = self._require_user_id(user)
        with self._immediate() as conn:
            conn.execute("DELETE FROM invites WHERE expires < ?", (now - 86400,))
            conn.execute("INSERT INTO invites (digest, user_id, expires) VALUES (?, ?, ?)",
                         (digest, user_id, expires))

    @_guarded
    def invite_user(self, digest: str, *, now: float) -> str:
        """The user a live invite is for; nothing is used up.

        Raises `UnknownInvite` or `InviteExpired` (expired or used).
        """
        return self._live_invite(digest, now)

    @_guarded
    def use_invite(self, digest: str, *, now: float) -> str:
        """Use up the invite; return its user. Atomic: of two uses, one succeeds.

        Raises `UnknownInvite` or `InviteExpired`.
        """
        rows = self._conn.execute(
            "UPDATE invites SET used = ? WHERE digest = ? AND used IS NULL AND expires > ?"
            " RETURNING user_id", (now, digest, now)).fetchall()
        if not rows:
            self._live_invite(digest, now)   # raises the refusal that applies
            raise InviteExpired("the invite expired or was used")
        return self._conn.execute("SELECT name FROM users WHERE id = ?",
                                  (rows[0][0],)).fetchone()[0]

    def _live_invite(self, digest: str, now: float) -> str:
        row = self._conn.execute(
            "SELECT i.expires, i.used, u.name FROM invites i JOIN users u ON u.id = i.user_id"
            " WHERE i.digest = ?", (digest,)).fetchone()
        if row is None:
            raise UnknownInvite("no such invite")
        expires, used, name = row
        if used is not None or expires <= now:
            raise InviteExpired("the invite expired or was used")
        return name

    @_guarded
    def get_device(self, device_id: str) -> Device | None:
        row = self._conn.execute(DEVICE_SQL + " WHERE d.id = ?", (device_id,)).fetchone()
        return None if row is None else Device(*row)

    @_guarded
    def list_devices(self, user: str) -> list[Device]:
        """The user's devices, oldest first."""
        rows = self._conn.execute(DEVICE_SQL + " WHERE u.name = ? ORDER BY d.created, d.id",
                                  (user,)).fetchall()
        return [Device(*row) for row in rows]

    @_guarded
    def devices_version(self) -> int:
        """Changes when another connection commits (SQLite's data_version): whenever
        the devices may have changed (the daemon's device cache asks)."""
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    @_guarded
    def delete_device(self, user: str, device_id: str) -> None:
        cursor = self._conn.execute(
            "DELETE FROM devices WHERE id = ? AND user_id = (SELECT id FROM users WHERE name = ?)",
            (device_id, user))
        if cursor.rowcount != 1:
            raise StoreError(f"user {user!r} has no device {device_id!r}")

    # --- login path (daemon) ---

    @_guarded
    def load_account(self, name: str) -> Account | None:
        """Return the user and their tokens (seeds decrypted) from one query, or None.

        Raises SeedIntegrityError if any seed fails to authenticate: the
        caller must reject and alert, never skip the token.
        """
        return self.account_from_rows(self._conn.execute(ACCOUNT_SQL, (name,)).fetchall())

    def account_from_rows(self, rows: list[tuple]) -> Account | None:
        """The account from the rows of ``ACCOUNT_SQL`` (see `load_account`); for
        the daemon's statements that the reactor sends itself (`pg_reactor`)."""
        if not rows:
            return None
        first = rows[0]
        tokens = ()
        if first[6] is not None:
            tokens = tuple(self._token((r[6], r[7], r[0]) + r[8:16]) for r in rows)
        return Account(
            name=first[0], phone=first[1], blocked=bool(first[2]), failures=first[3],
            locked_until=first[4], tokens=tokens, has_password=bool(first[5]),
            bypass_until=first[-1], default_method=first[16], devices=first[17],
            has_pin=bool(first[18]),
        )

    @_guarded
    def get_password(self, name: str) -> tuple[str | None, str | None] | None:
        """Return ``(password_hash, phone)`` for the local directory, or None if unknown."""
        row = self._conn.execute(
            "SELECT password_hash, phone FROM users WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    @_guarded
    def use_totp_step(self, token_id: int, step: int, drift: int) -> bool:
        """Record ``step`` as used, if it is newer than the last used; the replay guard.

        One conditional UPDATE: of two concurrent uses of one step, exactly
        one returns True.
        """
        cursor = self._conn.execute(_USE_TOTP_STEP, (step, drift, token_id, step))
        return cursor.rowcount == 1

    @_guarded
    def use_hotp_counter(self, token_id: int, matched_counter: int) -> bool:
        """Advance the HOTP counter past ``matched_counter`` unless already past it."""
        cursor = self._conn.execute(_USE_HOTP_COUNTER,
                                    (matched_counter + 1, token_id, matched_counter))
        return cursor.rowcount == 1

    @_guarded
    def use_code_and_audit(self, use: CodeUse, entry: AuditEntry, *,
                           clear_failures_of: str | None = None) -> bool:
        """Record ``use`` (as `use_totp_step` or `use_hotp_counter` would) and, if it
        was recorded, append ``entry`` to the audit log (and reset the user's
        failure count of user ``clear_failures_of``), in one transaction: a login with
        a code costs one commit. Nothing is written when the use was not
        recorded (another login used the code first): returns False."""
        with self._immediate() as conn:
            if use.kind is TokenKind.TOTP:
                cursor = conn.execute(_USE_TOTP_STEP, (use.value, use.drift, use.token_id,
                                                       use.value))
            else:
                cursor = conn.execute(_USE_HOTP_COUNTER, (use.value + 1, use.token_id,
                                                          use.value))
            if cursor.rowcount != 1:
                return False
            if clear_failures_of is not None:
                conn.execute(_CLEAR_FAILURES, (clear_failures_of,))
            conn.execute(AUDIT_INSERT, audit_row(entry))
        return True

    @_guarded
    def register_failure(
        self, name: str, *, now: float, threshold: int, lock_seconds: float
    ) -> tuple[int, float | None]:
        """Count a wrong code; lock the user when ``threshold`` is reached.

        Returns the stored ``(failures, locked_until)`` after the update: on
        the failure that locks, that is ``(0, now + lock_seconds)``; otherwise
        ``locked_until`` is the previous value, which may lie in the past.
        An unknown user (deleted meanwhile) gives ``(0, None)``.
        """
        if threshold < 1:
            raise StoreError(f"failure threshold must be at least 1, not {threshold}")
        # SQLite evaluates every SET expression against the old row.
        rows = self._conn.execute(
            "UPDATE users SET"
            " failures = CASE WHEN failures + 1 >= :threshold THEN 0 ELSE failures + 1 END,"
            " locked_until = CASE WHEN failures + 1 >= :threshold"
            "   THEN :until ELSE locked_until END"
            " WHERE name = :name RETURNING failures, locked_until",
            {"threshold": threshold, "until": now + lock_seconds, "name": name},
        ).fetchall()  # fetch all: the statement (and its write) ends only when drained
        if not rows:
            return (0, None)
        failures, locked_until = rows[0]
        return (failures, None if locked_until is None else float(locked_until))

    @_guarded
    def clear_failures(self, name: str) -> None:
        """Reset the failure count after a successful login (no write if already 0)."""
        self._conn.execute(_CLEAR_FAILURES, (name,))

    @_guarded
    def consume_bypass(self, name: str, *, now: float) -> bool:
        """Use the user's bypass if it has not expired; it is removed either way."""
        rows = self._conn.execute(
            "DELETE FROM bypass WHERE user_id = (SELECT id FROM users WHERE name = ?)"
            " RETURNING expires",
            (name,),
        ).fetchall()
        return any(expires > now for (expires,) in rows)

    @_guarded
    def record_audit(self, entry: AuditEntry) -> None:
        """Append one decision to the audit log (``entry.id`` is ignored)."""
        self._conn.execute(AUDIT_INSERT, audit_row(entry))

    @_guarded
    def record_audits(self, entries: Sequence[AuditEntry]) -> None:
        """Append several decisions in one transaction (group commit under load)."""
        with self._immediate() as conn:
            conn.executemany(AUDIT_INSERT, [audit_row(e) for e in entries])

    @_guarded
    def recent_audit(self, *, user: str | None = None, limit: int = 20,
                     outcomes: tuple[str, ...] = ()) -> list[AuditEntry]:
        """Return up to ``limit`` audit rows, newest first, optionally for one user
        and only with one of ``outcomes`` (e.g. the sign-ins: accept, reject)."""
        columns = 'id, time, "user", client, nas_ip, calling_station_id, factor, outcome, reason'
        where, params = [], []
        if user is not None:
            where.append('"user" = ?')
            params.append(user)
        if outcomes:
            where.append(f"outcome IN ({', '.join('?' * len(outcomes))})")
            params.extend(outcomes)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            f"SELECT {columns} FROM audit{clause} ORDER BY time DESC, id DESC LIMIT ?",
            (*params, max(limit, 0)),
        )
        return [
            AuditEntry(
                id=r[0], time=r[1], user=r[2], client=r[3], nas_ip=r[4],
                calling_station_id=r[5], factor=r[6], outcome=r[7], reason=r[8],
            )
            for r in rows.fetchall()
        ]

    @_guarded
    def purge_audit(self, *, before: float) -> int:
        """Delete audit rows older than ``before``; return how many went.

        Deletes in small batches, each its own transaction, so a large purge
        never holds the write lock long enough to stall logins.
        """
        total = 0
        while True:
            cursor = self._conn.execute(
                "DELETE FROM audit WHERE id IN"
                " (SELECT id FROM audit WHERE time < ? ORDER BY time LIMIT ?)",
                (before, _PURGE_BATCH),
            )
            total += cursor.rowcount
            if cursor.rowcount < _PURGE_BATCH:
                return total


def _apply_sync(conn, *, now: float, cutoff: float,
                entries: str = "temp.sync_entries") -> SyncResult:
    """The statements of `Store.sync_users`, inside its transaction; ``entries`` is the
    temp table with the directory's users."""
    conflicts = tuple(name for (name,) in conn.execute(
        f"SELECT e.name FROM {entries} e JOIN users u ON u.name = e.name"
        " WHERE u.source != 'ldap' ORDER BY e.name"))
    (present,) = conn.execute(
        f"SELECT count(*) FROM {entries} e JOIN users u ON u.name = e.name"
        " WHERE u.source = 'ldap'").fetchone()
    absent = f"source = 'ldap' AND name NOT IN (SELECT name FROM {entries})"
    # Removal first, so that users disabled by this run are never removed by it.
    removed = conn.execute(
        f"DELETE FROM users WHERE {absent} AND disabled_since <= ?", (cutoff,)).rowcount
    disabled = conn.execute(
        f"UPDATE users SET disabled_since = ? WHERE {absent} AND disabled_since IS NULL",
        (now,)).rowcount
    reenabled = conn.execute(
        f"UPDATE users SET disabled_since = NULL, phone = e.phone FROM {entries} e"
        " WHERE users.name = e.name AND users.source = 'ldap'"
        " AND users.disabled_since IS NOT NULL").rowcount
    updated = conn.execute(
        f"UPDATE users SET phone = e.phone FROM {entries} e"
        " WHERE users.name = e.name AND users.source = 'ldap'"
        # Null-safe "differs", in SQL every supported engine takes (SQLite has
        # IS DISTINCT FROM only since 3.39; Ubuntu 22.04 ships 3.37).
        " AND (users.phone <> e.phone OR (users.phone IS NULL) <> (e.phone IS NULL))").rowcount
    added = conn.execute(
        "INSERT INTO users (name, phone, source, blocked, failures, created)"
        f" SELECT name, phone, 'ldap', 0, 0, ? FROM {entries} e"
        " WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.name = e.name)",
        (now,)).rowcount
    return SyncResult(
        added=added, updated=updated, reenabled=reenabled, disabled=disabled,
        removed=removed, unchanged=present - reenabled - updated, conflicts=conflicts,
    )


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the per-connection settings every Store relies on."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
    conn.execute("PRAGMA foreign_keys = ON")  # needed for ON DELETE CASCADE
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        # Without WAL the CLI's reads would block the daemon's writes.
        raise StoreError(f"database {path}: cannot enable WAL mode (got {mode!r})")
    # NORMAL is durable against application crashes in WAL mode; only the
    # last transactions can be lost on power failure.
    conn.execute("PRAGMA synchronous = NORMAL")


def _load_cipher(conn, key_path: Path, *, create: bool) -> SeedCipher:
    """Load the seed key and check it is the one this database was sealed with."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
    # Once a database has a key, a missing key file must never be replaced
    # by a fresh one: the seeds would all become unreadable (F7).
    cipher = SeedCipher(load_or_create_key(key_path, create=create and row is None))
    if row is None:
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('key_check', ?) ON CONFLICT DO NOTHING",
            (cipher.encrypt(_KEY_CHECK_PLAINTEXT, serial=_KEY_CHECK_AAD),),
        )
        # Another process may have won the insert with its own key; verify below.
        row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
    try:
        cipher.decrypt(row[0], serial=_KEY_CHECK_AAD)
    except SeedIntegrityError:
        raise KeyFileError(
            f"seed key file {key_path} does not match the database; "
            f"restore the key file this database was created with"
        ) from None
    return cipher
