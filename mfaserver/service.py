"""The composition root: the only place that builds the daemon from a Config.

`make_service(config, reactor)` wires store, directories, gateways, second
factors, core, RADIUS listener and web listener together and returns a
Twisted service; `run_daemon` runs it in the foreground with logging, signal
handling (SIGTERM/SIGINT stop, SIGHUP reloads) and an exit code.

`MfaDaemon.reload` applies a changed config file: every key applies at once
(directories and gateways are rebuilt and swapped in; logins in flight finish
on the objects they started with) except the few in `NEEDS_RESTART`, each of
which is logged by name. The README's reload table lists them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import signal
from urllib.parse import urlsplit

from twisted.application import internet
from twisted.application import service as tservice
from twisted.internet import defer, task
from twisted.internet import error as terror
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mfaserver.addresses import is_loopback
from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.interfaces import Directory, MsChapNotConfigured, StoreUnavailable
from mfaserver.auth.pipeline import Authenticator
from mfaserver.config import ClientIndex, Config, ConfigError, load_config, open_store
from mfaserver.directory.chain import DirectoryChain
from mfaserver.directory.local import LocalDirectory
from mfaserver.factors import METHODS
from mfaserver.factors.push import (NumberMatchingPushFactor, PushFactor, PushTransactions,
                                    push_limit)
from mfaserver.factors.token import TokenFactor
from mfaserver.processes import (SharedTcpPort, SharedUdpPort, Supervisor, die_with_parent,
                                 worker_name)
from mfaserver.radius.protocol import ListenerSettings, RadiusAuthProtocol
from mfaserver.radius.replay import ReplyCache
from mfaserver.store.cluster import ClusterState
from mfaserver.store.threaded import PerThreadStore, ThreadedStore
from mfaserver.workers import WorkerThreads

log = Logger(namespace="mfaserver.service")

# Config keys that a reload cannot apply: sockets bound and files opened at
# start, the log observer, and the web routes of the phone-call callbacks
# ("voice" is [voice] being added or removed; its own keys apply live).
NEEDS_RESTART = ("server.state_dir", "server.log_format", "server.workers", "radius.listen",
                 "radius.port", "voice")
# Sections none of whose keys a reload can apply: the HTTP listener, the store's
# engine and connection, the node's name.
NEEDS_RESTART_SECTIONS = ("web", "store", "cluster")

# Database threads (and connections) per node on PostgreSQL: logins/s is flat from
# 2 to 8 on two cores (scripts/benchlib/pg_access_bench.py), so this is a budget.
POSTGRESQL_THREADS = 4
# A cluster node asks the database what notifications may have missed this often
# (issue #12: "a poll every 2-3 s"), and sweeps expired rows every few polls.
CLUSTER_POLL_SECONDS = 2.5
SWEEP_EVERY_TICKS = 4

# Seconds after which replaced gateways and wake-up senders are closed: longer
# than any request of theirs may take (SMTP's timeout is at most 120 s).
RETIRE_AFTER = 130.0

# Where a field's name differs from its key in the file.
_KEY_NAMES = {"directory.backends": "directory.backend"}


def clients_by_name(config: Config) -> dict:
    return {client.name: client for client in config.radius.clients}


def listener_settings(config: Config) -> ListenerSettings:
    return ListenerSettings(
        find_client=ClientIndex(config.radius.clients).find,
        reject_delay=config.radius.reject_delay,
        status_server=config.radius.status_server,
    )


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (or sections of one).

    A section added or removed is its own name ("voice"); an array of tables
    is one key ("radius.clients"). Values are compared, never shown.
    """
    if (dataclasses.is_dataclass(old) and type(old) is type(new)
            and not isinstance(old, type)):
        keys = []
        for field in dataclasses.fields(old):
            if not prefix and field.name in ("path", "warnings"):
                continue
            key = f"{prefix}.{field.name}" if prefix else field.name
            keys += changed_keys(getattr(old, field.name), getattr(new, field.name),
                                 _KEY_NAMES.get(key, key))
        return keys
    return [] if old == new else [prefix]


def needs_restart(key: str) -> bool:
    """Whether a change of ``key`` takes effect only after a restart."""
    return key in NEEDS_RESTART or any(key == section or key.startswith(section + ".")
                                       for section in NEEDS_RESTART_SECTIONS)


class LifecycleService(tservice.Service):
    """Runs ``part.start()`` when the daemon starts and ``part.stop()`` when it stops.

    For worker threads and directories that hold threads, processes or sockets.
    """

    def __init__(self, part):
        self.part = part

    def startService(self):
        super().startService()
        self.part.start()

    def stopService(self):
        super().stopService()
        return self.part.stop()


