"""MS-CHAPv2 with an out-of-band factor (issue 11, part 2), without I/O.

The test client's MS-CHAPv2 maths against RFC 2759 §9.2 and RFC 3079 §3.5.3;
RFC 2548 salt encryption; the RADIUS edge reading MS-CHAPv2 into the core's
request and writing MS-CHAP2-Success and the MPPE keys for the NAS; and the
core's decisions over fakes on a Clock.
"""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import InvalidCredentials
from mfaserver.auth.model import (MPPE_RECV_KEY, MPPE_SEND_KEY, MSCHAP2_SUCCESS, Account,
                                  AuthRequest, Decision, MsChapV2, Outcome, Principal, Reason,
                                  Secret, Verdict)
from mfaserver.auth.pipeline import (MSG_MSCHAP_NO_APPROVAL, MSG_MSCHAP_NOT_CONFIGURED,
                                     MSG_MSCHAP_NUMBER_MATCHING, Authenticator)
from mfaserver.config import MfaConfig
from mfaserver.factors import METHODS
from mfaserver.radius import codec, translate
from mfaserver.testing import (MemoryAccountStore, MemoryApprovalFactor, MemoryCodeFactor,
                               MemoryConfirmedApprovalFactor, MemoryDirectory)
import mschap
from mschap import MsChapLogin

T0 = 1_700_000_010.0
SECRET = b"nas-secret-0123456789"

# RFC 2759 §9.2
USER = "User"
PASSWORD = "clientPass"
AUTH_CHALLENGE = bytes.fromhex("5B5D7C7D7B3F2F3E3C2C602132262628")
PEER_CHALLENGE = bytes.fromhex("21402324255E262A28295F2B3A337C7E")


# --- The test client's maths -------------------------------------------------------------------

def test_rfc2759_test_vectors():
    assert mschap.challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, USER) == \
        bytes.fromhex("D02E4386BCE91226")
    assert mschap.nt_password_hash(PASSWORD) == bytes.fromhex("44EBBA8D5312B8D611474411F56989AE")
    response = mschap.nt_response(AUTH_CHALLENGE, PEER_CHALLENGE, USER, PASSWORD)
    assert response == bytes.fromhex("82309ECD8D708B5EA08FAA3981CD83544233114A3D85D6DF")
    assert mschap.hash_nt_password_hash(mschap.nt_password_hash(PASSWORD)) == \
        bytes.fromhex("41C00C584BD2D91C4017A2A12FA59F3F")
    assert mschap.authenticator_response(PASSWORD, response, PEER_CHALLENGE, AUTH_CHALLENGE,
                                         USER) == b"S=407A5589115FD0D6209F510FE9C04566932CDA56"


def test_rfc3079_128_bit_key_vectors():
    # RFC 3079 §3.5.3: MasterKey FDECE3717A8C838CB388E527AE3CDD31 gives this send key.
    response = mschap.nt_response(AUTH_CHALLENGE, PEER_CHALLENGE, USER, PASSWORD)
    assert mschap.server_keys(PASSWORD, response)[0] == \
        bytes.fromhex("8B7CDC149B993A1BA118CB153F56DCCB")


# --- RFC 2548 salt encryption ------------------------------------------------------------------

def test_salt_encryption_round_trips_and_hides_the_length():
    authenticator = bytes(range(16))
    for key in (b"", bytes(16), os.urandom(16), os.urandom(32), os.urandom(100)):
        hidden = codec.encrypt_salted(key, SECRET, authenticator, b"\x81\x02")
        assert hidden[:2] == b"\x81\x02"
        assert (len(hidden) - 2) % 16 == 0
        assert codec.decrypt_salted(hidden, SECRET, authenticator) == key


def test_salt_encryption_depends_on_secret_authenticator_and_salt():
    key = bytes(range(16))
    a = codec.encrypt_salted(key, SECRET, bytes(16), b"\x80\x01")
    assert a != codec.encrypt_salted(key, SECRET, bytes(16), b"\x80\x02")
    assert a != codec.encrypt_salted(key, b"other", bytes(16), b"\x80\x01")
    assert a != codec.encrypt_salted(key, SECRET, b"\x01" * 16, b"\x80\x01")
    assert a[2:] != key.ljust(32, b"\0")[:len(a) - 2]


