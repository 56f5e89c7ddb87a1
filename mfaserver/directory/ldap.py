"""The LDAP / Active Directory directory: find the user's entry, then bind as it.

`check_password` and `search_filter` (what is refused or built before any
LDAP traffic) serve both clients. The default client is libldap on the
reactor, `mfaserver.directory.libldap`; this module's `Ldap3Directory` is
``[directory.ldap] client = "ldap3"``, the pure-Python client of issue 3.

The LDAP work itself (search, bind, group checks, connection pools,
failover, TLS) runs in worker processes, `mfaserver.directory.ldap_worker`,
whose docstring describes it and the pipe protocol. ldap3 is pure Python:
on threads of the daemon it held the GIL that the reactor thread needs for
everything else in a login; in its own process it runs on another core.
This module is the daemon's side:

* Before any LDAP traffic, a password that is empty or blank after SASLprep
  is refused: a simple bind with an empty password is an anonymous bind
  that servers answer with success (RFC 4513 §5.1.2). So is a password that
  SASLprep refuses (control characters), which ldap3 could not send anyway.
  Names that can match nobody (empty, another AD domain) are `UnknownUser`
  here too; otherwise the search filter is built here, with the name
  escaped.
* `Ldap3Directory.start` spawns ``processes`` workers (``sys.executable -m
  mfaserver.directory.ldap_worker``), each with ``ceil(pool_size /
  processes)`` threads and as many pooled connections per server and kind,
  so ``pool_size`` still bounds the LDAP work in progress. The
  configuration, service password included, goes down the child's stdin;
  the user's password goes only down that pipe too. A login goes to the
  running worker with the fewest logins in progress; while none runs (not
  started yet, or restarting), logins wait for one.
* Each login has an overall deadline on the reactor clock (one ``timeout``
  per server, plus one), after which it fails with `DirectoryUnavailable`
  (fail closed) even if the worker is stuck; the worker is told to drop it
  if it has not started it yet.
* A worker that exits is started again after 0.1 s, doubling up to 30 s
  while new ones die before answering a login; the logins it held fail
  with `DirectoryUnavailable`.
* `Ldap3Directory.stop` closes the workers' stdin: they finish the logins
  they hold and exit. One still running a deadline later gets SIGTERM,
  then SIGKILL.

How many workers: see `default_processes`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import site
import sys
from pathlib import Path
from typing import Any, Iterable

from ldap3.core.exceptions import LDAPSASLPrepError
from ldap3.protocol.sasl.sasl import sasl_prep
from ldap3.utils.conv import escape_filter_chars
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

import mfaserver
from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal, Reason
from mfaserver.directory.settings import LdapConfig
from mfaserver.directory import ad, ldap_worker

log = Logger()

WORKER_MODULE = "mfaserver.directory.ldap_worker"
FIRST_RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 30.0
KILL_GRACE = 2.0  # after SIGTERM, before SIGKILL


def check_password(password: str) -> None:
    """Raise `InvalidCredentials` for a password that must not reach an LDAP bind."""
    if not password or password.isspace():
        raise InvalidCredentials(Reason.EMPTY_PASSWORD, "empty password")
    if password.isascii() and password.isprintable():
        return  # SASLprep leaves printable ASCII as it is (and costs ~0.2 ms)
    try:
        prepared = sasl_prep(password)
    except LDAPSASLPrepError:
        raise InvalidCredentials(Reason.BAD_PASSWORD, "password refused by SASLprep") from None
    if not prepared or prepared.isspace():
        raise InvalidCredentials(Reason.EMPTY_PASSWORD, "password empty after SASLprep")


def search_filter(config: LdapConfig, username: str) -> tuple[str, str]:
    """``(filter, name)`` for what the user typed; raises UnknownUser for names never found."""
    if config.active_directory:
        return ad.search_filter(username, config.user_filter, config.ad_domain)
    if not username:
        raise UnknownUser()
    escaped = escape_filter_chars(username)
    return config.user_filter.replace("{username}", escaped), username


def default_processes() -> int:
    """Worker processes when not configured: two, or one on a single core.

    A worker spends ~1.5 ms of CPU per login under one GIL, the reactor
    ~1.1 ms (RADIUS, SQLite, TOTP, audit): one reactor keeps about two
    workers busy. On 2 cores with slapd and radclient on them too, full
    logins went from ~450/s with one worker to ~530/s with two.
    """
    return min(2, os.cpu_count() or 1)


class Ldap3Directory:
    """`Directory` over LDAP or Active Directory servers with ldap3 in worker processes
    (``client = "ldap3"``; see the module docstring).

    ``groups`` are the lower-cased group DNs whose membership the
    `Principal` reports (the reply rules' groups); ``config.required_group``
    is checked in addition. ``processes`` is the number of worker
    processes (`default_processes` when None).
    """

    def __init__(self, config: LdapConfig, reactor, groups: Iterable[str] = (),
                 processes: int | None = None):
        self._config = config
        self._reactor = reactor
        ldap_worker.tls_context(config)  # a bad ca_file fails now, not in every worker
        count = default_processes() if processes is None else processes
        if count < 1:
            raise ValueError("an Ldap3Directory needs at least one worker process")
        # Read by each worker from its stdin: holds the service password.
        self._setup = json.dumps({
            "config": ldap_worker.config_to_json(config),
            "groups": [g.lower() for g in groups],
            "threads": math.ceil(config.pool_size / count),
        }).encode() + b"\n"
        self._workers = [_WorkerProcess(self) for _ in range(count)]
        self._ids = itertools.count(1)
        self._pending: dict[int, _Login] = {}
        self._backlog: dict[int, _Login] = {}  # waiting for a running worker, in order
        self._stopping = False
        # ldap3 also sets SO_RCVTIMEO, which takes whole seconds.
        receive_timeout = max(1, math.ceil(config.timeout))
        # Room for one timeout per server, plus one for the wait for a thread.
        self._deadline = receive_timeout * (len(config.servers) + 1)

    def start(self) -> Deferred[None]:
        """Start the worker processes; fire once each has read its configuration.

        Logins need not wait for that: they queue until a worker runs.
        """
        self._stopping = False
        for worker in self._workers:
            worker.spawn()
        return defer.gatherResults([w.when_ready() for w in self._workers]).addCallback(
            lambda _: None)

    def stop(self) -> Deferred[None]:
        """Fire once the logins in progress have ended and the workers have exited."""
        self._stopping = True
        backlog, self._backlog = self._backlog, {}
        for login in backlog.values():
            self._finish(login, DirectoryUnavailable("the LDAP directory is stopping"))
        return defer.gatherResults([w.stop(self._deadline) for w in self._workers]).addCallback(
            lambda _: None)

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        """Fire with the `Principal`, or fail with InvalidCredentials, UnknownUser or
        DirectoryUnavailable."""
        try:
            check_password(password)
            search_filter, name = self._search_filter(username)
        except (InvalidCredentials, UnknownUser):
            return defer.fail()
        request_id = next(self._ids)
        d = Deferred(lambda _: self._cancel(request_id))
        login = _Login(request_id, d, json.dumps({
            "id": request_id, "user": username, "filter": search_filter, "name": name,
            "password": password}).encode() + b"\n")
        self._pending[request_id] = login
        self._dispatch(login)
        d.addTimeout(self._deadline, self._reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result, timeout) -> Failure:
        log.warn("LDAP login gave no answer within {timeout}s", timeout=timeout)
        return Failure(DirectoryUnavailable(f"no answer within {timeout}s"))

    def _search_filter(self, username: str) -> tuple[str, str]:
        return search_filter(self._config, username)

    # --- Logins and workers -----------------------------------------------------------------------

    def _dispatch(self, login: _Login) -> None:
        running = [w for w in self._workers if w.running]
        if not running:
            self._backlog[login.id] = login
            return
        worker = min(running, key=lambda w: len(w.logins))
        login.worker = worker
        worker.logins.add(login.id)
        worker.send(login.line)

    def _cancel(self, request_id: int) -> None:
        """The Deferred was cancelled (by the deadline): forget the login, tell its worker."""
        login = self._pending.pop(request_id, None)
        self._backlog.pop(request_id, None)
        if login is not None and login.worker is not None:
            login.worker.logins.discard(request_id)
            if login.worker.running:
                login.worker.send(b'{"cancel": %d}\n' % request_id)

    def _finish(self, login: _Login, outcome: Principal | Exception) -> None:
        self._pending.pop(login.id, None)
        if isinstance(outcome, Exception):
            login.deferred.errback(Failure(outcome))
        else:
            login.deferred.callback(outcome)

    def _worker_started(self, worker: _WorkerProcess) -> None:
        backlog, self._backlog = self._backlog, {}
        for login in backlog.values():
            self._dispatch(login)

    def _worker_answered(self, worker: _WorkerProcess, message: dict[str, Any]) -> None:
        worker.logins.discard(message["id"])
        login = self._pending.get(message["id"])
        if login is not None:  # else: it timed out meanwhile
            self._finish(login, ldap_worker.decode_outcome(message))

    def _worker_ended(self, worker: _WorkerProcess, held: set[int]) -> None:
        for request_id in held:
            login = self._pending.get(request_id)
            if login is not None:
                self._finish(login, DirectoryUnavailable("the LDAP worker process ended"))


class _Login:
    """A login sent (or to be sent) to a worker: the line holds the password."""

    __slots__ = ("id", "deferred", "line", "worker")

    def __init__(self, request_id: int, deferred: Deferred, line: bytes):
        self.id = request_id
        self.deferred = deferred
        self.line = line
        self.worker: _WorkerProcess | None = None


class _WorkerProcess(ProcessProtocol):
    """One worker process, started again whenever it ends until the directory stops."""

    def __init__(self, directory: Ldap3Directory):
        self._directory = directory
        self._reactor = directory._reactor
        self.logins: set[int] = set()  # ids sent to this process and not answered
        self.running = False
        self._ready = False
        self._ready_waiters: list[Deferred] = []
        self._ended_waiters: list[Deferred] = []
        self._out = b""
        self._err = b""
        self._restart_delay = FIRST_RESTART_DELAY
        self._restart = None
        self._kill_calls: list = []
        self.pid: int | None = None

    def spawn(self) -> None:
        self._restart = None
        self._out = self._err = b""
        try:
            self._reactor.spawnProcess(self, sys.executable,
                                       [sys.executable, "-m", WORKER_MODULE],
                                       env=_worker_environment())
        except OSError as e:  # fork failed: out of processes or memory
            log.error("LDAP worker process could not start: {error}", error=str(e))
            self._start_later()
            return
        self.running = True
        self.pid = self.transport.pid
        self.transport.write(self._directory._setup)
        log.info("LDAP worker process {pid} started", pid=self.pid)
        self._directory._worker_started(self)

    def send(self, line: bytes) -> None:
        self.transport.write(line)

    def when_ready(self) -> Deferred[None]:
        if self._ready:
            return defer.succeed(None)
        d = Deferred()
        self._ready_waiters.append(d)
        return d

    def stop(self, grace: float) -> Deferred[None]:
        """Close the worker's stdin; SIGTERM it after ``grace`` seconds, SIGKILL later."""
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        self._fire_ready()  # nobody waits for a start that will not come
        if not self.running:
            return defer.succeed(None)
        d = Deferred()
        self._ended_waiters.append(d)
        self.transport.closeStdin()
        self._kill_calls = [self._reactor.callLater(grace, self._signal, "TERM"),
                            self._reactor.callLater(grace + KILL_GRACE, self._signal, "KILL")]
        return d

    def _signal(self, name: str) -> None:
        log.warn("LDAP worker process {pid} still running: sending SIG{signal}",
                 pid=self.pid, signal=name)
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def _fire_ready(self) -> None:
        self._ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    # --- ProcessProtocol ------------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        *lines, self._out = (self._out + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.error("LDAP worker process {pid} wrote a bad line", pid=self.pid)
                continue
            if "id" in message:
                self._restart_delay = FIRST_RESTART_DELAY  # it works: restart it quickly
                self._directory._worker_answered(self, message)
            elif "log" in message:
                log.emit(LogLevel.levelWithName(message["log"]), message["format"],
                         **message["fields"])
            elif message.get("ready"):
                self._fire_ready()

    def errReceived(self, data: bytes) -> None:
        *lines, self._err = (self._err + data).split(b"\n")
        for line in lines:
            log.error("LDAP worker process {pid}: {line}", pid=self.pid,
                      line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        for call in self._kill_calls:
            if call.active():
                call.cancel()
        self._kill_calls = []
        held, self.logins = self.logins, set()
        self._directory._worker_ended(self, held)
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)
        if self._directory._stopping:
            return
        self._ready = False
        log.error("LDAP worker process {pid} ended ({why})", pid=self.pid,
                  why=reason.getErrorMessage())
        self._start_later()

    def _start_later(self) -> None:
        log.info("starting another LDAP worker process in {delay}s", delay=self._restart_delay)
        self._restart = self._reactor.callLater(self._restart_delay, self.spawn)
        self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)


def _worker_environment() -> dict[str, str]:
    """The daemon's environment, with this copy of mfaserver on the import path.

    The worker must run the same code as the daemon, also from a source tree
    that is not installed. An installed copy is found anyway (and putting
    site-packages ahead of the standard library could shadow parts of it).
    """
    env = dict(os.environ)
    root = Path(mfaserver.__file__).resolve().parent.parent
    if root not in {Path(p).resolve() for p in site.getsitepackages()}:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env
