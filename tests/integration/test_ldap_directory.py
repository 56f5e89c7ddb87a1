"""LdapDirectory against a real slapd on 127.0.0.1, and against servers that misbehave.

These run on the real reactor (pytest-twisted): real sockets, real worker
processes and their threads, real timeouts (1 s, so the slow cases stay
short). The fixture waits until the workers have started, so that the
timings measure logins, not Python starting up. What needs no server or
process (refusals before any traffic, the deadline, the pipe protocol, the
AD rules) is in tests/test_ldap_directory.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import ldap3
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as real_reactor
from twisted.logger import LogLevel, globalLogPublisher

import ldap_server
from ldap_server import (
    ADMINS_GROUP, BASE_DN, DUP_PASSWORD, MOBILE, PUBLIC_DN, PUBLIC_PASSWORD, SERVICE_DN,
    SERVICE_PASSWORD, VPN_GROUP, user_password,
)
from mfaserver.auth.interfaces import DirectoryUnavailable, InvalidCredentials, UnknownUser
from mfaserver.auth.model import Reason
from mfaserver.config import LdapConfig
from mfaserver.directory import ldap_worker
from mfaserver.directory.ldap import Ldap3Directory
from mfaserver.directory.libldap import LibldapDirectory

pytestmark = pytest.mark.integration

PW0 = user_password(0)

INJECTIONS = [
    "*", "user*", "adm*", "*)(uid=*", "*)(|(objectClass=*)", "user000)(uid=*",
    "x)(memberOf=cn=admins*", "\\", "\\2a", "\x00", "user000\x00", "a,ou=x", "#x",
    "uid=user000,ou=people,dc=example,dc=org", "(uid=user000)", "u" * 253,
    "Üser000", "user000*",
]


def config(servers, **overrides) -> LdapConfig:
    values = dict(servers=tuple(servers), base_dn=BASE_DN, bind_dn=SERVICE_DN,
                  bind_password=SERVICE_PASSWORD, timeout=1.0, pool_size=4,
                  retry_dead_after=30.0)
    values.update(overrides)
    return LdapConfig(**values)


@pytest_twisted.async_yield_fixture
async def directory():
    """Makes started LdapDirectory objects on the real reactor; stops them afterwards."""
    started = []

    async def make(servers, groups=(), processes=None, client="libldap",
                   **overrides) -> LibldapDirectory:
        # processes: the ldap3 worker processes (client = "ldap3"); libldap has none.
        kind = Ldap3Directory if client == "ldap3" else LibldapDirectory
        made = kind(config(servers, **overrides), real_reactor, groups=groups,
                    processes=processes)
        started.append(made)
        await made.start()
        return made

    yield make
    for made in started:
        await made.stop()


async def failure(d, kind):
    """The exception ``d`` fails with; the test fails if it succeeds or fails otherwise."""
    try:
        result = await d
    except kind as e:
        return e
    pytest.fail(f"expected {kind.__name__}, got {result!r}")


# --- Logins --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_returns_the_canonical_name_and_phone(slapd, directory):
    ldap = await directory([slapd.url])
    principal = await ldap.authenticate("USER000", PW0)
    assert principal.username == "user000"
    assert principal.phone == MOBILE
    assert principal.groups == frozenset()
    other = await ldap.authenticate("user005", user_password(5))
    assert (other.username, other.phone) == ("user005", None)


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_invalid_credentials(slapd, directory):
    ldap = await directory([slapd.url])
    e = await failure(ldap.authenticate("user000", user_password(1)), InvalidCredentials)
    assert e.reason is Reason.BAD_PASSWORD
    # The pooled connections survive a refusal: the next login works.
    assert (await ldap.authenticate("user001", user_password(1))).username == "user001"


@pytest_twisted.ensureDeferred
async def test_unknown_user(slapd, directory):
    ldap = await directory([slapd.url])
    await failure(ldap.authenticate("nobody", "whatever"), UnknownUser)
    await failure(ldap.authenticate("", "whatever"), UnknownUser)


@pytest_twisted.ensureDeferred
async def test_empty_password_sends_nothing_on_open_pooled_connections(slapd, ldap_proxy,
                                                                       directory):
    ldap = await directory([ldap_proxy.url])
    await ldap.authenticate("user000", PW0)  # the pools now hold open connections
    sent = len(ldap_proxy.sent)
    await failure(ldap.authenticate("user000", ""), InvalidCredentials)
    await failure(ldap.authenticate("user000", "   "), InvalidCredentials)
    assert len(ldap_proxy.sent) == sent


@pytest_twisted.ensureDeferred
async def test_injection_attempts_match_nobody(slapd, directory):
    ldap = await directory([slapd.url])
    for name in INJECTIONS:
        await failure(ldap.authenticate(name, PW0), UnknownUser)


@pytest_twisted.ensureDeferred
async def test_two_matching_entries_are_refused_as_ambiguous(slapd, directory):
    ldap = await directory([slapd.url])
    e = await failure(ldap.authenticate("dup", DUP_PASSWORD), InvalidCredentials)
    assert e.reason is Reason.AMBIGUOUS_USER


@pytest_twisted.ensureDeferred
async def test_anonymous_search_sees_only_what_anonymous_may_read(slapd, directory):
    public = await directory([slapd.url], bind_dn="", bind_password="", base_dn=PUBLIC_DN)
    assert (await public.authenticate("public", PUBLIC_PASSWORD)).username == "public"
    everything = await directory([slapd.url], bind_dn="", bind_password="")
    await failure(everything.authenticate("user000", PW0), UnknownUser)
    assert (await everything.authenticate("public", PUBLIC_PASSWORD)).username == "public"


@pytest_twisted.ensureDeferred
async def test_search_base_that_does_not_exist_makes_the_directory_unavailable(
        slapd, directory):
    ldap = await directory([slapd.url], base_dn="ou=nowhere,dc=example,dc=org")
    await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)


@pytest_twisted.ensureDeferred
async def test_wrong_service_password_makes_the_directory_unavailable(slapd, directory):
    ldap = await directory([slapd.url], bind_password="wrong")
    await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)


# --- Groups --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_required_group_member_logs_in_and_others_are_refused(slapd, directory):
    ldap = await directory([slapd.url], required_group=VPN_GROUP)
    principal = await ldap.authenticate("user050", user_password(50))
    assert principal.groups == {VPN_GROUP}
    e = await failure(ldap.authenticate("user150", user_password(150)), InvalidCredentials)
    assert e.reason is Reason.NOT_IN_GROUP
    # Groups are checked only after the bind: a wrong password is just that.
    e = await failure(ldap.authenticate("user150", "wrong"), InvalidCredentials)
    assert e.reason is Reason.BAD_PASSWORD


@pytest_twisted.ensureDeferred
async def test_reply_groups_are_reported(slapd, directory):
    missing = f"cn=missing,ou=groups,{BASE_DN}"
    ldap = await directory([slapd.url], groups=[ADMINS_GROUP, VPN_GROUP, missing])
    assert (await ldap.authenticate("user000", PW0)).groups == {ADMINS_GROUP, VPN_GROUP}
    assert (await ldap.authenticate("user050", user_password(50))).groups == {VPN_GROUP}
    assert (await ldap.authenticate("user250", user_password(250))).groups == frozenset()


@pytest_twisted.ensureDeferred
async def test_referrals_in_the_search_result_are_not_followed(slapd, hung_ldap, directory):
    referral = f"ou=elsewhere,{ldap_server.PEOPLE_DN}"
    manage_dsa_it = [("2.16.840.1.113730.3.4.2", True, None)]
    admin = ldap3.Connection(slapd.url, ldap_server.ROOT_DN, ldap_server.ROOT_PASSWORD,
                             auto_bind=True)
    assert admin.add(referral, ["referral", "extensibleObject"],
                     {"ou": "elsewhere", "ref": f"{hung_ldap.url}/{referral}"},
                     controls=manage_dsa_it), admin.result
    try:
        ldap = await directory([slapd.url])
        assert (await ldap.authenticate("user000", PW0)).username == "user000"
        await failure(ldap.authenticate("nobody", PW0), UnknownUser)
    finally:
        admin.delete(referral, controls=manage_dsa_it)
        admin.unbind()
    assert hung_ldap.connections == 0


# --- Failures of servers -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dead_first_server_fails_over_and_is_skipped_then_retried(
        slapd, closing_ldap, directory):
    ldap = await directory([ldap_server.dead_url(), closing_ldap.url, slapd.url],
                     retry_dead_after=0.5)
    assert (await ldap.authenticate("user000", PW0)).username == "user000"
    assert closing_ldap.connections == 1
    assert (await ldap.authenticate("user001", user_password(1))).username == "user001"
    assert closing_ldap.connections == 1  # skipped while marked dead
    await task.deferLater(real_reactor, 0.6)
    assert (await ldap.authenticate("user002", user_password(2))).username == "user002"
    assert closing_ldap.connections == 2  # tried again after retry_dead_after


@pytest_twisted.ensureDeferred
async def test_all_servers_down_is_unavailable(closing_ldap, directory):
    ldap = await directory([ldap_server.dead_url(), closing_ldap.url], processes=1)
    await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)
    # Every server is marked dead now, so all are tried again.
    await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)
    assert closing_ldap.connections == 2


@pytest_twisted.ensureDeferred
async def test_idle_connections_closed_by_the_server_are_replaced(slapd, ldap_proxy,
                                                                  directory):
    ldap = await directory([ldap_proxy.url])
    await ldap.authenticate("user000", PW0)
    ldap_proxy.drop_connections()
    await task.deferLater(real_reactor, 0.1)
    assert (await ldap.authenticate("user001", user_password(1))).username == "user001"


@pytest_twisted.ensureDeferred
async def test_hung_server_fails_in_time_while_a_healthy_directory_keeps_serving(
        slapd, hung_ldap, directory):
    hung = await directory([hung_ldap.url], pool_size=2)
    healthy = await directory([slapd.url], pool_size=2)
    start = time.monotonic()
    stuck = [defer.ensureDeferred(failure(hung.authenticate(f"user{i:03d}", user_password(i)),
                                          DirectoryUnavailable))
             for i in range(6)]
    names = await defer.gatherResults(
        [healthy.authenticate(f"user{i:03d}", user_password(i)) for i in range(20)])
    assert names[19].username == "user019"
    assert time.monotonic() - start < 0.8
    await defer.gatherResults(stuck)
    # Two logins held the two threads for the 1 s timeout; the four queued
    # behind them skipped the server that had just failed.
    assert time.monotonic() - start < 1.8


@pytest_twisted.ensureDeferred
async def test_hung_first_server_costs_one_timeout_then_fails_over(slapd, hung_ldap,
                                                                   directory):
    ldap = await directory([hung_ldap.url, slapd.url], processes=1, pool_size=2)
    start = time.monotonic()
    principals = await defer.gatherResults(
        [ldap.authenticate(f"user{i:03d}", user_password(i)) for i in range(16)])
    assert [p.username for p in principals] == [f"user{i:03d}" for i in range(16)]
    assert time.monotonic() - start < 1.8
    start = time.monotonic()
    await ldap.authenticate("user000", PW0)  # the hung server is skipped now
    assert time.monotonic() - start < 0.3


# --- The worker processes ------------------------------------------------------------------------

def worker_pids(ldap: Ldap3Directory) -> list[int]:
    return [w.pid for w in ldap._workers if w.running]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def until(condition, timeout: float = 2.0) -> None:
    """Wait on the real reactor until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await task.deferLater(real_reactor, 0.01)


