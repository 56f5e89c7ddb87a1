"""`mfaserver.store.copy`: a whole store into an empty one (here SQLite to SQLite; the
PostgreSQL direction runs in tests/integration/test_store_postgresql_e2e.py)."""

from __future__ import annotations

import pytest

from mfaserver.auth.model import AuditEntry, TokenKind
from mfaserver.store import Store, StoreError
from mfaserver.store.copy import PAGE_ROWS, copy_store
from mfaserver.store.db import NewToken

NOW = 1_700_000_000.0


@pytest.fixture
def source(tmp_path):
    store = Store.open(tmp_path / "a.sqlite3", tmp_path / "seed.key")
    for i in range(3):
        store.add_user(f"user{i}", password_hash=None, phone=None, now=NOW)
        store.add_token(f"user{i}", NewToken(TokenKind.TOTP, bytes([i]) * 20), now=NOW)
    # More audit rows than one page, so paging is exercised.
    store.record_audits([AuditEntry(NOW + n, f"user{n % 3}", "vpn", "10.0.0.1", None,
                                    "totp", "accept", "ok")
                         for n in range(PAGE_ROWS + 7)])
    yield store
    store.close()


def test_everything_is_copied_with_ids_and_seeds(source, tmp_path):
    target = Store.open(tmp_path / "b.sqlite3", tmp_path / "seed.key")
    report = copy_store(source, target)
    assert report.rows["users"] == 3 and report.rows["tokens"] == 3
    assert report.rows["audit"] == PAGE_ROWS + 7
    assert report.summary().startswith("3 users, 3 tokens, 0 bypass, 1,007 audit")
    for i in range(3):
        account = target.load_account(f"user{i}")
        assert account.tokens[0].secret == bytes([i]) * 20
        assert account.tokens[0].id == source.load_account(f"user{i}").tokens[0].id
    assert ([e.id for e in target.recent_audit(limit=5000)]
            == [e.id for e in source.recent_audit(limit=5000)])
    # A row added after the copy gets an id after the copied ones.
    target.add_user("later", password_hash=None, phone=None, now=NOW)
    target.add_token("later", NewToken(TokenKind.TOTP, b"x" * 20), now=NOW)
    copied_ids = {target.load_account(f"user{i}").tokens[0].id for i in range(3)}
    assert target.load_account("later").tokens[0].id > max(copied_ids)


def test_a_target_that_is_not_empty_is_refused(source, tmp_path):
    target = Store.open(tmp_path / "b.sqlite3", tmp_path / "seed.key")
    target.add_user("someone", password_hash=None, phone=None, now=NOW)
    with pytest.raises(StoreError, match="not empty"):
        copy_store(source, target)
    assert [u.name for u in target.list_users()] == ["someone"]


def test_a_target_with_another_key_gets_nothing(source, tmp_path):
    target = Store.open(tmp_path / "b.sqlite3", tmp_path / "other.key")
    with pytest.raises(StoreError, match="does not decrypt with this key"):
        copy_store(source, target)
    assert target.list_users() == []
    assert target.recent_audit(limit=10) == []
