"""The RADIUS listener with a fake transport, an injected clock and a controllable core."""

from __future__ import annotations

import ipaddress

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.model import Decision, Reason
from mfaserver.config import ClientConfig, ClientIndex
from mfaserver.radius import codec
from mfaserver.radius.protocol import ListenerSettings, RadiusAuthProtocol
from mfaserver.radius.replay import ReplyCache
from mfaserver.testing import FakeDatagramTransport, access_request, status_server

SECRET = b"a-long-shared-secret-for-tests"
NAS = ("127.0.0.1", 40000)


def client(name="vpn", address="127.0.0.0/8", require_ma=True, secret=SECRET):
    return ClientConfig(name=name, network=ipaddress.ip_network(address), secret=secret,
                        require_message_authenticator=require_ma)


class ProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.requests = []
        self.pending: list[defer.Deferred] = []
        self.decision = Decision.accept(Reason.OK, factor="totp")
        self.hold = False
        self.clients = (client(), client("legacy", "10.0.0.1", require_ma=False))
        self.proto = RadiusAuthProtocol(
            ListenerSettings(ClientIndex(self.clients).find, reject_delay=1.0,
                             status_server=True),
            self.authenticate, ReplyCache(self.clock, ttl=30), self.clock)
        self.transport = FakeDatagramTransport()
        self.proto.transport = self.transport

    def authenticate(self, request):
        self.requests.append(request)
        if self.hold:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(self.decision)

    def replies(self):
        return [data for data, _ in self.transport.written]

    def decode(self, data, authenticator):
        return codec.decode_response(data, SECRET, authenticator)

    def test_accept_reply_is_signed_with_message_authenticator_first(self):
        data, auth = access_request(SECRET, "alice", "pw,123456")
        self.proto.datagramReceived(data, NAS)
        [reply] = self.replies()
        packet = self.decode(reply, auth)
        self.assertEqual(packet.code, codec.ACCESS_ACCEPT)
        self.assertEqual(packet.attributes[0][0], codec.MESSAGE_AUTHENTICATOR)
        self.assertEqual(self.requests[0].password, "pw,123456")

    def test_reject_is_delayed_on_the_clock_and_retransmissions_meanwhile_are_dropped(self):
        self.decision = Decision.reject(Reason.BAD_CODE, "Wrong or already used code.")
        data, auth = access_request(SECRET, "alice", "pw,000000")
        self.proto.datagramReceived(data, NAS)
        self.proto.datagramReceived(data, NAS)
        self.assertEqual(self.replies(), [])
        self.clock.advance(1.0)
        [reply] = self.replies()
        packet = self.decode(reply, auth)
        self.assertEqual(packet.code, codec.ACCESS_REJECT)
        self.assertEqual(packet.get(codec.REPLY_MESSAGE), b"Wrong or already used code.")
        self.assertEqual(len(self.requests), 1)

    def test_retransmission_after_the_decision_gets_identical_bytes_without_redeciding(self):
        data, _ = access_request(SECRET, "alice", "pw,123456")
        self.proto.datagramReceived(data, NAS)
        self.proto.datagramReceived(data, NAS)
        first, second = self.replies()
        self.assertEqual(first, second)
        self.assertEqual(len(self.requests), 1)

    def test_retransmission_while_pending_is_dropped_then_answered_once(self):
        self.hold = True
        data, _ = access_request(SECRET, "alice", "pw")
        for _ in range(3):
            self.proto.datagramReceived(data, NAS)
        self.assertEqual((len(self.requests), self.replies()), (1, []))
        self.pending[0].callback(self.decision)
        self.assertEqual(len(self.replies()), 1)

    def test_challenge_carries_state_and_proxy_states_in_order(self):
        self.decision = Decision.challenge(b"S" * 16, "Enter the code.")
        data, auth = access_request(SECRET, "alice", "pw", extra=[
            (codec.PROXY_STATE, b"first"), (codec.PROXY_STATE, b"second")])
        self.proto.datagramReceived(data, NAS)
        packet = self.decode(self.replies()[0], auth)
        self.assertEqual(packet.code, codec.ACCESS_CHALLENGE)
        self.assertEqual(packet.get(codec.STATE), b"S" * 16)
        self.assertEqual(packet.get_all(codec.PROXY_STATE), [b"first", b"second"])

    def test_unknown_client_is_dropped_before_parsing(self):
        data, _ = access_request(SECRET, "alice", "pw")
        self.proto.datagramReceived(data, ("192.0.2.9", 1812))
        self.assertEqual((self.replies(), self.requests, self.proto.dropped), ([], [], 1))

    def test_missing_message_authenticator_is_dropped_when_required(self):
        data, _ = access_request(SECRET, "alice", "pw", message_authenticator=False)
        self.proto.datagramReceived(data, NAS)
        self.assertEqual((self.replies(), self.requests), ([], []))

    def test_wrong_secret_fails_the_message_authenticator_and_is_dropped(self):
        data, _ = access_request(b"another-secret-entirely", "alice", "pw")
        self.proto.datagramReceived(data, NAS)
        self.assertEqual((self.replies(), self.requests), ([], []))

    def test_legacy_client_without_message_authenticator_is_served(self):
        data, auth = access_request(SECRET, "alice", "pw", message_authenticator=False)
        self.proto.datagramReceived(data, ("10.0.0.1", 1645))
        self.assertEqual(len(self.replies()), 1)

    def test_legacy_client_proxy_state_without_message_authenticator_is_dropped(self):
        data, _ = access_request(SECRET, "alice", "pw", message_authenticator=False,
                                 extra=[(codec.PROXY_STATE, b"x")])
        self.proto.datagramReceived(data, ("10.0.0.1", 1645))
        self.assertEqual((self.replies(), self.requests), ([], []))

    def test_status_server_is_answered_without_authentication(self):
        data, auth = status_server(SECRET)
        self.proto.datagramReceived(data, NAS)
        packet = self.decode(self.replies()[0], auth)
        self.assertEqual(packet.code, codec.ACCESS_ACCEPT)
        self.assertEqual(self.requests, [])

    def test_status_server_without_message_authenticator_is_dropped(self):
        data, _ = status_server(SECRET, message_authenticator=False)
        self.proto.datagramReceived(data, ("10.0.0.1", 1645))
        self.assertEqual(self.replies(), [])

    def test_dropped_packets_are_logged_at_most_once_per_interval(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(50):
            self.proto.datagramReceived(b"\x01" * 30, ("192.0.2.9", 1812))
        self.assertEqual(len([e for e in events if "unknown client" in e.get("log_format", "")]), 1)

    def test_shutdown_cancels_pending_requests_and_sends_nothing(self):
        self.hold = True
        data, _ = access_request(SECRET, "alice", "pw")
        self.proto.datagramReceived(data, NAS)
        self.proto.stopProtocol()
        self.assertTrue(self.pending[0].called)
        self.assertEqual(self.replies(), [])

    def test_shutdown_cancels_delayed_rejects(self):
        self.decision = Decision.reject(Reason.BAD_CODE)
        data, _ = access_request(SECRET, "alice", "pw")
        self.proto.datagramReceived(data, NAS)
        self.proto.stopProtocol()
        self.clock.advance(5)
        self.assertEqual(self.replies(), [])

    def test_core_failure_sends_nothing_and_the_request_can_be_retried(self):
        self.hold = True
        data, _ = access_request(SECRET, "alice", "pw")
        self.proto.datagramReceived(data, NAS)
        self.pending[0].errback(RuntimeError("boom"))
        self.flushLoggedErrors(RuntimeError)
        self.proto.datagramReceived(data, NAS)
        self.assertEqual(len(self.requests), 2)
