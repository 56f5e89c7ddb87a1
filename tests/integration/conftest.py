"""Fixtures that start real servers on 127.0.0.1: the daemon (driven with FreeRADIUS's
radclient), OpenLDAP's slapd (see `ldap_server`), and LDAP servers that misbehave.

The slapd fixtures skip their tests where slapd is not installed
(``scripts/test`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ldap_server
import postgres_server
from mfaserver.radius import codec
from mfaserver.testing import status_server

SECRET = "integration-shared-secret-0123456789"
MFASERVER = [sys.executable, "-m", "mfaserver.cli.main"]

pytestmark = pytest.mark.integration


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    """What radclient printed about the reply (code None: no reply)."""

    code: str | None
    attributes: dict[str, list[str]] = field(default_factory=dict)
    output: str = ""

    def get(self, name: str) -> str | None:
        values = self.attributes.get(name)
        return values[0] if values else None


_RECEIVED = re.compile(r"^Received (\S+) Id \d+")
_PAIR = re.compile(r"^\s+([A-Za-z0-9-]+) = (.*)$")


def parse_radclient(output: str) -> Reply:
    reply = Reply(code=None, output=output)
    in_reply = False
    for line in output.splitlines():
        m = _RECEIVED.match(line)
        if m:
            reply.code, reply.attributes, in_reply = m.group(1), {}, True
            continue
        if line.startswith("Sent "):
            in_reply = False
            continue
        m = _PAIR.match(line)
        if in_reply and m:
            value = m.group(2)
            if value.startswith('"') and value.endswith('"'):
                value = value[1:-1]
            reply.attributes.setdefault(m.group(1), []).append(value)
    return reply


@dataclass
class Daemon:
    """A running `mfaserver run` and the ways to talk to it."""

    config_path: Path
    port: int
    proc: subprocess.Popen
    log_path: Path

    def cli(self, *args: str, input: str | None = None, check: bool = True):
        result = subprocess.run([*MFASERVER, "-c", str(self.config_path), *args], input=input,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"mfaserver {' '.join(args)} failed: {result.stderr}")
        return result

    def radclient(self, pairs: str, kind: str = "auth", secret: str = SECRET,
                  timeout: float = 3, retries: int = 1, port: int | None = None) -> Reply:
        result = subprocess.run(
            ["radclient", "-x", "-r", str(retries), "-t", str(timeout),
             f"127.0.0.1:{port or self.port}", kind, secret],
            input=pairs, capture_output=True, text=True, timeout=timeout * retries + 30)
        return parse_radclient(result.stdout + result.stderr)

    def login(self, user: str, password: str, *extra: str) -> Reply:
        pairs = [f'User-Name = "{user}"', f'User-Password = "{password}"',
                 "Message-Authenticator = 0x00", *extra]
        return self.radclient(",".join(pairs))

    def send_raw(self, data: bytes, wait: float = 1.0) -> bytes | None:
        """Send one datagram; return the reply datagram or None after ``wait`` seconds."""
        return self.send_repeatedly(data, 1, wait)[0]

    def send_repeatedly(self, data: bytes, times: int, wait: float = 1.0) -> list[bytes | None]:
        """Send ``data`` ``times`` times from one source port, each after the last reply
        (or ``wait`` seconds): what a NAS retransmitting a request does."""
        replies = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(wait)
            for _ in range(times):
                s.sendto(data, ("127.0.0.1", self.port))
                try:
                    replies.append(s.recv(8192))
                except socket.timeout:
                    replies.append(None)
        return replies

    def alive(self) -> bool:
        data, auth = status_server(SECRET.encode())
        reply = self.send_raw(data, wait=2.0)
        if reply is None:
            return False
        return codec.decode_response(reply, SECRET.encode(), auth).code == codec.ACCESS_ACCEPT

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, seconds: float = 5.0) -> str:
        """The log once it contains ``needle`` (info lines are written in batches)."""
        deadline = time.monotonic() + seconds
        while True:
            text = self.log_text()
            if needle in text or time.monotonic() > deadline:
                return text
            time.sleep(0.05)


def write_config(directory: Path, port: int, extra: str = "", server: str = "") -> Path:
    """The daemon's config; ``extra`` goes inside [mfa] (tables may follow), ``server``
    inside [server]."""
    path = directory / "mfaserver.toml"
    path.write_text(f"""
