"""The LDAP / Active Directory login path on python-ldap (OpenLDAP's C libldap), on the reactor.

ldap3 is pure Python: a search and a bind cost ~0.5 ms of CPU, which capped
logins at ~1,400/s (issue 11). libldap does the same in ~0.1 ms. Its
asynchronous API returns a message id for each operation; each connection's
socket is a reactor reader, and when it is readable the results that are
complete are taken with ``result4(RES_ANY, all=1, timeout=0)``, in a loop
until there are none (libldap may hold responses already read from the
socket, TLS records with several messages in particular), and handed to
the operation with that message id. No thread and no process on the hot
path.

* What may block without bound in libldap (TCP connect, the TLS handshake of
  ldaps://, StartTLS, the first bind) runs in a thread of a bounded pool
  (`open_connection`), with ``OPT_NETWORK_TIMEOUT`` and ``OPT_TIMEOUT`` set
  to ``timeout`` and ``OPT_CONNECT_ASYNC`` (a non-blocking socket: the only
  way libldap bounds an ldaps:// handshake), and the reactor gives up on it
  after ``timeout`` too.
* Per server: up to ``search_connections`` connections bound as the service
  account (anonymous if ``bind_dn`` is empty), on which searches are
  pipelined (the least busy one is used); up to ``pool_size`` connections
  for user binds, one bind at a time each (RFC 4511 §4.2.1: nothing else
  may be in flight with a bind), never used for searches, so a user's
  rights never leak into a search. A user's bind result is matched by its
  message id on a connection that carries only that bind.
* Every operation has a timeout of ``timeout`` seconds on the reactor
  clock: when it fires, the connection is dropped (abandon, then unbind
  off the reactor thread) and every operation on it fails: the server
  failed, and failover proceeds as with ldap3 (see `LdapLogins.login`).
  An idle connection that becomes readable (the server closed it, or sent a
  Notice of Disconnection) is dropped at once.
* TLS: the certificate and the host name are always verified (libldap's
  ``TLS_REQCERT demand``), against ``ca_file`` or the system CAs, TLS 1.2
  or newer, with a context of the connection's own (``OPT_X_TLS_NEWCTX``)
  so ldap.conf and other connections cannot weaken it. Referrals are never
  followed (``OPT_REFERRALS`` off; search references are ignored).

The login itself (search for exactly one entry, bind as it, then the groups)
is that of the ldap3 worker, `mfaserver.directory.ldap_worker`, which
remains for ``client = "ldap3"``.
"""

from __future__ import annotations

import math
import os
import ssl
from typing import Any, Callable, Iterable

import ldap
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ldap3.utils.conv import escape_filter_chars

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal, Reason
from mfaserver.directory import ad
from mfaserver.directory.ldap import check_password, search_filter
from mfaserver.directory.ldap_worker import bound_principal
from mfaserver.directory.settings import LdapConfig

log = Logger()

# Results that say "this server cannot serve now", not "this user may not log in".
SERVER_TROUBLE = (ldap.BUSY, ldap.UNAVAILABLE, ldap.OTHER)
PIPELINE_DEPTH = 8  # searches in flight on one connection before another is opened


class ServerDown(Exception):
    """This server could not answer (the next one may): the message says why."""


