"""The composition root: a daemon built from a config, started and stopped, each optional
section on and off, and reload section by section. In memory: a MemoryReactorClock with
UDP, calls to the blocking pools run at once, a real SQLite store in a temporary folder."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase

import ldap_server
from fake_twilio import twilio_signature
from mfaserver import passwords
from mfaserver.auth.model import AuthRequest, Outcome, Reason, TokenKind
from mfaserver.config import load_config
from mfaserver.factors import oath
from mfaserver.factors.push import NumberMatchingPushFactor, PushFactor
from mfaserver.factors.sms import SmsCodes
from mfaserver.factors.voice import VoiceFactor
from mfaserver.service import (RETIRE_AFTER, Directories, MfaDaemon, PeriodicSync,
                               _InFlightDirectory, changed_keys, needs_restart)
from mfaserver.store import NewToken
from mfaserver.testing import MemoryDirectory

T0 = 1_700_000_010.0
SEED = bytes(range(20))
SECRET = "a-long-shared-secret-for-the-tests"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2

BASE = f"""
[server]
state_dir = "state"

[radius]
listen = "127.0.0.1"
port = 1812

[[radius.clients]]
name = "vpn"
address = "127.0.0.1"
secret = "{SECRET}"
"""

TWILIO = f"""
[gateways.twilio]
account_sid = "{ACCOUNT_SID}"
auth_token = "a-twilio-auth-token"
from_number = "+15550001111"
api_base = "http://127.0.0.1:9"
"""

WEB = """
[web]
listen = "127.0.0.1"
port = 8443
public_url = "http://127.0.0.1:8443"
"""

SMTP_ALERTS = """
[gateways.smtp]
host = "127.0.0.1"
sender = "mfa@example.org"
starttls = "none"

[alerts]
gateway = "smtp"
to = ["admins@example.org"]
"""

UPSTREAM = f"""
[directory]
backend = ["radius", "local"]

[directory.radius]
servers = ["127.0.0.1:1645"]
secret = "{SECRET}"
"""


class _UDPPort:
    def __init__(self, port: int, protocol, interface: str):
        self.port, self.protocol, self.interface = port, protocol, interface
        self.listening = True
        self.written: list[tuple[bytes, tuple]] = []

    def getHost(self):
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def write(self, data, addr=None):
        self.written.append((data, addr))

    def stopListening(self):
        self.listening = False
        self.protocol.doStop()

    def loseConnection(self):
        self.stopListening()


class UDPMemoryReactor(MemoryReactorClock):
    """MemoryReactorClock with listenUDP (the RADIUS listener, upstream RADIUS sockets)."""

    def __init__(self):
        super().__init__()
        self.udp: list[_UDPPort] = []
        self.refuse_udp = False     # listenUDP fails, as on a port in use

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if self.refuse_udp:
            raise CannotListenError(interface, port, OSError("address in use"))
        fake = _UDPPort(port, protocol, interface)
        protocol.makeConnection(fake)
        self.udp.append(fake)
        return fake


class InlineThreads:
    """`WorkerThreads` stand-in: each call runs at once, on the caller's thread."""

    def __init__(self, reactor, count: int, name: str):
        self.name = name
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def run(self, f, *args, **kwargs) -> defer.Deferred:
        return defer.execute(f, *args, **kwargs)


class DaemonHarness(SynchronousTestCase):
    """A daemon on a UDPMemoryReactor from BASE and the sections a test adds."""

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.reactor = UDPMemoryReactor()
        self.reactor.advance(T0)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, *sections: str) -> Path:
        path = self.dir / "mfaserver.toml"
        path.write_text(BASE + "".join(textwrap.dedent(s) for s in sections))
        return path

    def start(self, *sections: str) -> MfaDaemon:
        daemon = MfaDaemon(load_config(self.write(*sections)), self.reactor,
                           threads=InlineThreads)
        daemon.startService()
        self.addCleanup(self.stop, daemon)
        return daemon

    def stop(self, daemon: MfaDaemon) -> None:
        if daemon.running:
            self.successResultOf(daemon.stopService())

    def reload(self, daemon: MfaDaemon, *sections: str) -> bool:
        self.write(*sections)
        self.events.clear()
        return daemon.reload()

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def login(self, daemon: MfaDaemon, username: str, password: str):
        request = AuthRequest(client_name="vpn", username=username, password=password)
        return self.successResultOf(daemon.authenticator.authenticate(request))