def test_worker_process_speaks_json_lines_and_exits_at_end_of_input(slapd):
    setup = {"config": ldap_worker.config_to_json(config([slapd.url])),
             "groups": [VPN_GROUP], "threads": 2}
    requests = [{"id": 1, "user": "user000", "filter": "(uid=user000)", "name": "user000",
                 "password": PW0},
                {"id": 2, "user": "user001", "filter": "(uid=user001)", "name": "user001",
                 "password": "wrong"}]
    lines = [json.dumps(m) for m in (setup, *requests)]
    child = subprocess.run([sys.executable, "-m", "mfaserver.directory.ldap_worker"],
                           input="\n".join(lines) + "\n", capture_output=True, text=True,
                           timeout=30)
    assert child.returncode == 0, child.stderr
    answers = [json.loads(line) for line in child.stdout.splitlines()]
    assert answers[0] == {"ready": True}
    assert sorted(answers[1:], key=lambda m: m["id"]) == [
        {"id": 1, "principal": {"username": "user000", "phone": MOBILE, "groups": [VPN_GROUP]}},
        {"id": 2, "error": "invalid", "reason": "bad_password",
         "detail": "bind refused: invalidCredentials"}]
    assert child.stderr == ""


@pytest_twisted.ensureDeferred
async def test_service_password_is_in_neither_argv_nor_environment(slapd, directory):
    ldap = await directory([slapd.url], processes=2, client="ldap3")
    pids = worker_pids(ldap)
    assert len(pids) == 2
    for pid in pids:
        for what in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{what}", "rb") as f:
                assert SERVICE_PASSWORD.encode() not in f.read()