def system_ca_file() -> str | None:
    """The system's CA bundle, as OpenSSL finds it (libldap has no "default CAs" option)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.openssl_cafile


def open_connection(url: str, config: LdapConfig, bind_dn: str, password: str) -> Any:
    """A connected, bound python-ldap object (blocking: call it in a thread).

    ``bind_dn`` empty: an anonymous bind, which only forces the connect and
    the TLS handshake now rather than on the reactor thread.
    """
    handle = ldap.initialize(url)  # no I/O yet
    try:
        handle.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        handle.set_option(ldap.OPT_REFERRALS, 0)
        handle.set_option(ldap.OPT_RESTART, 1)
        handle.set_option(ldap.OPT_NETWORK_TIMEOUT, float(config.timeout))
        handle.set_option(ldap.OPT_TIMEOUT, float(config.timeout))
        # The socket stays non-blocking after the connect: otherwise libldap's ldaps://
        # handshake with a server that accepts and never answers blocks for ever
        # (measured: OPT_NETWORK_TIMEOUT bounds it only on a non-blocking socket).
        handle.set_option(ldap.OPT_CONNECT_ASYNC, 1)
        handle.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        ca_file = str(config.ca_file) if config.ca_file else system_ca_file()
        if ca_file:
            handle.set_option(ldap.OPT_X_TLS_CACERTFILE, ca_file)
        handle.set_option(ldap.OPT_X_TLS_PROTOCOL_MIN, ldap.OPT_X_TLS_PROTOCOL_TLS1_2)
        handle.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # last: builds the context from the above
        if config.start_tls and not url.lower().startswith("ldaps:"):
            handle.start_tls_s()
        handle.simple_bind_s(bind_dn, password)
    except BaseException:
        _unbind(handle)
        raise
    return handle


def _unbind(handle) -> None:
    try:
        handle.unbind_ext()
    except ldap.LDAPError:
        pass  # it is being dropped: nothing more to learn


def describe(error: ldap.LDAPError) -> str:
    """An LDAPError as one line: its description and the server's message."""
    info = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    text = " ".join(str(info.get(k, "")) for k in ("desc", "info")).strip()
    return text or type(error).__name__


@implementer(IReadDescriptor)
class Connection:
    """One libldap connection, read by the reactor; operations matched to results by msgid.

    `submit` starts an operation and returns a Deferred that fires with
    ``(result type, data)`` or fails with the LDAPError libldap raised for
    it, or with `ServerDown` when the connection failed or timed out.
    """

    def __init__(self, handle, reactor, timeout: float, closer: Callable[[Any], None],
                 on_lost: Callable[[Connection], None]):
        self.handle = handle
        # python-ldap's C object: its Python wrapper takes a lock and builds control
        # lists on every call (~5 % of a login's CPU); every call here is on the
        # reactor thread, while no other thread uses the handle.
        self._raw = getattr(handle, "_l", handle)
        # A duplicate: libldap closes its own descriptor when it finds the connection
        # broken, inside result3, while the reactor still watches it.
        self._fd = os.dup(handle.fileno())
        self._reactor = reactor
        self._timeout = timeout
        self._closer = closer
        self._on_lost = on_lost
        self.pending: dict[int, tuple[Deferred, Any]] = {}
        self.closed = False
        reactor.addReader(self)

    def submit(self, start: Callable[[Any], int]) -> Deferred:
        """Start an operation: ``start(raw)`` calls python-ldap's C object (its
        ``search_ext`` or ``simple_bind``, every argument given) and returns the msgid."""
        if self.closed:
            return defer.fail(ServerDown("connection closed"))
        try:
            msgid = start(self._raw)
        except ldap.LDAPError as e:
            self.fail(ServerDown(describe(e)))
            return defer.fail(ServerDown(describe(e)))
        d = Deferred()
        call = self._reactor.callLater(self._timeout, self._timed_out, msgid)
        self.pending[msgid] = (d, call)
        return d

    def _timed_out(self, msgid: int) -> None:
        if msgid in self.pending:
            try:
                self._raw.abandon_ext(msgid, None, None)
            except ldap.LDAPError:
                pass
            self.fail(ServerDown(f"no answer within {self._timeout}s"))

    # --- IReadDescriptor ---------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "ldap"

    def doRead(self) -> None:
        read = 0
        while not self.closed:
            try:
                kind, data, msgid, _ = self._raw.result4(ldap.RES_ANY, 1, 0, 0, 0, 0)
            except ldap.LDAPError as e:
                info = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
                entry = self.pending.pop(info.get("msgid", -1), None)
                if entry is None:  # not an operation's result: the connection failed
                    self.fail(ServerDown(describe(e)))
                    return
                entry[1].cancel()
                entry[0].errback(Failure(e))
                read += 1
                continue
            if kind is None:
                if not read and not self.pending:
                    # Readable while idle: closed by the server, or a Notice of Disconnection.
                    self.fail(ServerDown("closed by the server"))
                return
            read += 1
            entry = self.pending.pop(msgid, None)
            if entry is None:
                if msgid == 0:  # unsolicited notification: the server is leaving
                    self.fail(ServerDown("notice of disconnection"))
                    return
                continue  # abandoned meanwhile
            entry[1].cancel()
            entry[0].callback((kind, data))

    def connectionLost(self, reason) -> None:
        # The reactor has removed this reader already (hang-up or error on the socket).
        self.fail(ServerDown("connection lost"), registered=False)

    def fail(self, why: ServerDown, registered: bool = True) -> None:
        """Drop the connection: every operation on it fails with ``why``."""
        if self.closed:
            return
        self.closed = True
        if registered:
            self._reactor.removeReader(self)
        os.close(self._fd)
        pending, self.pending = self.pending, {}
        self._on_lost(self)
        self._closer(self.handle)
        for d, call in pending.values():
            if call.active():
                call.cancel()
            d.errback(Failure(why))

    def close(self) -> None:
        """Close an idle connection (at stop)."""
        if not self.closed:
            self.closed = True
            self._reactor.removeReader(self)
            os.close(self._fd)
            self._on_lost(self)
            self._closer(self.handle)


