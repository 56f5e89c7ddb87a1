"""Fail-over between two nodes on one PostgreSQL (issue #12 part 3): real daemons,
``kill -9``, a real FreeRADIUS proxy with a fail-over pool, and a concurrency fuzz.

A node killed with a push pending leaves the push in the database: the NAS's
retry to the other node joins it (no second push) and is answered there when
the user answers; the killed node, started again, is a node of the cluster
again. A FreeRADIUS proxy with a fail-over home_server_pool of both nodes
(Status-Server checks) is the NAS's view of it end to end. The fuzz sends the
same codes to both nodes at once, kills one of them mid-way and checks that
no code was accepted twice and that every answered request has its one audit
row.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import psycopg
import pytest

from freeradius_server import RADIUSD_GLOBALS, running_freeradius
from ldap_server import free_tcp_port
from mfaserver.factors import oath
from mfaserver.radius import codec
from mfaserver.testing import access_request

from .conftest import SECRET, parse_radclient, start_daemon, stop_daemon
from . import test_cluster_e2e
from .test_cluster_e2e import Node, phone_at
from .test_push_e2e import PASSWORD, Login, _WakeSink, enroll, push_config
from .test_radius_e2e import SEED, SEED_B32
from .test_store_postgresql_e2e import add_user, code_at, store_config

pytestmark = pytest.mark.integration

wake_sink = test_cluster_e2e.wake_sink   # the fixture: a wake-up webhook that counts


# A kill -9, the NAS's time-outs and its fail-over take a while, longer on a busy
# machine: the pushes here wait longer than test_cluster_e2e's 20 s, and a node
# (started again beside a busy one) has longer to come up.
PUSH_TIMEOUT = 45
START_SECONDS = 60


def node_config(dsn: str, name: str) -> str:
    return store_config(dsn) + f'[cluster]\nnode_name = "{name}"\n'


def push_node(directory, dsn: str, name: str) -> Node:
    web_port = free_tcp_port()
    config = push_config(web_port, timeout=PUSH_TIMEOUT, notify="webhook")
    return Node(start_daemon(directory, config + node_config(dsn, name),
                             seconds=START_SECONDS), web_port)


def copy_seed_key(tmp_path, name: str):
    """Node ``name``'s directory, with node a's seed key (every node has the same key)."""
    state = tmp_path / name / "state"
    state.mkdir(parents=True, mode=0o700)
    shutil.copy2(tmp_path / "a" / "state" / "seed.key", state / "seed.key")
    return tmp_path / name


def kill_9(node) -> None:
    """What a power cut does to a node: SIGKILL, no shutdown of any kind."""
    node.daemon.proc.kill()
    node.daemon.proc.wait(10)


def wait_for_wake_ups(count: int, seconds: float = 5.0) -> None:
    """Wait for ``count`` wake-ups, and a little longer for a duplicate."""
    deadline = time.monotonic() + seconds
    while len(_WakeSink.received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


@pytest.fixture
def cluster(tmp_path, postgres_database, wake_sink):
    """Nodes a and b, alice with a phone (wake-ups to ``wake_sink``) and that phone
    as seen through node b."""
    (tmp_path / "a").mkdir()
    nodes = []
    try:
        nodes.append(push_node(tmp_path / "a", postgres_database, "a"))
        nodes.append(push_node(copy_seed_key(tmp_path, "b"), postgres_database, "b"))
        a, b = nodes
        a.daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        topic = f"http://127.0.0.1:{wake_sink.server_port}/Zk3pQ9vXc4pLr8sWz1dA"
        phone = enroll(a.daemon, tmp_path, "alice", ("--notify-webhook", topic))
        yield nodes, phone, phone_at(phone, b, tmp_path / "alice-phone-b.json")
    finally:
        for node in nodes:
            stop_daemon(node.daemon)


# --- 1. kill -9 with a push pending -------------------------------------------------------------

def test_kill_9_with_a_push_pending_the_retry_to_the_other_node_joins_and_is_accepted(
        cluster, tmp_path, postgres_database):
    nodes, phone_a, phone_b = cluster
    a, b = nodes
    station = 'Calling-Station-Id = "198.51.100.21"'
    first = Login(a.daemon, "alice", PASSWORD, station, timeout=4)
    txn = phone_a.wait_for_transaction()
    wait_for_wake_ups(1)
    kill_9(a)
    # Node A never answers; the NAS gives up on it and fails over: the same login
    # (a new Access-Request), to node B.
    assert first.reply().code is None
    retry = Login(b.daemon, "alice", PASSWORD, station)
    # B joins A's push (B logs nothing until it decides: give it time); the device
    # still sees that one transaction, through B.
    time.sleep(4.0)
    assert [row["txid"] for row in phone_b.pending()] == [txn["txid"]]
    phone_b.run("approve", txn["txid"])
    reply = retry.reply()
    assert reply.code == "Access-Accept", reply.output
    assert phone_b.pending() == []
    # One push in all: one wake-up (from A, which opened it), one transaction.
    wait_for_wake_ups(2, seconds=1.0)
    assert len(_WakeSink.received) == 1, _WakeSink.received
    log = b.daemon.cli("log", "--user", "alice").stdout.splitlines()
    assert [line.split()[1] for line in log] == ["accept"], log

    # A starts again on its directory (new ports, same seed key and database): it is a
    # node again. A login held on A, approved through B, is accepted by A.
    a = push_node(tmp_path / "a", postgres_database, "a")
    nodes[0] = a
    login = Login(a.daemon, "alice", PASSWORD, 'Calling-Station-Id = "198.51.100.22"')
    again = phone_b.wait_for_transaction()
    assert again["txid"] != txn["txid"]
    phone_b.run("approve", again["txid"])
    reply = login.reply()
    assert reply.code == "Access-Accept", (reply.output, a.daemon.log_text()[-3000:])
    wait_for_wake_ups(2)
    assert len(_WakeSink.received) == 2


def test_an_approval_given_between_the_kill_and_the_retry_is_not_lost(cluster):
    nodes, phone_a, phone_b = cluster
    a, b = nodes
    station = 'Calling-Station-Id = "198.51.100.23"'
    first = Login(a.daemon, "alice", PASSWORD, station, timeout=4)
    txn = phone_a.wait_for_transaction()
    kill_9(a)
    assert first.reply().code is None
    # The user approves through B before the NAS's retry reaches B.
    phone_b.run("approve", txn["txid"])
    retry = Login(b.daemon, "alice", PASSWORD, station, timeout=8)
    time.sleep(4.0)
    second_push = phone_b.pending()
    reply = retry.reply()
    wait_for_wake_ups(2, seconds=1.0)
    assert second_push == [] and len(_WakeSink.received) == 1, (second_push,
                                                                _WakeSink.received)
    assert reply.code == "Access-Accept", reply.output


# --- 2. a FreeRADIUS proxy with a fail-over pool in front ---------------------------------------

# FreeRADIUS as the NAS's RADIUS server, proxying every request to the pool of
# nodes a and b: fail-over (a while it lives), Status-Server checks with the
# shortest intervals FreeRADIUS allows. Message-Authenticator is put on every
# proxied request (mfaserver drops requests without one) and on the replies.
# A request is forgotten 1 s after it is done (cleanup_delay): the NAS's next
# retransmission of it is then a new request, and goes to a live node.
PROXY_CONF = RADIUSD_GLOBALS.replace("cleanup_delay = 5", "cleanup_delay = 1") + """\
proxy_requests = yes