class DaemonTests(DaemonHarness):

    # --- start and stop, each optional section on and off ---

    def test_the_embedded_default_listens_on_udp_only_and_stops_cleanly(self):
        daemon = self.start()
        [port] = self.reactor.udp
        self.assertEqual((port.interface, port.port), ("127.0.0.1", 1812))
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(set(daemon.authenticator.factors), {"totp", "push"})
        self.assertIsNone(daemon.wake)
        self.successResultOf(daemon.stopService())
        self.assertFalse(port.listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_local_user_logs_in_with_password_and_code_through_the_built_daemon(self):
        daemon = self.start()
        daemon.store.add_user("alice", password_hash=passwords.hash_password("pw-alice"),
                              phone=None, now=T0)
        daemon.store.add_token("alice", NewToken(kind=TokenKind.TOTP, secret=SEED), now=T0)
        code = oath.hotp(SEED, oath.totp_step(self.reactor.seconds()))
        decision = self.login(daemon, "alice", "pw-alice," + code)
        self.assertEqual((decision.outcome, decision.factor), (Outcome.ACCEPT, "totp"))
        self.assertEqual(self.login(daemon, "alice", "wrong," + code).reason,
                         Reason.BAD_PASSWORD)

    def test_web_section_adds_the_http_listener(self):
        daemon = self.start(WEB)
        [(port, site, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, "127.0.0.1"))
        self.successResultOf(daemon.stopService())

    def test_web_with_a_certificate_listens_with_tls(self):
        certs = ldap_server.make_certificates(self.dir / "certs")
        self.start(f"""
            [web]
            listen = "127.0.0.1"
            port = 8443
            tls_certificate = "{certs.cert_file}"
            tls_key = "{certs.key_file}"
            """)
        self.assertEqual(self.reactor.tcpServers, [])
        [(port, _, context, _, interface)] = self.reactor.sslServers
        self.assertEqual((port, interface), (8443, "127.0.0.1"))

    def test_sms_section_adds_the_sms_factor_on_its_gateway(self):
        daemon = self.start('[sms]\ngateway = "console"\n')
        sms = daemon.authenticator.factors["sms"]
        self.assertIsInstance(sms, SmsCodes)
        self.assertIs(sms.gateway, daemon.gateways["console"])

    def test_voice_section_adds_the_phone_factor_over_twilio(self):
        daemon = self.start(TWILIO, WEB, "[voice]\n")
        phone = daemon.authenticator.factors["phone"]
        self.assertIsInstance(phone, VoiceFactor)
        self.assertIs(phone.calls.gateway, daemon.gateways["twilio"])

    def test_number_matching_makes_push_a_confirmed_approval(self):
        daemon = self.start("[push]\nnumber_matching = true\n")
        self.assertIsInstance(daemon.authenticator.factors["push"], NumberMatchingPushFactor)

    def test_push_notify_builds_the_wake_up_sender(self):
        daemon = self.start('[push]\nnotify = "ntfy"\n')
        self.assertIsNotNone(daemon.wake)
        self.assertIs(daemon.push.wake, daemon.wake)

    def test_upstream_radius_directory_opens_its_socket_and_closes_it_on_stop(self):
        daemon = self.start(UPSTREAM)
        [upstream] = [port for port in self.reactor.udp if port.port == 0]
        self.successResultOf(daemon.stopService())
        self.assertFalse(upstream.listening)

    def test_smtp_alerts_go_to_the_smtp_gateway(self):
        daemon = self.start(SMTP_ALERTS)
        self.assertEqual(daemon.authenticator.alerts._recipients, ("admins@example.org",))

    # --- reload ---

    def test_reload_applies_new_clients(self):
        daemon = self.start()
        self.assertIsNone(daemon.protocol.settings.find_client("127.0.0.2"))
        self.assertTrue(self.reload(daemon, f"""
            [[radius.clients]]
            name = "wifi"
            address = "127.0.0.2"
            secret = "{SECRET}"
            """))
        self.assertEqual(daemon.protocol.settings.find_client("127.0.0.2").name, "wifi")
        self.assertIn("configuration reloaded: 2 RADIUS clients", self.logged())

    def test_reload_names_each_key_that_needs_a_restart_every_time(self):
        daemon = self.start()
        path = self.dir / "mfaserver.toml"
        path.write_text(BASE.replace("port = 1812", "port = 1813")
                        .replace('state_dir = "state"', 'state_dir = "state"\nlog_format = "json"'))
        for _ in range(2):
            self.events.clear()
            self.assertTrue(daemon.reload())
            logged = self.logged()
            self.assertIn("radius.port changed: takes effect after a restart", logged)
            self.assertIn("server.log_format changed: takes effect after a restart", logged)
            self.assertIn("configuration reloaded: 1 RADIUS clients; 2 changes need a restart",
                          logged)
        # Still on the old port.
        self.assertEqual([p.port for p in self.reactor.udp if p.listening], [1812])

    def test_a_broken_file_keeps_the_running_configuration(self):
        daemon = self.start()
        (self.dir / "mfaserver.toml").write_text("[radius\n")
        self.assertFalse(daemon.reload())
        self.assertEqual(daemon.protocol.settings.find_client("127.0.0.1").name, "vpn")

    def test_reload_applies_mfa_settings_to_the_core_and_the_token_factor(self):
        daemon = self.start()
        self.reload(daemon, "[mfa]\ntotp_window = 2\ntimeout = 90\nmax_pending = 7\n")
        auth = daemon.authenticator
        self.assertEqual((auth.policy.timeout, auth.pending.max_total), (90, 7))
        self.assertEqual(auth.factors["totp"].totp_window, 2)
        self.assertEqual(self.logged()[-1], "configuration reloaded: 1 RADIUS clients")

    def test_reload_adds_changes_and_removes_sms(self):
        daemon = self.start()
        self.reload(daemon, '[sms]\ngateway = "console"\n')
        sms = daemon.authenticator.factors["sms"]
        self.reload(daemon, TWILIO, '[sms]\ngateway = "twilio"\ncode_ttl = 120\n')
        self.assertIs(daemon.authenticator.factors["sms"], sms, "codes already sent stay valid")
        self.assertIs(sms.gateway, daemon.gateways["twilio"])
        self.assertEqual(sms.ttl, 120)
        self.reload(daemon)
        self.assertNotIn("sms", daemon.authenticator.factors)

    def test_reload_swaps_gateways_and_closes_the_old_ones_later(self):
        daemon = self.start(TWILIO, '[sms]\ngateway = "twilio"\n')
        old = daemon.gateways["twilio"]
        closed = []
        old.close = lambda: closed.append(True)
        self.reload(daemon, TWILIO.replace("+15550001111", "+15550002222"),
                    '[sms]\ngateway = "twilio"\n')
        self.assertIsNot(daemon.gateways["twilio"], old)
        self.assertIs(daemon.authenticator.factors["sms"].gateway, daemon.gateways["twilio"])
        self.assertEqual(closed, [])
        self.reactor.advance(RETIRE_AFTER)
        self.assertEqual(closed, [True])

    def test_reload_toggles_number_matching_and_the_push_limit(self):
        daemon = self.start()
        self.assertIsInstance(daemon.authenticator.factors["push"], PushFactor)
        self.reload(daemon, "[push]\nnumber_matching = true\nmax_per_user_per_hour = 2\n")
        self.assertIsInstance(daemon.authenticator.factors["push"], NumberMatchingPushFactor)
        self.assertEqual(daemon.push_limit.burst, 2)

    def test_reload_starts_and_stops_wake_ups(self):
        daemon = self.start()
        self.reload(daemon, '[push]\nnotify = "webhook"\n')
        self.assertIsNotNone(daemon.push.wake)
        self.assertEqual(daemon.wake.kinds, frozenset({"webhook"}))
        self.reload(daemon)
        self.assertIsNone(daemon.push.wake)

    def test_reload_applies_voice_settings_but_adding_voice_needs_a_restart(self):
        daemon = self.start(TWILIO, WEB, "[voice]\n")
        calls = daemon.voice
        self.reload(daemon, TWILIO, WEB, "[voice]\npin = true\nmax_per_user_per_hour = 2\n")
        self.assertTrue(calls.pin_mode)
        self.assertEqual(calls._per_user.burst, 2)
        self.assertEqual(self.logged()[-1], "configuration reloaded: 1 RADIUS clients")
        self.reload(daemon, TWILIO, WEB)
        self.assertIn("voice changed: takes effect after a restart", self.logged())

    def test_a_rotated_twilio_token_checks_the_call_callbacks_after_a_reload(self):
        daemon = self.start(TWILIO, WEB, "[voice]\n")
        [(_, site, _, _)] = self.reactor.tcpServers
        client = StubTreq(site.resource)
        url = "http://127.0.0.1:8443/v1/voice/call1/status"
        params = [("CallStatus", "completed")]

        def status(token: str) -> int:
            d = client.post(url, data=params, headers={
                "X-Twilio-Signature": twilio_signature(token, url, params)})
            return self.successResultOf(d).code

        self.assertEqual((status("a-twilio-auth-token"), status("a-rotated-token")), (204, 403))
        self.reload(daemon, TWILIO.replace("a-twilio-auth-token", "a-rotated-token"), WEB,
                    "[voice]\n")
        self.assertEqual((status("a-twilio-auth-token"), status("a-rotated-token")), (403, 204))
        self.assertNotIn("restart", " ".join(self.logged()))

    def test_reload_of_the_web_listener_needs_a_restart(self):
        daemon = self.start(WEB)
        self.reload(daemon, WEB.replace("8443", "8444"))
        self.assertIn("web.port changed: takes effect after a restart", self.logged())

    def test_reload_swaps_the_alert_sink(self):
        daemon = self.start()
        self.reload(daemon, SMTP_ALERTS)
        self.assertEqual(daemon.authenticator.alerts._recipients, ("admins@example.org",))

    def test_reload_rebuilds_the_directory_and_stops_the_old_one(self):
        daemon = self.start(UPSTREAM)
        old = daemon.authenticator.directory
        [old_socket] = [port for port in self.reactor.udp if port.port == 0]
        self.reload(daemon, UPSTREAM.replace("1645", "1646"))
        self.assertIsNot(daemon.authenticator.directory, old)
        self.assertFalse(old_socket.listening)
        self.assertTrue(self.reactor.udp[-1].listening)
        self.assertNotIn("restart", " ".join(self.logged()))

    def test_reload_of_the_reply_groups_rebuilds_the_directory(self):
        # LDAP looks up the reply rules' groups, so they are part of the directory.
        daemon = self.start(UPSTREAM)
        old = daemon.authenticator.directory
        self.reload(daemon, UPSTREAM, """
            [[radius.reply]]
            group = "cn=admins,dc=example,dc=org"
            attributes = { Filter-Id = "admins" }
            """)
        self.assertIsNot(daemon.authenticator.directory, old)


class ReloadFailureTests(DaemonHarness):
    """A reload applies all of a new file or none of it; nothing outlives the daemon."""

    def test_a_directory_that_cannot_start_leaves_everything_as_it_was(self):
        daemon = self.start(UPSTREAM, TWILIO)
        config, gateways = daemon.config, daemon.gateways
        directory = daemon.authenticator.directory
        self.reactor.refuse_udp = True
        self.assertFalse(self.reload(daemon, UPSTREAM.replace("1645", "1646"),
                                     TWILIO.replace("+15550001111", "+15550002222")))
        self.assertIn("reload failed, keeping the running configuration", self.logged()[0])
        self.flushLoggedErrors(CannotListenError)
        self.assertIs(daemon.config, config)
        self.assertIs(daemon.gateways, gateways)
        self.assertIs(daemon.authenticator.directory, directory)
        # The same change applies once the port is free.
        self.reactor.refuse_udp = False
        self.assertTrue(daemon.reload())
        self.assertIsNot(daemon.authenticator.directory, directory)
        self.assertIsNot(daemon.gateways, gateways)

    def test_a_reload_after_the_daemon_stopped_starts_nothing(self):
        daemon = self.start()
        self.successResultOf(daemon.stopService())
        self.assertFalse(self.reload(daemon, UPSTREAM))
        self.assertEqual([p.port for p in self.reactor.udp], [1812])

    def test_stopping_soon_after_a_reload_closes_the_replaced_gateways(self):
        daemon = self.start(TWILIO)
        closed = []
        daemon.gateways["twilio"].close = lambda: closed.append(True)
        self.reload(daemon, TWILIO.replace("+15550001111", "+15550002222"))
        self.successResultOf(daemon.stopService())
        self.assertEqual(closed, [True])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_removing_voice_keeps_the_calls_working_until_the_restart(self):
        daemon = self.start(TWILIO, WEB, "[voice]\n")
        calls, gateway = daemon.voice, daemon.gateways["twilio"]
        closed = []
        gateway.close = lambda: closed.append(True)
        self.reload(daemon, WEB)
        self.assertIn("voice changed: takes effect after a restart", self.logged())
        self.assertIs(daemon.authenticator.factors["phone"].calls, calls)
        self.assertIs(calls.gateway, gateway)
        self.reactor.advance(RETIRE_AFTER)
        self.assertEqual(closed, [])
        [(_, site, _, _)] = self.reactor.tcpServers
        url = "http://127.0.0.1:8443/v1/voice/call1/status"
        params = [("CallStatus", "completed")]
        d = StubTreq(site.resource).post(url, data=params, headers={
            "X-Twilio-Signature": twilio_signature("a-twilio-auth-token", url, params)})
        self.assertEqual(self.successResultOf(d).code, 204)

    def test_a_fraud_key_on_a_call_that_already_ended_still_blocks_the_user(self):
        daemon = self.start(TWILIO, WEB, "[voice]\n")
        daemon.store.add_user("alice", password_hash=None, phone=None, now=T0)
        daemon._late_keys("alice", "vpn", "0")
        self.assertTrue(daemon.store.get_user("alice").blocked)
        self.assertEqual([(r.outcome, r.reason) for r in daemon.store.recent_audit()],
                         [("block", "fraud_reported"), ("refused", "late_answer")])


class SyncScheduleTests(SynchronousTestCase):
    """The LDAP sync runs every interval, never at start, and keeps its phase."""

    def setUp(self):
        self.clock = task.Clock()
        self.runs: list[float] = []
        self.sync = PeriodicSync(None, self.clock, InlineThreads(self.clock, 1, "sync"), 600)
        self.sync.run_once = lambda: self.runs.append(self.clock.seconds())
        self.sync.start()
        self.addCleanup(self.sync.stop)

    def test_the_first_run_is_one_interval_after_the_start(self):
        self.clock.advance(599)
        self.assertEqual(self.runs, [])
        self.clock.pump([1, 600])
        self.assertEqual(self.runs, [600, 1200])

    def test_the_same_interval_keeps_its_phase_and_a_new_one_starts_now(self):
        self.clock.advance(300)
        self.sync.set_interval(600)
        self.clock.advance(300)
        self.assertEqual(self.runs, [600])
        self.sync.set_interval(0)
        self.clock.advance(3600)
        self.assertEqual(self.runs, [600])
        self.sync.set_interval(100)
        self.clock.advance(100)
        self.assertEqual(self.runs, [600, 4300])


class DirectorySwapTests(SynchronousTestCase):
    """A replaced directory finishes its logins in flight before it is stopped."""

    class Part:
        def __init__(self):
            self.started = self.stopped = 0

        def start(self):
            self.started += 1

        def stop(self):
            self.stopped += 1

    class Slow:
        def __init__(self):
            self.waiting: list[defer.Deferred] = []

        def authenticate(self, username, password):
            d = defer.Deferred()
            self.waiting.append(d)
            return d

    def test_the_old_directory_stops_once_its_logins_in_flight_have_ended(self):
        old_part, new_part = self.Part(), self.Part()
        slow = self.Slow()
        built = iter([(_InFlightDirectory(slow), [old_part]),
                      (_InFlightDirectory(MemoryDirectory({"bob": "pw"})), [new_part])])
        directories = Directories(lambda config: next(built), None)
        directories.start()
        in_flight = directories.current.authenticate("alice", "pw")
        new, parts = directories.build(None)
        directories.start_new(parts)
        new = directories.replace(new, parts)
        self.assertEqual((old_part.stopped, new_part.started), (0, 1))
        self.assertEqual(self.successResultOf(new.authenticate("bob", "pw")).username, "bob")
        slow.waiting[0].callback("alice's principal")
        self.assertEqual(self.successResultOf(in_flight), "alice's principal")
        self.assertEqual(old_part.stopped, 1)
        self.successResultOf(directories.stop())
        self.assertEqual(new_part.stopped, 1)


def test_changed_keys_names_keys_not_values(tmp_path):
    path = tmp_path / "mfaserver.toml"
    path.write_text(BASE)
    old = load_config(path)
    path.write_text(BASE.replace("port = 1812", "port = 1813") + TWILIO + WEB + "[voice]\n"
                    + "[mfa]\ntimeout = 30\n")
    new = load_config(path)
    assert changed_keys(old, new) == ["radius.port", "mfa.timeout", "gateways.twilio", "web",
                                      "voice"]
    path.write_text(BASE.replace(SECRET, SECRET + "-new") + '[directory]\nbackend = "local"\n')
    assert changed_keys(old, load_config(path)) == ["radius.clients"]


def test_which_keys_need_a_restart():
    for key in ("server.state_dir", "server.log_format", "radius.port", "radius.listen", "web",
                "web.port", "web.tls_key", "voice", "store.dsn", "store.backend",
                "cluster.node_name"):
        assert needs_restart(key), key
    for key in ("radius.clients", "radius.reply", "directory.ldap.servers", "voice.pin",
                "gateways.twilio.auth_token", "mfa.timeout", "push.notify", "sms", "alerts.to",
                "webhook"):
        assert not needs_restart(key), key


def test_a_directory_that_raises_is_a_failed_login_and_not_counted_in_flight():
    class Raising:
        def authenticate(self, username, password):
            raise RuntimeError("a bug")
    directory = _InFlightDirectory(Raising())
    failures = []
    directory.authenticate("alice", "pw").addErrback(failures.append)
    assert failures[0].check(RuntimeError)
    assert directory.in_flight == 0
