"""Two nodes on one PostgreSQL, end to end (issue #12 part 2): the real daemons,
radclient as a NAS that talks to both, the reference authenticator as the phone.

A push opened on node A is joined, not sent again, when the same login
reaches node B; the device may answer through either node, and every node
holding the request answers. A challenge issued by one node is answered on
the other. The LISTEN connection killed mid-login: the answer still arrives,
by the poll.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import psycopg
import pytest
import pytest_twisted

from ldap_server import free_tcp_port
from mfaserver.factors import oath
from mfaserver.factors import push_protocol as proto
from mfaserver.radius import codec
from mfaserver.testing import access_request

from .conftest import SECRET, start_daemon, stop_daemon
from .test_push_e2e import PASSWORD, Login, Phone, _device, _http, _WakeSink, enroll, push_config
from .test_radius_e2e import SEED, SEED_B32
from .test_store_postgresql_e2e import store_config

pytestmark = pytest.mark.integration


class Node:
    def __init__(self, daemon, web_port: int):
        self.daemon = daemon
        self.base = f"http://127.0.0.1:{web_port}"


def start_node(directory, dsn: str, name: str, *, number_matching=False, notify="none",
               extra="") -> Node:
    web_port = free_tcp_port()
    config = (push_config(web_port, number_matching=number_matching, notify=notify)
              + extra + store_config(dsn) + f'[cluster]\nnode_name = "{name}"\n')
    return Node(start_daemon(directory, config), web_port)


def second_node(tmp_path, dsn: str, name: str, **kwargs) -> Node:
    """A node with a copy of node A's seed key (every node has the same key file)."""
    state = tmp_path / name / "state"
    state.mkdir(parents=True, mode=0o700)
    (state / "seed.key").write_bytes((tmp_path / "a" / "state" / "seed.key").read_bytes())
    (state / "seed.key").chmod(0o600)
    return start_node(tmp_path / name, dsn, name, **kwargs)


def phone_at(phone: Phone, node: Node, path) -> Phone:
    """The same device, talking to another node (as behind a load-balanced public_url)."""
    document = json.loads(phone.store.read_text())
    document["base_url"] = node.base
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return Phone(path)


@pytest.fixture
def wake_sink():
    _WakeSink.received = []
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _WakeSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    yield sink
    sink.shutdown()


@pytest.fixture
def cluster(tmp_path, postgres_database, wake_sink):
    (tmp_path / "a").mkdir()
    nodes = []
    try:
        a = start_node(tmp_path / "a", postgres_database, "a", notify="webhook")
        nodes.append(a)
        b = second_node(tmp_path, postgres_database, "b", notify="webhook")
        nodes.append(b)
        a.daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        topic = f"http://127.0.0.1:{wake_sink.server_port}/Zk3pQ9vXc4pLr8sWz1dA"
        phone = enroll(a.daemon, tmp_path, "alice", ("--notify-webhook", topic))
        yield a, b, phone, phone_at(phone, b, tmp_path / "alice-phone-b.json")
    finally:
        for node in nodes:
            stop_daemon(node.daemon)


def test_a_login_retried_on_the_other_node_joins_the_push_and_either_node_takes_the_answer(
        cluster):
    a, b, phone_a, phone_b = cluster
    station = 'Calling-Station-Id = "198.51.100.9"'
    first = Login(a.daemon, "alice", PASSWORD, station)
    txn = phone_a.wait_for_transaction()
    # The NAS fails over: the same login, to node B (twice, as a NAS retries).
    second = Login(b.daemon, "alice", PASSWORD, station)
    data, _ = access_request(SECRET.encode(), "alice", PASSWORD, identifier=91,
                             extra=[(codec.CALLING_STATION_ID, b"198.51.100.9")])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(data, ("127.0.0.1", b.daemon.port))
    time.sleep(1.0)
    # One push: both nodes list the same single transaction.
    assert [row["txid"] for row in phone_b.pending()] == [txn["txid"]]
    assert [row["txid"] for row in phone_a.pending()] == [txn["txid"]]
    # Answered through node B; node A's held request is answered too.
    phone_b.run("approve", txn["txid"])
    assert first.reply().code == "Access-Accept"
    assert second.reply().code == "Access-Accept"
    sock.settimeout(5)
    assert sock.recv(4096)[0] == codec.ACCESS_ACCEPT
    sock.close()
    assert phone_a.pending() == []
    # One wake-up in all, from the node that opened the push.
    time.sleep(0.5)
    assert len(_WakeSink.received) == 1
    a_log = a.daemon.cli("log", "--user", "alice").stdout
    assert "accept" in a_log


