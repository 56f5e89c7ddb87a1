"""The challenge-State contract, over one node's registry (in memory, on a Clock).

tests/integration/test_cluster_state.py runs the same contract over the
cluster's `SharedChallenges` on a real PostgreSQL.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import STATE_BYTES, ChallengeRegistry

T0 = 1_700_000_000.0
TTL = 300.0
CONTEXT = {"user": "alice", "attributes": (("Filter-Id", "vpn-users"), ("Class", b"\x00\xff")),
           "menu": ("push", "sms"), "confirm": ("push", "ticket-1")}


class ChallengeContract:
    """``make()`` sets ``self.challenges`` (ttl TTL) on ``self.clock``."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.make()

    def issue(self, client="vpn", user="alice", context=None) -> bytes:
        return self.successResultOf(defer.maybeDeferred(self.challenges.issue, client, user,
                                                        context))

    def redeem(self, state: bytes, client="vpn", user="alice"):
        return self.successResultOf(defer.maybeDeferred(self.challenges.redeem, state,
                                                        client, user))

    def test_a_state_is_random_and_redeemed_once_with_its_context(self):
        state = self.issue(context=CONTEXT)
        self.assertEqual(len(state), STATE_BYTES)
        self.assertNotEqual(state, self.issue(user="bob"))
        found = self.redeem(state)
        self.assertEqual((found.client_name, found.username), ("vpn", "alice"))
        self.assertEqual(found.context, CONTEXT)
        self.assertIsNone(self.redeem(state))

    def test_a_state_is_bound_to_its_client_and_user(self):
        state = self.issue()
        self.assertIsNone(self.redeem(state, client="other"))
        self.assertIsNone(self.redeem(state, user="bob"))
        # Left alone for its owner.
        self.assertIsNotNone(self.redeem(state))

    def test_a_state_expires(self):
        state = self.issue()
        self.clock.advance(TTL)
        self.assertIsNone(self.redeem(state))

    def test_only_the_newest_state_of_a_user_counts(self):
        old = self.issue()
        new = self.issue()
        other_client = self.issue(client="wifi")
        self.assertIsNone(self.redeem(old))
        self.assertIsNotNone(self.redeem(new))
        self.assertIsNotNone(self.redeem(other_client, client="wifi"))

    def test_an_unknown_state_is_none(self):
        self.assertIsNone(self.redeem(b"\x00" * STATE_BYTES))

    def test_a_changed_ttl_applies_to_new_states(self):
        self.challenges.ttl = 10.0
        state = self.issue()
        self.clock.advance(10.0)
        self.assertIsNone(self.redeem(state))


class ChallengeRegistryTests(ChallengeContract, SynchronousTestCase):
    def make(self):
        self.challenges = ChallengeRegistry(self.clock, ttl=TTL)