class ServerPool:
    """One server's connections: pipelined searchers and one-bind-at-a-time binders.

    ``opener(bind_dn, password)`` fires with a connected, bound handle; it runs
    in a thread, off the reactor. ``failed`` is called once per failure of the
    server (an open that failed, a connection that failed).
    """

    def __init__(self, url: str, config: LdapConfig, reactor,
                 opener: Callable[[str, str], Deferred], closer: Callable[[Any], None],
                 search_connections: int):
        self.url = url
        self._config = config
        self._reactor = reactor
        self._opener = opener
        self._closer = closer
        self._max_searchers = search_connections
        self._max_binders = config.pool_size
        self.searchers: list[Connection] = []
        self._opening_searcher = False
        self._searcher_waiters: list[Deferred] = []
        self.binders_idle: list[Connection] = []
        self._binders = 0  # open or opening
        self._binder_waiters: list[Deferred] = []
        self.failures = 0
        self.dead_until = 0.0

    def failed(self) -> None:
        self.failures += 1

    # --- searchers ---------------------------------------------------------------------------

    def searcher(self) -> Deferred[Connection]:
        """An open service connection to pipeline a search on."""
        if self.searchers:
            best = min(self.searchers, key=lambda c: len(c.pending))
            if len(best.pending) >= PIPELINE_DEPTH and not self._opening_searcher \
                    and len(self.searchers) < self._max_searchers:
                self._open_searcher()
            return defer.succeed(best)
        d = Deferred()
        self._searcher_waiters.append(d)
        if not self._opening_searcher:
            self._open_searcher()
        return d

    def _open_searcher(self) -> None:
        self._opening_searcher = True
        d = self._open(self._config.bind_dn, self._config.bind_password, self.searchers)
        d.addBoth(self._searcher_opened)

    def _searcher_opened(self, result) -> None:
        self._opening_searcher = False
        waiters, self._searcher_waiters = self._searcher_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # --- binders -----------------------------------------------------------------------------

    def binder(self) -> Deferred[Connection]:
        """A connection of its own for one user bind; give it back with `release`."""
        while self.binders_idle:
            conn = self.binders_idle.pop()
            if not conn.closed:
                return defer.succeed(conn)
        d = Deferred()
        self._binder_waiters.append(d)
        if self._binders < self._max_binders:
            self._binders += 1
            opened = self._open(self._config.bind_dn, self._config.bind_password, None)
            opened.addCallbacks(self.release, self._binder_open_failed)
        return d

    def release(self, conn: Connection) -> None:
        """A binder is free again (or, if it failed, its place is)."""
        if conn.pending:  # its login gave up during the bind: never bind beside it
            conn.fail(ServerDown("a bind was abandoned"))
        if conn.closed:
            return
        while self._binder_waiters:
            d = self._binder_waiters.pop(0)
            if not d.called:
                d.callback(conn)
                return
        self.binders_idle.append(conn)

    def _binder_lost(self, conn: Connection) -> None:
        self._binders -= 1
        if conn in self.binders_idle:
            self.binders_idle.remove(conn)

    def _binder_open_failed(self, failure: Failure) -> None:
        self._binders -= 1
        waiters, self._binder_waiters = self._binder_waiters, []
        for d in waiters:
            d.errback(failure)

    # --- opening -----------------------------------------------------------------------------

    def _open(self, bind_dn: str, password: str, into: list | None) -> Deferred[Connection]:
        d = self._opener(bind_dn, password)
        d.addTimeout(self._config.timeout, self._reactor)

        def opened(handle):
            lost = (lambda c: into.remove(c) if c in into else None) if into is not None \
                else self._binder_lost
            conn = Connection(handle, self._reactor, self._config.timeout, self._closer, lost)
            if into is not None:
                into.append(conn)
            return conn

        def failed(failure):
            self.failed()
            if failure.check(ldap.INVALID_CREDENTIALS):
                return Failure(ServerDown("service account bind refused: "
                                          + describe(failure.value)))
            if failure.check(ldap.LDAPError):
                return Failure(ServerDown(describe(failure.value)))
            if failure.check(defer.TimeoutError, defer.CancelledError):
                return Failure(ServerDown(f"no connection within {self._config.timeout}s"))
            return failure
        return d.addCallbacks(opened, failed)

    def fail_waiters(self, why: ServerDown) -> None:
        for waiters in (self._searcher_waiters, self._binder_waiters):
            pending = list(waiters)
            waiters.clear()
            for d in pending:
                d.errback(Failure(why))

    def close(self) -> None:
        for conn in [*self.searchers, *self.binders_idle]:
            conn.close()


