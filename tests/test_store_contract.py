"""Contract tests of the `AccountStore` seam: one suite run over `MemoryAccountStore` and
over the `ThreadedStore` on a real SQLite store (its calls run at once), so that the fake
the core's tests may use cannot drift from the store: the replay guards, the lockout, the
one-login bypass, blocking and the audit log."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.model import Account, AuditEntry, CodeUse, Token, TokenKind
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryAccountStore, run_now

NOW = 1_700_000_000.0
SEED = bytes(range(20))
PHONE = "+16502530000"


class AccountStoreContract:
    """``make`` sets ``store``; ``given(name, phone=, kinds=(TokenKind...), bypass_until=)``
    adds a user and returns the ids of their new tokens; ``audited()`` the rows written."""

    def load(self, name: str) -> Account | None:
        return self.successResultOf(self.store.load_account(name))

    def test_an_unknown_user_has_no_account(self):
        self.assertIsNone(self.load("nobody"))

    def test_an_account_has_the_users_state_and_tokens(self):
        self.given("alice", phone=PHONE, kinds=(TokenKind.TOTP, TokenKind.HOTP))
        account = self.load("alice")
        self.assertEqual((account.name, account.phone, account.blocked, account.failures,
                          account.locked_until, account.bypass_until),
                         ("alice", PHONE, False, 0, None, None))
        self.assertEqual([t.kind for t in account.tokens], [TokenKind.TOTP, TokenKind.HOTP])
        self.assertEqual((account.tokens[0].last_step, account.tokens[1].counter), (None, 0))

    def test_a_totp_step_is_used_once_and_never_an_older_one(self):
        [token] = self.given("alice", kinds=(TokenKind.TOTP,))
        use = self.store.use_totp_step
        self.assertTrue(self.successResultOf(use(token, 100, 0)))
        self.assertFalse(self.successResultOf(use(token, 100, 0)))
        self.assertFalse(self.successResultOf(use(token, 99, 0)))
        self.assertTrue(self.successResultOf(use(token, 101, -1)))
        [stored] = self.load("alice").tokens
        self.assertEqual((stored.last_step, stored.drift), (101, -1))

    def test_an_hotp_counter_moves_forward_only(self):
        [token] = self.given("alice", kinds=(TokenKind.HOTP,))
        use = self.store.use_hotp_counter
        self.assertTrue(self.successResultOf(use(token, 3)))
        self.assertEqual(self.load("alice").tokens[0].counter, 4)
        self.assertFalse(self.successResultOf(use(token, 3)))
        self.assertFalse(self.successResultOf(use(token, 2)))
        self.assertTrue(self.successResultOf(use(token, 4)))

    def test_the_guards_keep_to_their_token_kind(self):
        totp, hotp = self.given("alice", kinds=(TokenKind.TOTP, TokenKind.HOTP))
        self.assertFalse(self.successResultOf(self.store.use_hotp_counter(totp, 1)))
        self.assertFalse(self.successResultOf(self.store.use_totp_step(hotp, 1, 0)))

    def test_wrong_codes_lock_the_user_at_the_threshold(self):
        self.given("alice")
        fail = self.store.register_failure
        for count in (1, 2):
            self.assertEqual(self.successResultOf(
                fail("alice", now=NOW, threshold=3, lock_seconds=60)), (count, None))
        self.assertEqual(self.successResultOf(
            fail("alice", now=NOW, threshold=3, lock_seconds=60)), (0, NOW + 60))
        self.assertEqual(self.load("alice").locked_until, NOW + 60)

    def test_a_success_clears_the_failures(self):
        self.given("alice")
        self.successResultOf(self.store.register_failure("alice", now=NOW, threshold=3,
                                                         lock_seconds=60))
        self.successResultOf(self.store.clear_failures("alice"))
        self.assertEqual(self.load("alice").failures, 0)

    def test_a_failure_of_an_unknown_user_changes_nothing(self):
        self.assertEqual(self.successResultOf(self.store.register_failure(
            "nobody", now=NOW, threshold=3, lock_seconds=60)), (0, None))

    def test_a_bypass_is_used_once_and_only_before_it_expires(self):
        self.given("alice", bypass_until=NOW + 100)
        self.given("bob", bypass_until=NOW - 1)
        self.given("carol")
        self.assertEqual(self.load("alice").bypass_until, NOW + 100)
        self.assertTrue(self.successResultOf(self.store.consume_bypass("alice", now=NOW)))
        self.assertFalse(self.successResultOf(self.store.consume_bypass("alice", now=NOW)))
        self.assertFalse(self.successResultOf(self.store.consume_bypass("bob", now=NOW)))
        self.assertIsNone(self.load("bob").bypass_until)
        self.assertFalse(self.successResultOf(self.store.consume_bypass("carol", now=NOW)))

    def test_a_blocked_user_stays_blocked(self):
        self.given("alice")
        self.successResultOf(self.store.block_user("alice"))
        self.assertTrue(self.load("alice").blocked)

    def test_audit_rows_are_written(self):
        entry = AuditEntry(time=NOW, user="alice", client="vpn", nas_ip="192.0.2.1",
                           calling_station_id="198.51.100.7", factor="totp", outcome="accept",
                           reason="ok")
        self.assertIsNone(self.successResultOf(self.store.record_audit(entry)))
        [written] = self.audited()
        self.assertEqual((written.user, written.client, written.outcome, written.reason),
                         ("alice", "vpn", "accept", "ok"))

    # --- a login with a code in one trip (load_and_use_code) ---

    def entry(self, factor="totp"):
        return AuditEntry(time=NOW, user="alice", client="vpn", nas_ip=None,
                          calling_station_id=None, factor=factor, outcome="accept",
                          reason="ok")

    def test_one_trip_records_the_use_clears_the_failures_and_writes_the_row(self):
        [token] = self.given("alice", kinds=(TokenKind.TOTP,))
        self.successResultOf(self.store.register_failure("alice", now=NOW, threshold=3,
                                                         lock_seconds=60))
        seen = []

        def plan(account):
            seen.append(account)
            return CodeUse(token, TokenKind.TOTP, 100, -1), self.entry()
        account, used = self.successResultOf(self.store.load_and_use_code("alice", plan))
        self.assertEqual((account, used), (seen[0], CodeUse(token, TokenKind.TOTP, 100, -1)))
        self.assertEqual(account.failures, 1)  # as loaded, before the use
        after = self.load("alice")
        self.assertEqual((after.tokens[0].last_step, after.tokens[0].drift, after.failures),
                         (100, -1, 0))
        [row] = self.audited()
        self.assertEqual((row.user, row.factor, row.outcome), ("alice", "totp", "accept"))

    def test_one_trip_with_a_used_code_writes_nothing(self):
        [token] = self.given("alice", kinds=(TokenKind.TOTP,))
        self.assertTrue(self.successResultOf(self.store.use_totp_step(token, 100, 0)))
        self.successResultOf(self.store.register_failure("alice", now=NOW, threshold=3,
                                                         lock_seconds=60))
        account, used = self.successResultOf(self.store.load_and_use_code(
            "alice", lambda account: (CodeUse(token, TokenKind.TOTP, 100), self.entry())))
        self.assertIsNone(used)
        self.assertEqual(account.name, "alice")
        self.assertEqual(self.load("alice").failures, 1)
        self.assertEqual(self.audited(), [])

    def test_one_trip_moves_an_hotp_counter_forward_only(self):
        [token] = self.given("alice", kinds=(TokenKind.HOTP,))
        plan = lambda account: (CodeUse(token, TokenKind.HOTP, 3), self.entry("hotp"))
        self.assertIsNotNone(self.successResultOf(self.store.load_and_use_code("alice", plan))[1])
        self.assertEqual(self.load("alice").tokens[0].counter, 4)
        self.assertIsNone(self.successResultOf(self.store.load_and_use_code("alice", plan))[1])
        self.assertEqual(len(self.audited()), 1)

    def test_one_trip_without_a_plan_only_loads(self):
        self.given("alice", kinds=(TokenKind.TOTP,))
        seen = []
        account, used = self.successResultOf(self.store.load_and_use_code(
            "alice", lambda account: seen.append(account)))
        self.assertEqual((account.name, used, seen), ("alice", None, [account]))
        self.assertEqual(self.audited(), [])
        self.assertEqual(self.successResultOf(self.store.load_and_use_code(
            "nobody", lambda account: None)), (None, None))


class MemoryAccountStoreTests(AccountStoreContract, SynchronousTestCase):
    def setUp(self):
        self.store = MemoryAccountStore()
        self._ids = iter(range(1, 1000))

    def given(self, name, phone=None, kinds=(), bypass_until=None):
        tokens = tuple(Token(id=next(self._ids), serial=f"{name}-{i}", user=name, kind=kind,
                             secret=SEED) for i, kind in enumerate(kinds))
        self.store.add(Account(name=name, phone=phone, blocked=False, failures=0,
                               locked_until=None, tokens=tokens, bypass_until=bypass_until))
        return [t.id for t in tokens]

    def audited(self):
        return self.store.audit


class ThreadedStoreTests(AccountStoreContract, SynchronousTestCase):
    def setUp(self):
        folder = Path(tempfile.mkdtemp())
        self.db = Store.open(folder / "db.sqlite3", folder / "seed.key")
        self.addCleanup(self.db.close)
        self.store = ThreadedStore(self.db, run_now)

    def given(self, name, phone=None, kinds=(), bypass_until=None):
        self.db.add_user(name, password_hash=None, phone=phone, now=NOW)
        if bypass_until is not None:
            self.db.add_bypass(name, bypass_until)
        return [self.db.add_token(name, NewToken(kind=kind, secret=SEED), now=NOW).id
                for kind in kinds]

    def audited(self):
        return self.db.recent_audit()