def test_a_device_long_polling_one_node_hears_of_a_push_opened_on_the_other(cluster):
    a, b, phone_a, phone_b = cluster
    device_id, key, _ = _device(phone_a)
    now = int(time.time())
    nonce = proto.new_nonce()
    headers = {"X-MFA-Timestamp": str(now), "X-MFA-Nonce": nonce,
               "X-MFA-Signature": proto.sign(key, proto.poll_message(device_id, now, nonce))}
    result = {}

    def poll():
        started = time.monotonic()
        result["reply"] = _http("GET", f"{b.base}/v1/devices/{device_id}/transactions?wait=20",
                                headers=headers)
        result["seconds"] = time.monotonic() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    opened = time.monotonic()
    login = Login(a.daemon, "alice", PASSWORD)
    poller.join(25)
    status, body = result["reply"]
    assert status == 200 and len(body["transactions"]) == 1
    # Woken by the notification, not by the poll's own timeout.
    assert result["seconds"] < 5 and time.monotonic() - opened < 5
    phone_a.run("deny", body["transactions"][0]["txid"])
    assert login.reply().code == "Access-Reject"


def test_the_answer_arrives_by_polling_when_the_listen_connection_is_killed(
        cluster, postgres_database):
    a, b, phone_a, phone_b = cluster
    login = Login(a.daemon, "alice", PASSWORD)
    txn = phone_a.wait_for_transaction()
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query = 'LISTEN mfaserver'").fetchall()
    assert len(killed) == 2, killed   # one per node
    a.daemon.wait_for_log("not listening", seconds=10)
    phone_b.run("approve", txn["txid"])
    assert login.reply().code == "Access-Accept"
    a.daemon.wait_for_log("listening again", seconds=15)


def test_a_number_matching_challenge_from_one_node_is_answered_on_the_other(
        tmp_path, postgres_database):
    (tmp_path / "a").mkdir()
    a = start_node(tmp_path / "a", postgres_database, "a", number_matching=True)
    b = None
    try:
        b = second_node(tmp_path, postgres_database, "b", number_matching=True)
        a.daemon.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        phone = enroll(a.daemon, tmp_path, "alice")
        challenge = a.daemon.login("alice", PASSWORD)
        assert challenge.code == "Access-Challenge", challenge.output
        txn = phone.wait_for_transaction()
        # The same login again on B: joins (the same number), no second push.
        again = b.daemon.login("alice", PASSWORD)
        assert again.code == "Access-Challenge"
        assert [row["txid"] for row in phone.pending()] == [txn["txid"]]
        phone.run("approve", txn["txid"], "--number", txn["number"])
        # B's State replaced A's (a user's newest challenge is the one that counts),
        # and is answered on A.
        old = b.daemon.login("alice", txn["number"], f"State = {challenge.get('State')}")
        assert old.code == "Access-Reject"
        answer = a.daemon.login("alice", txn["number"], f"State = {again.get('State')}")
        assert answer.code == "Access-Accept", answer.output
        # The State was used: once, on any node.
        replay = b.daemon.login("alice", txn["number"], f"State = {again.get('State')}")
        assert replay.code == "Access-Reject"
    finally:
        for node in (a, b):
            if node is not None:
                stop_daemon(node.daemon)


def test_a_code_challenge_from_one_node_is_answered_on_the_other(tmp_path, postgres_database):
    (tmp_path / "a").mkdir()
    a = start_node(tmp_path / "a", postgres_database, "a", extra="")
    b = None
    try:
        b = second_node(tmp_path, postgres_database, "b")
        a.daemon.cli("user", "add", "bob", "--password-stdin", input="pw-bob\n")
        a.daemon.cli("token", "add", "bob", "--type", "totp", "--secret", SEED_B32, "--no-qr")
        challenge = a.daemon.login("bob", "pw-bob")
        assert challenge.code == "Access-Challenge", challenge.output
        code = oath.hotp(SEED, oath.totp_step(time.time()))
        answer = b.daemon.login("bob", code, f"State = {challenge.get('State')}")
        assert answer.code == "Access-Accept", answer.output
    finally:
        for node in (a, b):
            if node is not None:
                stop_daemon(node.daemon)


