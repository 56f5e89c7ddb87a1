"""A throw-away PostgreSQL for the tests: ``initdb`` in a temp dir, one server on 127.0.0.1.

`PostgresServer(directory).start()` makes a cluster with ``initdb`` (password
authentication, scram-sha-256, superuser ``mfaserver``), listening on a free
TCP port of 127.0.0.1 only, with its Unix socket inside ``directory``.
PostgreSQL refuses to run as root: when the tests run as root (as CI does),
the cluster belongs to the ``postgres`` system user that Debian's package
creates, and every server command runs as that user.

The server is our child process, not a daemon started by ``pg_ctl``: with
``PR_SET_PDEATHSIG`` it gets SIGQUIT (PostgreSQL's immediate shutdown) when
the test process dies, so a killed run leaves no server behind. `stop` is
``pg_ctl stop -m immediate``'s equivalent (SIGQUIT) or a smart shutdown;
`start` runs it again on the same port and data.

Needs Debian's ``postgresql`` package (``scripts/setup-env`` installs it).
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ldap_server import free_tcp_port

HOST = "127.0.0.1"
USER = "mfaserver"
PASSWORD = "pg-test-password"
SYSTEM_USER = "postgres"  # who owns the cluster when the tests run as root
PR_SET_PDEATHSIG = 1


class PostgresUnavailable(Exception):
    """No PostgreSQL server binaries, or the cluster did not come up."""


def bin_dir() -> Path:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("PostgreSQL server binaries not found (apt package postgresql)")


def available() -> bool:
    try:
        bin_dir()
    except PostgresUnavailable:
        return False
    return os.geteuid() != 0 or _system_user() is not None


def _system_user():
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        return None


class PostgresServer:
    """One throw-away cluster under ``directory``; `dsn` connects as the superuser."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.data = self.directory / "data"
        self.port = port or free_tcp_port()
        self.log_path = self.directory / "postgres.log"
        self.process: subprocess.Popen | None = None
        self._bin = bin_dir()
        self._as = _system_user() if os.geteuid() == 0 else None
        if os.geteuid() == 0 and self._as is None:
            raise PostgresUnavailable(f"running as root and no {SYSTEM_USER!r} system user")

    def dsn(self, dbname: str = "postgres", **extra) -> str:
        """A libpq connection string for ``dbname`` (key=value form)."""
        parts = {"host": HOST, "port": self.port, "user": USER, "password": PASSWORD,
                 "dbname": dbname, "connect_timeout": 5, **extra}
        return " ".join(f"{key}={value}" for key, value in parts.items())

    def _preexec(self):
        libc = ctypes.CDLL(None, use_errno=True)
        owner = self._as

        def run() -> None:
            # Die with the test process (immediate shutdown), as this user.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)
            if owner is not None:
                os.setgroups([])
                os.setgid(owner.pw_gid)
                os.setuid(owner.pw_uid)
        return run

    def _chown(self, path: Path) -> None:
        if self._as is not None:
            os.chown(path, self._as.pw_uid, self._as.pw_gid)

    def _run(self, argv: list[str], what: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                preexec_fn=self._preexec(), stdin=subprocess.DEVNULL,
                                cwd=self.directory)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{what} failed: {(result.stderr or result.stdout)[-800:]}")

    def initdb(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._chown(self.directory)
        password_file = self.directory / "pwfile"
        password_file.write_text(PASSWORD + "\n")
        self._chown(password_file)
        self._run([str(self._bin / "initdb"), "-D", str(self.data), "-U", USER,
                   "--pwfile", str(password_file), "--auth", "scram-sha-256",
                   "--encoding", "UTF8", "--no-locale", "--no-sync"], "initdb")
        password_file.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{HOST}'\n"
                       f"port = {self.port}\n"
                       f"unix_socket_directories = '{self.directory}'\n"
                       # A throw-away cluster: no fsync, small, quick to stop.
                       "fsync = off\nsynchronous_commit = on\nfull_page_writes = off\n"
                       "shared_buffers = 32MB\nmax_connections = 100\n"
                       "logging_collector = off\n")

    def start(self, timeout: float = 30) -> "PostgresServer":
        if not self.data.exists():
            self.initdb()
        log = open(self.log_path, "ab")
        self._chown(self.log_path)
        self.process = subprocess.Popen(
            [str(self._bin / "postgres"), "-D", str(self.data)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=self._preexec(), cwd=self.directory)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if self.process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with {self.process.returncode}: "
                                          f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresUnavailable(f"postgres did not accept connections in "
                                          f"{timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def accepting(self) -> bool:
        """True once a login to the server works (not only its port)."""
        import psycopg
        try:
            psycopg.connect(self.dsn(connect_timeout=1)).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self, immediate: bool = True, timeout: float = 30) -> None:
        """Stop the server: immediate (SIGQUIT, as ``pg_ctl stop -m immediate``) or fast."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its DSN."""
        import psycopg
        from psycopg import sql
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            # A file copy of the small template: 23 ms a database here, against 70 ms
            # for 15's default (WAL_LOG); the suite makes a few hundred.
            strategy = " STRATEGY = FILE_COPY" if conn.info.server_version >= 150000 else ""
            conn.execute(sql.SQL("CREATE DATABASE {}" + strategy).format(sql.Identifier(name)))
        return self.dsn(name)
