"""End to end on PostgreSQL (issue #12 part 1): the real daemon with ``[store] backend =
"postgresql"``, radclient as the NAS, a throw-away PostgreSQL made with initdb.

Two daemons on one database are two nodes: a TOTP code is accepted by one of
them only; the database going away makes logins fail closed, and they work
again when it is back, without a restart; ``mfaserver store copy`` moves a
SQLite store there and back with its seeds.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import pytest

from mfaserver import passwords
from mfaserver.auth.model import TokenKind
from mfaserver.factors import oath
from mfaserver.store import NewToken
from mfaserver.store.pg import PgStore

from .conftest import MFASERVER, start_daemon, stop_daemon, write_config
from .test_radius_e2e import SEED, SEED_B32

pytestmark = pytest.mark.integration


def store_config(dsn: str) -> str:
    # start_daemon appends this inside [mfa]; the tables after it are top level.
    return f'\n[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n'


def code_at(step: int) -> str:
    return oath.hotp(SEED, step)


def add_user(daemon, name: str) -> None:
    daemon.cli("user", "add", name, "--password-stdin", input=f"pw-{name}\n")
    daemon.cli("token", "add", name, "--type", "totp", "--secret", SEED_B32, "--no-qr")


def add_users_directly(daemon, dsn: str, names, kind=TokenKind.TOTP) -> None:
    """What `add_user` does for many users at once, written straight into the node's
    database (each CLI call pays a process start)."""
    store = PgStore.open(dsn, daemon.config_path.parent / "state" / "seed.key", create=False)
    try:
        now = time.time()
        for name in names:
            store.add_user(name, password_hash=passwords.hash_password(f"pw-{name}"),
                           phone=None, now=now)
            store.add_token(name, NewToken(kind=kind, secret=SEED), now=now)
    finally:
        store.close()


@pytest.fixture
def node_a(tmp_path, postgres_database):
    (tmp_path / "a").mkdir()
    daemon = start_daemon(tmp_path / "a", store_config(postgres_database))
    yield daemon
    stop_daemon(daemon)


@pytest.fixture
def node_b(tmp_path, postgres_database, node_a):
    """A second node on the same database, with a copy of node A's seed key."""
    state = tmp_path / "b" / "state"
    state.mkdir(parents=True, mode=0o700)
    shutil.copy2(tmp_path / "a" / "state" / "seed.key", state / "seed.key")
    daemon = start_daemon(tmp_path / "b", store_config(postgres_database)
                          + '[cluster]\nnode_name = "node-b"\n')
    yield daemon
    stop_daemon(daemon)


def test_a_login_with_a_code_is_accepted_audited_and_not_replayed(node_a):
    add_user(node_a, "alice")
    code = code_at(oath.totp_step(time.time()))
    reply = node_a.login("alice", f"pw-alice,{code}")
    assert reply.code == "Access-Accept", reply.output
    again = node_a.login("alice", f"pw-alice,{code}")
    assert again.code == "Access-Reject", again.output
    log = node_a.cli("log", "--user", "alice").stdout.splitlines()
    assert [line.split()[1] for line in log] == ["reject", "accept"]


