"""The libldap client on a fake reactor: msgid matching, pipelining, timeouts, failover.

`FakeServer` stands in for python-ldap and the servers behind it: its
handles record the operations started on them (search_ext, simple_bind,
abandon_ext) and `FakeServer.answer` queues their results, which the
connection reads from ``result4(RES_ANY, 1, 0, ...)`` when the reactor says the
socket is readable (`MemoryReactorClock` keeps the readers; the test calls
``doRead``). Nothing is opened, no thread runs: the opener is a Deferred the
test fires. The real client against slapd and Samba AD is in
tests/integration/test_ldap_directory.py and test_active_directory.py.
"""

from __future__ import annotations

import os

import ldap
import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Reason
from mfaserver.config import LdapConfig
from mfaserver.directory.libldap import Connection, LdapLogins, ServerDown

BASE = "dc=example,dc=org"
GROUP = f"cn=vpn,{BASE}"


def dn(name: str) -> str:
    return f"uid={name},{BASE}"


class FakeHandle:
    """A python-ldap LDAPObject: records operations, returns queued results."""

    def __init__(self, server: FakeServer, url: str, bind_dn: str):
        self.server = server
        self.url = url
        self.bind_dn = bind_dn
        self.started: dict[int, tuple] = {}   # msgid -> operation, not answered yet
        self.searches: list[tuple] = []
        self.binds: list[tuple] = []
        self.abandoned: list[int] = []
        self.ready: list = []                 # what result3 returns next
        self.unbound = False
        self._read, self._write = os.pipe()

    def fileno(self) -> int:
        return self._read

    def _start(self, operation: tuple) -> int:
        self.server.msgid += 1
        self.started[self.server.msgid] = operation
        return self.server.msgid

    def search_ext(self, base, scope, query, attributes, attrsonly, sctrls, cctrls, timeout,
                   sizelimit):
        msgid = self._start(("search", base, scope, query))
        self.searches.append((msgid, base, query))
        return msgid

    def simple_bind(self, who, password, serverctrls, clientctrls):
        msgid = self._start(("bind", who, password))
        self.binds.append((msgid, who, password))
        return msgid

    def abandon_ext(self, msgid, serverctrls, clientctrls):
        self.abandoned.append(msgid)
        self.started.pop(msgid, None)

    def result4(self, msgid, all, timeout, add_ctrls, add_intermediates, add_extop):
        assert (msgid, all, timeout) == (ldap.RES_ANY, 1, 0)  # never blocks
        if not self.ready:
            return None, None, None, None
        item = self.ready.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def unbind_ext(self):
        self.unbound = True
        os.close(self._read)
        os.close(self._write)


class FakeServer:
    """The directory behind the handles: users, passwords, one group, AD-style messages."""

    def __init__(self):
        self.msgid = 0
        self.users = {"alice": "alice-pw", "bob": "bob-pw"}
        self.members = {"alice"}
        self.handles: list[FakeHandle] = []
        self.opens: list[defer.Deferred] = []
        self.bind_error: dict[str, str] = {}  # name -> AD diagnostic for a refused bind
        self.auto_open = True

    def opener(self, url: str, bind_dn: str, password: str) -> defer.Deferred:
        handle = FakeHandle(self, url, bind_dn)
        self.handles.append(handle)
        if self.auto_open:
            return defer.succeed(handle)
        d = defer.Deferred()
        self.opens.append(d)
        return d

    def result(self, handle: FakeHandle, msgid: int, operation: tuple):
        kind = operation[0]
        if kind == "bind":
            who, password = operation[1], operation[2]
            name = who.split(",")[0].split("=")[1]
            if name in self.bind_error:
                return ldap.INVALID_CREDENTIALS({"msgid": msgid, "desc": "Invalid credentials",
                                                 "info": self.bind_error[name]})
            if self.users.get(name) != password:
                return ldap.INVALID_CREDENTIALS({"msgid": msgid, "desc": "Invalid credentials"})
            return (ldap.RES_BIND, [], msgid, [])
        _, base, scope, query = operation
        if scope == ldap.SCOPE_BASE:  # a group check
            name = query.split("member=uid=")[1].split(",")[0]
            entries = [(base, {})] if base == GROUP and name in self.members else []
            return (ldap.RES_SEARCH_RESULT, entries, msgid, [])
        name = query[len("(uid="):-1]
        entries = [(dn(name), {"uid": [name.encode()], "mobile": [b"+15550001"]})] \
            if name in self.users else []
        # An AD-style continuation reference, which is not an entry.
        return (ldap.RES_SEARCH_RESULT, entries + [(None, ["ldap://elsewhere"])], msgid, [])

    def answer(self, reactor, order=None) -> None:
        """Answer every operation started so far (``order``: a key on msgids), then read."""
        pending = [(h, m, op) for h in self.handles for m, op in h.started.items()]
        if order is not None:
            pending.sort(key=lambda p: order(p[1]))
        for handle, msgid, operation in pending:
            del handle.started[msgid]
            handle.ready.append(self.result(handle, msgid, operation))
        for handle, *_ in pending:
            for reader in list(reactor.readers):
                if reader.handle is handle and not reader.closed:
                    reader.doRead()


