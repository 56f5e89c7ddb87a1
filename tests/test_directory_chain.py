"""Directories tried in order, and what the core does with a directory's answer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import AuthRequest, Outcome, Principal, Reason, TokenKind
from mfaserver.auth.pipeline import Authenticator
from mfaserver.config import MfaConfig, ReplyRule
from mfaserver.directory.chain import DirectoryChain
from mfaserver.factors import METHODS, oath
from mfaserver.factors.token import TokenFactor
from mfaserver.store import NewToken, Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.testing import MemoryDirectory, run_now

T0 = 1_700_000_010.0
SEED = bytes(range(20))


def refusing(error: Exception) -> MemoryDirectory:
    """A directory that fails every login with ``error``."""
    directory = MemoryDirectory()
    directory.failure = error
    return directory


class Canonical:
    """A directory that knows users under another spelling (like AD with UPNs)."""

    def __init__(self, principal: Principal):
        self.principal = principal

    def authenticate(self, username, password):
        return defer.succeed(self.principal)


class ChainTests(SynchronousTestCase):
    def test_unknown_user_moves_on_to_the_next_directory(self):
        chain = DirectoryChain([MemoryDirectory({"bob": "b"}), MemoryDirectory({"alice": "a"})])
        self.assertEqual(self.successResultOf(chain.authenticate("alice", "a")).username, "alice")
        self.failureResultOf(chain.authenticate("carol", "c"), UnknownUser)

    def test_wrong_password_ends_the_chain(self):
        second = MemoryDirectory({"alice": "a"})
        chain = DirectoryChain([MemoryDirectory({"alice": "other"}), second])
        self.failureResultOf(chain.authenticate("alice", "a"), InvalidCredentials)
        self.assertEqual(second.calls, [])

    def test_an_unreachable_directory_fails_closed(self):
        second = MemoryDirectory({"alice": "a"})
        chain = DirectoryChain([refusing(DirectoryUnavailable()), second])
        self.failureResultOf(chain.authenticate("alice", "a"), DirectoryUnavailable)
        self.assertEqual(second.calls, [])


class DirectoryAnswersTests(SynchronousTestCase):
    def setUp(self):
        d = Path(tempfile.mkdtemp())
        self.db = Store.open(d / "db.sqlite3", d / "seed.key")
        self.addCleanup(self.db.close)
        self.db.add_user("alice", password_hash=None, phone=None, now=T0)
        self.db.add_token("alice", NewToken(kind=TokenKind.TOTP, secret=SEED), now=T0)
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.rules = (ReplyRule("cn=admins,dc=example,dc=org", (("Filter-Id", "admins"),)),
                      ReplyRule("cn=others,dc=example,dc=org", (("Class", "others"),)))

    def authenticator(self, directory):
        store = ThreadedStore(self.db, run_now)
        return Authenticator(directory, store, ChallengeRegistry(self.clock), MfaConfig(),
                             self.clock, methods=METHODS,
                             factors={"totp": TokenFactor(store, self.clock)},
                             reply_rules=self.rules)

    def decide(self, auth, password, username="ALICE@example.org", state=None):
        request = AuthRequest(client_name="vpn", username=username, password=password,
                              state=state)
        return self.successResultOf(auth.authenticate(request))

    def code(self):
        return oath.hotp(SEED, oath.totp_step(self.clock.seconds()))

    def test_store_is_keyed_by_the_canonical_name_and_group_rules_add_attributes(self):
        principal = Principal("alice", attributes=(("Class", b"\x01upstream"),),
                              groups=frozenset({"cn=admins,dc=example,dc=org"}))
        decision = self.decide(self.authenticator(Canonical(principal)), "pw," + self.code())
        self.assertIs(decision.outcome, Outcome.ACCEPT)
        self.assertEqual(decision.attributes, (("Class", b"\x01upstream"), ("Filter-Id", "admins")))

    def test_challenge_for_a_name_typed_another_way_completes(self):
        principal = Principal("alice", groups=frozenset({"cn=admins,dc=example,dc=org"}))
        auth = self.authenticator(Canonical(principal))
        challenge = self.decide(auth, "pw")
        self.assertIs(challenge.outcome, Outcome.CHALLENGE)
        decision = self.decide(auth, self.code(), state=challenge.state)
        self.assertIs(decision.outcome, Outcome.ACCEPT)
        self.assertEqual(decision.attributes, (("Filter-Id", "admins"),))

    def test_a_directory_refusal_reason_reaches_the_audit_and_the_user(self):
        auth = self.authenticator(refusing(InvalidCredentials(Reason.PASSWORD_EXPIRED, "532")))
        decision = self.decide(auth, "pw," + self.code())
        self.assertEqual(decision.reason, Reason.PASSWORD_EXPIRED)
        self.assertIn("expired", decision.reply_message)
        self.assertEqual(self.db.recent_audit(limit=1)[0].reason, "password_expired")

    def test_an_unreachable_directory_rejects_with_try_later(self):
        decision = self.decide(self.authenticator(refusing(DirectoryUnavailable())), "pw")
        self.assertEqual(decision.reason, Reason.DIRECTORY_UNAVAILABLE)
        self.assertIn("unavailable", decision.reply_message)