class CallOnStop(tservice.Service):
    """Calls ``stop()`` when the daemon stops (closes pending pushes, HTTP pools...)."""

    def __init__(self, stop):
        self._stop = stop

    def stopService(self):
        super().stopService()
        return self._stop()


def _close_all(parts) -> Deferred[None]:
    """Close the pooled connections of ``parts`` (those that keep any); a failure is logged."""
    d = defer.gatherResults([defer.maybeDeferred(part.close) for part in parts
                             if hasattr(part, "close")], consumeErrors=True)
    d.addErrback(lambda f: log.failure("could not close {parts}", f, parts=parts))
    return d.addCallback(lambda _: None)


def _stop_all(parts) -> Deferred[None]:
    """Stop ``parts`` (each a ``stop()`` that may return a Deferred); a failure is logged."""
    d = defer.gatherResults([defer.maybeDeferred(part.stop) for part in parts],
                            consumeErrors=True)
    d.addErrback(lambda f: log.failure("could not stop {parts}", f, parts=parts))
    return d.addCallback(lambda _: None)


class _InFlightDirectory:
    """A `Directory` that counts its logins in progress, so that a directory
    replaced on reload is stopped only once it has finished them."""

    def __init__(self, directory: Directory, mschap=None):
        self.directory = directory
        self.mschap = mschap  # the part that checks MS-CHAPv2 (MsChapDirectory), or None
        self.in_flight = 0
        self._idle: list[Deferred] = []

    def authenticate(self, username: str, password: str) -> Deferred:
        d = defer.maybeDeferred(self.directory.authenticate, username, password)
        self.in_flight += 1
        d.addBoth(self._ended)
        return d

    def authenticate_mschap(self, username: str, challenge: bytes, response: bytes) -> Deferred:
        if self.mschap is None:
            return defer.fail(MsChapNotConfigured())
        d = defer.maybeDeferred(self.mschap.authenticate_mschap, username, challenge, response)
        self.in_flight += 1
        d.addBoth(self._ended)
        return d

    def _ended(self, result):
        self.in_flight -= 1
        if not self.in_flight:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)
        return result

    def when_idle(self) -> Deferred[None]:
        if not self.in_flight:
            return defer.succeed(None)
        waiter = Deferred()
        self._idle.append(waiter)
        return waiter


class Directories:
    """The directory the core asks (one, or a chain), and the parts that need
    starting and stopping (LDAP workers, upstream RADIUS sockets).

    ``build(config)`` returns a new directory and its parts (not started).
    On reload, `start_new` starts a set built from the changed config and
    `replace` swaps it in; the old set finishes its logins in flight, then
    stops. (Gateways are retired differently, after a fixed time: each of
    their requests has its own deadline.)
    """

    def __init__(self, build, config: Config):
        self.build = build
        self.current, self._parts = build(config)
        self._retiring: list[Deferred] = []

    def start(self) -> None:
        self.start_new(self._parts)

    def stop(self) -> Deferred[None]:
        retiring = defer.gatherResults(self._retiring, consumeErrors=True)
        return defer.gatherResults([_stop_all(self._parts), retiring]).addCallback(
            lambda _: None)

    @staticmethod
    def start_new(parts: list) -> None:
        """Start ``parts``; if one cannot start, stop those started and raise."""
        started = []
        try:
            for part in parts:
                part.start()
                started.append(part)
        except Exception:
            _stop_all(started)
            raise

    def replace(self, new: _InFlightDirectory, parts: list) -> _InFlightDirectory:
        """Use ``new`` (its ``parts`` started) from now on; retire the old directory."""
        old, old_parts = self.current, self._parts
        self.current, self._parts = new, parts
        retired = old.when_idle().addCallback(lambda _: _stop_all(old_parts))
        self._retiring.append(retired)
        retired.addBoth(lambda _: self._retiring.remove(retired))
        return new


