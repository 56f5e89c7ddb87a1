"""The cluster's shared state on a real PostgreSQL (issue #12 part 2), on a Clock.

The contracts one node's in-memory state is held to (tests/test_challenges.py,
tests/test_factor_contracts.py) run here over `SharedChallenges` and the
shared push factors; the pipeline's challenge tests run over shared States.
Then what only a cluster has: two registries (two nodes) on one database,
joining one push, answering on the other, limits across nodes, the poll
when a notification is missed, the sweeper.

Database calls run at once (``run``), and after each one the test's LISTEN
connection is asked a ``SELECT 1``: PostgreSQL delivers a listener's
notifications before it answers, so every NOTIFY a call committed reaches
the registries, for real and deterministically, before the test goes on.

The push registry has two ways to the database: a thread (``run``, as above)
and the statements the reactor sends (`mfaserver.store.pg_reactor.PgLogins`,
which the daemon uses). Every push test class runs once over each
(``via_reactor``): there the reactor is pumped until the statement's answer
is in, and then the notifications are delivered the same way.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import psycopg
import test_challenges
import test_factor_contracts as contracts
import test_pipeline
import test_pipeline_oob
from mfaserver.auth.approvals import TooManyPending
from mfaserver.auth.interfaces import (DeliveryFailed, FactorRefused, UnknownApproval,
                                       WrongConfirmation)
from mfaserver.auth.model import CodeResult, Login, Reason, Verdict
from mfaserver.factors.push import AlreadyAnswered, push_limit
from mfaserver.factors.sms import SharedSmsCodes
from mfaserver.factors.voice import VoiceFactor
from mfaserver.factors.voice_shared import SharedVoiceCalls
from mfaserver.gateways.base import GatewayError
from mfaserver.factors.push_shared import (SharedNumberMatchingPushFactor, SharedPushFactor,
                                           SharedPushTransactions)
from mfaserver.store.pg import PgStore
from mfaserver.store.shared import SharedChallenges
from mfaserver.testing import MemorySmsGateway, MemoryVoiceGateway, run_now

from .test_pg_reactor import PollingReactor

pytestmark = pytest.mark.integration


class Database:
    """A PgStore whose calls run at once, delivering their notifications to ``nodes``."""

    def __init__(self, dsn: str, key_path):
        self.store = PgStore.open(dsn, key_path)
        self.listen = psycopg.connect(dsn, autocommit=True)
        self.listen.execute("LISTEN mfaserver")
        self._heard: list[str] = []
        self.listen.add_notify_handler(lambda n: self._heard.append(n.payload))
        self.nodes: list[SharedPushTransactions] = []
        self.deliver = True
        self._reactor_statements = None

    def run(self, f, *args, **kwargs) -> Deferred:
        try:
            result = f(self.store, *args, **kwargs)
        except Exception:
            return defer.fail()
        self.deliver_notifications()
        return defer.succeed(result)

    def deliver_notifications(self) -> None:
        self.listen.execute("SELECT 1")
        if self.deliver:
            heard, self._heard = self._heard, []
            for payload in heard:
                for node in self.nodes:
                    node.notified(payload)
        else:
            self._heard.clear()

    def reactor_statements(self) -> "ReactorStatements":
        if self._reactor_statements is None:
            self._reactor_statements = ReactorStatements(self)
        return self._reactor_statements

    def close(self) -> None:
        if self._reactor_statements is not None:
            self._reactor_statements.close()
        self.listen.close()
        self.store.close()


class ReactorStatements:
    """The store's `PgLogins` (the daemon's reactor statements) with each call
    answered before it returns: the reactor is pumped until the Deferred has its
    result, then the notifications are delivered as after `Database.run`."""

    def __init__(self, db: Database):
        self._db = db
        self._reactor = PollingReactor()
        self._logins = db.store.reactor_logins(self._reactor, run_now)

    def __getattr__(self, name):
        method = getattr(self._logins, name)

        def call(*args, **kwargs):
            d = method(*args, **kwargs)
            assert self._reactor.settle(d), f"{name}: no answer from the database in 10 s"
            self._db.deliver_notifications()
            return d
        return call

    def close(self) -> None:
        self._logins.close()


@pytest.fixture
def database(postgres_database, tmp_path):
    db = Database(postgres_database, tmp_path / "seed.key")
    yield db
    db.close()


class OnDatabase:
    """Sets ``self.pg`` (a `Database`) before setUp runs. ``via_reactor``: the push
    registries send their statements as the daemon's reactor does."""

    via_reactor = False

    @pytest.fixture(autouse=True)
    def _database(self, database):
        self.pg = database


