"""``mfaserver store copy``: one store's content into another, SQLite to PostgreSQL or back.

Rows are copied as they are stored, ids included (so references between
tables hold), and seeds stay encrypted: the copy never decrypts a seed to
move it. Both stores are opened with the same seed key file, which is what
makes the copied seeds readable where they land; every copied seed is then
decrypted once in the target to prove it (a wrong key fails the copy).

The source is read in one snapshot (a read-only transaction) and the target
written in one transaction: a copy is complete or absent. The target must be
empty (no users, audit rows or devices): a copy never merges into a store in
use. Rows the daemon writes after the snapshot began are not copied: stop it
first. Tables are read in pages by primary key, so a long audit log is never
held in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mfaserver.store.crypto import SeedIntegrityError
from mfaserver.store.db import Store, StoreError

# In an order that respects the foreign keys, each with its primary key. The meta
# table is not copied: its key check is the target's own, made with the same key.
TABLES = (("users", "id"), ("tokens", "id"), ("bypass", "user_id"), ("audit", "id"),
          ("devices", "id"), ("enrollments", "digest"), ("invites", "digest"))
# Their ids are generated; after a copy the target's next id must follow the copied ones.
GENERATED_IDS = ("users", "tokens", "audit")
PAGE_ROWS = 1000


@dataclass(frozen=True)
class CopyReport:
    rows: dict[str, int]

    def summary(self) -> str:
        return ", ".join(f"{self.rows[table]:,} {table}" for table, _ in TABLES)


def copy_store(source: Store, target: Store) -> CopyReport:
    """Copy every row of ``source`` into the empty ``target``; StoreError if the target
    is not empty or anything fails (the target is then left as it was)."""
    try:
        with source._lock, target._lock:
            return _copy(source, target)
    except (source._dialect.error, target._dialect.error) as e:
        raise StoreError(f"copy failed: {str(e).strip().splitlines()[0]}") from None


def _copy(source: Store, target: Store) -> CopyReport:
    if source._conn is None or target._conn is None:
        raise StoreError("the store is closed")
    tconn = target._conn
    if any(tconn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
           for table in ("users", "audit", "devices")):
        raise StoreError("the target store is not empty: copy only into a new database")
    rows: dict[str, int] = {}
    sconn = source._conn
    sconn.execute(source._dialect.begin_snapshot)
    try:
        with target._immediate() as tconn:
            for table, key in TABLES:
                rows[table] = _copy_table(sconn, tconn, table, key)
                if target._dialect.after_explicit_ids and table in GENERATED_IDS:
                    tconn.execute(target._dialect.after_explicit_ids.format(table=table))
            _check_seeds(target, tconn)
    finally:
        sconn.execute("ROLLBACK")  # read only: nothing to keep
    return CopyReport(rows)


def _copy_table(sconn, tconn, table: str, key: str) -> int:
    cursor = sconn.execute(f"SELECT * FROM {table} ORDER BY {key} LIMIT ?", (PAGE_ROWS,))
    columns = [d[0] for d in cursor.description]
    # "user" is a reserved word in PostgreSQL (the audit log's column).
    names = ", ".join(f'"{c}"' for c in columns)
    insert = (f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})")
    position = columns.index(key)
    page = cursor.fetchall()
    total = 0
    while page:
        tconn.executemany(insert, page)
        total += len(page)
        if len(page) < PAGE_ROWS:
            break
        page = sconn.execute(f"SELECT * FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?",
                             (page[-1][position], PAGE_ROWS)).fetchall()
    return total


def _check_seeds(target: Store, tconn) -> None:
    """Every copied seed decrypts with the target's key (the same key file)."""
    for serial, secret in tconn.execute("SELECT serial, secret FROM tokens").fetchall():
        try:
            target._cipher.decrypt(bytes(secret), serial=serial)
        except SeedIntegrityError:
            raise StoreError(f"the seed of token {serial} does not decrypt with this key "
                             "file: both stores must use the same seed.key") from None
