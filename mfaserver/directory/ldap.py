"""The LDAP / Active Directory directory: find the user's entry, then bind as it.

One login, on one server, is one call on a worker thread (ldap3 blocks):

1. Search with the service account (anonymously if ``bind_dn`` is empty)
   for ``user_filter`` with the escaped name, size limit 2. No entry:
   `UnknownUser`; two: ``AMBIGUOUS_USER``.
2. Bind as the entry's DN with the password (result 49: wrong password, or
   in AD mode the reason AD gives, see `mfaserver.directory.ad`).
3. Only then, check the configured groups (``required_group`` and the reply
   rules' groups), each with one base-scope search on the service
   connection: on the group entry for ``(|(member=DN)(uniqueMember=DN))``
   (OpenLDAP and other RFC 4519 servers: works without the memberOf
   overlay, direct members only), or in AD mode on the user entry for the
   in-chain matching rule (nested groups included).

Before any of this, a password that is empty or blank after SASLprep is
refused without LDAP traffic: a simple bind with an empty password is an
anonymous bind that servers answer with success (RFC 4513 §5.1.2). So is a
password that SASLprep refuses (control characters), which ldap3 could not
send anyway.

Connections: each server keeps up to ``pool_size`` bound service
connections for searches and up to ``pool_size`` connections used only for
user binds, re-bound as each user in turn (faster than a new connection per
login; the latter never search, so a user's rights never leak into a
search). A connection that failed is dropped; one the server closed while
idle is noticed before use and replaced.

Failover and time limits: servers are tried in order; one that fails (no
connection, TLS refused, no answer within ``timeout``, service bind
refused) is skipped for ``retry_dead_after`` seconds, unless all are. Logins
queued behind a server that has just failed skip it at once instead of
waiting their turn to time out. ldap3's connect and receive timeouts bound
every blocking call, and each login has an overall deadline on the reactor
clock, after which it fails with `DirectoryUnavailable` (fail closed).

TLS (ldaps:// and StartTLS) always verifies the certificate and the host
name, against ``ca_file`` or the system CAs, TLS 1.2 or newer. Referrals
are never followed.
"""

from __future__ import annotations

import math
import queue
import select
import ssl
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPSASLPrepError
from ldap3.protocol.sasl.sasl import sasl_prep
from ldap3.utils.conv import escape_filter_chars
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal, Reason
from mfaserver.config import LdapConfig
from mfaserver.directory import ad
from mfaserver.workers import WorkerThreads

log = Logger()

SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4
INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
# Results that say "this server cannot serve now", not "this user may not log in".
SERVER_TROUBLE = frozenset({51, 52, 80})  # busy, unavailable, other


class _ServerDown(Exception):
    """This server could not answer (the next one may): the message says why."""


class _ServerSkipped(Exception):
    """The server failed for another login while this one waited for a worker."""


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


class _VerifiedTls(ldap3.Tls):
    """ldap3's Tls, with the certificate and host name checked by OpenSSL in the handshake.

    ldap3 turns OpenSSL's host name check off and redoes it with
    ``ssl.match_hostname``, which Python 3.12 removed (ldap3's fallback
    cannot match IP addresses); a standard verifying context is simpler.
    """

    def __init__(self, context: ssl.SSLContext):
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context

    def wrap_socket(self, connection, do_handshake=False):
        connection.socket = self._context.wrap_socket(
            connection.socket, server_hostname=connection.server.host,
            do_handshake_on_connect=do_handshake)


class _Server:
    """One configured URL: its ldap3 Server, its idle connections, its health.

    ``dead_until`` belongs to the reactor thread. ``failures`` counts
    failures, counted by the worker that saw one, at once: a login queued
    before it compares and skips the server.
    """

    def __init__(self, url: str, tls: _VerifiedTls, config: LdapConfig):
        self.url = url
        self.ldap = ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=config.timeout,
                                 tls=tls, allowed_referral_hosts=[])
        self.start_tls = config.start_tls and not self.ldap.ssl
        self.searchers: queue.LifoQueue = queue.LifoQueue(config.pool_size)
        self.binders: queue.LifoQueue = queue.LifoQueue(config.pool_size)
        self.dead_until = 0.0
        self.failures = 0
        self.lock = threading.Lock()

    def failed(self) -> None:
        with self.lock:
            self.failures += 1