def _result(d):
    """What an already-fired Deferred holds; its failure raised."""
    out = []
    d.addBoth(out.append)
    if not out:
        return d
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class Settled:
    """A cluster factor as the contracts call it: its database answers at once here,
    so a call gives its result or raises, as one node's factor does. The calls
    that wait for the user (``request_approval``, ``confirm``) give their
    Deferred, unless it was refused at once."""

    REFUSALS = (FactorRefused, UnknownApproval, WrongConfirmation, TooManyPending)

    def __init__(self, factor, db: Database, clock):
        self._factor = factor
        self._db = db
        self._clock = clock

    def __getattr__(self, name):
        attr = getattr(self._factor, name)
        if not callable(attr):
            return attr
        waits = name in ("request_approval", "confirm")

        def call(*args, **kwargs):
            result = attr(*args, **kwargs)
            if not isinstance(result, Deferred):
                return result
            if not waits:
                return _result(result)
            out = []
            result.addErrback(lambda f: out.append(f) if f.check(*self.REFUSALS) else f)
            if out:
                out[0].raiseException()
            return result
        return call

    def pending_count(self, user=None):
        # The cluster counts pending approvals in the table (open_push checks them).
        return self._db.store.count_pending_pushes(self._clock.seconds(), user, numbered=True)


# --- the contracts, over the cluster's implementations ---------------------------------------

class SharedChallengesTests(OnDatabase, test_challenges.ChallengeContract, SynchronousTestCase):
    def make(self):
        self.challenges = SharedChallenges(self.pg.run, self.clock, ttl=test_challenges.TTL)


def _registry(db: Database, clock, node="a", late_window=600.0, limits=(5, 10_000),
              via_reactor=False):
    registry = SharedPushTransactions(
        db.run, clock, node=node, limits=lambda: limits, late_window=late_window,
        sent_by_reactor=db.reactor_statements() if via_reactor else None)
    db.nodes.append(registry)
    return registry


class SharedPushFactorTests(OnDatabase, contracts.ApprovalFactorContract, contracts.Harness):
    def make(self):
        self.push = _registry(self.pg, self.clock, via_reactor=self.via_reactor)
        self.factor = Settled(SharedPushFactor(self.push, push_limit(self.clock, 30)),
                              self.pg, self.clock)
        self.alice, self.bob = contracts.account("alice"), contracts.account("bob", devices=0)

    def request(self, who=None):
        d = super().request(who)
        if who is None:
            self.txid = _result(self.push.pending_for("alice"))[-1].txid
        return d

    def answer(self, verdict):
        _result(self.push.answer(self.txid, "alice", verdict.value))

    def withdrawn(self) -> bool:
        return _result(self.push.get(self.txid)).state == "closed"

    def exhaust(self):
        self.factor._limit.set_per_hour(0)

    def test_cancelling_withdraws_the_request(self):
        # A cluster differs here on purpose: cancelling (this node stops, its
        # copy of the request is gone) leaves the push for the NAS's retry on
        # another node; it ends when answered or expired.
        d = self.request()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(_result(self.push.get(self.txid)).state, "pending")
        self.assertEqual(len(self.push), 0)


class SharedNumberMatchingTests(OnDatabase, contracts.ConfirmedApprovalFactorContract,
                                contracts.Harness):
    late_window = 600

    def make(self):
        self.push = _registry(self.pg, self.clock, late_window=self.late_window,
                               via_reactor=self.via_reactor)
        self.factor = Settled(SharedNumberMatchingPushFactor(self.push,
                                                             push_limit(self.clock, 30)),
                              self.pg, self.clock)
        self.alice, self.bob = contracts.account("alice"), contracts.account("bob", devices=0)

    def shown(self, ticket):
        return _result(self.push.get(ticket)).number

    def answer(self, ticket, verdict):
        txn = _result(self.push.get(ticket))
        _result(self.push.answer(ticket, txn.user, verdict.value))

    def exhaust(self):
        self.factor._limit.set_per_hour(0)


class SharedPushFactorViaReactorTests(SharedPushFactorTests):
    via_reactor = True


class SharedNumberMatchingViaReactorTests(SharedNumberMatchingTests):
    via_reactor = True


