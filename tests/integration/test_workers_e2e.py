"""``[server] workers = N`` end to end (issue #12): one ``mfaserver run`` on PostgreSQL
starts N processes that share the RADIUS port (SO_REUSEPORT), each a cluster
node; a worker that dies is started again; stopping the daemon, or killing
it, leaves no worker behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest

from mfaserver.factors import oath
from mfaserver.radius import codec
from mfaserver.testing import access_request

from .conftest import SECRET, start_daemon, stop_daemon
from .test_radius_e2e import SEED
from .test_store_postgresql_e2e import add_users_directly, store_config

pytestmark = pytest.mark.integration


@pytest.fixture
def workers(tmp_path, postgres_database):
    daemon = start_daemon(tmp_path, store_config(postgres_database)
                          + '[cluster]\nnode_name = "n"\n', server_config="workers = 2")
    daemon.wait_for_log("worker 1 started", seconds=15)
    yield daemon
    stop_daemon(daemon)


def worker_pids(daemon) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker 1 started \(pid (\d+)\)",
                                           daemon.log_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped) is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_the_workers_share_the_port_and_each_is_a_node(workers, postgres_database):
    users = [f"w{i}" for i in range(16)]
    add_users_directly(workers, postgres_database, users)
    code = oath.hotp(SEED, oath.totp_step(time.time()))
    # Each login from a socket of its own: the kernel spreads new 4-tuples.
    replies = []
    for name in users:
        data, _ = access_request(SECRET.encode(), name, f"pw-{name},{code}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(data, ("127.0.0.1", workers.port))
            replies.append(sock.recv(4096)[0])
    assert replies == [codec.ACCESS_ACCEPT] * len(users)
    text = workers.wait_for_log(f"accept {users[-1]} ")
    nodes = {json.loads(line).get("node") for line in text.splitlines()
             if '"outcome": "accept"' in line}
    # 16 new senders all hashed to one of two workers: 2 ** -15.
    assert nodes == {"n", "n-1"}, nodes


def test_a_dead_worker_is_started_again_and_none_outlives_the_daemon(workers):
    [first] = worker_pids(workers)
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: len(worker_pids(workers)) == 2, 15), workers.log_text()[-2000:]
    assert "worker 1 ended" in workers.log_text() or "worker 1 exited" in workers.log_text()
    second = worker_pids(workers)[1]
    assert alive(second)
    assert workers.alive()
    assert stop_daemon(workers) == 0
    assert wait_until(lambda: not alive(second), 10)


def test_killing_the_daemon_takes_its_workers_down(workers):
    [worker] = worker_pids(workers)
    workers.proc.kill()
    workers.proc.wait()
    assert wait_until(lambda: not alive(worker), 10)