class LdapLogins:
    """Checks logins against the configured servers, on the reactor (module docstring).

    ``opener(url, bind_dn, password)`` fires with a connected python-ldap
    handle (a thread in `LibldapDirectory`, a fake in tests); ``closer`` closes
    one, also off the reactor thread.
    """

    def __init__(self, config: LdapConfig, groups: Iterable[str], reactor,
                 opener: Callable[[str, str, str], Deferred], closer: Callable[[Any], None]):
        self._config = config
        self._reactor = reactor
        search_connections = max(1, math.ceil(config.pool_size / 4))
        self.servers = [
            ServerPool(url, config, reactor, lambda dn, pw, url=url: opener(url, dn, pw),
                       closer, search_connections)
            for url in config.servers]
        names = [config.required_group, *(g.lower() for g in groups)]
        self._groups = tuple(dict.fromkeys(g for g in names if g))
        self._attributes = list(dict.fromkeys(
            a for a in (config.username_attribute, config.phone_attribute) if a))
        self._time_limit = max(1, math.ceil(config.timeout))

    async def login(self, user: str, search_filter: str, name: str, password: str) -> Principal:
        """The `Principal`, or InvalidCredentials, UnknownUser, DirectoryUnavailable."""
        seen = [s.failures for s in self.servers]
        now = self._reactor.seconds()
        servers = list(enumerate(self.servers))
        for index, server in [(i, s) for i, s in servers if s.dead_until <= now] or servers:
            if server.failures != seen[index]:
                continue  # it failed for another login while this one waited
            try:
                principal = await self._login(server, search_filter, name, password)
            except ServerDown as e:
                if server.dead_until <= self._reactor.seconds():
                    server.dead_until = self._reactor.seconds() + self._config.retry_dead_after
                    log.warn("LDAP server {url} failed ({problem}); skipping it for "
                             "{seconds}s", url=server.url, problem=str(e),
                             seconds=self._config.retry_dead_after)
                server.fail_waiters(e)
                continue
            except InvalidCredentials as e:
                if e.reason is Reason.AMBIGUOUS_USER:
                    log.warn("LDAP: several entries match {user!r} on {url}; refusing it",
                             user=user, url=server.url)
                raise
            server.dead_until = 0.0
            return principal
        log.error("LDAP: no server could check {user!r}", user=user)
        raise DirectoryUnavailable("no LDAP server answered")

    async def _login(self, server: ServerPool, search_filter: str, name: str,
                     password: str) -> Principal:
        try:
            dn, entry = await self._find(server, search_filter)
            binder = await server.binder()
            try:
                await self._bind_as(binder, dn, password)
            finally:
                server.release(binder)
            groups = await self._member_of(server, dn)
        except ServerDown:
            raise
        except ldap.LDAPError as e:
            server.failed()
            raise ServerDown(describe(e)) from None
        return bound_principal(self._config, entry, name, groups)

    async def _search(self, server: ServerPool, base: str, scope: int, query: str,
                      attributes: list[str], size_limit: int = 0) -> list:
        conn = await server.searcher()
        try:
            _, data = await conn.submit(lambda raw: raw.search_ext(
                base, scope, query, attributes, 0, None, None, self._time_limit, size_limit))
        except ServerDown:
            server.failed()
            raise
        # AD adds continuation references (searchResRef) to other partitions: not entries.
        return [(dn, attrs) for dn, attrs in data if dn is not None]

    async def _find(self, server: ServerPool, search_filter: str) -> tuple[str, dict]:
        """The DN and attributes of the only entry matching ``search_filter``."""
        try:
            entries = await self._search(server, self._config.base_dn, ldap.SCOPE_SUBTREE,
                                         search_filter, self._attributes, size_limit=2)
        except ldap.SIZELIMIT_EXCEEDED:
            raise InvalidCredentials(Reason.AMBIGUOUS_USER, "several entries match") from None
        except ldap.LDAPError as e:
            raise ServerDown(f"user search failed: {describe(e)}") from None
        if len(entries) > 1:
            raise InvalidCredentials(Reason.AMBIGUOUS_USER, "several entries match")
        if not entries:
            raise UnknownUser()
        return entries[0]

    async def _bind_as(self, binder: Connection, dn: str, password: str) -> None:
        try:
            await binder.submit(lambda raw: raw.simple_bind(dn, password, None, None))
        except ServerDown:
            raise
        except SERVER_TROUBLE as e:
            raise ServerDown(f"user bind: {describe(e)}") from None
        except ldap.INVALID_CREDENTIALS as e:
            if self._config.active_directory:
                raise ad.bind_failure(str(e.args[0].get("info", ""))) from None
            raise InvalidCredentials(Reason.BAD_PASSWORD,
                                     f"bind refused: {describe(e)}") from None
        except ldap.LDAPError as e:
            raise InvalidCredentials(Reason.BAD_PASSWORD,
                                     f"bind refused: {describe(e)}") from None

    async def _member_of(self, server: ServerPool, dn: str) -> frozenset[str]:
        """Which of the configured groups the user with ``dn`` belongs to (searched at once)."""
        if not self._groups:
            return frozenset()
        escaped = escape_filter_chars(dn)
        searches = []
        for group in self._groups:
            if self._config.active_directory:
                base, query = dn, ad.member_filter(group)
            else:
                base, query = group, f"(|(member={escaped})(uniqueMember={escaped}))"
            searches.append(defer.ensureDeferred(self._group_search(server, base, query)))
        results = await defer.gatherResults(searches, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)
        return frozenset(g for g, member in zip(self._groups, results) if member)

    async def _group_search(self, server: ServerPool, base: str, query: str) -> bool:
        try:
            return bool(await self._search(server, base, ldap.SCOPE_BASE, query, ["1.1"]))
        except ldap.NO_SUCH_OBJECT:
            return False  # a missing group has no members
        except ldap.LDAPError as e:
            raise ServerDown(f"group search failed: {describe(e)}") from None

    def close(self) -> None:
        for server in self.servers:
            server.close()