def config(**overrides) -> LdapConfig:
    values = dict(servers=("ldap://a", "ldap://b"), base_dn=BASE, bind_dn="cn=svc",
                  bind_password="svc-pw", timeout=1.0, pool_size=4, retry_dead_after=30.0)
    values.update(overrides)
    return LdapConfig(**values)


@pytest.fixture
def reactor():
    return MemoryReactorClock()


@pytest.fixture
def server():
    return FakeServer()


def logins(reactor, server, groups=(), **overrides) -> LdapLogins:
    return LdapLogins(config(**overrides), groups, reactor, server.opener, lambda h: h.unbind_ext())


def login(made: LdapLogins, name: str, password: str) -> defer.Deferred:
    return defer.ensureDeferred(made.login(name, f"(uid={name})", name, password))


def outcome(d):
    results = []
    d.addBoth(results.append)
    assert results, "the login has not finished"
    return results[0]


def until_answered(reactor, server, d, rounds=5):
    for _ in range(rounds):
        if d.called:
            break
        server.answer(reactor)
    return outcome(d)


def test_login_searches_binds_as_the_user_and_checks_groups(reactor, server):
    made = logins(reactor, server, groups=[GROUP])
    principal = until_answered(reactor, server, login(made, "alice", "alice-pw"))
    assert (principal.username, principal.phone, principal.groups) == (
        "alice", "+15550001", {GROUP})
    searchers = [h for h in server.handles if h.searches]
    binders = [h for h in server.handles if h.binds]
    # The user's bind is on a connection that never searches.
    assert searchers and binders and not set(map(id, searchers)) & set(map(id, binders))


def test_results_are_matched_by_msgid_whatever_their_order(reactor, server):
    made = logins(reactor, server)
    good = login(made, "alice", "alice-pw")
    bad = login(made, "bob", "wrong")
    # Searches for both are pipelined on one connection; answer them last first.
    for _ in range(4):
        server.answer(reactor, order=lambda msgid: -msgid)
    assert outcome(good).username == "alice"
    assert outcome(bad).value.reason is Reason.BAD_PASSWORD
    searched = [h for h in server.handles if h.searches]
    assert len(searched) == 1 and len(searched[0].searches) == 2


def test_one_readable_event_reads_every_buffered_result(reactor, server):
    made = logins(reactor, server)
    first, second = login(made, "alice", "x"), login(made, "bob", "y")
    [searcher] = server.handles
    # Both responses are in libldap's buffer; the socket is readable once.
    for msgid, operation in sorted(searcher.started.items()):
        searcher.ready.append(server.result(searcher, msgid, operation))
    searcher.started.clear()
    [conn] = [r for r in reactor.readers if r.handle is searcher]
    conn.doRead()
    assert len([h for h in server.handles if h is not searcher]) >= 1  # both went on to bind
    assert not first.called and not second.called
    assert isinstance(until_answered(reactor, server, first).value, InvalidCredentials)
    assert isinstance(until_answered(reactor, server, second).value, InvalidCredentials)


def test_unknown_user_and_empty_result(reactor, server):
    made = logins(reactor, server)
    assert isinstance(until_answered(reactor, server, login(made, "nobody", "pw")).value,
                      UnknownUser)