def test_salt_encryption_refuses_bad_salts_and_lengths():
    import pytest
    with pytest.raises(ValueError):
        codec.encrypt_salted(b"k", SECRET, bytes(16), b"\x01\x02")  # high bit clear
    with pytest.raises(ValueError):
        codec.decrypt_salted(b"\x80\x01" + bytes(15), SECRET, bytes(16))
    # A wrong secret: the length octet usually points beyond the data.
    hidden = codec.encrypt_salted(bytes(16), SECRET, bytes(16), b"\x80\x01")
    failures = 0
    for i in range(50):
        try:
            codec.decrypt_salted(hidden, b"wrong-%d" % i, bytes(16))
        except ValueError:
            failures += 1
    assert failures > 30


# --- The RADIUS edge ---------------------------------------------------------------------------

def _request(attributes, authenticator=None) -> codec.Packet:
    authenticator = authenticator or os.urandom(16)
    data = codec.encode_request(codec.ACCESS_REQUEST, 7, authenticator, SECRET, attributes)
    return codec.decode_request(data, SECRET)


def _mschap_attributes(login: MsChapLogin):
    return [(codec.USER_NAME, login.username.encode()),
            codec.vsa(311, codec.MS_CHAP_CHALLENGE, login.authenticator_challenge),
            codec.vsa(311, codec.MS_CHAP2_RESPONSE, login.response_attribute())]


def test_an_mschapv2_request_reaches_the_core_as_opaque_octets():
    login = MsChapLogin.new("alice", "pw")
    packet = _request(_mschap_attributes(login))
    request = translate.to_auth_request(packet, "vpn", SECRET, ("192.0.2.1", 1812))
    assert (request.pap, request.protocol, request.password) == (False, "mschapv2", None)
    assert request.mschap == MsChapV2(login.authenticator_challenge, login.response_attribute())
    assert login.response_attribute().hex() not in repr(request)


def test_other_protocols_are_named_for_the_log_and_carry_no_mschap():
    login = MsChapLogin.new("alice", "pw")
    cases = {
        "mschapv1": [codec.vsa(311, codec.MS_CHAP_CHALLENGE, bytes(8)),
                     codec.vsa(311, codec.MS_CHAP_RESPONSE, bytes(50))],
        "eap": [(codec.EAP_MESSAGE, b"\x02\x01\x00\x0a\x01alice")],
        "leap": [(codec.EAP_MESSAGE, b"\x02\x01\x00\x0a\x11\x01\x00\x08" + bytes(2))],
        "chap": [(codec.CHAP_PASSWORD, bytes(17))],
        # MS-CHAPv2 without its challenge, or with a short response.
        "mschapv2 (malformed)": [codec.vsa(311, codec.MS_CHAP2_RESPONSE,
                                           login.response_attribute())],
    }
    for protocol, attributes in cases.items():
        packet = _request([(codec.USER_NAME, b"alice"), *attributes])
        request = translate.to_auth_request(packet, "vpn", SECRET, ("192.0.2.1", 1812))
        assert (request.protocol, request.mschap, request.pap) == (protocol, None, False)


def test_an_accept_carries_success_and_the_keys_encrypted_for_the_nas():
    login = MsChapLogin.new("alice", "pw")
    packet = translate.reply_context(_request(_mschap_attributes(login)))
    send, recv = login.server_keys()
    decision = Decision.accept(factor="push", attributes=[
        ("Class", b"vpn"), (MSCHAP2_SUCCESS, login.expected_success()),
        (MPPE_SEND_KEY, Secret(send)), (MPPE_RECV_KEY, Secret(recv))])
    data = translate.encode_decision(decision, packet, SECRET)
    reply = codec.decode_response(data, SECRET, packet.authenticator)
    ms = dict(reply.vendor_attributes(311))
    assert ms[codec.MS_CHAP2_SUCCESS] == login.expected_success()
    assert codec.decrypt_salted(ms[codec.MS_MPPE_SEND_KEY], SECRET, packet.authenticator) == send
    assert codec.decrypt_salted(ms[codec.MS_MPPE_RECV_KEY], SECRET, packet.authenticator) == recv
    # Each key has its own salt, with the high bit set.
    salts = {ms[codec.MS_MPPE_SEND_KEY][:2], ms[codec.MS_MPPE_RECV_KEY][:2]}
    assert len(salts) == 2 and all(s[0] & 0x80 for s in salts)
    assert reply.get(codec.CLASS) == b"vpn"
    assert send.hex() not in repr(decision) and recv.hex() not in repr(decision)


def test_a_reject_carries_no_mschap_items():
    packet = translate.reply_context(_request(_mschap_attributes(MsChapLogin.new("a", "b"))))
    data = translate.encode_decision(Decision.reject(Reason.FACTOR_DENIED), packet, SECRET)
    reply = codec.decode_response(data, SECRET, packet.authenticator)
    assert reply.vendor_attributes(311) == []


# --- The core ----------------------------------------------------------------------------------