@pytest_twisted.ensureDeferred
async def test_two_worker_processes_share_the_logins(slapd, directory):
    ldap = await directory([slapd.url], groups=[ADMINS_GROUP], processes=2, client="ldap3")
    principals = await defer.gatherResults(
        [ldap.authenticate(f"user{i:03d}", user_password(i)) for i in range(40)])
    assert [p.username for p in principals] == [f"user{i:03d}" for i in range(40)]
    assert [p.groups for p in principals[:3]] == [{ADMINS_GROUP}, {ADMINS_GROUP}, set()]


@pytest_twisted.ensureDeferred
async def test_worker_that_dies_fails_its_logins_at_once(hung_ldap, directory):
    ldap = await directory([hung_ldap.url], processes=1, client="ldap3")
    start = time.monotonic()
    d = ldap.authenticate("user000", PW0)
    await until(lambda: hung_ldap.connections > 0)
    os.kill(worker_pids(ldap)[0], signal.SIGKILL)
    e = await failure(d, DirectoryUnavailable)
    assert "ended" in str(e)
    assert time.monotonic() - start < 0.9  # before the server's 1 s timeout


@pytest_twisted.ensureDeferred
async def test_worker_that_dies_is_replaced(slapd, directory):
    ldap = await directory([slapd.url], processes=1, client="ldap3")
    await ldap.authenticate("user000", PW0)
    [first] = worker_pids(ldap)
    os.kill(first, signal.SIGKILL)
    await until(lambda: process_gone(first) and not worker_pids(ldap))
    # The login waits for the new worker process.
    assert (await ldap.authenticate("user001", user_password(1))).username == "user001"
    assert worker_pids(ldap) != [first]