class LdapDirectory:
    """`Directory` over LDAP or Active Directory servers (see the module docstring).

    ``groups`` are the lower-cased group DNs whose membership the
    `Principal` reports (the reply rules' groups); ``config.required_group``
    is checked in addition.
    """

    def __init__(self, config: LdapConfig, reactor, groups: Iterable[str] = ()):
        self._config = config
        self._reactor = reactor
        context = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        tls = _VerifiedTls(context)
        self._servers = [_Server(url, tls, config) for url in config.servers]
        self._workers = WorkerThreads(reactor, config.pool_size, "mfaserver-ldap")
        names = [config.required_group, *(g.lower() for g in groups)]
        self._groups = tuple(dict.fromkeys(g for g in names if g))
        self._attributes = list(dict.fromkeys(
            a for a in (config.username_attribute, config.phone_attribute) if a))
        # ldap3 also sets SO_RCVTIMEO, which takes whole seconds.
        self._receive_timeout = max(1, math.ceil(config.timeout))
        # Room for one timeout per server, plus one for the wait for a worker.
        self._deadline = self._receive_timeout * (len(self._servers) + 1)

    def start(self) -> None:
        self._workers.start()

    def stop(self) -> Deferred:
        """Fire once the logins in progress have ended and the connections are closed."""
        # Joining the workers blocks for up to a timeout: not on the reactor thread.
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._shutdown)

    def _shutdown(self) -> None:
        self._workers.stop()
        for server in self._servers:
            for pool in (server.searchers, server.binders):
                while not pool.empty():
                    _close(pool.get_nowait())

    def authenticate(self, username: str, password: str) -> Deferred[Principal]:
        """Fire with the `Principal`, or fail with InvalidCredentials, UnknownUser or
        DirectoryUnavailable."""
        d = Deferred.fromCoroutine(self._authenticate(username, password))
        d.addTimeout(self._deadline, self._reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result, timeout) -> Failure:
        log.warn("LDAP login gave no answer within {timeout}s", timeout=timeout)
        return Failure(DirectoryUnavailable(f"no answer within {timeout}s"))

    async def _authenticate(self, username: str, password: str) -> Principal:
        check_password(password)
        search_filter, name = self._search_filter(username)
        now = self._reactor.seconds()
        servers = [s for s in self._servers if s.dead_until <= now] or self._servers
        for server in servers:
            try:
                principal = await self._workers.run(self._login, server, server.failures,
                                                    search_filter, name, password)
            except _ServerSkipped:
                continue
            except _ServerDown as e:
                server.dead_until = self._reactor.seconds() + self._config.retry_dead_after
                log.warn("LDAP server {url} failed ({problem}); skipping it for {seconds}s",
                         url=server.url, problem=str(e), seconds=self._config.retry_dead_after)
                continue
            except InvalidCredentials as e:
                if e.reason is Reason.AMBIGUOUS_USER:
                    log.warn("LDAP: several entries match {user!r} on {url}; refusing it",
                             user=username, url=server.url)
                raise
            server.dead_until = 0.0
            return principal
        log.error("LDAP: no server could check {user!r}", user=username)
        raise DirectoryUnavailable("no LDAP server answered")

    def _search_filter(self, username: str) -> tuple[str, str]:
        """``(filter, name)`` for what the user typed; raises UnknownUser for names never found."""
        if self._config.active_directory:
            return ad.search_filter(username, self._config.user_filter, self._config.ad_domain)
        if not username:
            raise UnknownUser()
        escaped = escape_filter_chars(username)
        return self._config.user_filter.replace("{username}", escaped), username

    # --- On a worker thread ---------------------------------------------------------------------

    def _login(self, server: _Server, failures: int, search_filter: str, name: str,
               password: str) -> Principal:
        if server.failures != failures:
            raise _ServerSkipped()
        try:
            with _borrowed(server.searchers, lambda: self._open_searcher(server)) as searcher:
                dn, entry = self._find(searcher, search_filter)
                with _borrowed(server.binders, lambda: self._open(server)) as binder:
                    self._bind_as(binder, dn, password)
                groups = self._member_of(searcher, dn)
        except _ServerDown:
            server.failed()
            raise
        except LDAPException as e:
            server.failed()
            raise _ServerDown(f"{type(e).__name__}: {e}") from None
        if self._config.required_group and self._config.required_group not in groups:
            raise InvalidCredentials(Reason.NOT_IN_GROUP,
                                     f"not a member of {self._config.required_group}")
        phones = _values(entry, self._config.phone_attribute)
        return Principal(username=self._canonical_name(entry, name),
                         phone=phones[0] if phones else None, groups=groups)

    def _open(self, server: _Server) -> ldap3.Connection:
        """An open connection, not bound (or anonymous)."""
        conn = ldap3.Connection(server.ldap, authentication=ldap3.SIMPLE,
                                client_strategy=ldap3.SYNC, auto_referrals=False,
                                receive_timeout=self._receive_timeout, read_only=True,
                                raise_exceptions=False)
        try:
            conn.open(read_server_info=False)
            if server.start_tls:
                conn.start_tls(read_server_info=False)
        except BaseException:
            _close(conn)
            raise
        return conn

    def _open_searcher(self, server: _Server) -> ldap3.Connection:
        conn = self._open(server)
        if self._config.bind_dn:
            conn.user, conn.password = self._config.bind_dn, self._config.bind_password
            try:
                bound = conn.bind()
            except BaseException:
                _close(conn)
                raise
            if not bound:
                result = conn.result
                _close(conn)
                raise _ServerDown(f"service account bind refused: {result['description']} "
                                  f"{result['message']}".strip())
        return conn

    def _find(self, searcher: ldap3.Connection, search_filter: str) -> tuple[str, dict]:
        """The DN and attributes of the only entry matching ``search_filter``."""
        searcher.search(self._config.base_dn, search_filter, ldap3.SUBTREE,
                        attributes=self._attributes, size_limit=2,
                        time_limit=self._receive_timeout)
        result = searcher.result
        if result["result"] not in (SUCCESS, SIZE_LIMIT_EXCEEDED):
            raise _ServerDown(f"user search failed: {result['description']} "
                              f"{result['message']}".strip())
        # AD adds continuation references (searchResRef) to other partitions: not entries.
        entries = [r for r in searcher.response or () if r["type"] == "searchResEntry"]
        if result["result"] == SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            raise InvalidCredentials(Reason.AMBIGUOUS_USER, "several entries match")
        if not entries:
            raise UnknownUser()
        return entries[0]["dn"], entries[0]["raw_attributes"]

    def _bind_as(self, binder: ldap3.Connection, dn: str, password: str) -> None:
        binder.user, binder.password = dn, password
        try:
            binder.bind()
        finally:
            binder.password = None  # an idle pooled connection keeps no password
        code, message = binder.result["result"], binder.result["message"]
        if code == SUCCESS:
            return
        if code in SERVER_TROUBLE:
            raise _ServerDown(f"user bind: {binder.result['description']} {message}".strip())
        if code == INVALID_CREDENTIALS and self._config.active_directory:
            raise ad.bind_failure(message)
        raise InvalidCredentials(Reason.BAD_PASSWORD,
                                 f"bind refused: {binder.result['description']} {message}".strip())

    def _member_of(self, searcher: ldap3.Connection, dn: str) -> frozenset[str]:
        """Which of the configured groups the user with ``dn`` belongs to."""
        found = set()
        escaped = escape_filter_chars(dn)
        for group in self._groups:
            if self._config.active_directory:
                base, query = dn, ad.member_filter(group)
            else:
                base, query = group, f"(|(member={escaped})(uniqueMember={escaped}))"
            searcher.search(base, query, ldap3.BASE, attributes=["1.1"],
                            time_limit=self._receive_timeout)
            code = searcher.result["result"]
            if code not in (SUCCESS, NO_SUCH_OBJECT):  # a missing group has no members
                raise _ServerDown(f"group search failed: {searcher.result['description']}")
            if any(r["type"] == "searchResEntry" for r in searcher.response or ()):
                found.add(group)
        return frozenset(found)

    def _canonical_name(self, entry: dict, typed: str) -> str:
        """The entry's own spelling of the name: the value the user typed, or else the first."""
        names = _values(entry, self._config.username_attribute)
        if not names:
            raise DirectoryUnavailable(
                f"the entry has no readable {self._config.username_attribute!r}")
        folded = typed.casefold()
        return next((n for n in names if n.casefold() == folded), names[0])