def test_required_group(reactor, server):
    made = logins(reactor, server, required_group=GROUP)
    assert until_answered(reactor, server, login(made, "alice", "alice-pw")).groups == {GROUP}
    failure = until_answered(reactor, server, login(made, "bob", "bob-pw"))
    assert failure.value.reason is Reason.NOT_IN_GROUP


@pytest.mark.parametrize("code, reason", [
    ("533", Reason.ACCOUNT_DISABLED), ("532", Reason.PASSWORD_EXPIRED),
    ("775", Reason.ACCOUNT_LOCKED), ("773", Reason.MUST_CHANGE_PASSWORD),
    ("52e", Reason.BAD_PASSWORD)])
def test_ad_bind_errors_keep_their_reason(reactor, server, code, reason):
    server.bind_error["alice"] = f"80090308: LdapErr: DSID-0C09044E, comment: " \
                                 f"AcceptSecurityContext error, data {code}, v4563"
    made = logins(reactor, server, active_directory=True)
    failure = until_answered(reactor, server, login(made, "alice", "alice-pw"))
    assert failure.check(InvalidCredentials) and failure.value.reason is reason


def test_an_operation_without_answer_drops_the_connection_and_fails_over(reactor, server):
    made = logins(reactor, server)
    d = login(made, "alice", "alice-pw")
    [hung] = server.handles
    reactor.advance(1.0)  # the search's timeout
    assert hung.abandoned and hung.unbound
    assert hung not in [r.handle for r in reactor.readers]
    principal = until_answered(reactor, server, d)  # answered by ldap://b
    assert principal.username == "alice"
    assert made.servers[0].dead_until == pytest.approx(31.0)
    # Skipped while dead: the next login goes to ldap://b at once.
    d = login(made, "bob", "bob-pw")
    assert {h.url for h in server.handles if h.started} == {"ldap://b"}
    assert until_answered(reactor, server, d).username == "bob"


def test_an_open_that_hangs_fails_at_the_timeout_and_fails_over(reactor, server):
    server.auto_open = False
    made = logins(reactor, server)
    d = login(made, "alice", "alice-pw")
    reactor.advance(1.0)  # ldap://a never connected
    assert server.opens[0].called  # cancelled by the timeout
    server.opens[1].callback(server.handles[1])  # ldap://b's searcher
    server.answer(reactor)
    server.opens[2].callback(server.handles[2])  # ldap://b's binder
    assert until_answered(reactor, server, d).username == "alice"


def test_all_servers_down_is_unavailable(reactor, server):
    made = logins(reactor, server)
    d = login(made, "alice", "alice-pw")
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert isinstance(outcome(d).value, DirectoryUnavailable)


def test_a_server_that_closes_an_idle_connection_is_noticed_and_replaced(reactor, server):
    made = logins(reactor, server, servers=("ldap://a",))
    assert until_answered(reactor, server, login(made, "alice", "alice-pw")).username == "alice"
    first = list(server.handles)
    for handle in first:
        handle.ready.append(ldap.SERVER_DOWN({"desc": "Can't contact LDAP server"}))
    for reader in list(reactor.readers):
        reader.doRead()
    assert not reactor.readers and all(h.unbound for h in first)
    assert until_answered(reactor, server, login(made, "bob", "bob-pw")).username == "bob"
    assert len(server.handles) == 2 * len(first)


def test_a_readable_idle_connection_without_a_result_is_dropped(reactor, server):
    conn = Connection(FakeHandle(server, "ldap://a", ""), reactor, 1.0,
                      lambda h: h.unbind_ext(), lambda c: None)
    assert conn in reactor.readers
    conn.doRead()  # readable, nothing pending, nothing to read: end of file
    assert conn.closed and conn not in reactor.readers


def test_operations_on_a_failed_connection_fail_as_server_down(reactor, server):
    conn = Connection(FakeHandle(server, "ldap://a", ""), reactor, 1.0,
                      lambda h: h.unbind_ext(), lambda c: None)
    d = conn.submit(lambda h: h.simple_bind("uid=x", "pw", None, None))
    conn.fail(ServerDown("gone"))
    assert outcome(d).check(ServerDown)
    assert outcome(conn.submit(lambda h: h.simple_bind("uid=x", "pw", None, None))).check(ServerDown)
