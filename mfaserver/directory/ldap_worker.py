"""The LDAP worker process: ldap3's blocking work, away from the daemon's GIL.

`mfaserver.directory.ldap.Ldap3Directory` runs ``python -m
mfaserver.directory.ldap_worker`` and talks to it over the child's stdin and
stdout, one JSON object per line (UTF-8; JSON escapes every control
character, so a line never holds a newline of its data). ldap3 is pure
Python (1-1.5 ms of CPU per search and bind): in the daemon's process it
would take the GIL from the reactor thread, here it runs on another core.

Parent to worker, on stdin:

* first line, once: ``{"config": {LdapConfig fields}, "groups": [...],
  "threads": n}``. The service account's password crosses only this
  private pipe, never argv, the environment or a file;
* a login: ``{"id": 7, "user": typed name, "filter": search filter,
  "name": name to match, "password": ...}`` (the parent has already refused
  empty passwords and built the filter, see `mfaserver.directory.ldap`);
* ``{"cancel": 7}``: the parent gave up on login 7; if no thread has taken
  it yet, it is dropped (no bind for an answer nobody waits for);
* end of file: finish the logins already queued, close the connections,
  exit 0. (So the worker also ends when the daemon dies.)

Worker to parent, on stdout (one writer lock, one write per line):

* ``{"ready": true}`` once the configuration is read;
* ``{"id": 7, "principal": {"username": ..., "phone": ..., "groups": [...]}}``,
  or ``{"id": 7, "error": "invalid", "reason": "bad_password", "detail": ...}``,
  ``{"id": 7, "error": "unknown"}``, ``{"id": 7, "error": "unavailable",
  "detail": ...}``: the `InvalidCredentials`, `UnknownUser` and
  `DirectoryUnavailable` of `Directory.authenticate`;
* ``{"log": "warn", "format": ..., "fields": {...}}``: an event for the
  daemon's log (never a password). stderr is for what Python itself prints
  (tracebacks); the parent logs it as errors. Stray prints cannot corrupt
  the protocol: fd 1 is pointed at stderr once the real stdout is set aside.

One login, on one server, on one of ``threads`` threads:

1. Search with the service account (anonymously if ``bind_dn`` is empty)
   for the filter, size limit 2. No entry: `UnknownUser`; two:
   ``AMBIGUOUS_USER``.
2. Bind as the entry's DN with the password (result 49: wrong password, or
   in AD mode the reason AD gives, see `mfaserver.directory.ad`).
3. Only then, check the configured groups (``required_group`` and the reply
   rules' groups), each with one base-scope search on the service
   connection: on the group entry for ``(|(member=DN)(uniqueMember=DN))``
   (OpenLDAP and other RFC 4519 servers: works without the memberOf
   overlay, direct members only), or in AD mode on the user entry for the
   in-chain matching rule (nested groups included).

Connections: each server keeps up to ``threads`` bound service connections
for searches and up to ``threads`` connections used only for user binds,
re-bound as each user in turn (faster than a new connection per login; the
latter never search, so a user's rights never leak into a search). A
connection that failed is dropped; one the server closed while idle is
noticed before use and replaced.

Failover: servers are tried in order; one that fails (no connection, TLS
refused, no answer within ``timeout``, service bind refused) is skipped for
``retry_dead_after`` seconds, unless all are. Logins that arrived before a
server failed skip it at once instead of waiting their turn to time out.
ldap3's connect and receive timeouts bound every blocking call; the overall
deadline of a login is the parent's. Each worker process keeps its own
pools and its own record of dead servers.

TLS (ldaps:// and StartTLS) always verifies the certificate and the host
name, against ``ca_file`` or the system CAs, TLS 1.2 or newer. Referrals
are never followed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import select
import signal
import ssl
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal, Reason
from mfaserver.directory.settings import LdapConfig
from mfaserver.directory import ad

SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4
INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
# Results that say "this server cannot serve now", not "this user may not log in".
SERVER_TROUBLE = frozenset({51, 52, 80})  # busy, unavailable, other


# --- The wire format (both sides) ---------------------------------------------------------------

def config_to_json(config: LdapConfig) -> dict[str, Any]:
    """``config`` as JSON values (`config_from_json` reverses it)."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values[field.name] = str(value) if isinstance(value, Path) else value
    return values


def config_from_json(values: dict[str, Any]) -> LdapConfig:
    values = dict(values, servers=tuple(values["servers"]))
    if values.get("ca_file"):
        values["ca_file"] = Path(values["ca_file"])
    return LdapConfig(**values)


