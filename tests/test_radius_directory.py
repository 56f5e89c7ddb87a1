"""The upstream RADIUS directory with a fake UDP reactor on a Clock and a fake upstream."""

from __future__ import annotations

import hashlib
import struct

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials
from mfaserver.auth.model import Reason
from mfaserver.config import UpstreamRadiusConfig
from mfaserver.directory.radius import RadiusDirectory
from mfaserver.radius import codec

SECRET = b"upstream-shared-secret-for-tests"
FIRST = ("192.0.2.1", 1812)
SECOND = ("192.0.2.2", 1645)


class FakeUDPPort:
    """A bound UDP port that records what is written to it."""

    def __init__(self, protocol, interface: str):
        self.protocol = protocol
        self.interface = interface
        self.written: list[tuple[bytes, tuple]] = []
        self.closed = False

    def write(self, data: bytes, addr: tuple) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.closed = True
        self.protocol.doStop()


class FakeUDPReactor(task.Clock):
    """IReactorTime from Clock plus a listenUDP that hands out fake ports."""

    def __init__(self):
        super().__init__()
        self.ports: list[FakeUDPPort] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        fake = FakeUDPPort(protocol, interface)
        protocol.makeConnection(fake)
        self.ports.append(fake)
        return fake


def config(**changes) -> UpstreamRadiusConfig:
    values = dict(servers=(FIRST, SECOND), secret=SECRET, timeout=3.0, retries=1,
                  pass_through=("Class", "Framed-IP-Address"), nas_identifier="mfa-test",
                  retry_dead_after=30.0)
    values.update(changes)
    return UpstreamRadiusConfig(**values)


def response(code: int, request: codec.Packet, attrs=(), secret=SECRET) -> bytes:
    """What a correct upstream server answers."""
    return codec.encode_response(code, request, secret, attrs)


def response_without_message_authenticator(code: int, request: codec.Packet) -> bytes:
    """A reply with a valid Response Authenticator but no Message-Authenticator."""
    body = bytes((codec.REPLY_MESSAGE, 4)) + b"ok"
    head = struct.pack("!BBH", code, request.identifier, 20 + len(body))
    digest = hashlib.md5(head + request.authenticator + body + SECRET).digest()
    return head + digest + body


class UpstreamFakes(SynchronousTestCase):
    """A directory on the fake reactor, and how the tests play the upstream."""

    def setUp(self):
        self.reactor = FakeUDPReactor()
        self.directory = self.make(config())

    def make(self, cfg: UpstreamRadiusConfig) -> RadiusDirectory:
        self.reactor.ports.clear()
        directory = RadiusDirectory(cfg, self.reactor)
        directory.start()
        self.port = self.reactor.ports[0]
        return directory

    def sent(self) -> list[tuple[codec.Packet, tuple]]:
        """Every datagram sent, decoded the way the upstream server would."""
        return [(codec.decode_request(data, SECRET), addr) for data, addr in self.port.written]

    def last(self) -> tuple[codec.Packet, tuple]:
        data, addr = self.port.written[-1]
        return codec.decode_request(data, SECRET), addr

    def receive(self, data: bytes, source: tuple) -> None:
        self.port.protocol.datagramReceived(data, source)

    def elapse(self, seconds: float) -> None:
        """Let time pass in small steps, as a real reactor would."""
        for _ in range(round(seconds / 0.5)):
            self.reactor.advance(0.5)

    def answer(self, code: int, attrs=()) -> None:
        """Answer the last request sent, from where it was sent to."""
        packet, addr = self.last()
        self.receive(response(code, packet, attrs), addr)


