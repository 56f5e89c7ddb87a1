"""LdapDirectory without servers or processes: refusals before any LDAP traffic, the
deadline, the worker pipe protocol and its threads, and the AD name and error rules.

The worker processes are fakes on a `task.Clock` (`ProcessReactor`): nothing
is spawned, and what the daemon writes down each pipe is recorded. The
tests against a real slapd and real worker processes are in
tests/integration/test_ldap_directory.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from ldap_server import (
    ADMINS_GROUP, BASE_DN, MOBILE, SERVICE_DN, SERVICE_PASSWORD, VPN_GROUP, user_password,
)
from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Principal, Reason
from mfaserver.config import LdapConfig
from mfaserver.directory import ad, ldap_worker
from mfaserver.directory.ldap import FIRST_RESTART_DELAY, KILL_GRACE, Ldap3Directory as LdapDirectory

PW0 = user_password(0)
NOWHERE = "ldap://ldap.example.invalid"  # never contacted: no worker runs for real


def config(servers=(NOWHERE,), **overrides) -> LdapConfig:
    values = dict(servers=tuple(servers), base_dn=BASE_DN, timeout=1.0, pool_size=4)
    values.update(overrides)
    return LdapConfig(**values)


def result_now(d):
    """The result the already-fired ``d`` succeeded with."""
    results = []
    d.addCallback(results.append)
    assert results, "expected a result at once"
    return results[0]


def failure_now(d, kind):
    """The exception the already-fired ``d`` failed with."""
    failures = []
    d.addErrback(failures.append)
    assert failures, f"expected {kind.__name__} at once"
    return failures[0].trap(kind) and failures[0].value


class FakeProcess:
    """The transport of a worker process that was never started: records what it is sent."""

    def __init__(self, protocol, pid: int):
        self.protocol = protocol
        self.pid = pid
        self.written: list[bytes] = []
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def logins_sent(self) -> list[dict]:
        """The JSON lines written after the setup line."""
        return [json.loads(line) for line in b"".join(self.written[1:]).splitlines()]

    def answer(self, request_id: int, outcome: Principal | Exception) -> None:
        """The worker writes its answer, in two pieces as a pipe may deliver it."""
        line = json.dumps(ldap_worker.encode_outcome(request_id, outcome)).encode() + b"\n"
        self.protocol.outReceived(line[:7])
        self.protocol.outReceived(line[7:])

    def end(self, reason=ProcessTerminated(signal=9)) -> None:
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(task.Clock):
    """A clock whose spawnProcess starts nothing and hands out `FakeProcess` transports."""

    def __init__(self):
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, protocol, executable, args, env=None, **kwargs):
        process = FakeProcess(protocol, pid=1000 + len(self.processes))
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


def started(processes: int = 1, **overrides) -> tuple[LdapDirectory, ProcessReactor]:
    """An LdapDirectory with its fake worker processes running."""
    reactor = ProcessReactor()
    ldap = LdapDirectory(config(**overrides), reactor, processes=processes)
    ldap.start()
    return ldap, reactor


# --- Refused before any LDAP traffic --------------------------------------------------------------

@pytest.mark.parametrize("password", ["", " ", "\t \n", "\u00a0", "\u200b", "\u00ad"])
def test_empty_or_blank_password_is_refused_without_contacting_the_server(password):
    ldap, reactor = started()
    d = ldap.authenticate("user000", password)
    # Refused at once, before anything went to a worker (so to no LDAP server).
    e = failure_now(d, InvalidCredentials)
    assert e.reason in (Reason.EMPTY_PASSWORD, Reason.BAD_PASSWORD)
    assert reactor.processes[0].logins_sent() == []


@pytest.mark.parametrize("password", ["pass\x00word", "pass\x07word"])
def test_password_that_saslprep_refuses_is_refused_without_contacting_the_server(password):
    ldap, reactor = started()
    e = failure_now(ldap.authenticate("user000", password), InvalidCredentials)
    assert e.reason is Reason.BAD_PASSWORD
    assert reactor.processes[0].logins_sent() == []


def test_login_that_gets_no_worker_fails_at_the_deadline():
    clock = task.Clock()
    ldap = LdapDirectory(config(), clock)  # workers never started
    d = ldap.authenticate("user000", PW0)
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)  # 1 s timeout: one per server plus one
    failure_now(d, DirectoryUnavailable)


# --- The worker processes and their pipes ---------------------------------------------------------

def test_a_login_goes_down_the_pipe_and_the_answer_fires_it():
    ldap, reactor = started()
    worker = reactor.processes[0]
    assert json.loads(worker.written[0])["threads"] == 4  # the setup line: pool_size threads
    d = ldap.authenticate("USER000", PW0)
    assert worker.logins_sent() == [{"id": 1, "user": "USER000", "filter": "(uid=USER000)",
                                     "name": "USER000", "password": PW0}]
    assert not d.called
    worker.answer(1, Principal("user000", MOBILE))
    assert result_now(d) == Principal("user000", MOBILE)


def test_logins_go_to_the_worker_with_the_fewest_in_progress():
    ldap, reactor = started(processes=2)
    first, second = reactor.processes
    for i in range(3):
        ldap.authenticate(f"user{i:03d}", user_password(i))
    second.answer(2, UnknownUser())  # the first now holds two, the second none
    ldap.authenticate("user003", user_password(3))
    assert [m["id"] for m in first.logins_sent()] == [1, 3]
    assert [m["id"] for m in second.logins_sent()] == [2, 4]


def test_a_login_a_stuck_worker_does_not_answer_fails_at_the_deadline_and_is_withdrawn():
    ldap, reactor = started()
    worker = reactor.processes[0]
    d = ldap.authenticate("user000", PW0)
    reactor.advance(1.9)
    assert not d.called
    reactor.advance(0.1)  # 1 s timeout: one per server plus one
    failure_now(d, DirectoryUnavailable)
    assert worker.logins_sent()[-1] == {"cancel": 1}
    worker.answer(1, Principal("user000"))  # too late: ignored


def test_a_worker_that_ends_fails_its_logins_and_is_started_again_later():
    ldap, reactor = started()
    d = ldap.authenticate("user000", PW0)
    reactor.processes[0].end()
    assert "ended" in str(failure_now(d, DirectoryUnavailable))
    waiting = ldap.authenticate("user001", user_password(1))  # waits for the next worker
    reactor.advance(FIRST_RESTART_DELAY * 0.9)
    assert len(reactor.processes) == 1
    reactor.advance(FIRST_RESTART_DELAY * 0.1)
    assert len(reactor.processes) == 2
    assert [m["user"] for m in reactor.processes[1].logins_sent()] == ["user001"]
    # It dies too before answering anything: the next one waits twice as long.
    reactor.processes[1].end()
    failure_now(waiting, DirectoryUnavailable)
    reactor.advance(FIRST_RESTART_DELAY * 1.9)
    assert len(reactor.processes) == 2
    reactor.advance(FIRST_RESTART_DELAY * 0.1)
    assert len(reactor.processes) == 3


def test_stop_closes_the_pipe_then_signals_a_worker_that_does_not_exit():
    ldap, reactor = started()
    worker = reactor.processes[0]
    stopped = ldap.stop()
    assert worker.stdin_closed and worker.signals == []
    reactor.advance(2)  # the login deadline: one timeout per server plus one
    assert worker.signals == ["TERM"]
    reactor.advance(KILL_GRACE)
    assert worker.signals == ["TERM", "KILL"]
    assert not stopped.called
    worker.end(ProcessDone(0))
    assert result_now(stopped) is None
    reactor.advance(60)
    assert len(reactor.processes) == 1  # not started again


def test_outcomes_and_config_survive_the_json_lines():
    def through_json(value):
        return json.loads(json.dumps(value))

    principal = Principal("user000", MOBILE, groups=frozenset({VPN_GROUP, ADMINS_GROUP}))
    assert ldap_worker.decode_outcome(
        through_json(ldap_worker.encode_outcome(7, principal))) == principal
    refused = ldap_worker.decode_outcome(through_json(ldap_worker.encode_outcome(
        8, InvalidCredentials(Reason.ACCOUNT_LOCKED, "AD data 775: account locked out"))))
    assert (refused.reason, refused.detail) == (Reason.ACCOUNT_LOCKED,
                                                "AD data 775: account locked out")
    unknown = through_json(ldap_worker.encode_outcome(9, UnknownUser()))
    assert isinstance(ldap_worker.decode_outcome(unknown), UnknownUser)
    down = through_json(ldap_worker.encode_outcome(10, DirectoryUnavailable("no answer")))
    assert str(ldap_worker.decode_outcome(down)) == "no answer"
    original = config(["ldaps://a.example", "ldaps://b.example"], ca_file=Path("/x/ca.pem"),
                      bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD,
                      required_group=VPN_GROUP, active_directory=True)
    assert ldap_worker.config_from_json(
        through_json(ldap_worker.config_to_json(original))) == original


class _FakeLogins:
    """Stands in for `ldap_worker.Logins`: answers at once, remembers whom it checked."""

    def __init__(self):
        self.checked = []

    def failures(self):
        return (0,)

    def login(self, user, search_filter, name, password, seen):
        self.checked.append(user)
        if password != "right":
            raise InvalidCredentials(Reason.BAD_PASSWORD, "bind refused")
        return Principal(name)


def test_worker_drops_logins_cancelled_before_a_thread_took_them():
    stream = io.BytesIO()
    stream.close = lambda: None
    output = ldap_worker._Output(stream)
    logins = _FakeLogins()
    worker = ldap_worker.Worker(logins, 1, output)
    for i, user in enumerate(["alice", "bob", "carol"], 1):
        worker.submit({"id": i, "user": user, "filter": "", "name": user,
                       "password": "right" if user != "carol" else "wrong"})
    worker.cancel(2)
    worker.start()
    worker.stop()
    output.close()
    answers = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert logins.checked == ["alice", "carol"]
    assert answers == [
        {"id": 1, "principal": {"username": "alice", "phone": None, "groups": []}},
        {"id": 3, "error": "invalid", "reason": "bad_password", "detail": "bind refused"}]


# --- Active Directory: names and bind errors (no server) ------------------------------------------

AD_FILTER = "(&(objectClass=user)(sAMAccountName={username}))"


def test_ad_plain_and_domain_names_use_the_configured_filter():
    assert ad.search_filter("alice", AD_FILTER, "") == (
        "(&(objectClass=user)(sAMAccountName=alice))", "alice")
    assert ad.search_filter("EXAMPLE\\alice", AD_FILTER, "example") == (
        "(&(objectClass=user)(sAMAccountName=alice))", "alice")
    assert ad.search_filter("OTHER\\alice", AD_FILTER, "")[1] == "alice"  # any domain


def test_ad_upn_searches_user_principal_name_within_the_configured_filter():
    assert ad.search_filter("alice@example.org", AD_FILTER, "EXAMPLE") == (
        "(&(userPrincipalName=alice@example.org)"
        "(&(objectClass=user)(sAMAccountName=*)))", "alice@example.org")


@pytest.mark.parametrize("name", ["OTHER\\alice", "\\alice", "EXAMPLE\\", ""])
def test_ad_names_from_another_domain_or_empty_are_unknown(name):
    with pytest.raises(UnknownUser):
        ad.search_filter(name, AD_FILTER, "EXAMPLE")


def test_ad_names_are_escaped():
    assert ad.search_filter("*)(cn=*@x", AD_FILTER, "")[0] == (
        "(&(userPrincipalName=\\2a\\29\\28cn=\\2a@x)(&(objectClass=user)(sAMAccountName=*)))")
    assert ad.search_filter("EXAMPLE\\a*\\", AD_FILTER, "")[0] == (
        "(&(objectClass=user)(sAMAccountName=a\\2a\\5c))")
    assert ad.member_filter("cn=smith\\, j,ou=g") == (
        "(memberOf:1.2.840.113556.1.4.1941:=cn=smith\\5c, j,ou=g)")


@pytest.mark.parametrize("code, reason", [
    ("52e", Reason.BAD_PASSWORD),
    ("525", Reason.BAD_PASSWORD),
    ("530", Reason.LOGON_NOT_PERMITTED),
    ("531", Reason.LOGON_NOT_PERMITTED),
    ("532", Reason.PASSWORD_EXPIRED),
    ("533", Reason.ACCOUNT_DISABLED),
    ("701", Reason.ACCOUNT_EXPIRED),
    ("773", Reason.MUST_CHANGE_PASSWORD),
    ("775", Reason.ACCOUNT_LOCKED),
    ("999", Reason.BAD_PASSWORD),
])
def test_ad_bind_error_codes(code, reason):
    message = (f"80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, "
               f"data {code}, v4563\x00")
    e = ad.bind_failure(message)
    assert e.reason is reason
    assert f"data {code}" in e.detail


def test_ad_bind_error_code_case_and_samba_version_suffix():
    e = ad.bind_failure("80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext "
                        "error, data 775, v1db1")
    assert e.reason is Reason.ACCOUNT_LOCKED
    assert ad.bind_failure("... data 52E, v893").reason is Reason.BAD_PASSWORD


def test_ad_bind_error_without_a_code_is_a_wrong_password():
    e = ad.bind_failure("")
    assert e.reason is Reason.BAD_PASSWORD
    assert e.detail