class SharedStates(OnDatabase):
    """A pipeline test class, with its States in PostgreSQL."""

    def setUp(self):
        super().setUp()
        self.challenges = self.auth.challenges = SharedChallenges(self.pg.run, self.clock,
                                                                  ttl=300)


class PipelineOverSharedChallenges(SharedStates, test_pipeline.PipelineTests):
    pass


class MenuOverSharedChallenges(SharedStates, test_pipeline_oob.MenuTests):
    pass


class NumberMatchingOverSharedChallenges(SharedStates, test_pipeline_oob.NumberMatchingTests):
    pass


class SharedSmsCodesTests(OnDatabase, contracts.CodeFactorContract, contracts.Harness):
    def make(self):
        self.gateway = MemorySmsGateway()
        self.factor = SharedSmsCodes(self.gateway, self.clock, self.pg.run)
        self.alice, self.bob = contracts.account("alice"), contracts.account("bob", phone=None)

    def right_code(self) -> str:
        return self.gateway.last_code()


# --- what only a cluster has ------------------------------------------------------------------

class TextedCodesAcrossNodes(OnDatabase, contracts.Harness):
    def make(self):
        self.gateway = MemorySmsGateway()
        self.a = SharedSmsCodes(self.gateway, self.clock, self.pg.run, per_user_per_hour=3,
                                per_number_per_hour=10)
        self.b = SharedSmsCodes(self.gateway, self.clock, self.pg.run, per_user_per_hour=3,
                                per_number_per_hour=10)
        self.alice = contracts.account("alice")

    def check(self, node, code):
        return self.successResultOf(node.check(self.alice, code)).result

    def test_a_code_texted_by_one_node_is_accepted_once_by_any(self):
        self.successResultOf(self.a.send(self.login()))
        code = self.gateway.last_code()
        # Sealed in the table: the database alone does not give the code away.
        [(sealed,)] = self.pg.store._conn.execute("SELECT code FROM cluster_sms").fetchall()
        self.assertNotIn(code.encode(), bytes(sealed))
        self.assertIs(self.check(self.b, code), CodeResult.ACCEPTED)
        self.assertIs(self.check(self.a, code), CodeResult.WRONG)

    def test_only_the_newest_code_counts_and_codes_expire(self):
        self.successResultOf(self.a.send(self.login()))
        old = self.gateway.last_code()
        self.successResultOf(self.b.send(self.login()))
        new = self.gateway.last_code()
        if old != new:
            self.assertIs(self.check(self.a, old), CodeResult.WRONG)
        self.clock.advance(self.a.ttl)
        self.assertIs(self.check(self.a, new), CodeResult.WRONG)

    def test_send_limits_hold_across_nodes(self):
        for node in (self.a, self.b, self.a):
            self.successResultOf(node.send(self.login()))
        refused = self.failureResultOf(self.b.send(self.login()), FactorRefused)
        self.assertIs(refused.value.reason, Reason.RATE_LIMITED)
        self.assertEqual(len(self.gateway.sent), 3)