[server]
state_dir = "state"
{server}

[radius]
listen = "127.0.0.1"
port = {port}
reject_delay = 0.1

[[radius.clients]]
name = "nas"
address = "127.0.0.1"
secret = "{SECRET}"

[mfa]
delimiter = ","
challenge = true
unenrolled = "reject"
{extra}
""")
    return path


def start_daemon(directory: Path, extra_config: str = "", server_config: str = "", *,
                 seconds: float = 20) -> Daemon:
    """Start `mfaserver run` on a free port; it must answer Status-Server within
    ``seconds`` (more for a start beside a busy cluster on a small machine).
    ``extra_config`` goes inside [mfa] (tables may follow), ``server_config``
    inside [server]."""
    if shutil.which("radclient") is None:
        pytest.fail("radclient is missing: run scripts/test, which installs freeradius-utils")
    port = free_udp_port()
    config = write_config(directory, port, extra_config, server_config)
    log_path = directory / "daemon.log"
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*MFASERVER, "-c", str(config), "run", "--log-format", "json"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(config, port, proc, log_path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {daemon.log_text()}")
        if daemon.alive():
            return daemon
    stop_daemon(daemon)
    raise AssertionError(f"daemon did not answer Status-Server: {daemon.log_text()}")


def stop_daemon(daemon: Daemon) -> int:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    return daemon.proc.returncode


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    stop_daemon(d)


# --- PostgreSQL -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL cluster (`postgres_server`) for the whole session;
    tests take a database of their own from it with `postgres_database`."""
    if not postgres_server.available():
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    # Not under pytest's tmp_path: when the tests run as root the server runs as the
    # postgres user, who cannot enter pytest's 0700 directories.
    directory = Path(tempfile.mkdtemp(prefix="mfaserver-pg-"))
    server = postgres_server.PostgresServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres, request):
    """The DSN of a new, empty database in the session's PostgreSQL."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + "_" + \
        os.urandom(3).hex()
    return postgres.create_database(name)


# --- slapd, certificates, and LDAP servers that misbehave ----------------------------------------

def _start_slapd(directory: Path, certs: ldap_server.Certificates,
                 right_name: bool = True) -> ldap_server.Slapd:
    """slapd with the test data, its certificate from ``certs``' CA valid for 127.0.0.1
    (or, not ``right_name``, for another host)."""
    if not ldap_server.available():
        pytest.skip("slapd or its schema files are not installed (apt-get install slapd)")
    cert, key = ((certs.cert_file, certs.key_file) if right_name
                 else (certs.wrong_cert_file, certs.wrong_key_file))
    return ldap_server.start_slapd(directory, tls=(certs.ca_file, cert, key))


@pytest.fixture(scope="session")
def ldap_certs(tmp_path_factory) -> ldap_server.Certificates:
    """A CA, server certificates signed by it, and an unrelated CA."""
    return ldap_server.make_certificates(tmp_path_factory.mktemp("ldap-certs"))


@pytest.fixture(scope="session")
def slapd(tmp_path_factory, ldap_certs):
    """slapd with the test data, its certificate valid for 127.0.0.1."""
    server = _start_slapd(tmp_path_factory.mktemp("slapd"), ldap_certs)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slapd_wrong_name(tmp_path_factory, ldap_certs):
    """A second slapd whose certificate (from the right CA) names another host."""
    server = _start_slapd(tmp_path_factory.mktemp("slapd-wrong-name"), ldap_certs,
                          right_name=False)
    yield server
    server.stop()


@pytest.fixture
def own_slapd(tmp_path, ldap_certs):
    """A fresh slapd for one test, which may change the directory (the shared
    session ``slapd`` must keep its data)."""
    server = _start_slapd(tmp_path / "slapd", ldap_certs)
    yield server
    server.stop()


@pytest.fixture
def hung_ldap():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = ldap_server.HungServer()
    yield server
    server.close()


@pytest.fixture
def closing_ldap():
    """A TCP server on 127.0.0.1 that closes every connection at once."""
    server = ldap_server.HungServer(hang=False)
    yield server
    server.close()


@pytest.fixture
def ldap_proxy(slapd):
    """A relay to slapd's plain port that records what clients send."""
    proxy = ldap_server.RecordingProxy(slapd.port)
    yield proxy
    proxy.close()
