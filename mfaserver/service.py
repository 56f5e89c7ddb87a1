"""The composition root: the only place that builds the daemon from a Config.

`make_service(config, reactor)` wires store, directory, core and RADIUS
listener together and returns a Twisted service; `run_daemon` runs it in the
foreground with logging, signal handling (SIGTERM/SIGINT stop, SIGHUP
reloads) and an exit code.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal

from twisted.application import service as tservice
from twisted.internet import error as terror
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mfaserver.auth.challenges import ChallengeRegistry
from mfaserver.auth.pipeline import Authenticator
from mfaserver.config import ClientIndex, Config, ConfigError, load_config
from mfaserver.directory.chain import DirectoryChain
from mfaserver.directory.local import LocalDirectory
from mfaserver.radius.protocol import ListenerSettings, RadiusAuthProtocol
from mfaserver.radius.replay import ReplyCache
from mfaserver.store import Store
from mfaserver.store.threaded import ThreadedStore
from mfaserver.workers import WorkerThreads

log = Logger(namespace="mfaserver.service")


def clients_by_name(config: Config) -> dict:
    return {client.name: client for client in config.radius.clients}


def listener_settings(config: Config) -> ListenerSettings:
    return ListenerSettings(
        find_client=ClientIndex(config.radius.clients).find,
        reject_delay=config.radius.reject_delay,
        status_server=config.radius.status_server,
    )


class LifecycleService(tservice.Service):
    """Runs ``part.start()`` when the daemon starts and ``part.stop()`` when it stops.

    For worker threads and directories that hold threads or sockets.
    """

    def __init__(self, part):
        self.part = part

    def startService(self):
        super().startService()
        self.part.start()

    def stopService(self):
        super().stopService()
        return self.part.stop()


class ClosingService(tservice.Service):
    """Calls ``part.close()`` when the daemon stops (pooled HTTP connections)."""

    def __init__(self, part):
        self.part = part

    def stopService(self):
        super().stopService()
        return self.part.close()


class OutsideChanges(tservice.Service):
    """Every second, drop what the store caches if an admin command changed the file."""

    def __init__(self, threaded: ThreadedStore, reactor):
        self._loop = task.LoopingCall(self._check, threaded)
        self._loop.clock = reactor

    def _check(self, threaded: ThreadedStore):
        d = threaded.check_outside_changes()
        d.addErrback(lambda f: log.failure("could not check the store for changes", f))
        return d

    def startService(self):
        super().startService()
        self._loop.start(1.0, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()


class StoppingService(tservice.Service):
    """Calls ``stop()`` when the daemon stops (closes pending pushes, drops wake-ups)."""

    def __init__(self, stop):
        self._stop = stop

    def stopService(self):
        super().stopService()
        self._stop()


class WebListenerService(tservice.Service):
    """Serves the HTTP listener ([web]) while the daemon runs."""

    def __init__(self, reactor, settings, app):
        self._reactor = reactor
        self._settings = settings
        self.app = app
        self.port = None

    def startService(self):
        from mfaserver.web.server import listen
        failures = []
        # TCP and TLS endpoints listen at once: a port in use fails here, at start.
        listen(self._reactor, self._settings, self.app).addCallbacks(
            lambda port: setattr(self, "port", port), failures.append)
        if failures:
            failures[0].raiseException()
        super().startService()
        host = self.port.getHost()
        log.info("HTTP listening on {host}:{port}", host=host.host, port=host.port)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


class RadiusListenerService(tservice.Service):
    """Binds the UDP port on start, closes it on stop (abandoning undecided requests)."""

    def __init__(self, reactor, protocol: RadiusAuthProtocol, port: int, interface: str):
        self._reactor = reactor
        self.protocol = protocol
        self._port_number = port
        self._interface = interface
        self.port = None

    def startService(self):
        self.port = self._reactor.listenUDP(self._port_number, self.protocol,
                                            interface=self._interface, maxPacketSize=8192)
        super().startService()
        host = self.port.getHost()
        log.info("RADIUS listening on {host}:{port}", host=host.host, port=host.port)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


class PeriodicSync(tservice.Service):
    """Runs the LDAP directory sync every [directory.sync] interval seconds.

    A run takes seconds for a large directory (phone parsing, one write
    transaction), so it runs on its own thread with its own store connection;
    logins go on meanwhile. A run still going when the next is due is not
    doubled. A failed run changes nothing and is logged.
    """

    def __init__(self, daemon: "MfaDaemon", reactor):
        self._daemon = daemon
        self._reactor = reactor
        self._thread = WorkerThreads(reactor, 1, "mfaserver-sync")
        self._loop = None
        self._running = None

    def startService(self):
        from twisted.internet.task import LoopingCall
        super().startService()
        self._thread.start()
        self._loop = LoopingCall(self.run_once)
        self._loop.clock = self._reactor
        self._loop.start(self._daemon.config.directory.sync.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._thread.stop()

    def run_once(self):
        """Start one sync unless one is running; fires when it has finished."""
        if self._running is not None:
            log.warn("directory sync still running; skipping this round")
            return None
        config = self._daemon.config
        self._running = self._thread.run(_sync_in_thread, config, self._reactor.seconds())
        self._running.addCallbacks(self._done, self._failed)
        return self._running

    def _done(self, report):
        self._running = None
        log.info("directory {summary}", summary=report.summary())
        for line in report.details(numbers=False):
            log.warn("directory sync: {problem}", problem=line)

    def _failed(self, failure):
        self._running = None
        log.error("directory sync failed, nothing changed: {error}",
                  error=failure.getErrorMessage())


def _sync_in_thread(config: Config, now: float):
    from mfaserver.directory.sync import run_sync
    with Store.open(config.database_path, config.key_path, create=False) as store:
        return run_sync(config, store, now)


class MfaDaemon(tservice.MultiService):
    """The running daemon; `reload()` applies a changed config file without a restart."""

    def __init__(self, config: Config, reactor):
        super().__init__()
        self.config = config
        self.store = Store.open(config.database_path, config.key_path)
        # One database thread: SQLite calls are short, and one connection must
        # not be used by two threads at once. Hashing gets one thread per core.
        db_thread = WorkerThreads(reactor, 1, "mfaserver-db")
        hash_threads = WorkerThreads(reactor, max(2, os.cpu_count() or 2), "mfaserver-hash")
        for workers in (db_thread, hash_threads):
            LifecycleService(workers).setServiceParent(self)
        threaded = ThreadedStore(self.store, db_thread.run)
        OutsideChanges(threaded, reactor).setServiceParent(self)
        directory = self._directory(config, reactor,
                                    LocalDirectory(threaded.lookup_password, hash_threads.run))
        self.challenges = ChallengeRegistry(reactor, ttl=config.mfa.challenge_timeout)
        self._gateways: dict[str, object] = {}
        self.push = self._push(config, reactor, threaded)
        self.voice = self._voice(config, reactor, threaded, hash_threads)
        self.authenticator = Authenticator(
            directory, threaded, self.challenges, config.mfa, reactor,
            reply_rules=config.radius.reply, sms=self._sms(config, reactor),
            push=self.push, voice=self.voice, alerts=self._alerts(config, reactor),
            clients=clients_by_name(config),
            pushes_per_user_per_hour=config.push.max_per_user_per_hour)
        self.cache = ReplyCache(reactor, ttl=config.radius.response_cache_seconds)
        self.protocol = RadiusAuthProtocol(listener_settings(config),
                                           self.authenticator.authenticate, self.cache, reactor)
        self.listener = RadiusListenerService(reactor, self.protocol, config.radius.port,
                                              config.radius.listen)
        self.listener.setServiceParent(self)
        if config.web is not None:
            WebListenerService(reactor, config.web,
                               self._web_app(config, reactor, threaded)).setServiceParent(self)
        if config.directory.ldap is not None and config.directory.sync.interval > 0:
            PeriodicSync(self, reactor).setServiceParent(self)

    def _gateway(self, name: str, config: Config, reactor):
        """The gateway ``name`` ([gateways.NAME] or "console"), built once and shared."""
        if name not in self._gateways:
            if name == "twilio":
                from mfaserver.gateways.twilio import TwilioGateway
                gateway = TwilioGateway(config.gateways.twilio, reactor)
                ClosingService(gateway).setServiceParent(self)
            elif name == "http":
                from mfaserver.gateways.http import HttpGateway
                gateway = HttpGateway(config.gateways.http, reactor)
            elif name == "smtp":
                from mfaserver.gateways.smtp import SmtpGateway
                gateway = SmtpGateway(config.gateways.smtp, reactor)
            else:
                from mfaserver.gateways.console import ConsoleGateway
                gateway = ConsoleGateway()
            self._gateways[name] = gateway
        return self._gateways[name]

    def _sms(self, config: Config, reactor):
        """The SMS code sender for [sms], or None when SMS is not configured."""
        if config.sms is None:
            return None
        from mfaserver.factors.sms import SmsCodes
        return SmsCodes(self._gateway(config.sms.gateway, config, reactor), reactor,
                        code_length=config.sms.code_length, ttl=config.sms.code_ttl,
                        per_user_per_hour=config.sms.max_per_user_per_hour,
                        per_number_per_hour=config.sms.max_per_number_per_hour)

    def _alerts(self, config: Config, reactor):
        """Where fraud reports go ([alerts])."""
        gateway = self._gateway(config.alerts.gateway, config, reactor)
        if config.alerts.gateway == "smtp":
            return gateway.alerts_to(config.alerts.to)
        return gateway

    def _push(self, config: Config, reactor, threaded: ThreadedStore):
        """The push transaction registry, with wake-ups per [push] notify."""
        from mfaserver.factors.push import PushTransactions
        wake = None
        if config.push.notify != "none":
            from mfaserver.gateways.wake import WakeNotifier
            wake = WakeNotifier(reactor, threaded.list_devices,
                                kinds=frozenset({config.push.notify}),
                                timeout=config.push.notify_timeout)
            StoppingService(wake.stop).setServiceParent(self)
        push = PushTransactions(reactor, number_matching=config.push.number_matching,
                                wake=wake)
        StoppingService(push.close_all).setServiceParent(self)
        return push

    def _voice(self, config: Config, reactor, threaded: ThreadedStore, hash_threads):
        """Approval by phone call for [voice], or None."""
        if config.voice is None:
            return None
        from mfaserver import passwords
        from mfaserver.factors.voice import VoiceCalls

        async def check_pin(user: str, pin: str) -> bool:
            encoded = await threaded.get_pin_hash(user)
            if encoded is None:
                return False
            return await hash_threads.run(passwords.verify_password, pin, encoded)

        return VoiceCalls(
            self._gateway(config.voice.gateway, config, reactor), reactor,
            public_url=config.web.public_url, pin_mode=config.voice.pin,
            check_pin=lambda user, pin: Deferred.fromCoroutine(check_pin(user, pin)),
            per_user_per_hour=config.voice.max_per_user_per_hour,
            per_number_per_hour=config.voice.max_per_number_per_hour,
            max_calls=config.mfa.max_pending,
            on_late=lambda user: audit_late_call(threaded, reactor, user))

    def _web_app(self, config: Config, reactor, threaded: ThreadedStore):
        """The HTTP side: /health, the device API, and the voice callbacks."""
        from mfaserver.web.devices import DeviceApi
        from mfaserver.web.server import WebApp
        app = WebApp(reactor)
        DeviceApi(threaded, self.push, reactor,
                  report_fraud=lambda user, client: Deferred.fromCoroutine(
                      self.authenticator.report_fraud(user, client, "push")),
                  audit=threaded.record_audit).add_routes(app)
        if self.voice is not None:
            from mfaserver.web.voice import add_voice_routes
            add_voice_routes(app, self.voice, auth_token=config.gateways.twilio.auth_token,
                             public_url=config.web.public_url)
        return app

    def _directory(self, config: Config, reactor, local: LocalDirectory):
        """The directory (or chain of them) named by [directory] backend."""
        directories = []
        for name in config.directory.backends:
            if name == "local":
                directories.append(local)
                continue
            if name == "ldap":
                from mfaserver.directory.ldap import LdapDirectory
                ldap = config.directory.ldap
                directory = LdapDirectory(ldap, reactor,
                                          groups=[rule.group for rule in config.radius.reply],
                                          processes=ldap.processes or None)
            else:
                from mfaserver.directory.radius import RadiusDirectory
                directory = RadiusDirectory(config.directory.radius, reactor)
            LifecycleService(directory).setServiceParent(self)
            directories.append(directory)
        return directories[0] if len(directories) == 1 else DirectoryChain(directories)

    def stopService(self):
        d = super().stopService()
        d.addBoth(lambda result: (self.store.close(), result)[1])
        return d

    def reload(self) -> bool:
        """Re-read the config file; keep running on the old one if it is broken."""
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return False
        old = self.config
        for what, before, after in (
                ("radius.listen", old.radius.listen, new.radius.listen),
                ("radius.port", old.radius.port, new.radius.port),
                ("server.state_dir", old.server.state_dir, new.server.state_dir),
                ("directory.backend", old.directory.backends, new.directory.backends),
                ("[sms] and [gateways]", (old.sms, old.gateways), (new.sms, new.gateways)),
                ("[voice] and [alerts]", (old.voice, old.alerts), (new.voice, new.alerts)),
                ("push.notify", old.push.notify, new.push.notify),
                ("[web]", old.web, new.web)):
            if before != after:
                log.warn("{key} changed: takes effect after a restart", key=what)
        self.protocol.settings = listener_settings(new)
        self.authenticator.policy = new.mfa
        self.authenticator.reply_rules = new.radius.reply
        self.authenticator.clients = clients_by_name(new)
        self.authenticator.pending.max_per_user = new.mfa.max_pending_per_user
        self.authenticator.pending.max_total = new.mfa.max_pending
        self.push.number_matching = new.push.number_matching
        self.challenges.ttl = new.mfa.challenge_timeout
        self.cache.ttl = new.radius.response_cache_seconds
        self.config = new
        for warning in new.warnings:
            log.warn("{config}: {warning}", config=str(new.path), warning=warning)
        log.info("configuration reloaded: {n} RADIUS clients", n=len(new.radius.clients))
        return True


def audit_late_call(threaded: ThreadedStore, clock, user: str) -> None:
    """Keys pressed on a call after its login timed out: refused, and audited."""
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


def make_service(config: Config, reactor) -> MfaDaemon:
    """Build the daemon for ``config`` on ``reactor`` (not started)."""
    return MfaDaemon(config, reactor)


def run_daemon(config: Config, log_format: str | None = None) -> int:
    """Run in the foreground until SIGTERM/SIGINT; return the process exit code."""
    from twisted.internet import reactor

    from mfaserver.logs import start_logging

    log_writer = start_logging(log_format or config.server.log_format, clock=reactor)
    return_large_buffers_to_the_os()
    for warning in config.warnings:
        log.warn("{config}: {warning}", config=str(config.path), warning=warning)
    try:
        daemon = make_service(config, reactor)
        daemon.startService()
    except terror.CannotListenError as e:
        log.critical("cannot listen on {listen}:{port}: {error}", listen=config.radius.listen,
                     port=config.radius.port, error=str(e.socketError))
        return 1
    except Exception as e:
        log.critical("cannot start: {error}", error=f"{type(e).__name__}: {e}")
        return 1
    tune_garbage_collection()
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", log_writer.flush)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(daemon.reload))
    log.info("mfaserver started with {config}", config=str(config.path))
    reactor.run()
    log.info("mfaserver stopped")
    log_writer.flush()
    return 0