@pytest_twisted.ensureDeferred
async def test_a_phone_call_placed_by_one_node_is_decided_by_the_other(tmp_path,
                                                                       postgres_database):
    """Behind a load balancer, Twilio's callbacks for a call node A placed reach node B."""
    import fake_twilio
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from .test_voice_e2e import PASSWORD as VOICE_PASSWORD, PHONE, voice_config

    # The phone rings 3 s: the NAS's fail-over (0.5 s later) must reach B while it
    # rings, even on a loaded machine, or it is a second login with a call of its own.
    twilio = fake_twilio.FakeTwilio(reactor, answer_delay=3.0).start()
    port_a, port_b = free_tcp_port(), free_tcp_port()
    public = f'public_url = "http://127.0.0.1:{port_a}"'
    (tmp_path / "a").mkdir()
    node_a = start_daemon(tmp_path / "a", voice_config(twilio.api_base, port_a)
                          + store_config(postgres_database) + '[cluster]\nnode_name = "a"\n')
    node_b = None
    try:
        state = tmp_path / "b" / "state"
        state.mkdir(parents=True, mode=0o700)
        (state / "seed.key").write_bytes((tmp_path / "a" / "state" / "seed.key").read_bytes())
        (state / "seed.key").chmod(0o600)
        config_b = voice_config(twilio.api_base, port_b).replace(
            f'public_url = "http://127.0.0.1:{port_b}"', public)
        node_b = start_daemon(tmp_path / "b", config_b + store_config(postgres_database)
                              + '[cluster]\nnode_name = "b"\n')
        node_a.cli("user", "add", "alice", "--password-stdin", "--phone", PHONE,
                   input=VOICE_PASSWORD + "\n")
        twilio.callback_base = f"http://127.0.0.1:{port_b}"
        twilio.script_call(PHONE, "#")
        station = 'Calling-Station-Id = "203.0.113.7"'

        def login(node):
            return deferToThread(node.radclient, ",".join([
                'User-Name = "alice"', f'User-Password = "{VOICE_PASSWORD}"',
                "Message-Authenticator = 0x00", station]), "auth", timeout=25)

        first = login(node_a)
        await deferLater(reactor, 0.5, lambda: None)
        second = login(node_b)           # the NAS fails over while the phone rings
        replies = await gatherResults([first, second])
        assert [r.code for r in replies] == ["Access-Accept", "Access-Accept"]
        assert len(twilio.calls) == 1
        [call] = twilio.calls
        # The status callback (the call completed) may still be on its way.
        # (An exchange is listed when it is sent; its code once the answer is in.)
        for _ in range(50):
            if len(call.exchanges) >= 3 and all(e.code is not None or e.error
                                                for e in call.exchanges):
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert [e.code for e in call.exchanges] == [200, 200, 204], call.exchanges
        node_b.wait_for_log("Call for alice: approve")
    finally:
        for node in (node_a, node_b):
            if node is not None:
                stop_daemon(node)
        await Deferred.fromCoroutine(twilio.stop())


def test_a_node_stopped_with_a_push_pending_sends_no_reply_and_the_retry_is_accepted(cluster):
    """A rolling restart: the stopping node abandons its held request (no reply, so
    the NAS tries another server), and the push stays for the retry."""
    a, b, phone_a, phone_b = cluster
    station = 'Calling-Station-Id = "198.51.100.77"'
    first = Login(a.daemon, "alice", PASSWORD, station, timeout=5)
    txn = phone_a.wait_for_transaction()
    assert stop_daemon(a.daemon) == 0
    assert first.reply().code is None
    retry = Login(b.daemon, "alice", PASSWORD, station)
    time.sleep(0.5)
    assert [row["txid"] for row in phone_b.pending()] == [txn["txid"]]
    phone_b.run("approve", txn["txid"])
    assert retry.reply().code == "Access-Accept"
    assert len(_WakeSink.received) == 1