class LibldapDirectory:
    """`Directory` over LDAP or Active Directory servers with libldap (module docstring).

    ``groups`` are the lower-cased group DNs whose membership the `Principal`
    reports; ``config.required_group`` is checked in addition.
    """

    def __init__(self, config: LdapConfig, reactor, groups: Iterable[str] = (),
                 processes: int | None = None):
        self._config = config
        self._reactor = reactor
        if config.ca_file is not None:
            ssl.create_default_context(cafile=str(config.ca_file))  # a bad ca_file fails now
        # Opens (one per connection) and closes; threads end within ``timeout``.
        self._threads = ThreadPool(minthreads=0, maxthreads=min(2 * config.pool_size + 2, 32),
                                   name="ldap-open")
        self._logins = LdapLogins(config, groups, reactor, self._open, self._close)
        self._pending: set[Deferred] = set()
        self._deadline = max(1, math.ceil(config.timeout)) * (len(config.servers) + 1)
        self._stopping = False

    def _open(self, url: str, bind_dn: str, password: str) -> Deferred:
        return deferToThreadPool(self._reactor, self._threads, open_connection, url,
                                 self._config, bind_dn, password)

    def _close(self, handle) -> None:
        if self._threads.started:
            self._threads.callInThread(_unbind, handle)
        else:
            _unbind(handle)

    def start(self) -> Deferred[None]:
        self._stopping = False
        self._threads.start()
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        """Fire once the logins in progress have ended and the connections are closed."""
        self._stopping = True
        waits = [_settled(d) for d in self._pending]

        def close(_):
            self._logins.close()
            self._threads.stop()
        return defer.gatherResults(waits).addCallback(close)

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        """Fire with the `Principal`, or fail with InvalidCredentials, UnknownUser or
        DirectoryUnavailable."""
        try:
            check_password(password)
            query, name = search_filter(self._config, username)
        except (InvalidCredentials, UnknownUser):
            return defer.fail()
        if self._stopping:
            return defer.fail(DirectoryUnavailable("the LDAP directory is stopping"))
        d = defer.ensureDeferred(self._logins.login(username, query, name, password))
        d.addErrback(self._internal_error)
        d.addTimeout(self._deadline, self._reactor, onTimeoutCancel=self._timed_out)
        self._pending.add(d)
        d.addBoth(self._done, d)
        return d

    def _done(self, result, d):
        self._pending.discard(d)
        return result

    def _internal_error(self, failure: Failure):
        if failure.check(InvalidCredentials, UnknownUser, DirectoryUnavailable,
                         defer.CancelledError):
            return failure
        log.failure("LDAP login: internal error", failure)
        return Failure(DirectoryUnavailable("internal error in the LDAP client"))

    def _timed_out(self, result, timeout) -> Failure:
        log.warn("LDAP login gave no answer within {timeout}s", timeout=timeout)
        return Failure(DirectoryUnavailable(f"no answer within {timeout}s"))


def _settled(d: Deferred) -> Deferred[None]:
    """Fires when ``d`` does, whatever with, without touching its result."""
    settled = Deferred()

    def fire(result):
        settled.callback(None)
        return result
    d.addBoth(fire)
    return settled