@pytest_twisted.ensureDeferred
async def test_stuck_worker_fails_logins_at_the_deadline_and_is_killed_on_stop(
        slapd, directory):
    ldap = await directory([slapd.url], processes=1, client="ldap3")
    [pid] = worker_pids(ldap)
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        login = defer.ensureDeferred(failure(ldap.authenticate("user000", PW0),
                                             DirectoryUnavailable))
        login.addCallback(lambda _: time.monotonic() - start)
        # A stopped process reads no end of input and ignores SIGTERM (sent after the
        # deadline): SIGKILL ends it.
        await ldap.stop()
        assert 3.9 < time.monotonic() - start < 5.5
        assert 1.9 < await login < 3  # 1 s timeout: one per server plus one
        assert process_gone(pid)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_stop_ends_the_workers_cleanly(slapd):
    ldap = Ldap3Directory(config([slapd.url]), real_reactor, processes=2)
    await ldap.start()
    pending = ldap.authenticate("user000", PW0)
    pids = worker_pids(ldap)
    start = time.monotonic()
    await ldap.stop()
    assert time.monotonic() - start < 1.5  # at end of input, not by a signal
    assert all(process_gone(pid) for pid in pids)
    assert (await pending).username == "user000"  # a login in progress finishes


@pytest.mark.parametrize("client", ["ldap3", "libldap"])
@pytest_twisted.ensureDeferred
async def test_worker_log_events_reach_the_daemon_log(client, slapd, directory):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        dead = ldap_server.dead_url()
        ldap = await directory([dead, slapd.url], processes=1, client=client)
        assert (await ldap.authenticate("user000", PW0)).username == "user000"
    finally:
        globalLogPublisher.removeObserver(events.append)
    failed = [e for e in events if e.get("log_format", "").startswith("LDAP server {url} failed")]
    assert [e["url"] for e in failed] == [dead]
    assert failed[0]["log_level"] == LogLevel.warn
    assert PW0 not in repr(events) and SERVICE_PASSWORD not in repr(events)


# --- TLS -----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_ldaps_with_the_right_ca_works(slapd, ldap_certs, directory):
    ldap = await directory([slapd.ldaps_url], ca_file=ldap_certs.ca_file)
    assert (await ldap.authenticate("user000", PW0)).username == "user000"


@pytest_twisted.ensureDeferred
async def test_start_tls_with_the_right_ca_works_and_hides_the_password(
        slapd, ldap_proxy, ldap_certs, directory):
    ldap = await directory([ldap_proxy.url], start_tls=True, ca_file=ldap_certs.ca_file)
    assert (await ldap.authenticate("user000", PW0)).username == "user000"
    assert PW0.encode() not in ldap_proxy.sent
    assert SERVICE_PASSWORD.encode() not in ldap_proxy.sent