def encode_outcome(request_id: int, outcome: Principal | Exception) -> dict[str, Any]:
    """The response to login ``request_id``: its `Principal` or its refusal."""
    if isinstance(outcome, Principal):
        return {"id": request_id, "principal": {
            "username": outcome.username, "phone": outcome.phone,
            "groups": sorted(outcome.groups)}}
    if isinstance(outcome, InvalidCredentials):
        return {"id": request_id, "error": "invalid", "reason": outcome.reason.value,
                "detail": outcome.detail}
    if isinstance(outcome, UnknownUser):
        return {"id": request_id, "error": "unknown"}
    return {"id": request_id, "error": "unavailable", "detail": str(outcome)}


def decode_outcome(message: dict[str, Any]) -> Principal | Exception:
    """The `Principal` or the exception that a response carries."""
    principal = message.get("principal")
    if principal is not None:
        return Principal(username=principal["username"], phone=principal["phone"],
                         groups=frozenset(principal["groups"]))
    error = message.get("error")
    if error == "invalid":
        return InvalidCredentials(Reason(message["reason"]), message["detail"])
    if error == "unknown":
        return UnknownUser()
    return DirectoryUnavailable(message.get("detail") or "the LDAP worker failed")


def tls_context(config: LdapConfig) -> ssl.SSLContext:
    """The verifying client context for ldaps:// and StartTLS (raises for a bad ``ca_file``)."""
    context = ssl.create_default_context(
        cafile=str(config.ca_file) if config.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# --- Logins (blocking, on the worker's threads) -------------------------------------------------

class _ServerDown(Exception):
    """This server could not answer (the next one may): the message says why."""


class VerifiedTls(ldap3.Tls):
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

    ``failures`` counts failures, at once, under the lock: a login that
    arrived before one compares and skips the server. ``dead_until`` is a
    `time.monotonic` value (a float: reads and writes are atomic).
    """

    def __init__(self, url: str, tls: VerifiedTls, config: LdapConfig, pool_size: int):
        self.url = url
        self.ldap = ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=config.timeout,
                                 tls=tls, allowed_referral_hosts=[])
        self.start_tls = config.start_tls and not self.ldap.ssl
        self.searchers: queue.LifoQueue = queue.LifoQueue(pool_size)
        self.binders: queue.LifoQueue = queue.LifoQueue(pool_size)
        self.dead_until = 0.0
        self.failures = 0
        self.lock = threading.Lock()

    def failed(self) -> None:
        with self.lock:
            self.failures += 1


Log = Callable[..., None]  # log(level, format, **fields)


class Logins:
    """Checks logins against the configured servers (see the module docstring).

    ``groups`` are the lower-cased group DNs whose membership the
    `Principal` reports; ``config.required_group`` is checked in addition.
    ``pool_size`` bounds the idle connections kept per server and kind.
    """

    def __init__(self, config: LdapConfig, groups: Iterable[str], log: Log,
                 pool_size: int | None = None):
        self._config = config
        self._log = log
        tls = VerifiedTls(tls_context(config))
        size = pool_size or config.pool_size
        self._servers = [_Server(url, tls, config, size) for url in config.servers]
        names = [config.required_group, *(g.lower() for g in groups)]
        self._groups = tuple(dict.fromkeys(g for g in names if g))
        self._attributes = list(dict.fromkeys(
            a for a in (config.username_attribute, config.phone_attribute) if a))
        # ldap3 also sets SO_RCVTIMEO, which takes whole seconds.
        self._receive_timeout = max(1, math.ceil(config.timeout))

    def failures(self) -> tuple[int, ...]:
        """Each server's failure count: what `login` compares against, taken on arrival."""
        return tuple(server.failures for server in self._servers)

    def login(self, user: str, search_filter: str, name: str, password: str,
              seen: tuple[int, ...]) -> Principal:
        """The `Principal`, or InvalidCredentials, UnknownUser, DirectoryUnavailable.

        ``user`` is what was typed (for the log), ``seen`` the `failures`
        when the login arrived.
        """
        now = time.monotonic()
        servers = list(enumerate(self._servers))
        for index, server in [(i, s) for i, s in servers if s.dead_until <= now] or servers:
            if server.failures != seen[index]:
                continue  # it failed for another login while this one waited
            try:
                principal = self._login(server, search_filter, name, password)
            except _ServerDown as e:
                server.dead_until = time.monotonic() + self._config.retry_dead_after
                self._log("warn", "LDAP server {url} failed ({problem}); skipping it for "
                          "{seconds}s", url=server.url, problem=str(e),
                          seconds=self._config.retry_dead_after)
                continue
            except InvalidCredentials as e:
                if e.reason is Reason.AMBIGUOUS_USER:
                    self._log("warn", "LDAP: several entries match {user!r} on {url}; "
                              "refusing it", user=user, url=server.url)
                raise
            server.dead_until = 0.0
            return principal
        self._log("error", "LDAP: no server could check {user!r}", user=user)
        raise DirectoryUnavailable("no LDAP server answered")

    def close(self) -> None:
        """Close the idle connections (call once no login is in progress)."""
        for server in self._servers:
            for pool in (server.searchers, server.binders):
                while not pool.empty():
                    _close(pool.get_nowait())

    def _login(self, server: _Server, search_filter: str, name: str,
               password: str) -> Principal:
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
        return bound_principal(self._config, entry, name, groups)

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

def bound_principal(config: LdapConfig, entry: dict, typed: str, groups) -> Principal:
    """The user found as ``entry`` (typed as ``typed``), once their password bound;
    InvalidCredentials if [directory.ldap] required_group is not among ``groups``.

    Shared by both LDAP clients (ldap3's and libldap's entries alike).
    """
    if config.required_group and config.required_group not in groups:
        raise InvalidCredentials(Reason.NOT_IN_GROUP, f"not a member of {config.required_group}")
    phones = _values(entry, config.phone_attribute)
    return Principal(username=canonical_name(entry, config.username_attribute, typed),
                     phone=phones[0] if phones else None, groups=groups)


def canonical_name(entry: dict, attribute: str, typed: str) -> str:
    """The entry's own spelling of the name: the value the user typed, or else the first.

    ``entry`` maps attribute names to lists of raw values (ldap3's
    raw_attributes and python-ldap's entries alike).
    """
    names = _values(entry, attribute)
    if not names:
        raise DirectoryUnavailable(f"the entry has no readable {attribute!r}")
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


# --- The process ----------------------------------------------------------------------------------

class _Output:
    """The protocol's stdout: whole lines, written by one thread.

    Under load, answers that are ready while the previous write goes out
    leave together in one write: the daemon then wakes once for several
    (a wake-up of the reactor costs more than the JSON of an answer).
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="ldap-output", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        self._queue.put(json.dumps(message).encode() + b"\n")

    def log(self, level: str, format: str, **fields) -> None:
        self.send({"log": level, "format": format, "fields": fields})

    def close(self) -> None:
        """Write what is queued, then stop (blocks until written)."""
        self._queue.put(None)
        self._thread.join()

    def _write(self) -> None:
        while True:
            lines = [self._queue.get()]
            while not self._queue.empty():
                lines.append(self._queue.get_nowait())
            end = None in lines
            try:
                self._stream.write(b"".join(line for line in lines if line is not None))
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                return  # the parent is gone: stdin ends too, and main() returns
            if end:
                return


class Worker:
    """``threads`` threads answering the logins that `submit` queues."""

    def __init__(self, logins: Logins, threads: int, output: _Output):
        self._logins = logins
        self._output = output
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: set[int] = set()  # queued, not yet taken or cancelled
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"ldap-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, request: dict[str, Any]) -> None:
        with self._lock:
            self._waiting.add(request["id"])
        self._queue.put((request, self._logins.failures()))

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._waiting.discard(request_id)

    def stop(self) -> None:
        """Let the queued logins finish, then end the threads (blocks until they have)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, seen = item
            with self._lock:
                if request["id"] not in self._waiting:
                    continue  # cancelled by the parent: nobody waits for the answer
                self._waiting.discard(request["id"])
            self._output.send(encode_outcome(request["id"], self._answer(request, seen)))

    def _answer(self, request: dict[str, Any], seen: tuple[int, ...]) -> Principal | Exception:
        try:
            return self._logins.login(request["user"], request["filter"], request["name"],
                                      request["password"], seen)
        except (InvalidCredentials, UnknownUser, DirectoryUnavailable) as e:
            return e
        except Exception:
            # A bug, not a verdict: fail closed, and say where.
            for line in traceback.format_exc().splitlines():
                self._output.log("error", "LDAP worker: {line}", line=line)
            return DirectoryUnavailable("internal error in the LDAP worker")


def main(stdin: BinaryIO | None = None) -> int:
    """Serve the protocol of the module docstring until stdin ends."""
    # The daemon decides when to stop (it closes stdin); Ctrl-C at a terminal
    # reaches the whole process group and must not kill logins in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = stdin or sys.stdin.buffer
    output = _Output(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)  # a stray print() goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    first = stdin.readline()
    if not first:
        return 0
    setup = json.loads(first)
    threads = setup["threads"]
    logins = Logins(config_from_json(setup["config"]), setup["groups"], output.log,
                    pool_size=threads)
    worker = Worker(logins, threads, output)
    worker.start()
    output.send({"ready": True})
    for line in stdin:
        message = json.loads(line)
        if "cancel" in message:
            worker.cancel(message["cancel"])
        else:
            worker.submit(message)
    worker.stop()
    logins.close()
    output.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