class TwoNodes(OnDatabase, contracts.Harness):
    """Nodes A and B: push registries on one database, one clock."""

    limits = (1, 10_000)

    def make(self):
        self.a = _registry(self.pg, self.clock, "a", limits=self.limits,
                           via_reactor=self.via_reactor)
        self.b = _registry(self.pg, self.clock, "b", limits=self.limits,
                           via_reactor=self.via_reactor)
        self.woken = []
        self.a.wake = self.b.wake = self.woken.append
        self.limit = push_limit(self.clock, 30)
        self.alice = contracts.account("alice")

    def hold(self, node, station="198.51.100.7", who=None) -> Deferred:
        return SharedPushFactor(node, self.limit).request_approval(
            Login(who or self.alice, "vpn", "192.0.2.1", station), contracts.TIMEOUT)

    def only_txid(self, node=None) -> str:
        [txn] = _result((node or self.a).pending_for("alice"))
        return txn.txid

    def test_the_same_login_on_two_nodes_is_one_push_and_both_get_the_answer(self):
        on_a, on_b = self.hold(self.a), self.hold(self.b)
        txid = self.only_txid()
        self.assertEqual(self.woken, ["alice"])     # one wake-up, from A
        _result(self.b.answer(txid, "alice", "approve"))
        self.assertIs(self.successResultOf(on_a), Verdict.APPROVE)
        self.assertIs(self.successResultOf(on_b), Verdict.APPROVE)

    def test_a_node_that_stops_leaves_the_push_to_the_nas_retry_on_another(self):
        on_a = self.hold(self.a)
        txid = self.only_txid()
        self.a.close_all()
        self.failureResultOf(on_a, defer.CancelledError)    # no reply: the NAS retries
        on_b = self.hold(self.b)     # the NAS's retry, to B: joins
        self.assertEqual(self.only_txid(self.b), txid)
        _result(self.a.answer(txid, "alice", "deny"))
        self.assertIs(self.successResultOf(on_b), Verdict.DENY)

    def test_an_answer_that_ends_the_push_before_a_joined_copy_waits_is_taken_once(self):
        on_a = self.hold(self.a)
        txid = self.only_txid()
        self.a.close_all()                              # A died
        self.failureResultOf(on_a, defer.CancelledError)
        login = Login(self.alice, "vpn", "192.0.2.1", "198.51.100.7")
        joined = _result(self.b.open(login, contracts.TIMEOUT))    # the retry joins ...
        self.assertEqual((joined.txid, joined.state), (txid, "pending"))
        _result(self.b.answer(txid, "alice", "approve"))   # ... and the answer ends it
        self.assertIs(self.successResultOf(self.b.wait(joined)), Verdict.APPROVE)
        # Delivered: one more copy of the login is a new login with a push of its own.
        again = self.hold(self.b)
        self.assertNoResult(again)
        self.assertEqual(self.woken, ["alice", "alice"])

    def test_an_answer_given_while_no_node_held_the_login_is_taken_by_its_retry_once(self):
        on_a = self.hold(self.a)
        txid = self.only_txid()
        self.a.close_all()                              # A died
        self.failureResultOf(on_a, defer.CancelledError)
        _result(self.b.answer(txid, "alice", "approve"))    # before the NAS's retry
        retry = self.hold(self.b)
        self.assertIs(self.successResultOf(retry), Verdict.APPROVE)
        self.assertEqual(self.woken, ["alice"])         # no second push
        # Taken: the next login is a new one, with a push of its own.
        self.clock.advance(1)
        self.assertNoResult(self.hold(self.b))
        self.assertEqual(self.woken, ["alice", "alice"])

    def test_an_answer_a_node_delivered_is_not_given_to_a_later_login(self):
        on_a = self.hold(self.a)
        _result(self.b.answer(self.only_txid(), "alice", "approve"))
        self.assertIs(self.successResultOf(on_a), Verdict.APPROVE)
        self.assertNoResult(self.hold(self.b))
        self.assertEqual(self.woken, ["alice", "alice"])

    def test_a_missed_notification_is_made_up_by_the_poll(self):
        on_a = self.hold(self.a)
        txid = self.only_txid()
        self.pg.deliver = False     # the LISTEN connection is down
        _result(self.b.answer(txid, "alice", "approve"))
        self.assertNoResult(on_a)
        self.pg.deliver = True
        self.successResultOf(self.a.poll())
        self.assertIs(self.successResultOf(on_a), Verdict.APPROVE)

    def test_a_long_poll_on_one_node_wakes_for_a_push_opened_on_the_other(self):
        polling = self.b.wait_for_new("alice", 30)
        self.hold(self.a)
        self.assertIsNone(self.successResultOf(polling))
        # And by the poll, when the notification was missed (a poll later than
        # the first push, so that it counts as old news).
        self.clock.advance(5)
        self.successResultOf(self.b.poll())
        polling = self.b.wait_for_new("alice", 30)
        polling_bob = self.b.wait_for_new("bob", 30)
        self.pg.deliver = False
        self.hold(self.a, who=contracts.account("bob"))
        self.assertNoResult(polling_bob)
        self.successResultOf(self.b.poll())
        self.assertIsNone(self.successResultOf(polling_bob))
        self.assertNoResult(polling)                 # alice had nothing new

    def test_pending_limits_hold_across_nodes(self):
        self.hold(self.a)
        # Another login of alice (another station) on B: over her one pending push.
        refused = self.hold(self.b, station="198.51.100.8")
        self.assertEqual(self.failureResultOf(refused, TooManyPending).value.scope, "user")

    def test_the_push_rate_holds_across_nodes(self):
        self.limit.set_per_hour(2)
        for node, station in ((self.a, "198.51.100.1"), (self.b, "198.51.100.2")):
            d = self.hold(node, station)
            _result(node.answer(_result(node.pending_for("alice"))[0].txid, "alice", "deny"))
            self.successResultOf(d)
        self.failureResultOf(self.hold(self.a, "198.51.100.3"), FactorRefused)
        self.failureResultOf(self.hold(self.b, "198.51.100.4"), FactorRefused)

    def test_an_answer_counts_once_across_nodes(self):
        self.hold(self.a)
        txid = self.only_txid()
        _result(self.a.answer(txid, "alice", "deny"))
        with self.assertRaises(AlreadyAnswered):
            _result(self.b.answer(txid, "alice", "approve"))

    def test_the_sweeper_removes_what_expired(self):
        held = self.hold(self.a)
        state = _result(SharedChallenges(self.pg.run, self.clock, ttl=60).issue("vpn", "alice"))
        self.clock.advance(contracts.TIMEOUT + 600 + 1)
        self.failureResultOf(held, defer.TimeoutError)
        challenges, pushes = self.pg.store.sweep(self.clock.seconds())
        self.assertEqual((challenges, pushes), (1, 1))
        self.assertEqual(self.pg.store.count_challenges(), 0)
        self.assertIsNone(self.pg.store.redeem_challenge(state, "vpn", "alice", 0.0))