class RadiusDirectoryTests(UpstreamFakes):
    def test_request_carries_user_name_hidden_password_and_nas_identifier(self):
        d = self.directory.authenticate("alice", "correct horse")
        [(packet, addr)] = self.sent()
        self.assertEqual(addr, FIRST)
        self.assertEqual(packet.code, codec.ACCESS_REQUEST)
        # decode_request verified the Message-Authenticator; it must come first.
        self.assertEqual(packet.attributes[0][0], codec.MESSAGE_AUTHENTICATOR)
        self.assertEqual(packet.get(codec.USER_NAME), b"alice")
        self.assertEqual(packet.get(codec.NAS_IDENTIFIER), b"mfa-test")
        hidden = packet.get(codec.USER_PASSWORD)
        self.assertNotIn(b"correct horse", packet.raw)
        self.assertEqual(codec.decrypt_password(hidden, SECRET, packet.authenticator),
                         b"correct horse")
        self.assertNoResult(d)

    def test_each_request_gets_a_fresh_authenticator(self):
        self.directory.authenticate("alice", "pw")
        self.directory.authenticate("bob", "pw")
        first, second = (packet for packet, _ in self.sent())
        self.assertNotEqual(first.authenticator, second.authenticator)
        self.assertNotEqual(first.identifier, second.identifier)

    def test_accept_passes_through_only_the_configured_attributes_as_raw_octets(self):
        d = self.directory.authenticate("alice", "pw")
        self.answer(codec.ACCESS_ACCEPT, [
            (codec.CLASS, b"vpn-users"),
            (codec.FILTER_ID, b"staff"),
            (8, bytes((10, 1, 2, 3))),               # Framed-IP-Address
            (codec.SESSION_TIMEOUT, struct.pack("!I", 3600)),
            (codec.CLASS, b"\x00second"),
        ])
        principal = self.successResultOf(d)
        self.assertEqual(principal.username, "alice")
        self.assertEqual(principal.attributes, (
            ("Class", b"vpn-users"),
            ("Framed-IP-Address", b"\x0a\x01\x02\x03"),
            ("Class", b"\x00second"),
        ))

    def test_reject_fails_with_invalid_credentials(self):
        d = self.directory.authenticate("alice", "wrong")
        self.answer(codec.ACCESS_REJECT, [(codec.REPLY_MESSAGE, b"no")])
        error = self.failureResultOf(d, InvalidCredentials).value
        self.assertEqual(error.reason, Reason.BAD_PASSWORD)
        self.assertEqual(error.detail, "upstream reject")

    def test_upstream_challenge_is_refused(self):
        d = self.directory.authenticate("alice", "pw")
        self.answer(codec.ACCESS_CHALLENGE, [(codec.STATE, b"s" * 16)])
        error = self.failureResultOf(d, InvalidCredentials).value
        self.assertEqual(error.detail, "upstream challenge not supported")

    def test_timeout_retransmits_the_same_datagram_then_fails_over(self):
        d = self.directory.authenticate("alice", "pw")
        self.elapse(2.5)
        self.assertEqual(len(self.port.written), 1)
        self.elapse(0.5)
        self.assertEqual([addr for _, addr in self.port.written], [FIRST, FIRST])
        self.assertEqual(self.port.written[0][0], self.port.written[1][0])
        self.elapse(3)
        packet, addr = self.last()
        self.assertEqual(addr, SECOND)
        self.assertNotEqual(packet.authenticator, self.sent()[0][0].authenticator)
        self.answer(codec.ACCESS_ACCEPT)
        self.assertEqual(self.successResultOf(d).username, "alice")

    def test_late_reply_from_the_server_given_up_on_is_dropped(self):
        d = self.directory.authenticate("alice", "pw")
        first, _ = self.sent()[0]
        self.elapse(6)
        self.receive(response(codec.ACCESS_ACCEPT, first), FIRST)
        self.assertNoResult(d)
        self.assertEqual(self.directory.dropped, 1)

    def test_no_answer_from_any_server_fails_with_directory_unavailable(self):
        d = self.directory.authenticate("alice", "pw")
        self.elapse(11.5)
        self.assertNoResult(d)
        self.elapse(0.5)
        self.failureResultOf(d, DirectoryUnavailable)
        self.assertEqual([addr for _, addr in self.port.written], [FIRST, FIRST, SECOND, SECOND])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_dead_server_is_tried_last_until_retry_dead_after_passes(self):
        self.directory.authenticate("alice", "pw")
        self.elapse(6)
        self.answer(codec.ACCESS_ACCEPT)          # the second server answers
        del self.port.written[:]
        self.directory.authenticate("bob", "pw")
        self.assertEqual(self.last()[1], SECOND)
        self.answer(codec.ACCESS_ACCEPT)
        self.elapse(29.5)
        self.directory.authenticate("carol", "pw")
        self.assertEqual(self.last()[1], SECOND)
        self.answer(codec.ACCESS_ACCEPT)
        self.elapse(0.5)                          # 30 s after the first went dead
        self.directory.authenticate("dave", "pw")
        self.assertEqual(self.last()[1], FIRST)

    def test_dead_server_that_answers_is_live_again(self):
        self.failureResultOf(self.run_out(), DirectoryUnavailable)   # both dead
        d = self.directory.authenticate("bob", "pw")
        self.elapse(6)                            # the first stays silent
        self.assertEqual(self.last()[1], SECOND)
        self.answer(codec.ACCESS_ACCEPT)
        self.successResultOf(d)
        self.directory.authenticate("carol", "pw")
        self.assertEqual(self.last()[1], SECOND)

    def test_when_all_servers_are_dead_they_are_still_tried_in_order(self):
        self.failureResultOf(self.run_out(), DirectoryUnavailable)
        del self.port.written[:]
        d = self.directory.authenticate("alice", "pw")
        self.assertEqual(self.last()[1], FIRST)
        self.elapse(6)
        self.assertEqual(self.last()[1], SECOND)
        self.answer(codec.ACCESS_ACCEPT)
        self.successResultOf(d)

    def run_out(self) -> defer.Deferred:
        d = self.directory.authenticate("alice", "pw")
        self.elapse(12)
        return d

    def assert_dropped_then_good_reply_accepted(self, bad: bytes, *sources: tuple) -> None:
        for source in sources:
            self.receive(bad, source)
        self.assertEqual(self.directory.dropped, len(sources))
        self.assertNoResult(self.pending)
        self.answer(codec.ACCESS_ACCEPT)
        self.successResultOf(self.pending)

    def bad_reply_setup(self) -> tuple[codec.Packet, tuple]:
        self.pending = self.directory.authenticate("alice", "pw")
        return self.last()

    def test_reply_with_bad_response_authenticator_is_dropped(self):
        packet, addr = self.bad_reply_setup()
        good = response(codec.ACCESS_ACCEPT, packet)
        bad = good[:4] + bytes(b ^ 1 for b in good[4:20]) + good[20:]
        self.assert_dropped_then_good_reply_accepted(bad, addr)

    def test_reply_signed_with_another_secret_is_dropped(self):
        packet, addr = self.bad_reply_setup()
        bad = response(codec.ACCESS_ACCEPT, packet, secret=b"some-other-secret")
        self.assert_dropped_then_good_reply_accepted(bad, addr)

    def test_reply_without_message_authenticator_is_dropped(self):
        packet, addr = self.bad_reply_setup()
        bad = response_without_message_authenticator(codec.ACCESS_ACCEPT, packet)
        self.assert_dropped_then_good_reply_accepted(bad, addr)

    def test_reply_with_wrong_identifier_is_dropped(self):
        packet, addr = self.bad_reply_setup()
        bad = response(codec.ACCESS_ACCEPT, ((packet.identifier + 1) % 256,
                                             packet.authenticator))
        self.assert_dropped_then_good_reply_accepted(bad, addr)

    def test_reply_from_wrong_address_or_port_is_dropped(self):
        packet, addr = self.bad_reply_setup()
        good = response(codec.ACCESS_ACCEPT, packet)
        self.assert_dropped_then_good_reply_accepted(good, ("192.0.2.99", 1812),
                                                     (FIRST[0], 1813), SECOND)

    def test_short_garbage_is_dropped(self):
        _, addr = self.bad_reply_setup()
        self.assert_dropped_then_good_reply_accepted(b"\x02", addr)

    def test_forged_reply_leaves_the_request_to_time_out(self):
        packet, addr = self.bad_reply_setup()
        self.receive(response_without_message_authenticator(codec.ACCESS_ACCEPT, packet), addr)
        self.elapse(12)
        self.failureResultOf(self.pending, DirectoryUnavailable)

    def test_300_concurrent_logins_never_share_an_outstanding_identifier(self):
        pending = [self.directory.authenticate(f"user{i}", "pw") for i in range(300)]
        by_server: dict[tuple, list[int]] = {}
        for packet, addr in self.sent():
            by_server.setdefault(addr, []).append(packet.identifier)
        self.assertEqual(len(by_server[FIRST]), 256)
        self.assertEqual(len(set(by_server[FIRST])), 256)
        self.assertEqual(len(by_server[SECOND]), 44)
        self.assertEqual(len(set(by_server[SECOND])), 44)
        for d in pending:
            self.assertNoResult(d)
        # Every reply reaches its own login.
        for (packet, addr), d, i in zip(self.sent(), pending, range(300)):
            self.receive(response(codec.ACCESS_ACCEPT, packet), addr)
            self.assertEqual(self.successResultOf(d).username, f"user{i}")

    def test_all_identifiers_busy_fails_closed(self):
        self.directory = self.make(config(servers=(FIRST,)))
        pending = [self.directory.authenticate(f"user{i}", "pw") for i in range(256)]
        self.failureResultOf(self.directory.authenticate("late", "pw"), DirectoryUnavailable)
        self.assertEqual(len(self.port.written), 256)
        pending[7].cancel()
        self.failureResultOf(pending[7], defer.CancelledError)
        self.directory.authenticate("next", "pw")
        packet, _ = self.last()
        self.assertEqual(packet.identifier, 7)

    def test_identifier_of_a_pending_request_is_not_reused_after_wrapping(self):
        self.directory = self.make(config(servers=(FIRST,)))
        slow = self.directory.authenticate("slow", "pw")
        slow_id = self.last()[0].identifier
        for i in range(600):
            d = self.directory.authenticate(f"user{i}", "pw")
            self.assertNotEqual(self.last()[0].identifier, slow_id)
            self.answer(codec.ACCESS_REJECT)
            self.failureResultOf(d, InvalidCredentials)
        first = codec.decode_request(self.port.written[0][0], SECRET)
        self.receive(response(codec.ACCESS_ACCEPT, first), FIRST)
        self.assertEqual(self.successResultOf(slow).username, "slow")

    def test_cancellation_stops_retransmissions_and_frees_the_identifier(self):
        self.directory = self.make(config(servers=(FIRST,)))
        d = self.directory.authenticate("alice", "pw")
        packet, addr = self.last()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(60)
        self.assertEqual(len(self.port.written), 1)
        # A late reply to the cancelled request is dropped, not delivered.
        self.receive(response(codec.ACCESS_ACCEPT, packet), addr)
        self.assertEqual(self.directory.dropped, 1)
        # All 256 identifiers are free again.
        for i in range(256):
            self.directory.authenticate(f"user{i}", "pw")
        self.assertEqual(len({p.identifier for p, _ in self.sent()[1:]}), 256)

    def test_empty_password_fails_without_sending_anything(self):
        error = self.failureResultOf(self.directory.authenticate("alice", ""),
                                     InvalidCredentials).value
        self.assertEqual(error.reason, Reason.EMPTY_PASSWORD)
        self.assertEqual(self.port.written, [])

    def test_password_over_128_octets_fails_without_sending_anything(self):
        self.failureResultOf(self.directory.authenticate("alice", "x" * 129), InvalidCredentials)
        self.assertEqual(self.port.written, [])
        self.directory.authenticate("alice", "x" * 128)
        packet, _ = self.last()
        self.assertEqual(codec.decrypt_password(packet.get(codec.USER_PASSWORD), SECRET,
                                                packet.authenticator), b"x" * 128)

    def test_stop_fails_pending_logins_and_closes_the_socket(self):
        d = self.directory.authenticate("alice", "pw")
        stopped = self.directory.stop()
        self.failureResultOf(d, DirectoryUnavailable)
        self.successResultOf(stopped)
        self.assertTrue(self.port.closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.failureResultOf(self.directory.authenticate("bob", "pw"), DirectoryUnavailable)

    def test_binds_loopback_when_every_server_is_local(self):
        self.make(config(servers=(("127.0.0.1", 1812),)))
        self.assertEqual(self.port.interface, "127.0.0.1")
        self.make(config(servers=(("127.0.0.1", 1812), FIRST)))
        self.assertEqual(self.port.interface, "0.0.0.0")

    def test_the_same_server_listed_twice_is_refused_at_start(self):
        directory = RadiusDirectory(config(servers=(FIRST, FIRST)), self.reactor)
        self.assertRaises(ValueError, directory.start)

    def test_ipv6_server_gets_its_own_socket(self):
        directory = self.make(config(servers=(("0:0::1", 1812), FIRST)))
        interfaces = sorted(p.interface for p in self.reactor.ports)
        self.assertEqual(interfaces, ["0.0.0.0", "::1"])
        d = directory.authenticate("alice", "pw")
        [v6] = [p for p in self.reactor.ports if p.interface == "::1"]
        [(data, addr)] = v6.written
        self.assertEqual(addr, ("::1", 1812))
        packet = codec.decode_request(data, SECRET)
        v6.protocol.datagramReceived(response(codec.ACCESS_ACCEPT, packet), ("::1", 1812, 0, 0))
        self.successResultOf(d)


class MsChapUpstreamTests(UpstreamFakes):
    """MS-CHAPv2 through the upstream (issue 11, part 2), on the same fakes."""

    CHALLENGE = bytes(range(16))
    RESPONSE = bytes((7, 0)) + bytes(range(100, 148))

    def check(self):
        return self.directory.authenticate_mschap("alice", self.CHALLENGE, self.RESPONSE)

    def test_the_mschap_attributes_are_forwarded_as_received_without_a_password(self):
        self.check()
        packet, _ = self.last()
        self.assertIsNone(packet.get(codec.USER_PASSWORD))
        self.assertEqual(packet.get(codec.USER_NAME), b"alice")
        self.assertEqual(dict(packet.vendor_attributes(311)),
                         {codec.MS_CHAP_CHALLENGE: self.CHALLENGE,
                          codec.MS_CHAP2_RESPONSE: self.RESPONSE})

    def test_the_keys_are_decrypted_with_the_upstream_secret_and_our_authenticator(self):
        from mfaserver.auth.model import MPPE_RECV_KEY, MPPE_SEND_KEY, MSCHAP2_SUCCESS, Secret
        d = self.check()
        packet, _ = self.last()
        send, recv = bytes(range(16)), bytes(range(16, 32))
        success = b"\x07S=" + b"A" * 40
        self.answer(codec.ACCESS_ACCEPT, [
            (codec.CLASS, b"vpn"),
            codec.vsa(311, codec.MS_CHAP2_SUCCESS, success),
            codec.vsa(311, codec.MS_MPPE_SEND_KEY, codec.encrypt_salted(
                send, SECRET, packet.authenticator, b"\x80\x01")),
            codec.vsa(311, codec.MS_MPPE_RECV_KEY, codec.encrypt_salted(
                recv, SECRET, packet.authenticator, b"\x80\x02"))])
        principal = self.successResultOf(d)
        self.assertEqual(principal.attributes, (
            ("Class", b"vpn"), (MSCHAP2_SUCCESS, success), (MPPE_SEND_KEY, send),
            (MPPE_RECV_KEY, recv)))
        self.assertIsInstance(principal.attributes[2][1], Secret)
        self.assertNotIn(send.hex(), repr(principal))

    def test_an_accept_without_mschap2_success_is_not_trusted(self):
        d = self.check()
        self.answer(codec.ACCESS_ACCEPT, [(codec.CLASS, b"vpn")])
        self.failureResultOf(d, DirectoryUnavailable)

    def test_mschap_error_codes_name_the_reason(self):
        for error, reason in [(b"\x07E=691 R=0 C=00 V=3", Reason.BAD_PASSWORD),
                              (b"\x07E=648 R=0", Reason.PASSWORD_EXPIRED),
                              (b"\x07E=647 R=0", Reason.ACCOUNT_DISABLED),
                              (b"\x07E=649 R=0", Reason.LOGON_NOT_PERMITTED),
                              (b"\x07E=999 R=0", Reason.BAD_PASSWORD)]:
            d = self.check()
            self.answer(codec.ACCESS_REJECT, [codec.vsa(311, codec.MS_CHAP_ERROR, error)])
            self.assertEqual(self.failureResultOf(d, InvalidCredentials).value.reason, reason)