def _values(raw_attributes: dict, name: str) -> list[str]:
    """The values of attribute ``name`` (matched case-insensitively), as text."""
    for key, values in raw_attributes.items():
        if key.lower() == name.lower():
            return [v.decode("utf-8", "replace") for v in values]
    return []


@contextmanager
def _borrowed(pool: queue.LifoQueue, make: Callable[[], ldap3.Connection]
              ) -> Iterator[ldap3.Connection]:
    """An idle connection from ``pool`` (or a new one), put back unless it failed.

    A verdict about the user (UnknownUser, InvalidCredentials) is not a
    failure of the connection.
    """
    conn = _take_idle(pool)
    if conn is None:
        conn = make()
    healthy = False
    try:
        yield conn
        healthy = True
    except (UnknownUser, InvalidCredentials):
        healthy = True
        raise
    finally:
        if healthy:
            try:
                pool.put_nowait(conn)
            except queue.Full:
                _close(conn)
        else:
            _close(conn)


def _take_idle(pool: queue.LifoQueue) -> ldap3.Connection | None:
    while True:
        try:
            conn = pool.get_nowait()
        except queue.Empty:
            return None
        if _still_open(conn):
            return conn
        _close(conn)


def _still_open(conn: ldap3.Connection) -> bool:
    """Whether an idle connection is usable: the server has sent nothing since.

    Anything readable on an idle LDAP connection means it is over: end of
    file, a TLS close, or a Notice of Disconnection (AD and OpenLDAP send
    one when they drop idle clients).
    """
    if conn.closed or conn.socket is None:
        return False
    poller = select.poll()
    poller.register(conn.socket, select.POLLIN)
    return not poller.poll(0)


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass  # it is being dropped because it failed: nothing more to learn