client nas {{
    ipaddr = 127.0.0.1
    secret = {secret}
    require_message_authenticator = yes
}}

proxy server {{
    default_fallback = no
}}

@HOME_SERVERS@
home_server_pool mfa {{
    type = fail-over
    home_server = a
    home_server = b
}}

modules {{
}}

server default {{
    listen {{
        type = auth
        ipaddr = 127.0.0.1
        port = {port}
    }}
    authorize {{
        update control {{
            &Home-Server-Pool := "mfa"
        }}
    }}
    authenticate {{
    }}
    pre-proxy {{
        update proxy-request {{
            &Message-Authenticator := 0x00
        }}
    }}
    post-proxy {{
        # A node that does not answer: no answer to the NAS either (not a Reject), so
        # the NAS sends its request again, and the proxy sends that to a live node.
        Post-Proxy-Type Fail-Authentication {{
            update control {{
                &Response-Packet-Type := Do-Not-Respond
            }}
        }}
    }}
    post-auth {{
        update reply {{
            &Message-Authenticator := 0x00
        }}
        Post-Auth-Type REJECT {{
            update reply {{
                &Message-Authenticator := 0x00
            }}
        }}
    }}
}}
"""

HOME_SERVER = """\
home_server {name} {{{{
    type = auth
    ipaddr = 127.0.0.1
    port = {port}
    secret = {{secret}}
    response_window = {window}
    zombie_period = 8
    status_check = status-server
    check_interval = 6
    check_timeout = 1
    num_answers_to_alive = 3
}}}}
"""

# How long the proxy waits for a node's reply (a push must be answered within it),
# and how long the NAS waits before it sends its request again: longer, or the
# proxy (which restarts its wait at each retransmission) would never give up on A.
RESPONSE_WINDOW = 8
NAS_RETRY = 10


@contextlib.contextmanager
def proxy_in_front(directory, a, b):
    directory.mkdir()
    homes = "".join(HOME_SERVER.format(name=name, port=node.daemon.port, window=RESPONSE_WINDOW)
                    for name, node in (("a", a), ("b", b)))
    conf = PROXY_CONF.replace("@HOME_SERVERS@", homes)
    with running_freeradius(directory, SECRET.encode(), users="", radiusd_conf=conf) as proxy:
        yield proxy


@dataclass
class ProxyLogin:
    """radclient as the NAS, talking to the proxy, in the background."""

    proc: subprocess.Popen

    @classmethod
    def start(cls, proxy, user: str, password: str, station: str, *, timeout: int,
              retries: int) -> "ProxyLogin":
        pairs = [f'User-Name = "{user}"', f'User-Password = "{password}"',
                 "Message-Authenticator = 0x00", f'Calling-Station-Id = "{station}"']
        proc = subprocess.Popen(
            ["radclient", "-x", "-r", str(retries), "-t", str(timeout),
             f"127.0.0.1:{proxy.port}", "auth", SECRET], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc.stdin.write(",".join(pairs))
        proc.stdin.close()
        return cls(proc)

    def reply(self):
        out = self.proc.stdout.read()
        self.proc.wait(60)
        return parse_radclient(out)


def test_a_freeradius_fail_over_pool_in_front_of_two_nodes_survives_kill_9(
        cluster, tmp_path):
    nodes, phone_a, phone_b = cluster
    a, b = nodes
    a.daemon.cli("user", "add", "bob", "--password-stdin", input="pw-bob\n")
    a.daemon.cli("token", "add", "bob", "--type", "totp", "--secret", SEED_B32, "--no-qr")
    with proxy_in_front(tmp_path / "proxy", a, b) as proxy:
        # The NAS (radclient) asks the proxy, which sends the login to A, the pool's
        # first: the push is held on A.
        started = time.monotonic()
        login = ProxyLogin.start(proxy, "alice", PASSWORD, "203.0.113.31",
                                 timeout=NAS_RETRY, retries=3)
        txn = phone_a.wait_for_transaction()
        kill_9(a)
        killed = time.monotonic()
        # No reply from A within response_window: the proxy marks A a zombie (and
        # sends it Status-Server, unanswered) and answers the NAS nothing.
        assert "as zombie" in proxy_log_after(proxy, "as zombie", RESPONSE_WINDOW + 10)
        # The NAS's retransmission is a new request to the proxy, which sends it to B,
        # alive: B joins the push held by nobody now.
        wait_until(started + NAS_RETRY + 4.0)
        assert [row["txid"] for row in phone_b.pending()] == [txn["txid"]]
        phone_b.run("approve", txn["txid"])
        reply = login.reply()
        assert reply.code == "Access-Accept", (reply.output, proxy.log_text()[-4000:])
        failover = time.monotonic() - killed
        wait_for_wake_ups(2, seconds=1.0)
        assert len(_WakeSink.received) == 1, _WakeSink.received
        log = b.daemon.cli("log", "--user", "alice").stdout.splitlines()
        assert [line.split()[1] for line in log] == ["accept"], log
        # With A dead, a plain code login through the proxy (password,TOTP) works.
        code = code_at(oath.totp_step(time.time()))
        plain = subprocess.run(
            ["radclient", "-x", "-r", "3", "-t", "5", f"127.0.0.1:{proxy.port}", "auth",
             SECRET], input=f'User-Name = "bob", User-Password = "pw-bob,{code}",'
                            ' Message-Authenticator = 0x00',
            capture_output=True, text=True, timeout=60)
        assert parse_radclient(plain.stdout).code == "Access-Accept", plain.stdout
        # Every proxied request carried a valid Message-Authenticator: none was dropped.
        assert "dropped packet" not in b.daemon.log_text()
        assert "dropped packet" not in a.daemon.log_text()
        print(f"fail-over: {failover:.1f} s from kill -9 to the Access-Accept")


def proxy_log_after(proxy, needle: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while needle not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    return proxy.log_text()


def wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


# --- 3. concurrency fuzz ------------------------------------------------------------------------

FUZZ_SECONDS = 15
TOTP_USERS = ("tina", "tom")
HOTP_USERS = ("hana", "hugo")
COPIES = 2          # of each login, to each node, at once
TOTP_PACE = 3.0     # s between waves of a TOTP user: rejects stay below the lockout


@dataclass
class Sent:
    """One Access-Request of the fuzz and what came of it (``outcome`` None: no reply)."""

    station: str
    user: str
    code_id: tuple      # ("totp", step) or ("hotp", counter): what the code was for
    node: str           # the node and its incarnation: "a1", "b2", ...
    outcome: str | None = None


def send_login(port: int, sent: Sent, password: str) -> None:
    """A NAS's request: sent, sent again (the same bytes) after a wait, then given up."""
    data, auth = access_request(SECRET.encode(), sent.user, password,
                                identifier=random.randrange(256),
                                extra=[(codec.CALLING_STATION_ID, sent.station.encode())])
    outcomes = {codec.ACCESS_ACCEPT: "accept", codec.ACCESS_REJECT: "reject"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for wait in (5.0, 15.0):
            s.settimeout(wait)
            try:
                s.sendto(data, ("127.0.0.1", port))
                reply = s.recv(4096)
            except OSError:   # socket.timeout, or the port refused (the node is dead)
                continue
            sent.outcome = outcomes[codec.decode_response(reply, SECRET.encode(), auth).code]
            return


def code_node(directory, dsn: str, name: str):
    # lockout_threshold goes in [mfa] (start_daemon's last table), before [store].
    return start_daemon(directory, "lockout_threshold = 100\n" + node_config(dsn, name),
                        seconds=START_SECONDS)


@pytest.fixture
def code_cluster(tmp_path, postgres_database):
    """Nodes a and b (a dict, as the test replaces them), no push; the fuzz's users."""
    (tmp_path / "a").mkdir()
    nodes = {}
    try:
        nodes["a"] = code_node(tmp_path / "a", postgres_database, "a")
        nodes["b"] = code_node(copy_seed_key(tmp_path, "b"), postgres_database, "b")
        a = nodes["a"]

        def add_hotp_user(name):
            a.cli("user", "add", name, "--password-stdin", input=f"pw-{name}\n")
            a.cli("token", "add", name, "--type", "hotp", "--secret", SEED_B32, "--no-qr")
        threads = ([threading.Thread(target=add_user, args=(a, name)) for name in TOTP_USERS]
                   + [threading.Thread(target=add_hotp_user, args=(name,))
                      for name in HOTP_USERS])
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        yield nodes
    finally:
        for daemon in nodes.values():
            stop_daemon(daemon)


def test_fuzz_same_codes_on_both_nodes_with_kills_accept_each_once_and_audit_every_answer(
        code_cluster, tmp_path, postgres_database):
    nodes = code_cluster
    incarnation = {"a": 1, "b": 1}
    killed = set()          # incarnations killed with requests maybe in flight
    down: dict[str, threading.Thread] = {}     # a killed node being started again
    stragglers: list[threading.Thread] = []    # requests to a killed node
    sent: list[Sent] = []
    hotp_counter = dict.fromkeys(HOTP_USERS, 0)
    totp_last = dict.fromkeys(TOTP_USERS, 0.0)
    # One kill -9 of each node: b a fifth of the way, a half way (or once b is back).
    kills = [("b", 0.2), ("a", 0.5)]

    failed_starts = []

    def restart(name):
        try:
            nodes[name] = code_node(tmp_path / name, postgres_database, name)
        except AssertionError as e:
            failed_starts.append(e)

    started = time.monotonic()
    waves = 0
    # Both kills happen, however slowly a killed node comes back on a busy machine.
    while time.monotonic() - started < (FUZZ_SECONDS if not kills else 5 * FUZZ_SECONDS):
        for name, thread in list(down.items()):
            if not thread.is_alive():
                assert not failed_starts, failed_starts
                del down[name]
                incarnation[name] += 1
        live = sorted(name for name in nodes if name not in down)
        waves += 1
        batch = []
        for user in HOTP_USERS + TOTP_USERS:
            if user in HOTP_USERS:
                code_id = ("hotp", hotp_counter[user])
                hotp_counter[user] += 1
            elif time.monotonic() - totp_last[user] >= TOTP_PACE:
                totp_last[user] = time.monotonic()
                code_id = ("totp", oath.totp_step(time.time()))
            else:
                continue
            password = f"pw-{user},{oath.hotp(SEED, code_id[1])}"
            for name in live:
                for _ in range(COPIES):
                    one = Sent(f"fz-{os.urandom(6).hex()}", user, code_id,
                               f"{name}{incarnation[name]}")
                    batch.append((threading.Thread(
                        target=send_login, args=(nodes[name].port, one, password)), one))
        random.shuffle(batch)
        for thread, one in batch:
            thread.start()
            sent.append(one)
        if kills and not down and time.monotonic() - started > FUZZ_SECONDS * kills[0][1]:
            victim = kills.pop(0)[0]
            time.sleep(random.uniform(0.0, 0.5))   # before, during or after its work
            nodes[victim].proc.kill()
            nodes[victim].proc.wait(10)
            killed.add(f"{victim}{incarnation[victim]}")
            down[victim] = threading.Thread(target=restart, args=(victim,))
            down[victim].start()
        for thread, one in batch:
            if one.node in killed:
                stragglers.append(thread)   # waits for a reply that will not come
            else:
                thread.join(30)
        time.sleep(0.2)
    for thread in [*down.values(), *stragglers]:
        thread.join(60)
    assert not kills and not failed_starts and waves >= 3, (waves, failed_starts)

    with psycopg.connect(postgres_database) as conn:
        rows = conn.execute("SELECT calling_station_id, outcome FROM audit"
                            " WHERE calling_station_id LIKE 'fz-%'").fetchall()
    audit: dict[str, list[str]] = {}
    for station, outcome in rows:
        audit.setdefault(station, []).append(outcome)
    by_station = {one.station: one for one in sent}
    # Every row is of a request sent, and no request was decided twice.
    assert set(audit) <= set(by_station)
    assert [s for s, outcomes in audit.items() if len(outcomes) != 1] == []
    # A request that got an answer has its one audit row, saying what the answer said.
    answered = [one for one in sent if one.outcome is not None]
    assert [(one.station, one.outcome, audit.get(one.station)) for one in answered
            if audit.get(one.station) != [one.outcome]] == []
    # Only a node killed with it in flight left a request unanswered (it may have
    # decided it, and written its row, without sending the reply).
    unanswered = [one for one in sent if one.outcome is None]
    assert {one.node for one in unanswered} <= killed, [
        (one.node, one.station) for one in unanswered if one.node not in killed]
    # No code was accepted twice: not in the replies, not in the audit log (which also
    # holds the accepts a killed node decided and never sent).
    replies = {}
    for one in answered:
        if one.outcome == "accept":
            replies.setdefault((one.user, one.code_id), []).append(one.station)
    assert {k: v for k, v in replies.items() if len(v) > 1} == {}
    decided = {}
    for station, outcomes in audit.items():
        if outcomes == ["accept"]:
            one = by_station[station]
            decided.setdefault((one.user, one.code_id), []).append(station)
    assert {k: v for k, v in decided.items() if len(v) > 1} == {}
    # And each HOTP code sent to both nodes at once, every copy answered, was
    # accepted exactly once (not zero times: the race has one winner).
    waves_of = {}
    for one in sent:
        if one.code_id[0] == "hotp":
            waves_of.setdefault((one.user, one.code_id), []).append(one)
    complete = [key for key, ones in waves_of.items() if all(o.outcome for o in ones)]
    assert [key for key in complete if len(replies.get(key, ())) != 1] == []
    assert len(complete) >= len(HOTP_USERS) * (waves - 2)
    assert {user for user, code_id in decided if code_id[0] == "totp"} == set(TOTP_USERS)
    for daemon in nodes.values():
        assert daemon.alive()
    print(f"fuzz: {len(sent)} requests in {waves} waves, {len(answered)} answered,"
          f" {len(unanswered)} lost with {sorted(killed)} (decided, unsent:"
          f" {sum(1 for one in unanswered if one.station in audit)}),"
          f" {sum(len(v) for v in decided.values())} accepts")