@pytest_twisted.ensureDeferred
async def test_plain_ldap_sends_the_password_in_clear(slapd, ldap_proxy, directory):
    # The converse of the test above, to show that the recording works.
    ldap = await directory([ldap_proxy.url])
    await ldap.authenticate("user000", PW0)
    assert PW0.encode() in ldap_proxy.sent


@pytest.mark.parametrize("ca", ["other", "system"])
@pytest_twisted.ensureDeferred
async def test_ldaps_with_an_untrusted_certificate_is_refused(ca, slapd, ldap_certs,
                                                               directory):
    ca_file = ldap_certs.other_ca_file if ca == "other" else None
    ldap = await directory([slapd.ldaps_url], ca_file=ca_file)
    await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)


@pytest_twisted.ensureDeferred
async def test_start_tls_with_an_untrusted_certificate_never_sends_the_password(
        slapd, ldap_proxy, ldap_certs, directory):
    ldap = await directory([ldap_proxy.url], start_tls=True, ca_file=ldap_certs.other_ca_file)
    await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)
    assert ldap_proxy.sent  # the StartTLS request went out...
    assert SERVICE_PASSWORD.encode() not in ldap_proxy.sent  # ...but no bind
    assert PW0.encode() not in ldap_proxy.sent


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_host_name_is_refused(slapd_wrong_name, ldap_certs,
                                                             directory):
    for url, tls in ((slapd_wrong_name.ldaps_url, False), (slapd_wrong_name.url, True)):
        ldap = await directory([url], start_tls=tls, ca_file=ldap_certs.ca_file)
        await failure(ldap.authenticate("user000", PW0), DirectoryUnavailable)


@pytest_twisted.ensureDeferred
async def test_ad_mode_strips_the_domain_and_reports_the_canonical_name(slapd, directory):
    # slapd stands in for AD here: only the name handling and the bind are AD-specific.
    ldap = await directory([slapd.url], active_directory=True, ad_domain="EXAMPLE")
    assert (await ldap.authenticate("example\\USER000", PW0)).username == "user000"
    await failure(ldap.authenticate("OTHER\\user000", PW0), UnknownUser)
    e = await failure(ldap.authenticate("EXAMPLE\\user000", "wrong"), InvalidCredentials)
    assert e.reason is Reason.BAD_PASSWORD


# --- libldap specifics ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_ldaps_server_that_never_answers_the_handshake_fails_in_time_and_stops(
        slapd, hung_ldap, ldap_certs):
    # libldap's ldaps:// handshake blocks for ever on a blocking socket: the open
    # thread must end too, or stop() (which joins the threads) would hang.
    ldap = LibldapDirectory(config([hung_ldap.url.replace("ldap://", "ldaps://"), slapd.url],
                                   ca_file=ldap_certs.ca_file), real_reactor)
    await ldap.start()
    start = time.monotonic()
    assert (await ldap.authenticate("user000", PW0)).username == "user000"
    assert time.monotonic() - start < 1.8  # one timeout, then the next server
    start = time.monotonic()
    await ldap.stop()
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("kind", ["ldaps", "start_tls"])
@pytest_twisted.ensureDeferred
async def test_many_logins_pipelined_over_tls_each_get_their_own_answer(
        kind, slapd, ldap_certs, directory):
    # TLS records may carry several responses that libldap buffers: each readable
    # event is drained, and every login gets its own result (msgid matching).
    url = slapd.ldaps_url if kind == "ldaps" else slapd.url
    ldap = await directory([url], groups=[ADMINS_GROUP, VPN_GROUP],
                           start_tls=kind == "start_tls", ca_file=ldap_certs.ca_file)
    logins = [ldap.authenticate(f"user{i:03d}", user_password(i) if i % 3 else "wrong")
              for i in range(60)]
    results = await defer.DeferredList(logins, consumeErrors=True)
    for i, (ok, value) in enumerate(results):
        if i % 3:
            assert ok and value.username == f"user{i:03d}"
            expected = ({ADMINS_GROUP} if i < 2 else set()) | ({VPN_GROUP} if i < 100 else set())
            assert value.groups == expected
        else:
            assert not ok and value.check(InvalidCredentials)
            assert value.value.reason is Reason.BAD_PASSWORD
