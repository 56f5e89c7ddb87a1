"""The core's decisions, over the real store (temporary SQLite) and an injected clock."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mfaserver import passwords
from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.model import AuthRequest, Outcome, Reason, TokenKind
from mfaserver.auth.pipeline import Authenticator, split_password
from mfaserver.config import MfaConfig
from mfaserver.directory.local import LocalDirectory
from mfaserver.factors import METHODS, oath
from mfaserver.factors.token import TokenFactor
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryDirectory, run_now

T0 = 1_700_000_010.0
SEED = bytes(range(20))
HOTP_SEED = bytes(range(100, 120))

POLICY = MfaConfig(delimiter=",", challenge=True, unenrolled="reject", challenge_timeout=300,
                   lockout_threshold=10, lockout_minutes=15, totp_window=1, hotp_look_ahead=10)


def totp_code(now: float, seed: bytes = SEED, offset_steps: int = 0) -> str:
    return oath.hotp(seed, oath.totp_step(now) + offset_steps)


@pytest.mark.parametrize("field, expected", [
    ("secret,123456", ("secret", "123456")),
    ("sec,ret,12345678", ("sec,ret", "12345678")),
    ("secret", ("secret", None)),
    ("secret,12345", ("secret,12345", None)),
    ("secret,123456789", ("secret,123456789", None)),
    ("secret,１２３４５６", ("secret,１２３４５６", None)),
    (",123456", ("", "123456")),
])
def test_split_password_only_splits_off_a_plausible_code(field, expected):
    assert split_password(field, ",") == expected


class PipelineTests(SynchronousTestCase):
    def setUp(self):
        import tempfile
        from pathlib import Path
        self.dir = Path(tempfile.mkdtemp())
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.db = Store.open(self.dir / "db.sqlite3", self.dir / "seed.key")
        self.addCleanup(self.db.close)
        self.store = ThreadedStore(self.db, run_now)
        self.directory = MemoryDirectory({"alice": "pw-alice", "bob": "pw-bob", "carol": "pw-c"})
        for name in ("alice", "bob"):
            self.db.add_user(name, password_hash=None, phone=None, now=T0)
        self.totp = self.db.add_token("alice", NewToken(kind=TokenKind.TOTP, secret=SEED), now=T0)
        self.hotp = self.db.add_token("bob", NewToken(kind=TokenKind.HOTP, secret=HOTP_SEED),
                                      now=T0)
        self.challenges = ChallengeRegistry(self.clock, ttl=300)
        self.auth = Authenticator(self.directory, self.store, self.challenges, POLICY, self.clock,
                                  methods=METHODS,
                                  factors={"totp": TokenFactor(self.store, self.clock)})
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def decide(self, username="alice", password="pw-alice", client="vpn", **kw):
        request = AuthRequest(client_name=client, username=username, password=password, **kw)
        return self.successResultOf(self.auth.authenticate(request))

    def test_password_and_current_totp_code_accepts(self):
        decision = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual((decision.outcome, decision.reason), (Outcome.ACCEPT, Reason.OK))
        self.assertEqual(decision.factor, "totp")

    def test_a_right_code_takes_one_trip_to_the_store_with_its_audit_row(self):
        trips = []
        self.store._run = lambda f, *a, **kw: trips.append(f.__name__) or run_now(f, *a, **kw)
        decision = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual((decision.outcome, decision.reason), (Outcome.ACCEPT, Reason.OK))
        self.assertEqual(trips, ["_load_and_use_code"])
        [row] = self.db.recent_audit()
        self.assertEqual((row.user, row.factor, row.outcome, row.reason, row.time),
                         ("alice", "totp", "accept", "ok", T0))
        self.assertEqual(self.db.list_tokens("alice")[0].last_step, oath.totp_step(T0))
        [event] = [e for e in self.events if e.get("audit")]
        self.assertEqual((event["outcome"], event["factor"]), ("accept", "totp"))

    def test_the_store_out_of_reach_rejects_with_try_later_and_no_traceback(self):
        from mfaserver.auth.pipeline import MSG_TRY_LATER
        from mfaserver.store.db import StoreUnavailableError

        def down(*args, **kwargs):
            raise StoreUnavailableError("database postgresql://db:5432/mfa: connection refused")
        self.db.load_account = down
        self.db.record_audits = down
        decision = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual((decision.outcome, decision.reason, decision.reply_message),
                         (Outcome.REJECT, Reason.STORE_UNAVAILABLE, MSG_TRY_LATER))
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])
        [event] = [e for e in self.events if e.get("audit")]  # the decision is still logged
        self.assertEqual(event["reason"], "store_unavailable")

    def test_an_accept_whose_audit_row_cannot_be_written_becomes_a_reject(self):
        from mfaserver.auth.pipeline import MSG_TRY_LATER
        from mfaserver.store.db import StoreUnavailableError
        challenge = self.decide(password="pw-alice")
        self.assertIs(challenge.outcome, Outcome.CHALLENGE)

        def down(*args, **kwargs):
            raise StoreUnavailableError("database postgresql://db:5432/mfa: connection lost")
        self.db.record_audits = down
        decision = self.decide(password=totp_code(T0), state=challenge.state)
        self.assertEqual((decision.outcome, decision.reason, decision.reply_message),
                         (Outcome.REJECT, Reason.STORE_UNAVAILABLE, MSG_TRY_LATER))
        [logged] = [e for e in self.events if e.get("audit")][-1:]
        self.assertEqual(logged["outcome"], "reject")
        self.assertTrue(any("not written" in e.get("log_format", "") for e in self.events))

    def test_a_code_used_by_another_login_meanwhile_is_decided_the_ordinary_way(self):
        code = totp_code(T0)
        use_and_audit = self.db.use_code_and_audit

        def other_login_first(use, entry, **kw):
            self.assertTrue(self.db.use_totp_step(use.token_id, use.value, use.drift))
            return use_and_audit(use, entry, **kw)
        self.db.use_code_and_audit = other_login_first
        decision = self.decide(password="pw-alice," + code)
        self.assertEqual((decision.outcome, decision.reason), (Outcome.REJECT, Reason.CODE_REUSED))
        [row] = self.db.recent_audit()
        self.assertEqual((row.outcome, row.reason), ("reject", "code_reused"))

    def test_code_from_two_steps_ago_is_rejected(self):
        self.assertEqual(self.decide(password="pw-alice," + totp_code(T0, offset_steps=-2))
                         .reason, Reason.BAD_CODE)

    def test_code_from_previous_step_accepts_and_the_drift_is_learned(self):
        self.assertIs(self.decide(password="pw-alice," + totp_code(T0, offset_steps=-1)).outcome,
                      Outcome.ACCEPT)
        self.assertEqual(self.db.list_tokens("alice")[0].drift, -1)
        # Ten minutes later the token is still a step behind: its code still passes.
        self.clock.advance(600)
        late = totp_code(self.clock.seconds(), offset_steps=-2)
        self.assertIs(self.decide(password="pw-alice," + late).outcome, Outcome.ACCEPT)

    def test_replayed_code_is_rejected_as_reused(self):
        code = totp_code(T0)
        self.decide(password="pw-alice," + code)
        decision = self.decide(password="pw-alice," + code)
        self.assertEqual((decision.outcome, decision.reason), (Outcome.REJECT, Reason.CODE_REUSED))

    def test_older_code_after_newer_one_is_rejected(self):
        self.decide(password="pw-alice," + totp_code(T0, offset_steps=1))
        decision = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual(decision.reason, Reason.CODE_REUSED)

    def test_wrong_password_and_unknown_user_look_the_same_to_the_user(self):
        wrong = self.decide(password="nope," + totp_code(T0))
        unknown = self.decide(username="mallory", password="nope," + totp_code(T0))
        self.assertEqual(wrong.reason, Reason.BAD_PASSWORD)
        self.assertEqual(unknown.reason, Reason.UNKNOWN_USER)
        self.assertEqual(wrong.reply_message, unknown.reply_message)

    def test_empty_password_is_rejected_without_asking_the_directory(self):
        for field in ("", "," + totp_code(T0)):
            decision = self.decide(password=field)
            self.assertEqual(decision.reason, Reason.EMPTY_PASSWORD)
        self.assertEqual(self.directory.calls, [])

    def test_ten_wrong_codes_lock_the_user_for_the_configured_time(self):
        for i in range(9):
            self.assertEqual(self.decide(password="pw-alice,000000").reason, Reason.BAD_CODE)
        self.assertEqual(self.decide(password="pw-alice,000000").reason, Reason.USER_LOCKED)
        locked = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual((locked.outcome, locked.reason), (Outcome.REJECT, Reason.USER_LOCKED))
        self.clock.advance(15 * 60 + 1)
        now = self.clock.seconds()
        self.assertIs(self.decide(password="pw-alice," + totp_code(now)).outcome, Outcome.ACCEPT)

    def test_success_resets_the_count_of_wrong_codes(self):
        for i in range(9):
            self.decide(password="pw-alice,000000")
        self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual(self.db.get_user("alice").failures, 0)
        self.assertEqual(self.decide(password="pw-alice,000000").reason, Reason.BAD_CODE)

    def test_unblock_clears_a_lockout(self):
        for i in range(10):
            self.decide(password="pw-alice,000000")
        self.db.set_blocked("alice", False)
        self.assertIs(self.decide(password="pw-alice," + totp_code(T0)).outcome, Outcome.ACCEPT)

    def test_blocked_user_is_rejected_even_with_a_good_code(self):
        self.db.set_blocked("alice", True)
        decision = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual(decision.reason, Reason.USER_BLOCKED)

    def test_bare_password_gets_a_challenge_and_the_state_completes_the_login(self):
        challenge = self.decide(password="pw-alice")
        self.assertIs(challenge.outcome, Outcome.CHALLENGE)
        self.assertGreaterEqual(len(challenge.state), 16)
        self.assertIn("code", challenge.reply_message)
        decision = self.decide(password=totp_code(T0), state=challenge.state)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "totp"))

    def test_a_state_is_single_use(self):
        state = self.decide(password="pw-alice").state
        self.decide(password=totp_code(T0), state=state)
        again = self.decide(password=totp_code(T0, offset_steps=1), state=state)
        self.assertEqual(again.reason, Reason.BAD_STATE)

    def test_a_state_is_bound_to_its_client_and_user(self):
        state = self.decide(password="pw-alice").state
        self.assertEqual(self.decide(password=totp_code(T0), state=state, client="other").reason,
                         Reason.BAD_STATE)
        self.assertEqual(self.decide(username="bob", password=totp_code(T0), state=state).reason,
                         Reason.BAD_STATE)
        self.assertIs(self.decide(password=totp_code(T0), state=state).outcome, Outcome.ACCEPT)

    def test_a_state_expires_after_five_minutes(self):
        state = self.decide(password="pw-alice").state
        self.clock.advance(301)
        decision = self.decide(password=totp_code(self.clock.seconds()), state=state)
        self.assertEqual(decision.reason, Reason.BAD_STATE)

    def test_only_the_newest_challenge_of_a_user_is_valid(self):
        old = self.decide(password="pw-alice").state
        new = self.decide(password="pw-alice").state
        self.assertEqual(self.decide(password=totp_code(T0), state=old).reason, Reason.BAD_STATE)
        self.assertIs(self.decide(password=totp_code(T0), state=new).outcome, Outcome.ACCEPT)

    def test_forged_state_is_rejected_and_does_not_consume_the_code(self):
        code = totp_code(T0)
        self.assertEqual(self.decide(password=code, state=b"x" * 16).reason, Reason.BAD_STATE)
        self.assertIs(self.decide(password="pw-alice," + code).outcome, Outcome.ACCEPT)

    def test_without_challenge_a_bare_password_is_rejected_with_a_hint(self):
        self.auth.policy = dataclasses.replace(POLICY, challenge=False)
        decision = self.decide(password="pw-alice")
        self.assertEqual(decision.reason, Reason.CODE_MISSING)
        self.assertIn("','", decision.reply_message)

    def test_unenrolled_user_is_rejected_or_allowed_per_policy(self):
        self.assertEqual(self.decide(username="carol", password="pw-c").reason,
                         Reason.NOT_ENROLLED)
        self.auth.policy = dataclasses.replace(POLICY, unenrolled="allow")
        decision = self.decide(username="carol", password="pw-c")
        self.assertEqual((decision.outcome, decision.reason),
                         (Outcome.ACCEPT, Reason.UNENROLLED_ALLOWED))

    def test_bypass_lets_one_login_pass_on_the_password_alone(self):
        self.db.add_bypass("alice", T0 + 600)
        self.assertEqual(self.decide(password="pw-alice").reason, Reason.BYPASS)
        self.assertIs(self.decide(password="pw-alice").outcome, Outcome.CHALLENGE)

    def test_a_request_that_takes_no_bypass_leaves_it_pending(self):
        self.db.add_bypass("alice", T0 + 600)
        self.assertIs(self.decide(password="pw-alice", bypass=False).outcome, Outcome.CHALLENGE)
        self.assertEqual(self.decide(password="pw-alice").reason, Reason.BYPASS)

    def test_expired_bypass_does_nothing(self):
        self.db.add_bypass("alice", T0 + 60)
        self.clock.advance(61)
        self.assertIs(self.decide(password="pw-alice").outcome, Outcome.CHALLENGE)

    def test_hotp_code_accepts_within_look_ahead_and_advances_the_counter(self):
        code = oath.hotp(HOTP_SEED, 5)
        self.assertIs(self.decide("bob", "pw-bob," + code).outcome, Outcome.ACCEPT)
        self.assertEqual(self.decide("bob", "pw-bob," + code).reason, Reason.CODE_REUSED)
        # A skipped code from before the counter is as dead as a used one.
        self.assertEqual(self.decide("bob", "pw-bob," + oath.hotp(HOTP_SEED, 3)).reason,
                         Reason.CODE_REUSED)
        self.assertIs(self.decide("bob", "pw-bob," + oath.hotp(HOTP_SEED, 6)).outcome,
                      Outcome.ACCEPT)

    def test_hotp_code_beyond_look_ahead_is_rejected(self):
        self.assertEqual(self.decide("bob", "pw-bob," + oath.hotp(HOTP_SEED, 11)).reason,
                         Reason.BAD_CODE)

    def test_chap_is_refused_with_a_pap_hint(self):
        decision = self.decide(password=None, pap=False)
        self.assertEqual(decision.reason, Reason.NOT_PAP)
        self.assertIn("PAP", decision.reply_message)
        self.assertEqual(self.directory.calls, [])

    def test_undecodable_password_is_rejected(self):
        self.assertEqual(self.decide(password=None).reason, Reason.PASSWORD_UNDECODABLE)

    def test_flipped_seed_byte_rejects_and_raises_an_alert(self):
        conn = self.db._conn if hasattr(self.db, "_conn") else self.db.conn
        blob = conn.execute("select secret from tokens where serial = ?",
                            (self.totp.serial,)).fetchone()[0]
        flipped = bytes([blob[0]]) + bytes([blob[1] ^ 1]) + blob[2:]
        conn.execute("update tokens set secret = ? where serial = ?", (flipped, self.totp.serial))
        decision = self.decide(password="pw-alice," + totp_code(T0))
        self.assertEqual((decision.outcome, decision.reason),
                         (Outcome.REJECT, Reason.SEED_INTEGRITY))
        self.assertTrue(any(e.get("log_level") is not None and e["log_level"].name == "critical"
                            for e in self.events))

    def test_every_decision_writes_one_audit_row(self):
        self.decide(password="pw-alice," + totp_code(T0), nas_ip="10.0.0.1",
                    calling_station_id="198.51.100.7")
        self.decide(password="wrong")
        self.decide(password="pw-alice")
        rows = self.db.recent_audit(limit=10)
        self.assertEqual([r.outcome for r in rows], ["challenge", "reject", "accept"])
        accept = rows[-1]
        self.assertEqual((accept.user, accept.client, accept.nas_ip, accept.calling_station_id,
                          accept.factor, accept.reason),
                         ("alice", "vpn", "10.0.0.1", "198.51.100.7", "totp", "ok"))

    def test_no_password_code_or_state_reaches_the_log(self):
        from twisted.logger import formatEvent
        code = totp_code(T0)
        state = self.decide(password="pw-alice").state
        self.decide(password=code, state=state)
        self.decide(password="pw-alice,999999")
        self.decide(password="wrong-pw-xyz")
        text = " ".join(formatEvent(e) + repr(sorted((k, v) for k, v in e.items()
                                                       if not k.startswith("log_")))
                        for e in self.events)
        for secret in ("pw-alice", code, "999999", "wrong-pw-xyz", state.hex(), repr(state)):
            self.assertNotIn(secret, text)
        self.assertTrue(self.events)


class LocalDirectoryTests(SynchronousTestCase):
    """The local directory checks scrypt hashes kept in the store."""

    def setUp(self):
        import tempfile
        from pathlib import Path
        d = Path(tempfile.mkdtemp())
        self.db = Store.open(d / "db.sqlite3", d / "seed.key")
        self.addCleanup(self.db.close)
        self.db.add_user("alice", password_hash=passwords.hash_password("s3cret", log2_n=4),
                         phone="+16502530000", now=T0)
        self.db.add_user("nopass", password_hash=None, phone=None, now=T0)
        self.hashed = []

        def run_hash(f, *args):
            self.hashed.append(args[1])
            return run_now(f, *args)

        self.directory = LocalDirectory(ThreadedStore(self.db, run_now).lookup_password, run_hash)

    def test_unknown_user_and_user_without_password_cost_a_hash_check_too(self):
        from mfaserver.auth.interfaces import UnknownUser
        self.failureResultOf(self.directory.authenticate("ghost", "x"), UnknownUser)
        self.failureResultOf(self.directory.authenticate("nopass", "x"), UnknownUser)
        self.assertEqual(len(self.hashed), 2)

    def test_principal_carries_the_phone(self):
        principal = self.successResultOf(self.directory.authenticate("alice", "s3cret"))
        self.assertEqual(principal.phone, "+16502530000")