class TwoNodesViaReactor(TwoNodes):
    via_reactor = True


# --- phone calls ------------------------------------------------------------------------------

def _calls(db: Database, clock, gateway, node="a", report_fraud=None, **settings):
    calls = SharedVoiceCalls(gateway, clock, run=db.run, node=node,
                             report_fraud=report_fraud or (lambda user, client: defer.succeed(None)),
                             public_url="https://mfa.example.org", **settings)
    db.nodes.append(calls)
    return calls


class SharedVoiceFactorTests(OnDatabase, contracts.VoiceFactorTests):
    def make(self):
        super().make()
        self.calls = _calls(self.pg, self.clock, self.gateway, per_user_per_hour=30,
                            report_fraud=self.report_fraud)
        self.factor = Settled(VoiceFactor(self.calls, self.clock,
                                          report_fraud=self.report_fraud), self.pg, self.clock)

    def test_cancelling_withdraws_the_request(self):
        # As for pushes: the call stays for the NAS's retry on another node.
        d = self.request()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.calls), 0)
        self.assertEqual(self.pg.store.get_call(self.call_id(), self.clock.seconds())[2],
                         "pending")


class _Placing:
    """A voice gateway whose answers the test gives (``placing``: one Deferred per call)."""

    def __init__(self, placing: list):
        self.placing = placing

    def start_call(self, to, *, answer_url, status_url=None):
        d = Deferred()
        self.placing.append(d)
        return d