class PeriodicSync:
    """The LDAP directory sync, run every ``interval`` seconds ([directory.sync]).

    The first run comes one interval after the start: a sync can disable
    users, so a restart does not run one. A run takes seconds for a large
    directory (phone parsing, one write transaction), so it runs on its own
    thread with its own store connection; logins go on meanwhile. A failed
    run changes nothing and is logged.
    """

    def __init__(self, daemon: "MfaDaemon", reactor, thread, interval: float):
        self._daemon = daemon
        self._reactor = reactor
        self.thread = thread
        self.interval = interval
        self._loop: task.LoopingCall | None = None
        self._started = False

    def start(self) -> None:
        self._started = True
        self.thread.start()
        self._schedule()

    def stop(self) -> None:
        self._started = False
        self._unschedule()
        self.thread.stop()

    def set_interval(self, interval: float) -> None:
        """Run every ``interval`` seconds from now on (0: not at all); the same
        interval keeps its phase."""
        if interval == self.interval:
            return
        self.interval = interval
        if self._started:
            self._unschedule()
            self._schedule()

    def _schedule(self) -> None:
        if self.interval > 0:
            self._loop = task.LoopingCall(self.run_once)
            self._loop.clock = self._reactor
            self._loop.start(self.interval, now=False)

    def _unschedule(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def run_once(self) -> Deferred[None]:
        """One sync; fires when it has finished (the loop waits for it)."""
        daemon = self._daemon
        # The database is the one the daemon opened: [server] state_dir
        # changes only with a restart.
        d = self.thread.run(_sync_in_thread, daemon.config, daemon.started_with,
                            self._reactor.seconds())
        d.addCallbacks(self._done, self._failed)
        return d

    def _done(self, report) -> None:
        log.info("directory {summary}", summary=report.summary())
        for line in report.details(numbers=False):
            log.warn("directory sync: {problem}", problem=line)

    def _failed(self, failure) -> None:
        log.error("directory sync failed, nothing changed: {error}",
                  error=failure.getErrorMessage())


def _sync_in_thread(config: Config, started_with: Config, now: float):
    from mfaserver.directory.sync import run_sync
    with open_store(started_with, create=False) as store:
        return run_sync(config, store, now)


class MfaDaemon(tservice.MultiService):
    """The running daemon; `reload()` applies a changed config file without a restart.

    ``threads(reactor, count, name)`` makes the pools for blocking calls
    (`WorkerThreads`; tests pass one that runs calls at once).
    """

    def __init__(self, config: Config, reactor, *, threads=WorkerThreads, worker: int = 0):
        super().__init__()
        self._threads = threads
        # [server] workers: this process's number (0: the one that starts the others).
        self.worker = worker
        self.node_name = worker_name(config.cluster.node_name, worker)
        self.config = config
        # What the keys in NEEDS_RESTART are compared with on every reload.
        self.started_with = config
        self._reactor = reactor
        self.store = open_store(config)
        # SQLite: one database thread; its calls are short, and one connection must
        # not be used by two threads at once. PostgreSQL: a few threads with a
        # connection each, as its calls wait for the network (sync psycopg in
        # threads, not async psycopg: scripts/benchlib/pg_access_bench.py).
        # Hashing gets one thread per core.
        # On PostgreSQL the statements every login makes (and a push's answer) are
        # sent by the reactor itself, not through a thread (store/pg_reactor.py).
        self._logins = None
        if config.store.backend == "postgresql":
            db_thread = threads(reactor, POSTGRESQL_THREADS, "mfaserver-db")
            self._per_thread = PerThreadStore(self.store.another)
            threaded_over = self._per_thread
            self._logins = self.store.reactor_logins(reactor, db_thread.run)
        else:
            db_thread = threads(reactor, 1, "mfaserver-db")
            self._per_thread = None
            threaded_over = self.store
        self.hash_threads = threads(reactor, max(2, os.cpu_count() or 2), "mfaserver-hash")
        for workers in (db_thread, self.hash_threads):
            LifecycleService(workers).setServiceParent(self)
        self.threaded = ThreadedStore(threaded_over, db_thread.run, logins=self._logins)
        timer = internet.TimerService(1.0, self._check_outside_changes)
        timer.clock = reactor
        timer.setServiceParent(self)
        self.local = LocalDirectory(self.threaded.lookup_password, self.hash_threads.run)
        self.directories = Directories(self._directories, config)
        LifecycleService(self.directories).setServiceParent(self)
        self._cluster = config.store.backend == "postgresql"
        if self._cluster:
            # Every node on this database is one cluster: States are answered on any.
            from mfaserver.store.shared import SharedChallenges
            self.challenges = SharedChallenges(self.threaded.run_state, reactor,
                                               ttl=config.mfa.challenge_timeout)
        else:
            self.challenges = ChallengeRegistry(reactor, ttl=config.mfa.challenge_timeout)
        self.gateways = self._gateways(config)
        # Replaced gateways and wake-up senders, closed once their requests have
        # ended: (the timer, the parts).
        self._retired: list[tuple] = []
        CallOnStop(self._close_gateways).setServiceParent(self)
        self.vapid = None
        self.wake = self._wake_notifier(config)
        if self._cluster:
            self.push = self._shared_push(config, db_thread)
        else:
            self.push = PushTransactions(reactor, wake=self.wake)
        CallOnStop(self._stop_push).setServiceParent(self)
        self.push_limit = push_limit(reactor, config.push.max_per_user_per_hour)
        self.sms = self._sms(config, self.gateways)
        self.voice = self._voice(config)
        # The Twilio auth token the call callbacks are checked with.
        self._voice_token = (config.gateways.twilio.auth_token if self.voice is not None
                             else None)
        self.authenticator = Authenticator(
            self.directories.current, self.threaded, self.challenges, config.mfa, reactor,
            methods=METHODS, factors=self._factors(config, self.sms),
            reply_rules=config.radius.reply, alerts=self._alerts(config, self.gateways),
            clients=clients_by_name(config))
        self.cache = ReplyCache(reactor, ttl=config.radius.response_cache_seconds)
        self.protocol = RadiusAuthProtocol(listener_settings(config),
                                           self.authenticator.authenticate, self.cache, reactor)
        if config.server.workers > 1:
            listener = SharedUdpPort(config.radius.port, self.protocol,
                                     interface=config.radius.listen, reactor=reactor)
        else:
            listener = internet.UDPServer(config.radius.port, self.protocol,
                                          interface=config.radius.listen, maxPacketSize=8192,
                                          reactor=reactor)
        listener.setServiceParent(self)
        if config.web is not None:
            self._web_listener(config).setServiceParent(self)
        self.sync: PeriodicSync | None = None
        self._schedule_sync(config)

    def _check_outside_changes(self):
        """Drop what the store caches if an admin command changed the file."""
        d = self.threaded.check_outside_changes()
        d.addErrback(_unless_store_unavailable, "could not check the store for changes")
        return d

    # --- building the parts ----------------------------------------------------------------

    def _gateways(self, config: Config) -> dict:
        """Every delivery channel the config names, by name ("console" always)."""
        from mfaserver.gateways.console import ConsoleGateway
        gateways = {"console": ConsoleGateway()}
        if config.gateways.twilio is not None:
            from mfaserver.gateways.twilio import TwilioGateway
            gateways["twilio"] = TwilioGateway(config.gateways.twilio, self._reactor)
        if config.gateways.http is not None:
            from mfaserver.gateways.http import HttpGateway
            gateways["http"] = HttpGateway(config.gateways.http, self._reactor)
        if config.gateways.smtp is not None:
            from mfaserver.gateways.smtp import SmtpGateway
            gateways["smtp"] = SmtpGateway(config.gateways.smtp, self._reactor)
        return gateways

    def _retire(self, parts: list) -> None:
        """Close ``parts`` (replaced gateways, a replaced wake-up sender) once the
        requests they have in flight are over: each has its own deadline, and
        RETIRE_AFTER is longer than any."""
        entry: tuple = ()

        def close():
            self._retired.remove(entry)
            _close_all(parts)
        entry = (self._reactor.callLater(RETIRE_AFTER, close), parts)
        self._retired.append(entry)

    def _close_gateways(self) -> Deferred[None]:
        """Shutdown: close the gateways in use and those retired meanwhile."""
        parts = set(self.gateways.values())
        if self.voice is not None:
            parts.add(self.voice.gateway)   # kept until the restart if [voice] went
        for call, retired in self._retired:
            call.cancel()
            parts.update(retired)
        self._retired.clear()
        return _close_all(parts)

    def _alerts(self, config: Config, gateways: dict):
        """Where fraud reports go ([alerts])."""
        gateway = gateways[config.alerts.gateway]
        if config.alerts.gateway == "smtp":
            return gateway.alerts_to(config.alerts.to)
        return gateway

    def _wake_notifier(self, config: Config):
        """The wake-up sender for [push] notify, or None (devices only long-poll)."""
        if config.push.notify == "none":
            return None
        from mfaserver.gateways.wake import WakeNotifier
        webpush = None
        if config.push.notify == "webpush":
            from mfaserver.gateways.webpush import WebPushSender
            subject = config.push.vapid_subject or config.web.public_url
            if not subject.startswith(("https://", "mailto:")):
                log.warn("[push] vapid_subject: {subject} is neither https:// nor mailto:;"
                         " Apple's push service refuses such wake-ups (set vapid_subject)",
                         subject=subject)
            # The push service may hold a wake-up as long as a login waits.
            webpush = WebPushSender(self._reactor, self._vapid_key(), subject=subject,
                                    timeout=config.push.notify_timeout,
                                    ttl=int(config.mfa.timeout))
        return WakeNotifier(self._reactor, self.threaded.list_devices,
                            kinds=frozenset({config.push.notify}),
                            timeout=config.push.notify_timeout, webpush=webpush)

    def _vapid_key(self):
        """The Web Push (VAPID) key pair, made once in state_dir and kept there."""
        if self.vapid is None:
            from mfaserver.gateways.webpush import VapidKey
            self.vapid = VapidKey.load_or_create(self.started_with.server.state_dir
                                                 / "vapid.pem")
        return self.vapid

    def _vapid_public_key(self) -> str | None:
        """What the web authenticator subscribes with, while wake-ups go by Web Push."""
        if self.config.push.notify != "webpush":
            return None
        return self._vapid_key().public_key

    def _shared_push(self, config: Config, db_thread):
        """The cluster's push registry, its LISTEN connection and the one timer that
        polls (the safety net behind notifications) and sweeps what expired."""
        from mfaserver.factors.push_shared import SharedPushTransactions
        from mfaserver.store.listen import Listener
        push = SharedPushTransactions(
            self.threaded.run_state, self._reactor, node=self.node_name,
            limits=lambda: (self.config.mfa.max_pending_per_user, self.config.mfa.max_pending),
            wake=self.wake, sent_by_reactor=self._logins)
        listener = Listener(config.store.dsn, self._reactor, db_thread.run,
                            deliver=self._cluster_notified, reconnected=self._cluster_poll)
        LifecycleService(listener).setServiceParent(self)
        self._cluster_ticks = 0
        timer = internet.TimerService(CLUSTER_POLL_SECONDS, self._cluster_tick)
        timer.clock = self._reactor
        timer.setServiceParent(self)
        return push

    def _cluster_tick(self) -> Deferred[None]:
        """Every CLUSTER_POLL_SECONDS: what notifications missed; now and then, remove
        expired challenges and pushes (any node may, whichever comes first)."""
        self._cluster_ticks += 1
        work = [self._cluster_poll()]
        if self._cluster_ticks % SWEEP_EVERY_TICKS == 0:
            swept = self.threaded.run_state(ClusterState.sweep, self._reactor.seconds())
            swept.addErrback(lambda f: log.debug("cluster sweep failed: {error}",
                                                 error=f.getErrorMessage()))
            work.append(swept)
        return defer.gatherResults(work).addCallback(lambda _: None)

    def _cluster_notified(self, payload: str) -> None:
        self.push.notified(payload)
        if self.voice is not None:
            self.voice.notified(payload)

    def _cluster_poll(self) -> Deferred[None]:
        work = [self.push.poll()]
        if self.voice is not None:
            work.append(self.voice.poll())
        return defer.gatherResults(work).addCallback(lambda _: None)

    def _stop_push(self) -> Deferred[None]:
        """Close the pending pushes (their logins get no reply) and drop queued wake-ups."""
        self.push.close_all()
        if self.wake is None:
            return defer.succeed(None)
        self.wake.stop()
        return _close_all([self.wake])

    def _sms(self, config: Config, gateways: dict):
        """The SMS codes for [sms], or None when SMS is not configured."""
        if config.sms is None:
            return None
        from mfaserver.factors.sms import SharedSmsCodes, SmsCodes
        settings = dict(code_length=config.sms.code_length, ttl=config.sms.code_ttl,
                        per_user_per_hour=config.sms.max_per_user_per_hour,
                        per_number_per_hour=config.sms.max_per_number_per_hour)
        gateway = gateways[config.sms.gateway]
        if self._cluster:
            return SharedSmsCodes(gateway, self._reactor, self.threaded.run_state, **settings)
        return SmsCodes(gateway, self._reactor, **settings)

    def _voice(self, config: Config):
        """The phone calls for [voice], or None."""
        if config.voice is None:
            return None
        from mfaserver import passwords
        from mfaserver.factors.voice import VoiceCalls
        threaded, hash_threads = self.threaded, self.hash_threads

        async def check_pin(user: str, pin: str) -> bool:
            encoded = await threaded.get_pin_hash(user)
            if encoded is None:
                return False
            return await hash_threads.run(passwords.verify_password, pin, encoded)

        settings = dict(
            public_url=config.web.public_url, pin_mode=config.voice.pin,
            check_pin=lambda user, pin: Deferred.fromCoroutine(check_pin(user, pin)),
            per_user_per_hour=config.voice.max_per_user_per_hour,
            per_number_per_hour=config.voice.max_per_number_per_hour,
            max_calls=config.mfa.max_pending, on_late=self._late_keys)
        gateway = self.gateways[config.voice.gateway]
        if self._cluster:
            from mfaserver.factors.voice_shared import SharedVoiceCalls
            calls = SharedVoiceCalls(gateway, self._reactor, run=self.threaded.run_state,
                                     node=self.node_name, report_fraud=self._report_phone_fraud,
                                     max_per_user=config.mfa.max_pending_per_user, **settings)
            CallOnStop(calls.close_all).setServiceParent(self)
            return calls
        return VoiceCalls(gateway, self._reactor, **settings)

    def _factors(self, config: Config, sms) -> dict:
        """The second factors, by method name. The stateful ones (codes sent, pushes
        and calls pending) are the daemon's own and kept across reloads."""
        from mfaserver.factors.voice import VoiceFactor
        factors = {
            "totp": TokenFactor(self.threaded, self._reactor,
                                totp_window=config.mfa.totp_window,
                                hotp_look_ahead=config.mfa.hotp_look_ahead),
            "push": self._push_factor(config),
        }
        if sms is not None:
            factors["sms"] = sms
        if self.voice is not None:
            factors["phone"] = VoiceFactor(self.voice, self._reactor,
                                           report_fraud=self._report_phone_fraud)
        return factors

    def _push_factor(self, config: Config):
        if self._cluster:
            from mfaserver.factors.push_shared import (SharedNumberMatchingPushFactor,
                                                       SharedPushFactor)
            kind = (SharedNumberMatchingPushFactor if config.push.number_matching
                    else SharedPushFactor)
        else:
            kind = NumberMatchingPushFactor if config.push.number_matching else PushFactor
        return kind(self.push, self.push_limit)

    def _report_phone_fraud(self, user: str, client: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self.authenticator.report_fraud(user, client, "phone"))

    def _late_keys(self, user: str, client: str, keys: str) -> None:
        """Keys pressed on a call after its login ended: audited, and a "0" still
        reports fraud (too late to stop the sign-in, not to block the account)."""
        audit_late_call(self.threaded, self._reactor, user)
        if keys == "0":
            self._report_phone_fraud(user, client)

    def _web_listener(self, config: Config):
        """The HTTP listener ([web]), with TLS when configured."""
        from mfaserver.web.server import make_site, tls_options
        web = config.web
        site = make_site(self._web_app(config), web)
        if config.server.workers > 1:
            if web.tls_certificate is not None:
                from twisted.protocols.tls import TLSMemoryBIOFactory
                site = TLSMemoryBIOFactory(tls_options(web.tls_certificate, web.tls_key),
                                           False, site)
            return SharedTcpPort(web.port, site, interface=web.listen, reactor=self._reactor)
        if web.tls_certificate is not None:
            return internet.SSLServer(web.port, site, tls_options(web.tls_certificate, web.tls_key),
                                      interface=web.listen, reactor=self._reactor)
        return internet.TCPServer(web.port, site, interface=web.listen, reactor=self._reactor)

    def _web_app(self, config: Config):
        """The HTTP side: /health, the device API, the web authenticator, the portal
        (with [portal]) and the voice callbacks."""
        from mfaserver import passwords
        from mfaserver.web.app import add_app_routes
        from mfaserver.web.context import WebContext
        from mfaserver.web.devices import DeviceApi
        from mfaserver.web.pages import add_asset_routes
        from mfaserver.web.server import WebApp
        app = WebApp(self._reactor)
        add_asset_routes(app)
        context = WebContext(
            clock=self._reactor, store=self.threaded, authenticator=self.authenticator,
            push=self.push,
            hash_password=lambda text: self.hash_threads.run(passwords.hash_password, text),
            public_url=config.web.public_url, vapid_public_key=self._vapid_public_key,
            portal_settings=lambda: self.config.portal,
            enrollment_minutes=lambda: self.config.push.enrollment_minutes)
        add_app_routes(app, context)
        if config.portal is not None:
            from mfaserver.web.portal import add_portal_routes
            add_portal_routes(app, context)
        DeviceApi(self.threaded, self.push, self._reactor,
                  report_fraud=lambda user, client: Deferred.fromCoroutine(
                      self.authenticator.report_fraud(user, client, "push")),
                  audit=self.threaded.record_audit,
                  loopback_push=_on_loopback(config.web.public_url)).add_routes(app)
        if self.voice is not None:
            from mfaserver.web.voice import add_voice_routes
            # The token as configured now: a reload may rotate it.
            add_voice_routes(app, self.voice, auth_token=lambda: self._voice_token,
                             public_url=config.web.public_url)
        return app

    def _directories(self, config: Config) -> tuple[_InFlightDirectory, list]:
        """The directory (or chain of them) named by [directory] backend, and its
        parts to start and stop."""
        directories, parts = [], []
        for name in config.directory.backends:
            if name == "local":
                directories.append(self.local)
                continue
            if name == "ldap":
                ldap = config.directory.ldap
                if ldap.client == "ldap3":
                    from mfaserver.directory.ldap import Ldap3Directory as LdapDirectory
                else:
                    from mfaserver.directory.libldap import LibldapDirectory as LdapDirectory
                directory = LdapDirectory(ldap, self._reactor,
                                          groups=[rule.group for rule in config.radius.reply],
                                          processes=ldap.processes or None)
            else:
                from mfaserver.directory.radius import RadiusDirectory
                directory = RadiusDirectory(config.directory.radius, self._reactor)
            parts.append(directory)
            directories.append(directory)
        chain = directories[0] if len(directories) == 1 else DirectoryChain(directories)
        mschap = next((d for d in directories if hasattr(d, "authenticate_mschap")), None)
        ad = config.directory.ad
        if ad is not None and ad.mschap == "ntlm_auth":
            # Active Directory without NPS: winbind's ntlm_auth checks MS-CHAPv2.
            from mfaserver.directory.ntlm import NtlmAuthDirectory
            mschap = NtlmAuthDirectory(ad, self._reactor)
            parts.append(mschap)
        return _InFlightDirectory(chain, mschap), parts

    def _schedule_sync(self, config: Config) -> None:
        """Run the LDAP sync every [directory.sync] interval, if LDAP is configured."""
        interval = config.directory.sync.interval if config.directory.ldap is not None else 0
        if self.worker != 0:
            return      # one sync per host: worker 0's
        if self.sync is None:
            if interval <= 0:
                return
            self.sync = PeriodicSync(self, self._reactor,
                                     self._threads(self._reactor, 1, "mfaserver-sync"), interval)
            LifecycleService(self.sync).setServiceParent(self)
        self.sync.set_interval(interval)

    def stopService(self):
        d = super().stopService()
        d.addBoth(self._close_stores)
        return d

    def _close_stores(self, result):
        # After the database threads have stopped.
        if self._logins is not None:
            self._logins.close()
        if self._per_thread is not None:
            self._per_thread.close()
        self.store.close()
        return result

    # --- reload ----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply it; keep running on the old one if it
        is broken or its parts cannot be built or started."""
        if not self.running:
            log.warn("not running: reload ignored")
            return False
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return False
        try:
            built = self._build(new)
        except Exception as e:
            log.failure("reload failed, keeping the running configuration: {error}",
                        error=f"{type(e).__name__}: {e}")
            return False
        self._swap(new, built)
        later = [key for key in changed_keys(self.started_with, new) if needs_restart(key)]
        for key in later:
            log.warn("{key} changed: takes effect after a restart", key=key)
        for warning in new.warnings:
            log.warn("{config}: {warning}", config=str(new.path), warning=warning)
        log.info("configuration reloaded: {n} RADIUS clients" + (
            "; {later} changes need a restart" if later else ""),
            n=len(new.radius.clients), later=len(later))
        return True

    def _build(self, new: Config) -> dict:
        """Everything ``new`` needs that the running daemon lacks, built (and the new
        directory started); nothing running is touched yet. Raises if a part
        cannot be built or started, having stopped what it started."""
        changed = changed_keys(self.config, new)

        def touched(*sections: str) -> bool:
            return any(key == s or key.startswith(s + ".") for key in changed for s in sections)

        built: dict = {"gateways": self.gateways, "wake": self.wake, "directory": None}
        if touched("gateways"):
            built["gateways"] = self._gateways(new)
        if touched("push.notify", "push.notify_timeout"):
            built["wake"] = self._wake_notifier(new)
        built["sms"] = self.sms
        if new.sms is None:
            built["sms"] = None
        elif self.sms is None:
            built["sms"] = self._sms(new, built["gateways"])
        built["alerts"] = self._alerts(new, built["gateways"])
        built["factors"] = self._factors(new, built["sms"])
        # Last, as it is the one step that starts something.
        if touched("directory.backend", "directory.ldap", "directory.radius", "radius.reply",
                   "directory.ad"):
            directory, parts = self.directories.build(new)
            self.directories.start_new(parts)
            built["directory"] = (directory, parts)
        return built

    def _swap(self, new: Config, built: dict) -> None:
        """Put what `_build` made in place and apply the new settings: nothing here
        can fail, so a reload applies all of it or (from `_build`) none."""
        self.config = new
        if self.voice is not None and new.voice is not None:
            self.voice.gateway = built["gateways"][new.voice.gateway]
        if built["gateways"] is not self.gateways:
            # [voice] removed: the calls go on, on their gateway, until the restart.
            in_use = {self.voice.gateway} if self.voice is not None else set()
            self._retire([g for g in self.gateways.values() if g not in in_use])
            self.gateways = built["gateways"]
        if built["directory"] is not None:
            self.authenticator.directory = self.directories.replace(*built["directory"])
        if built["wake"] is not self.wake:
            # The old sender finishes what it has queued; it is closed later.
            if self.wake is not None:
                self._retire([self.wake])
            self.wake = self.push.wake = built["wake"]
        self.push_limit.set_per_hour(new.push.max_per_user_per_hour)
        self.sms = built["sms"]
        if self.sms is not None:
            self.sms.gateway = self.gateways[new.sms.gateway]
            self.sms.code_length = new.sms.code_length
            self.sms.ttl = new.sms.code_ttl
            self.sms.set_limits(new.sms.max_per_user_per_hour, new.sms.max_per_number_per_hour)
        if self.voice is not None and new.voice is not None:
            self._voice_token = new.gateways.twilio.auth_token
            self.voice.pin_mode = new.voice.pin
            self.voice.max_calls = new.mfa.max_pending
            if self._cluster:
                self.voice.max_per_user = new.mfa.max_pending_per_user
            self.voice.set_limits(new.voice.max_per_user_per_hour,
                                  new.voice.max_per_number_per_hour)
        self.protocol.settings = listener_settings(new)
        self.cache.ttl = new.radius.response_cache_seconds
        self.challenges.ttl = new.mfa.challenge_timeout
        auth = self.authenticator
        auth.policy = new.mfa
        auth.reply_rules = new.radius.reply
        auth.clients = clients_by_name(new)
        auth.alerts = built["alerts"]
        auth.pending.max_per_user = new.mfa.max_pending_per_user
        auth.pending.max_total = new.mfa.max_pending
        auth.set_factors(built["factors"])
        self._schedule_sync(new)


def _on_loopback(public_url: str | None) -> bool:
    """True for a web listener reached on this host only (tests, a demo)."""
    return bool(public_url) and is_loopback(urlsplit(public_url).hostname or "")


def _unless_store_unavailable(failure, message: str) -> None:
    """Log ``failure`` with its traceback, unless it is the store's outage, which
    `ThreadedStore` has reported once already."""
    if not failure.check(StoreUnavailable):
        log.failure(message, failure)


def audit_late_call(threaded: ThreadedStore, clock, user: str) -> None:
    """Keys pressed on a call after its login ended: refused, and audited."""
    from mfaserver.auth.model import AuditEntry
    d = threaded.record_audit(AuditEntry(
        time=clock.seconds(), user=user, client="", nas_ip=None, calling_station_id=None,
        factor="phone", outcome="refused", reason="late_answer"))
    d.addErrback(lambda f: log.failure("could not audit a late call answer", f))


def return_large_buffers_to_the_os() -> None:
    """Keep the daemon's memory flat after password checks.

    Each scrypt check allocates 16 MiB. glibc raises its mmap threshold when
    the first such buffer is freed and then keeps later ones in the heap, so
    every hashing thread would pin 16 MiB for good. A fixed threshold keeps
    them mmapped, hence returned when freed. Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def tune_garbage_collection() -> None:
    """Keep the cyclic garbage collector from pausing the reactor for long.

    Thousands of held logins are hundreds of thousands of live objects;
    CPython's default thresholds then run full collections over all of them
    every time the heap grows by a quarter, each a pause of up to half a
    second (measured at 10,000 pending pushes). Objects that exist at start
    (modules, config) are frozen out of collection, and young collections,
    which catch the short-lived cycles (Failures, tracebacks), run less
    often, so fewer long-lived objects are scanned again and again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def _reload(daemon: MfaDaemon, supervisor: Supervisor | None) -> None:
    daemon.reload()
    if supervisor is not None:
        supervisor.reload()


def make_service(config: Config, reactor, worker: int = 0) -> MfaDaemon:
    """Build the daemon for ``config`` on ``reactor`` (not started)."""
    return MfaDaemon(config, reactor, worker=worker)


def run_daemon(config: Config, log_format: str | None = None, worker: int = 0) -> int:
    """Run in the foreground until SIGTERM/SIGINT; return the process exit code.

    ``worker``: 0 for ``mfaserver run``, which starts workers 1 .. N-1 itself
    with [server] workers = N (`mfaserver.processes`)."""
    from twisted.internet import reactor

    from mfaserver.logs import start_logging

    if worker:
        die_with_parent()
    log_writer = start_logging(log_format or config.server.log_format, clock=reactor,
                               node=worker_name(config.cluster.node_name, worker))
    return_large_buffers_to_the_os()
    for warning in config.warnings:
        log.warn("{config}: {warning}", config=str(config.path), warning=warning)
    try:
        daemon = make_service(config, reactor, worker)
        daemon.startService()
        supervisor = None
        if worker == 0 and config.server.workers > 1:
            # Started once this process listens and has made what the workers
            # share (the state directory, the VAPID key).
            supervisor = Supervisor(reactor, config.server.workers, config_path=config.path,
                                    log_format=log_format)
            supervisor.setServiceParent(daemon)
    except terror.CannotListenError as e:
        log.critical("cannot listen on {listen}:{port}: {error}", listen=e.interface,
                     port=e.port, error=str(e.socketError))
        return 1
    except Exception as e:
        log.critical("cannot start: {error}", error=f"{type(e).__name__}: {e}")
        return 1
    log.info("RADIUS listening on {host}:{port}", host=config.radius.listen,
             port=config.radius.port)
    if config.web is not None:
        log.info("HTTP listening on {host}:{port}", host=config.web.listen, port=config.web.port)
    tune_garbage_collection()
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", log_writer.flush)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(_reload, daemon,
                                                                   supervisor))
    log.info("mfaserver started with {config}", config=str(config.path))
    reactor.run()
    log.info("mfaserver stopped")
    log_writer.flush()
    return 0