def test_two_nodes_accept_the_same_code_once(node_a, node_b):
    names = [f"race{i}" for i in range(4)]
    for name in names:
        add_user(node_a, name)
    step = oath.totp_step(time.time())
    for name in names:
        code = code_at(step)
        replies = {}

        def send(node, key):
            replies[key] = node.login(name, f"pw-{name},{code}").code
        threads = [threading.Thread(target=send, args=(node, key))
                   for key, node in (("a", node_a), ("b", node_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(replies.values()) == ["Access-Accept", "Access-Reject"], (name, replies)


def test_a_user_added_on_one_node_logs_in_on_the_other(node_a, node_b):
    add_user(node_b, "bob")
    reply = node_a.login("bob", f"pw-bob,{code_at(oath.totp_step(time.time()))}")
    assert reply.code == "Access-Accept", reply.output
    # Each node's JSON log lines name it ([cluster] node_name, else the host name).
    assert '"node": "node-b"' in node_b.log_text()
    assert f'"node": "{socket.gethostname()}"' in node_a.log_text()


def test_database_down_fails_closed_and_recovers_without_a_restart(node_a, postgres):
    add_user(node_a, "carol")
    step = oath.totp_step(time.time())
    postgres.stop(immediate=True)
    try:
        for _ in range(3):
            started = time.monotonic()
            reply = node_a.login("carol", f"pw-carol,{code_at(step)}")
            assert reply.code == "Access-Reject", reply.output
            assert "try again later" in (reply.get("Reply-Message") or "").lower(), reply.output
            assert time.monotonic() - started < 3
    finally:
        postgres.start()
    # The code was never used (the store was down): the same one works once the
    # daemon has reconnected by itself (a failed connect backs off for up to 2 s).
    deadline = time.monotonic() + 10
    while True:
        reply = node_a.login("carol", f"pw-carol,{code_at(step)}")
        if reply.code == "Access-Accept" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert reply.code == "Access-Accept", (reply.output, node_a.log_text()[-2000:])
    assert node_a.alive()
    text = node_a.wait_for_log("store available again")
    # The outage is said once, and its end once; not a traceback per request.
    assert text.count("store unavailable") == 1, text[-3000:]
    assert text.count("store available again") == 1, text[-3000:]
    assert "Traceback" not in text


def test_store_copy_moves_a_sqlite_store_to_postgresql_and_back(tmp_path, postgres_database):
    """Users, tokens (seeds still encrypted, replay state kept) and the audit log move
    over; a login works on the copy; a non-empty target is refused."""
    (tmp_path / "sqlite").mkdir()
    first = start_daemon(tmp_path / "sqlite")
    try:
        add_user(first, "dora")
        # Codes from the previous step to the next one are accepted (totp_window 1):
        # step - 1 now, step on PostgreSQL, step + 1 back on SQLite, each within the
        # window however long the test takes.
        step = oath.totp_step(time.time())
        assert first.login("dora", f"pw-dora,{code_at(step - 1)}").code == "Access-Accept"
    finally:
        stop_daemon(first)
    copied = first.cli("store", "copy", "--to", postgres_database).stdout
    assert copied.startswith("copied 1 users, 1 tokens, 0 bypass, 1 audit, 0 devices"), copied
    assert "pg-test-password" not in copied  # the DSN's password is not echoed
    refused = first.cli("store", "copy", "--to", postgres_database, check=False)
    assert refused.returncode == 1 and "not empty" in refused.stderr

    state = tmp_path / "pg" / "state"
    state.mkdir(parents=True, mode=0o700)
    shutil.copy2(tmp_path / "sqlite" / "state" / "seed.key", state / "seed.key")
    node = start_daemon(tmp_path / "pg", store_config(postgres_database))
    try:
        assert node.login("dora", f"pw-dora,{code_at(step - 1)}").code == "Access-Reject"
        assert node.login("dora", f"pw-dora,{code_at(step)}").code == "Access-Accept"
        outcomes = [line.split()[1] for line in node.cli("log", "--user", "dora").stdout.splitlines()]
        assert outcomes == ["accept", "reject", "accept"]
        back = tmp_path / "back" / "state"
        back.mkdir(parents=True, mode=0o700)
        copied = node.cli("store", "copy", "--to", str(back / "mfaserver.sqlite3")).stdout
        assert copied.startswith("copied 1 users, 1 tokens, 0 bypass, 3 audit"), copied
    finally:
        stop_daemon(node)

    shutil.copy2(state / "seed.key", back / "seed.key")
    again = start_daemon(tmp_path / "back")
    try:
        # The replay record came back too: step is used, step + 1 is not.
        assert again.login("dora", f"pw-dora,{code_at(step)}").code == "Access-Reject"
        assert again.login("dora", f"pw-dora,{code_at(step + 1)}").code == "Access-Accept"
    finally:
        stop_daemon(again)


def test_migrate_command_on_postgresql(tmp_path, postgres_database):
    config = write_config(tmp_path, 1812, store_config(postgres_database))
    result = subprocess.run([*MFASERVER, "-c", str(config), "migrate"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("store schema at version ")
    assert "postgresql://127.0.0.1:" in result.stdout and "password" not in result.stdout