class CallsAcrossNodes(OnDatabase, contracts.Harness):
    def make(self):
        self.gateway_a, self.gateway_b = MemoryVoiceGateway(), MemoryVoiceGateway()
        self.fraud = []
        self.a = _calls(self.pg, self.clock, self.gateway_a, "a", self.report, max_calls=2)
        self.b = _calls(self.pg, self.clock, self.gateway_b, "b", self.report, max_calls=2)
        self.alice = contracts.account("alice")

    def report(self, user, client):
        self.fraud.append(user)
        return defer.succeed(None)

    def call(self, node, station="198.51.100.7", who=None) -> Deferred:
        return VoiceFactor(node, self.clock, report_fraud=self.report).request_approval(
            Login(who or self.alice, "vpn", "192.0.2.1", station), contracts.TIMEOUT)

    def call_id(self) -> str:
        [call] = self.gateway_a.calls
        return call.answer_url.split("/")[-2]

    def test_the_same_login_on_two_nodes_rings_once_and_keys_on_either_node_decide(self):
        on_a, on_b = self.call(self.a), self.call(self.b)
        self.assertEqual((len(self.gateway_a.calls), len(self.gateway_b.calls)), (1, 0))
        call_id = self.call_id()
        # The provider's callbacks reach B: the prompt names the client.
        self.assertIn(b"vpn", self.successResultOf(self.b.answer_twiml(call_id)))
        self.successResultOf(self.b.gather(call_id, "#"))
        self.assertIs(self.successResultOf(on_a), Verdict.APPROVE)
        self.assertIs(self.successResultOf(on_b), Verdict.APPROVE)
        # Keys again, on A: too late, and said so.
        self.assertIn(b"expired", self.successResultOf(self.a.gather(call_id, "#")))

    def test_a_fraud_keypress_is_reported_once_by_the_node_it_reaches(self):
        on_a = self.call(self.a)
        on_b = self.call(self.b)
        self.successResultOf(self.b.gather(self.call_id(), "0"))
        self.assertIs(self.successResultOf(on_a), Verdict.FRAUD)
        self.assertIs(self.successResultOf(on_b), Verdict.FRAUD)
        self.assertEqual(self.fraud, ["alice"])

    def test_a_fraud_keypress_blocks_even_when_no_node_holds_the_login(self):
        held = self.call(self.a)
        held.cancel()                   # A stopped; the NAS has not retried yet
        self.failureResultOf(held, defer.CancelledError)
        self.successResultOf(self.b.gather(self.call_id(), "0"))
        self.assertEqual(self.fraud, ["alice"])

    def test_a_call_that_ends_unanswered_is_no_answer_everywhere(self):
        on_a = self.call(self.a)
        self.successResultOf(self.b.call_ended(self.call_id(), "no-answer"))
        self.assertIs(self.successResultOf(on_a), Verdict.NO_ANSWER)

    def test_a_call_the_provider_refused_fails_the_joined_login_too(self):
        self.gateway_a.failure = GatewayError("provider says no")
        on_a = self.call(self.a, station="198.51.100.9")
        self.failureResultOf(on_a, DeliveryFailed)
        # Joined on B before A heard back: B's request fails the same way.
        placing = []
        self.a.gateway = _Placing(placing)
        on_a = self.call(self.a)
        on_b = self.call(self.b)
        self.assertNoResult(on_b)
        placing[0].errback(GatewayError("provider says no"))
        self.failureResultOf(on_a, DeliveryFailed)
        self.failureResultOf(on_b, DeliveryFailed)

    def test_call_limits_hold_across_nodes(self):
        self.call(self.a)
        self.call(self.b, who=contracts.account("carol"))
        # Two calls pending in the cluster (max_calls = 2): a third is refused.
        refused = self.failureResultOf(self.call(self.a, who=contracts.account("dave")),
                                       TooManyPending)
        self.assertEqual(refused.value.scope, "global")

    def test_pushes_and_calls_pending_count_together_per_user(self):
        push = _registry(self.pg, self.clock, "a", limits=(1, 100))
        held = SharedPushFactor(push, push_limit(self.clock, 30)).request_approval(
            self.login(), contracts.TIMEOUT)
        self.assertNoResult(held)
        refused = self.failureResultOf(self.call(self.b, station="198.51.100.99"),
                                       TooManyPending)
        self.assertEqual(refused.value.scope, "user")
        self.assertEqual(self.gateway_a.calls + self.gateway_b.calls, [])

    def test_keys_pressed_while_no_node_held_the_login_answer_its_retry_once(self):
        held = self.call(self.a)
        held.cancel()                   # A died
        self.failureResultOf(held, defer.CancelledError)
        self.successResultOf(self.b.gather(self.call_id(), "#"))
        self.assertIs(self.successResultOf(self.call(self.b)), Verdict.APPROVE)
        self.assertEqual(len(self.gateway_a.calls + self.gateway_b.calls), 1)
        self.assertNoResult(self.call(self.b))          # the next login rings again
        self.assertEqual(len(self.gateway_b.calls), 1)

    def test_keys_that_end_the_call_before_a_joined_copy_waits_answer_it_once(self):
        held = self.call(self.a)
        held.cancel()                   # A died
        self.failureResultOf(held, defer.CancelledError)
        call_id = self.call_id()
        run = self.b._run

        def keys_pressed_just_after_joining(f, *args, **kwargs):
            joined = run(f, *args, **kwargs)    # B's copy joins the pending call ...
            self.b._run = run
            self.successResultOf(self.a.gather(call_id, "#"))   # ... and "#" decides it
            return joined
        self.b._run = keys_pressed_just_after_joining
        self.assertIs(self.successResultOf(self.call(self.b)), Verdict.APPROVE)
        # Delivered: the next login rings again rather than taking that "#".
        self.assertNoResult(self.call(self.b))
        self.assertEqual(len(self.gateway_b.calls), 1)

    def test_a_missed_notification_is_made_up_by_the_poll(self):
        on_a = self.call(self.a)
        self.pg.deliver = False
        self.successResultOf(self.b.gather(self.call_id(), "1"))
        self.assertNoResult(on_a)
        self.pg.deliver = True
        self.successResultOf(self.a.poll())
        self.assertIs(self.successResultOf(on_a), Verdict.DENY)