class MemoryMsChapDirectory(MemoryDirectory):
    """A directory that "checks" MS-CHAPv2 with the test client's maths."""

    def __init__(self, passwords: dict[str, str]):
        super().__init__(passwords)
        self.passwords = passwords
        self.calls: list[str] = []

    def authenticate_mschap(self, username: str, challenge: bytes, response: bytes):
        self.calls.append(username)
        password = self.passwords.get(username)
        login = MsChapLogin(username, password or "", challenge, response[2:18], response[0])
        if password is None or login.nt_response != response[26:]:
            return defer.fail(InvalidCredentials(Reason.BAD_PASSWORD, "wrong"))
        send, recv = login.server_keys()
        return defer.succeed(Principal(username, attributes=(
            (MSCHAP2_SUCCESS, login.expected_success()),
            (MPPE_SEND_KEY, Secret(send)), (MPPE_RECV_KEY, Secret(recv)))))


class CoreTests(SynchronousTestCase):
    """alice has push and TOTP, bob only TOTP, carol push with number matching,
    dave a phone; erin nothing."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = MemoryAccountStore()
        for name in ("alice", "bob", "carol", "dave", "erin"):
            self.store.add(Account(name=name, phone=None, blocked=False, failures=0,
                                   locked_until=None))
        self.push = MemoryApprovalFactor(METHODS[0], self.clock, users={"alice"})
        self.totp = MemoryCodeFactor(METHODS[1], users={"alice", "bob"})
        self.phone = MemoryApprovalFactor(METHODS[3], self.clock, users={"dave"})
        self.directory = MemoryMsChapDirectory({n: f"{n}-pw" for n in
                                                ("alice", "bob", "carol", "dave", "erin")})
        self.auth = self._authenticator(MfaConfig(timeout=60.0),
                                        {"push": self.push, "totp": self.totp,
                                         "phone": self.phone})

    def _authenticator(self, policy, factors):
        return Authenticator(self.directory, self.store, ChallengeRegistry(self.clock), policy,
                             self.clock, methods=METHODS, factors=factors)

    def start(self, username: str, password: str | None = None, auth=None) -> defer.Deferred:
        login = MsChapLogin.new(username, password or f"{username}-pw")
        request = AuthRequest(client_name="vpn", username=username, password=None, pap=False,
                              mschap=MsChapV2(login.authenticator_challenge,
                                              login.response_attribute()),
                              protocol="mschapv2")
        self.login = login
        return (auth or self.auth).authenticate(request)

    def test_a_right_response_is_held_for_the_push_then_gets_success_and_keys(self):
        d = self.start("alice")
        self.assertNoResult(d)
        self.assertEqual(len(self.push.requests), 1)
        self.push.answer(Verdict.APPROVE)
        decision = self.successResultOf(d)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "push"))
        items = dict(decision.attributes)
        self.assertEqual(items[MSCHAP2_SUCCESS], self.login.expected_success())
        self.assertEqual((items[MPPE_SEND_KEY], items[MPPE_RECV_KEY]), self.login.server_keys())

    def test_a_wrong_password_is_rejected_without_a_push(self):
        decision = self.successResultOf(self.start("alice", "wrong"))
        self.assertEqual((decision.outcome, decision.reason), (Outcome.REJECT,
                                                               Reason.BAD_PASSWORD))
        self.assertEqual(self.push.requests, [])

    def test_a_denied_push_rejects(self):
        d = self.start("alice")
        self.push.answer(Verdict.DENY)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_DENIED)

    def test_an_unanswered_push_times_out(self):
        d = self.start("alice")
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(d).reason, Reason.FACTOR_TIMEOUT)

    def test_a_phone_user_gets_a_call(self):
        d = self.start("dave")
        self.phone.answer(Verdict.APPROVE)
        self.assertEqual(self.successResultOf(d).factor, "phone")

    def test_a_user_with_only_a_code_factor_is_refused_with_a_clear_message(self):
        decision = self.successResultOf(self.start("bob"))
        self.assertEqual((decision.outcome, decision.reason, decision.reply_message),
                         (Outcome.REJECT, Reason.NO_APPROVAL_FACTOR, MSG_MSCHAP_NO_APPROVAL))
        self.assertEqual(decision.attributes, ())

    def test_methods_outside_mschap_methods_are_not_used(self):
        auth = self._authenticator(MfaConfig(timeout=60.0, mschap_methods=("phone",)),
                                   {"push": self.push, "phone": self.phone})
        decision = self.successResultOf(self.start("alice", auth=auth))
        self.assertEqual(decision.reason, Reason.NO_APPROVAL_FACTOR)
        self.assertEqual(self.push.requests, [])

    def test_push_with_number_matching_is_refused_for_mschap(self):
        matching = MemoryConfirmedApprovalFactor(METHODS[0], self.clock, users={"carol"})
        auth = self._authenticator(MfaConfig(timeout=60.0), {"push": matching})
        decision = self.successResultOf(self.start("carol", auth=auth))
        self.assertEqual((decision.reason, decision.reply_message),
                         (Reason.NO_APPROVAL_FACTOR, MSG_MSCHAP_NUMBER_MATCHING))
        self.assertEqual(matching.pending_count(), 0)

    def test_an_unenrolled_user_is_rejected_unless_the_policy_allows(self):
        self.assertEqual(self.successResultOf(self.start("erin")).reason, Reason.NOT_ENROLLED)

    def test_a_directory_without_mschap_refuses_clearly(self):
        auth = Authenticator(MemoryDirectory({"alice": "pw"}), self.store,
                             ChallengeRegistry(self.clock), MfaConfig(), self.clock,
                             methods=METHODS, factors={"push": self.push})
        decision = self.successResultOf(self.start("alice", auth=auth))
        self.assertEqual((decision.reason, decision.reply_message),
                         (Reason.MSCHAP_NOT_CONFIGURED, MSG_MSCHAP_NOT_CONFIGURED))

    def test_other_protocols_are_refused_with_a_log_line(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            for protocol in ("mschapv1", "leap", "eap"):
                d = self.auth.authenticate(AuthRequest(client_name="vpn", username="alice",
                                                       password=None, pap=False,
                                                       protocol=protocol))
                self.assertEqual(self.successResultOf(d).reason, Reason.NOT_PAP)
        finally:
            globalLogPublisher.removeObserver(events.append)
        logged = [e.get("protocol") for e in events if "protocol" in e]
        self.assertEqual(logged, ["mschapv1", "leap", "eap"])
        self.assertEqual(self.push.requests, [])


# --- ntlm_auth (Active Directory without NPS) --------------------------------------------------

class FakeProcessReactor(task.Clock):
    """IReactorProcess + IReactorTime: records children; the test plays them."""

    def __init__(self):
        super().__init__()
        self.children: list[tuple] = []
        self.killed: list[str] = []

    def spawnProcess(self, protocol, executable, args, env=None, **kw):
        reactor = self

        class Process:
            def signalProcess(self, signal):
                reactor.killed.append(signal)

        self.children.append((protocol, executable, args, env))
        return Process()

    def finish(self, output: bytes, code: int = 0, index: int = -1) -> None:
        from twisted.internet.error import ProcessDone, ProcessTerminated
        from twisted.python.failure import Failure
        protocol = self.children[index][0]
        protocol.outReceived(output)
        protocol.processEnded(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(code)))


class NtlmAuthTests(SynchronousTestCase):

    def setUp(self):
        from mfaserver.directory.ntlm import NtlmAuthDirectory
        from mfaserver.directory.settings import AdConfig
        self.reactor = FakeProcessReactor()
        self.directory = NtlmAuthDirectory(
            AdConfig(mschap="ntlm_auth", ntlm_auth="/usr/bin/ntlm_auth", domain="EXAMPLE",
                     timeout=5, max_processes=2), self.reactor)
        self.login = MsChapLogin.new("alice", "alice-pw")

    def check(self, username="EXAMPLE\\alice", login=None):
        login = login or self.login
        return self.directory.authenticate_mschap(username, login.authenticator_challenge,
                                                  login.response_attribute())

    def nt_key(self, password="alice-pw") -> bytes:
        hash_hash = mschap.hash_nt_password_hash(mschap.nt_password_hash(password))
        return b"NT_KEY: " + hash_hash.hex().upper().encode() + b"\n"

    def test_the_command_line_is_freeradius_s(self):
        self.check()
        [(_, executable, args, env)] = self.reactor.children
        hashed = mschap.challenge_hash(self.login.peer_challenge,
                                       self.login.authenticator_challenge, "alice")
        self.assertEqual(executable, "/usr/bin/ntlm_auth")
        self.assertEqual(args, ["/usr/bin/ntlm_auth", "--request-nt-key", "--allow-mschapv2",
                                "--username=alice", f"--challenge={hashed.hex()}",
                                f"--nt-response={self.login.nt_response.hex()}",
                                "--domain=EXAMPLE"])
        self.assertNotIn("alice-pw", " ".join(args))

    def test_nt_key_gives_the_success_and_keys_the_client_expects(self):
        d = self.check()
        self.reactor.finish(self.nt_key())
        principal = self.successResultOf(d)
        items = dict(principal.attributes)
        self.assertEqual(principal.username, "alice")
        self.assertEqual(items[MSCHAP2_SUCCESS], self.login.expected_success())
        self.assertEqual((items[MPPE_SEND_KEY], items[MPPE_RECV_KEY]), self.login.server_keys())
        self.assertIsInstance(items[MPPE_SEND_KEY], Secret)

    def test_a_refusal_names_the_ntstatus(self):
        for output, reason in [
                (b"Logon failure (0xc000006d)\n", Reason.BAD_PASSWORD),
                (b"NT_STATUS_PASSWORD_EXPIRED (0xc0000071)\n", Reason.PASSWORD_EXPIRED),
                (b"NT_STATUS_ACCOUNT_DISABLED (0xC0000072)\n", Reason.ACCOUNT_DISABLED),
                (b"NT_STATUS_ACCOUNT_LOCKED_OUT (0xc0000234)\n", Reason.ACCOUNT_LOCKED),
                (b"something else\n", Reason.BAD_PASSWORD)]:
            d = self.check()
            self.reactor.finish(output, code=1)
            self.assertEqual(self.failureResultOf(d, InvalidCredentials).value.reason, reason)

    def test_an_nt_key_with_a_failing_exit_code_is_not_trusted(self):
        d = self.check()
        self.reactor.finish(self.nt_key(), code=1)
        self.failureResultOf(d, InvalidCredentials)

    def test_a_hung_ntlm_auth_is_killed_after_the_timeout(self):
        from mfaserver.auth.interfaces import DirectoryUnavailable
        d = self.check()
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.failureResultOf(d, DirectoryUnavailable)
        self.assertEqual(self.reactor.killed, ["KILL"])
        self.reactor.finish(b"", code=9)  # the kill's processEnded: no second result
        self.assertEqual(self.directory.running, 0)

    def test_at_most_max_processes_run_at_once(self):
        from mfaserver.auth.interfaces import DirectoryUnavailable
        first, second = self.check(), self.check()
        self.failureResultOf(self.check(), DirectoryUnavailable)
        self.reactor.finish(self.nt_key(), index=0)
        self.successResultOf(first)
        self.check()
        self.assertEqual(len(self.reactor.children), 3)
        self.assertNoResult(second)

    def test_names_ntlm_auth_could_take_for_an_option_are_refused(self):
        self.failureResultOf(self.check("-x"), InvalidCredentials)
        self.failureResultOf(self.check("EXAMPLE\\"), InvalidCredentials)
        self.assertEqual(self.reactor.children, [])

    def test_the_server_maths_match_rfc2759_and_rfc3079(self):
        from mfaserver.directory import ntlm
        response = mschap.nt_response(AUTH_CHALLENGE, PEER_CHALLENGE, USER, PASSWORD)
        hash_hash = bytes.fromhex("41C00C584BD2D91C4017A2A12FA59F3F")
        hashed = ntlm.challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, USER)
        self.assertEqual(ntlm.authenticator_response(hash_hash, response, hashed),
                         b"S=407A5589115FD0D6209F510FE9C04566932CDA56")
        self.assertEqual(ntlm.mppe_keys(hash_hash, response)[0],
                         bytes.fromhex("8B7CDC149B993A1BA118CB153F56DCCB"))


# --- The config --------------------------------------------------------------------------------

def test_the_config_keys_of_the_issue(tmp_path):
    import pytest
    from mfaserver.config import ConfigError, load_config
    from mfaserver.directory.settings import AdConfig
    base = '[[radius.clients]]\nname = "vpn"\naddress = "127.0.0.1"\nsecret = "%s"\n' % (
        "x" * 32)
    path = tmp_path / "mfaserver.toml"
    path.write_text(base)
    cfg = load_config(path)
    assert (cfg.mfa.mschap_methods, cfg.directory.ad) == (("push", "phone"), None)
    path.write_text(base + '[mfa]\nmschap_methods = ["phone"]\n'
                    '[directory.ad]\nmschap = "ntlm_auth"\ndomain = "EXAMPLE"\n')
    cfg = load_config(path)
    assert cfg.mfa.mschap_methods == ("phone",)
    assert cfg.directory.ad == AdConfig(mschap="ntlm_auth", domain="EXAMPLE")
    path.write_text(base + '[mfa]\nmschap_methods = ["totp"]\n')
    with pytest.raises(ConfigError, match="mschap_methods"):
        load_config(path)
    path.write_text(base + '[directory.ad]\nmschap = "ntlm_auth"\nntlm_auth = "ntlm_auth"\n')
    with pytest.raises(ConfigError, match="absolute"):
        load_config(path)
