"""mfaserver benchmark: RADIUS front-end and login throughput, printed as a table.

Run it through ``scripts/bench`` (which prepares the venv and radclient):

    scripts/bench                          # every section that can run here
    scripts/bench --only freeradius,bare   # just the reference servers
    scripts/bench --count 50000 --repeat 7 --logins 200

Sections (``--only``, comma separated):

  ours        Status-Server requests/s against ``mfaserver run``
  freeradius  the same against FreeRADIUS 3 with a minimal config written here
  bare        the same against a bare Twisted + pyrad responder (benchlib/bare_responder.py)
  logins      full "password,code" logins/s (local users, TOTP), hash cost share, RSS,
              with control runs over users whose password hash is trivially cheap
  scale       login rate and daemon RSS with 100,000 users and 100,000 tokens
  ldap        "password,code" logins/s against slapd (LDAP directory + TOTP), 64 in flight,
              side by side with the raw ldap3 search+bind rate of one Python process and
              FreeRADIUS 3 (rlm_ldap + rlm_totp); p50/p99 latency at a fixed 200 logins/s
              from an open-loop generator (benchlib/ldap_bench.py, benchlib/loadgen.py)
  ad          issue #11: the same logins against a Samba AD DC over LDAPS (mfaserver with
              active_directory = true, FreeRADIUS rlm_ldap + rlm_totp), p50/p99 at a fixed
              100 logins/s (benchlib/ad_bench.py; needs Samba, root, ports 389/636 free)
  push        issue #4: 10,000 logins held pending a push in one daemon, then approved
              through the device API: memory per pending login, Status-Server p99 while
              pending, approvals/s end to end, lost/duplicate wake-ups (scripts/push_load.py)
  cluster     issue #12: password,code logins/s (local users, and LDAP users next to
              FreeRADIUS) on one node on SQLite, one on PostgreSQL, two nodes on one
              PostgreSQL and workers = "auto"; pushes pending across two
              nodes (RSS per node, table size, approvals/s); kill -9 failover to the other
              node, 20 trials (benchlib/cluster_bench.py, a throw-away PostgreSQL)
  webapp      issue #10: the web authenticator open in headless Chromium: sign-in shown in
              the page and Approve-to-Accept latency (p50/p95 over 50 logins), its assets'
              size, and 1,000 idle pages long-polling: daemon CPU and memory
              (scripts/webapp_load.py)

Everything listens and sends on 127.0.0.1 only; every loop is bounded in count
and every child process in time. A section whose piece is missing (no
radclient, no freeradius, daemon not runnable yet) reports "n/a (reason)".

Load comes from FreeRADIUS's ``radclient``: a request file of ``--inflight``
packets sent ``-c`` times each with ``-p <inflight>``, which keeps that many
requests in flight (each resend gets a new ID and Request Authenticator, so no
server can answer from a duplicate cache). radclient shares the machine's
cores with the server under test; its CPU time is shown so that the split is
visible.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # the only address this script ever talks to
SECRET = "bench-shared-secret-0123456789"
LOGIN_PASSWORD = "bench-password"
SECTIONS = ("ours", "freeradius", "bare", "logins", "scale", "ldap", "ad", "push", "webapp",
            "cluster")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class NotAvailable(Exception):
    """A section cannot run here; the message says why (shown as "n/a (why)")."""


# --- results table ------------------------------------------------------------------------

@dataclass
class Row:
    section: str
    target: str
    metric: str
    value: str
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, section, target, metric, value, note=""):
        self.rows.append(Row(section, target, metric, value, note))
        progress(f"  {target}: {metric} = {value} {note}".rstrip())

    def na(self, section, target, reason):
        self.add(section, target, "-", "n/a", f"({reason})")

    def render(self) -> str:
        headers = ("section", "target", "metric", "value", "notes")
        cells = [headers] + [(r.section, r.target, r.metric, r.value, r.note) for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = []
        for n, c in enumerate(cells):
            line = "  ".join(c[i].ljust(widths[i]) if i != 3 else c[i].rjust(widths[i])
                             for i in range(4))
            lines.append((line + "  " + c[4]).rstrip())
            if n == 0:
                lines.append("-" * min(max(len(x) for x in lines), 120))
        out = "\n".join(lines)
        if self.notes:
            out += "\n\n" + "\n".join(textwrap.fill(n, 100, subsequent_indent="  ")
                                      for n in self.notes)
        return out


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------------------

def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def udp_port_bound(port: int) -> bool:
    wanted = f"0100007F:{port:04X}"
    any_addr = f"00000000:{port:04X}"
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                local = line.split()[1]
                if local in (wanted, any_addr):
                    return True
    except OSError:
        pass
    return False


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Server:
    """A child server process on 127.0.0.1:port, logging to a file, always stopped."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 cwd: Path | None = None, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env)
        deadline = time.monotonic() + 30
        while not udp_port_bound(self.port):
            if self.proc.poll() is not None:
                raise NotAvailable(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise NotAvailable(f"{self.name} did not bind {HOST}:{self.port} in 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def cpu_seconds(self) -> float:
        """utime + stime of the server process, all threads."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB."""
        values = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise NotAvailable(f"{self.name} died ({self.proc.returncode}): {tail(self.log_path)}")


@dataclass
class RadclientResult:
    wall: float
    sent: int
    accepted: int
    rejected: int
    lost: int
    client_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.accepted / self.wall if self.wall > 0 else 0.0


def run_radclient(server: Server, request_file: Path, command: str, *, parallel: int,
                  count: int, sent: int, timeout: float, retries: int = 1,
                  reply_timeout: float = 5.0) -> RadclientResult:
    argv = ["radclient", "-q", "-s", "-p", str(parallel), "-c", str(count),
            "-t", str(reply_timeout), "-r", str(retries), "-f", str(request_file),
            f"{HOST}:{server.port}", command, SECRET]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = server.cpu_seconds()
    t0 = time.perf_counter()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NotAvailable(f"radclient did not finish within {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    cpu1 = server.cpu_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server.check_alive()

    accepted, rejected, lost = radclient_counts(out.stdout)
    if accepted + rejected + lost == 0:
        raise NotAvailable(f"radclient printed no summary: {(out.stderr or out.stdout)[-300:]}")
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RadclientResult(wall, sent, accepted, rejected, lost, client_cpu, cpu1 - cpu0)


def radclient_counts(summary: str) -> tuple[int, int, int]:
    """(accepted, rejected, lost) from radclient -s's summary."""
    def stat(name: str) -> int:
        m = re.search(rf"{name}\s*:\s*(\d+)", summary)
        return int(m.group(1)) if m else 0
    return stat("Accepted"), stat("Rejected"), stat("Lost")


def require(command: str, package: str) -> str:
    path = shutil.which(command, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not path:
        raise NotAvailable(f"{command} not installed (apt package {package})")
    return path


# --- servers under test -------------------------------------------------------------------

def ours_config(directory: Path, port: int, extra: str = "") -> Path:
    """A config for mfaserver on 127.0.0.1:port with one client, state in directory/state.

    ``extra`` is appended as is; it starts inside the [mfa] table.
    """
    path = directory / "mfaserver.toml"
    path.write_text(textwrap.dedent(f"""\
        # Written by scripts/bench.
        [server]
        state_dir = "state"

        [radius]
        listen = "{HOST}"
        port = {port}
        reject_delay = 0
        status_server = true

        [[radius.clients]]
        name = "bench"
        address = "{HOST}"
        secret = "{SECRET}"

        [mfa]
        challenge = true
        """) + textwrap.dedent(extra))
    return path


def mfaserver_command() -> list[str]:
    exe = VENV_BIN / "mfaserver"
    if not exe.exists():
        raise NotAvailable(f"{exe} not installed")
    return [str(exe)]


def ours_server(directory: Path, port: int) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    config = ours_config(directory, port)
    check = subprocess.run(mfaserver_command() + ["-c", str(config), "check-config"],
                           capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise NotAvailable("mfaserver check-config failed: "
                           + (check.stderr or check.stdout).strip()[-300:])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return Server("mfaserver", mfaserver_command() + ["-c", str(config), "run"], port,
                  directory / "mfaserver.log", env=env)


from freeradius_conf import FREERADIUS_PRELUDE  # noqa: E402 (next to its one use)

FREERADIUS_CONF = """\
# Minimal FreeRADIUS 3 config written by scripts/bench: one auth listener on
# {host}:{port}, one client, Status-Server answered with Access-Accept.
""" + FREERADIUS_PRELUDE + """\
thread pool {{
	start_servers = 5
	max_servers = 32
	min_spare_servers = 3
	max_spare_servers = 10
	max_requests_per_server = 0
}}
modules {{
	always ok {{
		rcode = ok
	}}
}}
client bench {{
	ipaddr = {host}
	secret = {secret}
	require_message_authenticator = yes
}}
server default {{
	listen {{
		type = auth
		ipaddr = {host}
		port = {port}
	}}
	authorize {{
		ok
		Autz-Type Status-Server {{
			ok
		}}
	}}
	authenticate {{
	}}
}}
"""


def freeradius_server(directory: Path, port: int) -> Server:
    binary = require("freeradius", "freeradius")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "radiusd.conf").write_text(
        FREERADIUS_CONF.format(dir=directory, host=HOST, port=port, secret=SECRET))
    check = subprocess.run([binary, "-C", "-d", str(directory)], capture_output=True,
                           text=True, timeout=60)
    if check.returncode != 0:
        raise NotAvailable("freeradius -C failed: " + (check.stderr or check.stdout)[-300:])
    return Server("freeradius", [binary, "-f", "-d", str(directory), "-l", "stdout"], port,
                  directory / "freeradius.log")


def bare_server(directory: Path, port: int) -> Server:
    try:
        import pyrad  # noqa: F401
        import twisted  # noqa: F401
    except ImportError as e:
        raise NotAvailable(f"{e.name} not installed") from None
    directory.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(HERE / "bare_responder.py"), "--host", HOST,
            "--port", str(port), "--secret", SECRET, "--dictionary", str(HERE / "dictionary")]
    return Server("bare responder", argv, port, directory / "bare.log")


def freeradius_version() -> str:
    try:
        out = subprocess.run([require("freeradius", "freeradius"), "-v"], capture_output=True,
                             text=True, timeout=10).stdout
    except (NotAvailable, OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"FreeRADIUS Version ([\d.]+)", out)
    return m.group(1) if m else ""


def probe_reply_ma(server: Server) -> str:
    """"yes"/"no": does the server's Status-Server reply carry a Message-Authenticator?"""
    try:
        out = subprocess.run(["radclient", "-x", "-r", "1", "-t", "3",
                              f"{HOST}:{server.port}", "status", SECRET],
                             input="Message-Authenticator = 0x00\n", capture_output=True,
                             text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    reply = out.split("Received", 1)[1] if "Received" in out else ""
    return "yes" if "Message-Authenticator" in reply else "no"


# --- section: Status-Server front end -----------------------------------------------------

def bench_front_end(report: Report, args, workdir: Path, targets) -> dict[str, float]:
    """Status-Server req/s for each (name, factory, label) target; returns medians by name.

    All servers are started first; the runs are then interleaved (ours, FreeRADIUS,
    bare, ours, ...) so that a slow patch of the machine hits every target alike.
    """
    section = "front end"
    try:
        require("radclient", "freeradius-utils")
    except NotAvailable as e:
        for _, _, label in targets:
            report.na(section, label, str(e))
        return {}
    request_file = workdir / "status-requests"
    request_file.write_text("\n".join(["Message-Authenticator = 0x00\n"] * args.inflight))
    per_packet = max(1, math.ceil(args.count / args.inflight))
    sent = per_packet * args.inflight
    warm_count = max(1, min(per_packet, 2000 // args.inflight))
    medians: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        running = []
        for name, factory, label in targets:
            try:
                server = stack.enter_context(factory(workdir / name, free_udp_port()))
                warm = run_radclient(server, request_file, "status", parallel=args.inflight,
                                     count=warm_count, sent=0, timeout=args.run_timeout)
                if warm.accepted == 0:
                    raise NotAvailable(f"no Access-Accept to Status-Server "
                                       f"(rejected {warm.rejected}, lost {warm.lost})")
                running.append((name, label, server, []))
                report.add(section, label, "reply has Message-Authenticator",
                           probe_reply_ma(server))
            except NotAvailable as e:
                report.na(section, label, str(e))
            except Exception as e:  # a piece under construction must not stop the others
                report.na(section, label, f"error: {type(e).__name__}: {e}")
        progress(f"front end: {args.repeat} rounds of {sent:,} Status-Server requests, "
                 f"{args.inflight} in flight, against: "
                 + ", ".join(label for _, label, _, _ in running))
        for _ in range(args.repeat):
            for entry in list(running):
                name, label, server, runs = entry
                try:
                    runs.append(run_radclient(server, request_file, "status",
                                              parallel=args.inflight, count=per_packet,
                                              sent=sent, timeout=args.run_timeout))
                except NotAvailable as e:
                    report.na(section, label, str(e))
                    running.remove(entry)
        for name, label, server, runs in running:
            rates = [r.rate for r in runs]
            median = statistics.median(rates)
            mid = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
            failed = sum(r.sent - r.accepted for r in runs)
            note = (f"best {max(rates):,.0f}, worst {min(rates):,.0f}; median run: server CPU "
                    f"{1e6 * mid.server_cpu / mid.accepted:,.0f} us/req, radclient CPU "
                    f"{1e6 * mid.client_cpu / mid.accepted:,.0f} us/req")
            if failed:
                note += f"; NOT ANSWERED: {failed}"
            report.add(section, label, "Status-Server req/s (median)", f"{median:,.0f}", note)
            cpu_us = statistics.median(1e6 * r.server_cpu / r.accepted for r in runs)
            report.add(section, label, "server CPU per request (median)", f"{cpu_us:,.0f} us",
                       f"= {1e6 / cpu_us:,.0f} req/s per busy core; steadier than req/s here")
            medians[name + "_cpu"] = cpu_us
            rss, _ = server.memory_kib()
            report.add(section, label, "RSS after runs", f"{rss / 1024:,.1f} MiB")
            medians[name] = median
    return medians


# --- sections: logins and scale -----------------------------------------------------------

def totp(secret: bytes, now: float, period: int = 30, digits: int = 6) -> str:
    """RFC 6238 TOTP (HMAC-SHA1), computed here independently of mfaserver."""
    counter = int(now) // period
    mac = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def login_name(i: int) -> str:
    return f"bench{i:06d}"


def cheap_name(i: int) -> str:
    return f"cheap{i:06d}"


def seed_for(name: str) -> bytes:
    return hashlib.sha1(f"mfaserver-bench-seed-{name}".encode()).digest()


def import_store_api():
    try:
        from mfaserver.auth.model import TokenKind
        from mfaserver.config import load_config
        from mfaserver.passwords import hash_password, verify_password
        from mfaserver.store import NewToken, Store
    except Exception as e:  # the package is being written: any import problem is "n/a"
        raise NotAvailable(f"mfaserver store API not importable: {type(e).__name__}: {e}")
    return TokenKind, load_config, hash_password, verify_password, NewToken, Store


def build_store(directory: Path, named: list[tuple[str, str]], total_users: int,
                filler_hash: str, time_limit: float) -> tuple[float, int]:
    """Create users with one TOTP token each; returns (seconds, users created).

    ``named`` is (name, password hash) for the users that will log in; fillers
    fill000000... make up ``total_users`` and share ``filler_hash`` (the cost of
    a verification does not depend on the salt).
    """
    TokenKind, load_config, _, _, NewToken, Store = import_store_api()
    config = load_config(ours_config(directory, 1812))
    store = Store.open(config.database_path, config.key_path)
    now = time.time()
    # Bench-only shortcut: batch inserts in explicit transactions on the store's
    # private connection (6x faster than one autocommit per row); the plain loop
    # is the fallback if that attribute goes away.
    conn = getattr(store, "_conn", None)
    batch = 5000 if conn is not None and hasattr(conn, "in_transaction") else 0
    t0 = time.perf_counter()
    created = 0
    try:
        for i in range(max(total_users, len(named))):
            if batch and i % batch == 0:
                conn.execute("BEGIN")
            name, password_hash = named[i] if i < len(named) else (f"fill{i:06d}", filler_hash)
            store.add_user(name, password_hash=password_hash, phone=None, now=now)
            store.add_token(name, NewToken(kind=TokenKind.TOTP, secret=seed_for(name)), now=now)
            created += 1
            if batch and i % batch == batch - 1:
                conn.execute("COMMIT")
            if time.perf_counter() - t0 > time_limit:
                break
        if batch and conn.in_transaction:
            conn.execute("COMMIT")
    finally:
        store.close()
    return time.perf_counter() - t0, created


def login_file(path: Path, names: list[str], now: float,
               password: str = LOGIN_PASSWORD) -> None:
    with open(path, "w") as f:
        for name in names:
            f.write(f'User-Name = "{name}"\n'
                    f'User-Password = "{password},{totp(seed_for(name), now)}"\n'
                    "Message-Authenticator = 0x00\n\n")


def run_logins(server: Server, workdir: Path, args, names: list[str]) -> RadclientResult:
    """One radclient run logging in each of ``names`` once, with its current code."""
    path = workdir / f"logins-{names[0]}"
    # Stay clear of a TOTP step boundary so every code is inside the window.
    if int(time.time()) % 30 > 25:
        time.sleep(30 - time.time() % 30 + 0.2)
    login_file(path, names, time.time())
    return run_radclient(server, path, "auth", parallel=args.login_inflight, count=1,
                         sent=len(names), timeout=args.run_timeout, retries=1,
                         reply_timeout=20)


def measure_hash(verify_password, password_hash: str, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        if not verify_password(LOGIN_PASSWORD, password_hash):
            raise NotAvailable("verify_password rejected its own hash")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def login_rounds(args, workdir: Path, section: str, label: str, total_users: int,
                 full_hash: str, cheap_hash: str) -> dict:
    """Build a store, start the daemon, run the login runs. Returns figures.

    Each run logs in args.logins distinct users. Runs over users with the
    default scrypt hash ("full") alternate with control runs over users whose
    hash is trivially cheap ("cheap"): the difference is the cost of hashing.
    """
    full = [login_name(i) for i in range(args.logins * args.login_runs)]
    cheap = [cheap_name(i) for i in range(args.logins * args.login_runs)]
    directory = workdir / section
    directory.mkdir(parents=True)
    progress(f"{section}: building a store with {total_users:,} users + tokens")
    named = [(n, full_hash) for n in full] + [(n, cheap_hash) for n in cheap]
    build_s, created = build_store(directory, named, total_users, full_hash, args.build_timeout)
    if created < total_users:
        raise NotAvailable(f"store build reached only {created:,} of {total_users:,} users "
                           f"in {build_s:.0f} s (--build-timeout)")
    db_mib = sum(p.stat().st_size
                 for p in (directory / "state").glob("mfaserver.sqlite3*")) / 2 ** 20
    port = free_udp_port()
    config = ours_config(directory, port)
    server = Server("mfaserver", mfaserver_command() + ["-c", str(config), "run"],
                    port, directory / "mfaserver.log", env=dict(os.environ, PYTHONUNBUFFERED="1"))
    progress(f"{section}: {args.login_runs} x {args.logins} logins (+ as many with a "
             f"trivial hash), {args.login_inflight} in flight")
    full_runs, cheap_runs = [], []
    with server:
        rss_idle, _ = server.memory_kib()
        for r in range(args.login_runs):
            chunk = slice(r * args.logins, (r + 1) * args.logins)
            full_runs.append(run_logins(server, directory, args, full[chunk]))
            cheap_runs.append(run_logins(server, directory, args, cheap[chunk]))
        rss, hwm = server.memory_kib()
    return dict(full=full_runs, cheap=cheap_runs, build_s=build_s, db_mib=db_mib, rss=rss,
                hwm=hwm, rss_idle=rss_idle, users=max(total_users, len(named)))


def _median_run(runs: list[RadclientResult]) -> RadclientResult:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def report_logins(report: Report, section: str, figures: dict, hash_s: float) -> float:
    label = f"{figures['users']:,} users"
    runs, cheap = figures["full"], figures["cheap"]
    rates = [r.rate for r in runs]
    median = statistics.median(rates)
    mid, cheap_mid = _median_run(runs), _median_run(cheap)
    bad = sum(r.rejected + r.lost for r in runs + cheap)
    note = f"best {max(rates):,.1f}; runs {', '.join(f'{x:,.1f}' for x in rates)}"
    if bad:
        note += f"; REJECTED/LOST: {bad} of {sum(r.sent for r in runs + cheap)}"
    report.add(section, label, "logins/s (median)", f"{median:,.1f}", note)
    if mid.accepted and cheap_mid.accepted:
        wall_per = mid.wall / mid.accepted
        cores = mid.server_cpu / mid.wall
        cpu_per = mid.server_cpu / mid.accepted
        cheap_cpu = cheap_mid.server_cpu / cheap_mid.accepted
        report.add(section, label, "daemon CPU per login", f"{cpu_per * 1e3:,.1f} ms",
                   f"wall per login {wall_per * 1e3:,.1f} ms; cores used {cores:.2f}")
        share = hash_s / (wall_per * cores) if cores > 0 else float("nan")
        report.add(section, label, "hash share (formula)", f"{100 * share:,.0f} %",
                   f"t_hash / (wall per login x cores used) = {hash_s * 1e3:.1f} / "
                   f"({wall_per * 1e3:.1f} x {cores:.2f})")
        report.add(section, label, "hash share (measured)",
                   f"{100 * max(0.0, cpu_per - cheap_cpu) / cpu_per:,.0f} %",
                   "(CPU per login - CPU per trivial-hash login) / CPU per login")
        report.add(section, label, "non-hash CPU per login", f"{cheap_cpu * 1e3:,.2f} ms",
                   f"trivial-hash logins: {statistics.median(r.rate for r in cheap):,.0f}/s "
                   f"median, cores used {cheap_mid.server_cpu / cheap_mid.wall:.2f}")
    report.add(section, label, "daemon RSS after logins", f"{figures['rss'] / 1024:,.1f} MiB",
               f"idle before {figures['rss_idle'] / 1024:,.1f} MiB; "
               f"peak {figures['hwm'] / 1024:,.1f} MiB")
    report.add(section, label, "store build", f"{figures['build_s']:,.1f} s",
               f"database {figures['db_mib']:,.1f} MiB")
    return median


def bench_logins(report: Report, args, workdir: Path, sections: set[str]) -> None:
    try:
        require("radclient", "freeradius-utils")
        _, _, hash_password, verify_password, _, _ = import_store_api()
        mfaserver_command()
        full_hash = hash_password(LOGIN_PASSWORD)
        cheap_hash = hash_password(LOGIN_PASSWORD, log2_n=1)
        hash_s = measure_hash(verify_password, full_hash)
    except Exception as e:
        reason = str(e) if isinstance(e, NotAvailable) else f"error: {type(e).__name__}: {e}"
        for s in ("logins", "scale"):
            if s in sections:
                report.na(s, "mfaserver", reason)
        return
    params = full_hash.split("$")[1:4]
    report.add("logins", "in-process", "t_hash: verify_password",
               f"{hash_s * 1e3:,.1f} ms", f"median of 20, one thread; scrypt log2 N={params[0]}, "
                                          f"r={params[1]}, p={params[2]}")
    small_rate = None
    small_users = 2 * args.logins * args.login_runs
    plan = []
    if "logins" in sections:
        plan.append(("logins", small_users))
    if "scale" in sections:
        plan.append(("scale", max(args.scale_users, small_users)))
    for section, users in plan:
        try:
            figures = login_rounds(args, workdir, section, f"{users:,} users", users,
                                   full_hash, cheap_hash)
            rate = report_logins(report, section, figures, hash_s)
            if section == "logins":
                small_rate = rate
            elif small_rate:
                report.add("scale", "ratio", f"logins/s {users:,} / {small_users:,} users",
                           f"{rate / small_rate:.2f}")
        except NotAvailable as e:
            report.na(section, f"{users:,} users", str(e))
        except Exception as e:  # a piece under construction must not stop the others
            report.na(section, f"{users:,} users", f"error: {type(e).__name__}: {e}")
    report.notes.append(
        "Logins: every request is a distinct user with the current TOTP code (RFC 6238, "
        "computed here), so each is a full check: scrypt password verify + TOTP + "
        "replay-guard write + audit row. Each store holds, besides fillers, "
        f"{args.logins * args.login_runs} users with the default scrypt hash and as many with a "
        "trivial one (log2 N=1); runs over the two alternate. 'hash share (formula)' = "
        "t_hash / (wall time per login x cores used), cores used = daemon CPU seconds / wall "
        "seconds over the run (from /proc/PID/stat); it equals t_hash / daemon CPU per login "
        "and mixes an in-process timing with a loaded daemon, so it can exceed 100 %. 'hash "
        "share (measured)' and 'non-hash CPU per login' come from the trivial-hash control "
        "runs: RADIUS decode/encode, SQLite reads/writes, TOTP, logging.")


# --- section: ldap (issue #3) -------------------------------------------------------------

def pid_cpu_seconds(pid: int | str) -> float:
    """utime + stime of any process of ours, all threads (0 if it is gone); a
    "PID/task/TID" string gives one thread's."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int, depth: int = 4) -> float:
    """CPU seconds of a process and its running descendants (an LDAP worker process, say)."""
    total = pid_cpu_seconds(pid)
    if depth:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return total
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            total += sum(tree_cpu_seconds(c, depth - 1) for c in children)
    return total


@dataclass
class LdapRun:
    """One throughput run: logins accepted per wall second, and who used the CPU."""
    wall: float
    sent: int
    accepted: int
    failed: int          # rejected + lost (radclient) or refused (raw ldap3)
    server_cpu: float    # mfaserver / FreeRADIUS, or the raw ldap3 process
    directory_cpu: float  # slapd, or the Samba DC and its LDAP processes
    client_cpu: float    # radclient (0 for the raw ldap3 run: it is its own client)

    @property
    def rate(self) -> float:
        return self.accepted / self.wall if self.wall > 0 else 0.0


def wait_for_step_room(seconds: float, lookback_steps: int) -> None:
    """Sleep into the next 30 s TOTP step if codes made now could expire within ``seconds``.

    FreeRADIUS 3.2.1's rlm_totp accepts the current step only (``lookback_steps``
    0); mfaserver also the previous one (its window is +-1).
    """
    room = 30 - time.time() % 30 + 30 * lookback_steps
    if seconds < 29 + 30 * lookback_steps and room < seconds:
        progress(f"waiting {room - 30 * lookback_steps:.1f} s for the next TOTP step")
        time.sleep(room - 30 * lookback_steps + 0.2)


def ldap_login_file(path: Path, names: list[str], password: str) -> Path:
    """A radclient file logging each name in once with "password,current code"."""
    now = time.time()
    with open(path, "w") as f:
        for name in names:
            f.write(f'User-Name = "{name}"\n'
                    f'User-Password = "{password},{totp(seed_for(name), now)}"\n'
                    "Message-Authenticator = 0x00\n\n")
    return path


def ldap_radclient_run(server: Server, directory_cpu, path: Path, args, sent: int) -> LdapRun:
    """One radclient run; the server's CPU includes its child processes (LDAP workers).

    ``directory_cpu()``: CPU seconds so far of the directory server (slapd, the DC).
    """
    s0, c0 = directory_cpu(), tree_cpu_seconds(server.proc.pid)
    r = run_radclient(server, path, "auth", parallel=args.ldap_inflight, count=1, sent=sent,
                      timeout=args.run_timeout, retries=1, reply_timeout=10)
    return LdapRun(r.wall, sent, r.accepted, r.rejected + r.lost,
                   tree_cpu_seconds(server.proc.pid) - c0, directory_cpu() - s0,
                   r.client_cpu)


def ldap_raw_run(lb, ls, url: str, slapd_pid: int, workdir: Path, names: list[str],
                 args) -> LdapRun:
    """The raw ldap3 search+bind client as its own process (see ldap_bench.py)."""
    path = workdir / f"raw-names-{names[0]}"
    path.write_text("\n".join(names))
    s0 = pid_cpu_seconds(slapd_pid)
    try:
        out = subprocess.run(lb.raw_command(sys.executable, url, ls, path, 8),
                             capture_output=True, text=True, timeout=args.run_timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NotAvailable(f"raw ldap3 client did not finish in {args.run_timeout:.0f} s") \
            from None
    slapd_cpu = pid_cpu_seconds(slapd_pid) - s0
    try:
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        return LdapRun(figures["wall"], len(names), figures["ok"], figures["failed"],
                       figures["cpu"], slapd_cpu, 0.0)
    except (IndexError, KeyError, ValueError):
        raise NotAvailable("raw ldap3 client: " + (out.stderr or out.stdout)[-300:]) from None


def ldap_probe(server: Server, workdir: Path, name: str, password: str) -> str:
    """"accept", "reject" or "none": what the server answers one login (radclient)."""
    path = workdir / f"probe-{server.name}-{name}"
    path.write_text(f'User-Name = "{name}"\nUser-Password = "{password}"\n'
                    "Message-Authenticator = 0x00\n")
    try:
        out = subprocess.run(["radclient", "-x", "-r", "1", "-t", "5", "-f", str(path),
                              f"{HOST}:{server.port}", "auth", SECRET],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    if "Received Access-Accept" in out:
        return "accept"
    return "reject" if "Received Access-Reject" in out else "none"


def profile_ldap(report: Report, args, directory: Path, lb, ours: Server, slapd,
                 names: list[str], password: str) -> None:
    """One more mfaserver run with py-spy sampling the GIL holder; summary rows."""
    section = "ldap"
    spy = shutil.which("py-spy") or os.environ.get("PYSPY") or "/tmp/pyspy/bin/py-spy"
    if not os.access(spy, os.X_OK):
        report.na(section, "profile", "py-spy not found (PATH, $PYSPY or /tmp/pyspy/bin)")
        return
    raw = directory / "profile.txt"
    argv = [spy, "record", "--gil", "--subprocesses", "--format", "raw", "--rate", "250",
            "--duration", "120",
            "--output", str(raw), "--pid", str(ours.proc.pid)]
    with open(directory / "py-spy.log", "wb") as log:
        spy_proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        path = ldap_login_file(directory / "run-profile", names, password)
        run = ldap_radclient_run(ours, lambda: pid_cpu_seconds(slapd.process.pid), path,
                                 args, len(names))
    finally:
        spy_proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        try:
            spy_proc.wait(30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            spy_proc.wait()
    shares = lb.summarize_profile(raw, ours.proc.pid) if raw.exists() else []
    if not shares:
        report.na(section, "profile", f"py-spy wrote nothing: {tail(directory / 'py-spy.log')}")
        return
    report.add(section, "profile (mfaserver)", "logins/s while sampled", f"{run.rate:,.0f}",
               "py-spy --gil --subprocesses --rate 250: samples of the thread holding the "
               "GIL, in the daemon and its child processes, whole run")
    for label, share in shares:
        report.add(section, "profile (mfaserver)", label, f"{100 * share:.0f} %")


def idle_share(seconds: float = 1.0) -> float:
    """The share of all cores idle over ``seconds`` (from /proc/stat): other work on the box."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def directory_section_start(report: Report, section: str) -> None:
    """The "cores idle" row, and NotAvailable if radclient or mfaserver is missing."""
    idle = idle_share()
    report.add(section, "machine", "cores idle before the section", f"{100 * idle:.0f} %",
               f"load average {open('/proc/loadavg').read().split()[0]}; < 95 %: "
               "something else is running, figures are low")
    require("radclient", "freeradius-utils")
    mfaserver_command()
    import_store_api()


@dataclass
class DirectoryUsers:
    """The bench users of a directory section, split by use. Every mfaserver login
    needs its own user (a TOTP code counts once per token); FreeRADIUS and the raw
    client get the same users again."""
    all: list[str]
    warm: list[str]
    runs: list[list[str]]
    latency: list[str]
    probes: list[str]     # right, wrong code, wrong password
    extra: list[str]      # the profiled run's


def directory_users(name, per_run: int, runs: int, warm: int, latency: int,
                    extra: int = 0) -> DirectoryUsers:
    names = [name(i) for i in range(warm + runs * per_run + latency + 3 + extra)]
    rest = names[warm:]
    end = runs * per_run
    return DirectoryUsers(names, names[:warm],
                          [rest[r * per_run:(r + 1) * per_run] for r in range(runs)],
                          rest[end:end + latency], rest[end + latency:end + latency + 3],
                          rest[end + latency + 3:])


def directory_store(report: Report, args, section: str, directory: Path, names: list[str],
                    where: str, setup_note: str) -> None:
    """mfaserver's store with the same users (seeds from seed_for); a "setup" row."""
    progress(f"{section}: {where} with {len(names):,} bench users; building the mfaserver store")
    build_s, created = build_store(directory, [(x, None) for x in names], len(names), None,
                                   args.build_timeout)
    if created < len(names):
        raise NotAvailable(f"store build reached only {created:,} users in {build_s:.0f} s")
    report.add(section, "setup", f"users in {where} and the store", f"{len(names):,}",
               f"{setup_note}; store build {build_s:.1f} s")


@dataclass
class DirectoryBench:
    """What the ldap and ad sections differ in; `run_directory_logins` does the rest."""
    section: str                # "ldap", "ad": the table's section and progress prefix
    directory_name: str         # "slapd", "DC": whose CPU the notes show
    password: str               # every bench user's directory password
    mfaserver_section: str      # the [directory] tables of mfaserver's config
    write_freeradius: Callable[[Path, int], Path]  # (folder, port) -> radiusd.conf folder
    directory_cpu: Callable[[], float]  # CPU seconds so far of the directory server
    rate: float                 # logins/s of the open-loop latency run
    raw: Callable[[list[str]], LdapRun] | None = None  # the raw ldap3 client, per round
    profile: Callable[[Server], None] | None = None     # an extra profiled mfaserver run
    target_rate: int = 0        # a "mfaserver logins/s >= N" row, if set


def run_directory_logins(report: Report, args, directory: Path, d: DirectoryBench,
                         users: DirectoryUsers, open_loop) -> None:
    """mfaserver and FreeRADIUS (rlm_ldap + rlm_totp) against a running directory: checks,
    interleaved throughput rounds of distinct users, then latency at ``d.rate``; adds rows."""
    section = d.section
    password = d.password
    warm_names, run_names, probes = users.warm, users.runs, users.probes
    fr_label = f"FreeRADIUS {freeradius_version()} rlm_ldap+rlm_totp".replace("  ", " ")
    port = free_udp_port()
    config = ours_config(directory, port)
    with open(config, "a") as f:
        f.write("\n" + d.mfaserver_section)
    check = subprocess.run(mfaserver_command() + ["-c", str(config), "check-config"],
                           capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise NotAvailable("mfaserver check-config failed: "
                           + (check.stderr or check.stdout).strip()[-300:])
    targets = []  # (key, label, Server, lookback steps)
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(Server(
            "mfaserver", mfaserver_command() + ["-c", str(config), "run"], port,
            directory / "mfaserver.log", env=dict(os.environ, PYTHONUNBUFFERED="1")))
        targets.append(("ours", "mfaserver", ours, 1))
        try:
            binary = require("freeradius", "freeradius")
            if not Path("/usr/lib/freeradius/rlm_ldap.so").exists():
                raise NotAvailable("rlm_ldap not installed (apt package freeradius-ldap)")
            fr_port = free_udp_port()
            fr_dir = d.write_freeradius(directory / "freeradius", fr_port)
            chk = subprocess.run([binary, "-C", "-d", str(fr_dir)], capture_output=True,
                                 text=True, timeout=60)
            if chk.returncode != 0:
                raise NotAvailable("freeradius -C failed: " + (chk.stderr or chk.stdout)[-300:])
            fr = stack.enter_context(Server(
                "freeradius", [binary, "-f", "-d", str(fr_dir), "-l", "stdout"], fr_port,
                fr_dir / "freeradius.log"))
            targets.append(("freeradius", fr_label, fr, 0))
        except NotAvailable as e:
            report.na(section, fr_label, str(e))

        # By hand, once: the right login is accepted, a wrong code or password is not.
        good = totp(seed_for(probes[0]), time.time())
        wrong_code = f"{(int(good) + 1) % 1_000_000:06d}"
        for key, label, server, _ in targets:
            seen = [ldap_probe(server, directory, probes[0], f"{password},{good}"),
                    ldap_probe(server, directory, probes[1], f"{password},{wrong_code}"),
                    ldap_probe(server, directory, probes[2],
                               f"wrong-{password},{totp(seed_for(probes[2]), time.time())}")]
            expected = ["accept", "reject", "reject"]
            ok = sum(a == b for a, b in zip(seen, expected))
            report.add(section, label, "checks: right / wrong code / wrong password",
                       " / ".join(seen), "as expected" if ok == 3 else "NOT AS EXPECTED")

        # Warm-up: connection pools filled, first-use costs paid; gives a rate estimate.
        estimate = {}
        for key, label, server, lookback in targets:
            wait_for_step_room(10, lookback)
            path = ldap_login_file(directory / f"warm-{key}", warm_names, password)
            w = ldap_radclient_run(server, d.directory_cpu, path, args, len(warm_names))
            estimate[key] = max(w.rate, 50.0)
            if w.accepted == 0:
                report.na(section, label, f"no login accepted in the warm-up "
                                          f"({w.failed} failed); see {server.log_path.name}")
                targets = [t for t in targets if t[0] != key]

        progress(f"{section}: {len(run_names)} rounds of {len(run_names[0]):,} logins, "
                 f"{args.ldap_inflight} in flight: " + ("raw ldap3, " if d.raw else "")
                 + ", ".join(label for _, label, _, _ in targets))
        results: dict[str, list[LdapRun]] = {"raw": []}
        for key, *_ in targets:
            results[key] = []
        for chunk in run_names:
            if d.raw:
                results["raw"].append(d.raw(chunk))
            for key, label, server, lookback in targets:
                wait_for_step_room(1.5 * len(chunk) / estimate[key] + 1, lookback)
                path = ldap_login_file(directory / f"run-{key}-{chunk[0]}", chunk, password)
                results[key].append(ldap_radclient_run(server, d.directory_cpu, path, args,
                                                       len(chunk)))

        labels = {"raw": "raw ldap3, 1 process, 8 threads"}
        labels.update((key, label) for key, label, _, _ in targets)
        medians = {}
        for key, runs in results.items():
            if not runs:
                continue
            rates = [r.rate for r in runs]
            median = statistics.median(rates)
            medians[key] = median
            mid = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
            failed = sum(r.failed for r in runs)
            note = f"runs {', '.join(f'{x:,.0f}' for x in rates)}"
            if failed:
                note += f"; FAILED: {failed} of {sum(r.sent for r in runs)}"
            else:
                note += f"; all {sum(r.accepted for r in runs):,} accepted"
            report.add(section, labels[key], "logins/s (median)", f"{median:,.0f}", note)
            per = 1e3 / mid.accepted if mid.accepted else float("nan")
            cpu_note = f"{d.directory_name} {mid.directory_cpu * per:.2f} ms"
            if key != "raw":
                cpu_note += f", radclient {mid.client_cpu * per:.2f} ms"
            busy = (mid.server_cpu + mid.directory_cpu + mid.client_cpu) / mid.wall
            cpu_note += f"; cores busy {busy:.2f} of {os.cpu_count()}"
            report.add(section, labels[key],
                       "CPU per login: " + ("client" if key == "raw" else "server"),
                       f"{mid.server_cpu * per:.2f} ms", cpu_note)
        if medians.get("ours") and medians.get("raw"):
            report.add(section, "ratio", "mfaserver / raw ldap3",
                       f"{medians['ours'] / medians['raw']:.2f}", "[>= 0.8]")
        if medians.get("ours") and medians.get("freeradius"):
            report.add(section, "ratio", "mfaserver / FreeRADIUS",
                       f"{medians['ours'] / medians['freeradius']:.2f}",
                       "[explain if < 0.5: README, Benchmarks]")
        if d.target_rate and medians.get("ours"):
            report.add(section, "target", f"mfaserver logins/s >= {d.target_rate:,}",
                       "yes" if medians["ours"] >= d.target_rate else "no")

        if d.profile:
            d.profile(ours)

        # Latency: open loop at a fixed rate, fresh users for mfaserver, the same for FreeRADIUS.
        duration = len(users.latency) / d.rate
        progress(f"{section}: latency at {d.rate:,.0f} logins/s for {duration:.0f} s against "
                 + ", ".join(label for _, label, _, _ in targets))
        for key, label, server, _ in targets:
            s0, c0 = d.directory_cpu(), tree_cpu_seconds(server.proc.pid)
            res = open_loop(HOST, server.port, SECRET.encode(), users.latency,
                            lambda name, now: f"{password},{totp(seed_for(name), now)}",
                            rate=d.rate, timeout=5.0)
            server.check_alive()
            answered = len(res.latencies)
            worst = max(res.latencies or [0])
            note = (f"p50 {1e3 * res.percentile(50):.1f} ms, max {1e3 * worst:.1f} ms; "
                    f"{res.sent:,} sent in {res.duration:.1f} s, {res.accepted:,} accepted")
            bad = res.sent - res.accepted
            if bad:
                note += (f"; NOT ACCEPTED {bad} (rejected {res.rejected}, lost {res.lost}, "
                         f"other {res.other})")
            if res.late_sends:
                note += f"; {res.late_sends} sent > 5 ms late"
            if answered:
                server_cpu = tree_cpu_seconds(server.proc.pid) - c0
                directory_cpu = d.directory_cpu() - s0
                note += (f"; server CPU {1e3 * server_cpu / answered:.2f} ms/login, "
                         f"{d.directory_name} {1e3 * directory_cpu / answered:.2f}")
            report.add(section, label, f"p99 latency at {d.rate:,.0f}/s",
                       f"{1e3 * res.percentile(99):.1f} ms", note)


def bench_ldap(report: Report, args, workdir: Path) -> None:
    """Issue #3: password,code logins against slapd; raw ldap3 and FreeRADIUS side by side."""
    section = "ldap"
    directory_section_start(report, section)
    try:
        import ldap_bench as lb
        from loadgen import open_loop
    except Exception as e:  # ldap3 or mfaserver not importable
        raise NotAvailable(f"{type(e).__name__}: {e}") from None
    n = args.ldap_logins
    users = directory_users(lb.ldap_name, n, args.ldap_runs, min(n, 512),
                            max(1, int(args.ldap_rate * args.ldap_latency_seconds)),
                            n if args.ldap_profile else 0)
    directory = workdir / "ldap"
    directory.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        ls, slapd = lb.start_slapd(directory / "slapd", users.all, seed_for)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        raise NotAvailable(f"slapd: {e}") from None
    try:
        directory_store(report, args, section, directory, users.all, "slapd",
                        f"slapadd + start {time.perf_counter() - t0:.1f} s")
        run_directory_logins(report, args, directory, DirectoryBench(
            section=section, directory_name="slapd", password=lb.LDAP_PASSWORD,
            mfaserver_section=lb.mfaserver_ldap_section(ls, slapd.url),
            write_freeradius=lambda folder, port: lb.write_freeradius_config(
                folder, ls, host=HOST, port=port, secret=SECRET, ldap_port=slapd.port),
            directory_cpu=lambda: pid_cpu_seconds(slapd.process.pid), rate=args.ldap_rate,
            raw=lambda chunk: ldap_raw_run(lb, ls, slapd.url, slapd.process.pid, directory,
                                           chunk, args),
            profile=(lambda ours: profile_ldap(report, args, directory, lb, ours, slapd,
                                               users.extra, lb.LDAP_PASSWORD))
            if users.extra else None,
            target_rate=1000), users, open_loop)
    finally:
        slapd.stop()
    report.notes.append(
        f"LDAP logins (issue #3): slapd (tests/ldap_server.py config, 8 threads, mdb) holds "
        f"the bench users; every mfaserver login is a distinct user with the current TOTP code, "
        f"\"password,code\", radclient -p {args.ldap_inflight} over a file of "
        f"{args.ldap_logins:,} logins; mfaserver: [directory] backend = \"ldap\" over "
        "ldap://127.0.0.1 (service account search, size limit 2, then a bind as the user; "
        "pool_size 8), TOTP from its store with replay guard and audit row. Raw ldap3: one "
        "Python process, 8 threads, each with one bound search connection and one bind "
        "connection reused, the same search + bind, nothing else (the ceiling of one Python "
        "process). FreeRADIUS: regex split of User-Password, rlm_ldap search (seed from the "
        "entry's description into control:TOTP-Secret), Auth-Type bind as the user, rlm_totp "
        "(current step only, no replay record); 32 threads and 32 LDAP connections. Runs are "
        "interleaved (raw, mfaserver, FreeRADIUS) after a warm-up; medians. slapd, radclient "
        "and the server share the cores, so 'cores busy' shows who had them. Latency: "
        "benchlib/loadgen.py sends at a fixed rate (open loop, 8 sockets), fresh users; "
        "nearest-rank percentiles over answered requests.")


# --- section: ad (issue #11) ---------------------------------------------------------------

def bench_ad(report: Report, args, workdir: Path) -> None:
    """Issue #11: password,code logins against a Samba AD DC over LDAPS, mfaserver and
    FreeRADIUS side by side."""
    section = "ad"
    directory_section_start(report, section)
    try:
        import ad_bench as ab
        from loadgen import open_loop
        sa = ab.samba_ad()
        sa.samba_tool()
    except Exception as e:  # Samba, its Python or mfaserver missing
        raise NotAvailable(f"{type(e).__name__}: {e}") from None
    n = args.ad_logins
    users = directory_users(ab.ad_name, n, args.ad_runs, min(n, 256),
                            max(1, int(args.ad_rate * args.ad_latency_seconds)))
    directory = workdir / "ad"
    directory.mkdir(parents=True)
    try:
        _, dc, dc_s = ab.start_dc(directory / "samba", users.all, seed_for)
    except (sa.SambaUnavailable, OSError, subprocess.SubprocessError) as e:
        raise NotAvailable(f"Samba AD DC: {e}"[:600]) from None
    try:
        directory_store(report, args, section, directory, users.all, "the DC",
                        f"provision + users + start {dc_s:.1f} s")
        run_directory_logins(report, args, directory, DirectoryBench(
            section=section, directory_name="DC", password=ab.AD_PASSWORD,
            mfaserver_section=ab.mfaserver_ad_section(sa, dc),
            write_freeradius=lambda folder, port: ab.write_freeradius_config(
                folder, sa, dc, host=HOST, port=port, secret=SECRET),
            # samba -> prefork master -> LDAP workers (each behind a "tfork" helper)
            directory_cpu=lambda: tree_cpu_seconds(dc.proc.pid, depth=6),
            rate=args.ad_rate), users, open_loop)
    finally:
        dc.stop()
    report.notes.append(
        f"Active Directory logins (issue #11): a Samba {samba_version()} AD DC "
        "(tests/samba_ad.py domain, prefork process model, LDAPS on 127.0.0.1:636 with a CA "
        "made for the run) holds the bench users (NT hash and pwdLastSet set offline, the "
        "TOTP seed in description); every mfaserver login is a distinct user with the "
        "current code, \"password,code\", radclient -p "
        f"{args.ldap_inflight} over a file of {args.ad_logins:,} logins, {args.ad_runs} "
        "interleaved rounds after a warm-up, medians. mfaserver: [directory] backend = "
        "\"ldap\", active_directory = true, ldaps:// with ca_file (certificate verified), "
        "service account search by sAMAccountName then a bind as the user's DN; pool_size 8; "
        "TOTP from its store with replay guard and audit row. FreeRADIUS: the ldap section's "
        "config pointed at ldaps://127.0.0.1 with tls { ca_file, require_cert = demand }, "
        "filter sAMAccountName, seed from description, bind as the user, rlm_totp. The DC, "
        "radclient and the server share the cores. Latency: open loop at a fixed rate, fresh "
        "users for mfaserver, the same ones for FreeRADIUS.")


def samba_version() -> str:
    try:
        out = subprocess.run(["samba", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.replace("Version", "").strip()


# --- sections run as child scripts: push, webapp, cluster --------------------------------

def child_json(argv: list[str], timeout: float) -> dict:
    """Run a bench script that prints one JSON object last on stdout (progress on our
    stderr); that object, or NotAvailable with its "error" or why there is none."""
    script = Path(argv[1]).name
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NotAvailable(f"{script} did not finish in {timeout:.0f} s") from None
    try:
        figures = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise NotAvailable(f"{script} printed no result (exit {out.returncode})") from None
    if "error" in figures:
        raise NotAvailable(figures["error"])
    return figures


def bench_cluster(report: Report, args) -> None:
    """Issue #12: benchlib/cluster_bench.py in a child process; its rows become table rows."""
    from cluster_bench import OPTIONS
    argv = [sys.executable, str(HERE / "cluster_bench.py"), "--json",
            "--run-timeout", str(args.run_timeout), "--build-timeout", str(args.build_timeout)]
    for name, *_ in OPTIONS:
        argv += [f"--{name}", str(getattr(args, "cluster_" + name.replace("-", "_")))]
    if args.keep:
        argv.append("--keep")
    progress(f"cluster: logins/s (local, LDAP + FreeRADIUS) on SQLite, PostgreSQL, "
             "2 nodes, workers; "
             f"{args.cluster_pushes:,} pushes pending across 2 nodes; {args.cluster_trials} "
             "failover trials (benchlib/cluster_bench.py; progress below)")
    figures = child_json(argv, args.cluster_timeout)
    machine = figures["machine"]
    report.add("cluster", "machine", "cores, CPU", str(machine["cores"]), machine["cpu"])
    for section, target, metric, value, note in figures["rows"]:
        report.add(section, target, metric, value, note)
    report.notes.extend(figures["notes"])


# --- section: push (issue #4) -------------------------------------------------------------

def bench_push(report: Report, args) -> None:
    """Issue #4: scripts/push_load.py in a child process; its rows become table rows."""
    section = "push"
    mfaserver_command()
    script = HERE.parent / "push_load.py"
    argv = [sys.executable, str(script), "--json", "--logins", str(args.push_logins)]
    progress(f"push: {args.push_logins:,} logins held pending a push, then approved "
             "(scripts/push_load.py; progress below)")
    figures = child_json(argv, args.push_timeout)
    label = f"{figures['logins']:,} pending"
    for metric, value, target, met, note in figures["rows"]:
        if target != "-":
            note = f"[{target}: {'met' if met == 'yes' else 'NOT MET'}] {note}"
        report.add(section, label, metric, value, note)
    machine = figures["machine"]
    report.notes.append(
        f"Push (issue #4): scripts/push_load.py holds {figures['logins']:,} logins "
        "(\"password,push\", one user and one Ed25519 device each, created in the store "
        "before the daemon starts; scrypt log2 N=1, the cheapest hash verify_password "
        "accepts) pending in one daemon ([mfa] timeout 300, max_pending 20000, [push] notify "
        "webhook to a sink in the generator, one URL per user), sent from UDP sockets paced "
        "by the wake-ups. With all pending: daemon VmRSS (after a warm-up of 50 approved "
        "logins) and Status-Server round trips one at a time; then every device polls "
        "(wait=0) for its txid and all are approved through POST /v1/transactions/{txid} "
        "from 1 worker process over 4 keep-alive connections. approvals/s = accepts / "
        "(first approval POST -> last Access-Accept). Lost = users with no wake-up, "
        f"duplicates = users with more than one. Machine: {machine['cores']} cores "
        f"({machine['cpu']}); the generator shares them with the daemon.")


# --- section: webapp (issue #10) ----------------------------------------------------------

def bench_webapp(report: Report, args) -> None:
    """Issue #10: scripts/webapp_load.py in a child process; its rows become table rows."""
    section = "webapp"
    mfaserver_command()
    script = HERE.parent / "webapp_load.py"
    argv = [sys.executable, str(script), "--json", "--logins", str(args.webapp_logins),
            "--pages", str(args.webapp_pages)]
    progress(f"webapp: {args.webapp_logins} logins approved in headless Chromium, then "
             f"{args.webapp_pages:,} idle pages (scripts/webapp_load.py)")
    figures = child_json(argv, 600)
    for metric, value, target, met, note in figures["rows"]:
        note = f"[{target}: {'met' if met == 'yes' else 'NOT MET'}] {note}"
        report.add(section, "web authenticator", metric, value, note)
    machine = figures["machine"]
    report.notes.append(
        f"Web authenticator (issue #10): scripts/webapp_load.py enrolls headless Chromium "
        "(Debian's chromium, driven by chromium-driver) from an enrollment link and sends "
        f"{figures['logins']} \"password,push\" logins one after the other; shown = the "
        "moment a MutationObserver in the page sees the Approve button minus the moment the "
        "Access-Request was sent; accepted = Access-Accept received minus the click noted "
        f"in the page (both this machine's clock). Idle pages: {figures['pages']:,} devices, "
        "one signed long poll each (wait=30, polled again as each returns) from one "
        "process; daemon CPU over 30 s after 40 s of settling, as a share of one core, and "
        "its RSS growth. Assets: every file under mfaserver/web/static/app plus the /app/ "
        f"page. Machine: {machine['cores']} cores ({machine['cpu']}); Chromium and the "
        "generator share them with the daemon.")


# --- main ---------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark mfaserver's RADIUS front end and logins against FreeRADIUS "
                    "and a bare Twisted/pyrad responder; prints a table. 127.0.0.1 only.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sections: ours, freeradius, bare (Status-Server req/s); logins (password,code "
               "logins/s, hash share, RSS); scale (100,000 users and tokens); ldap (logins "
               "against slapd vs raw ldap3 and FreeRADIUS rlm_ldap+rlm_totp, latency); "
               "ad (the same against a Samba AD DC over LDAPS); "
               "push (10,000 logins pending a push, approved through the device API); "
               "cluster (issue #12: logins/s, local and LDAP users, on SQLite, PostgreSQL, 2 "
               "nodes and workers, FreeRADIUS for LDAP; "
               "pushes pending across 2 nodes; kill -9 failover)")
    parser.add_argument("--only", metavar="LIST", default=",".join(SECTIONS),
                        help="comma-separated sections to run (default: all)")
    parser.add_argument("--count", type=int, default=20000,
                        help="Status-Server requests per run (default 20000)")
    parser.add_argument("--inflight", type=int, default=64,
                        help="Status-Server requests in flight (default 64)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="Status-Server runs per server; the median is reported (default 5)")
    parser.add_argument("--login-runs", type=int, default=3,
                        help="login runs per store, each with its own users; the median is "
                             "reported (default 3)")
    parser.add_argument("--logins", type=int, default=100,
                        help="logins per run, one distinct user each (default 100)")
    parser.add_argument("--login-inflight", type=int, default=16,
                        help="logins in flight (default 16)")
    parser.add_argument("--scale-users", type=int, default=100_000,
                        help="users (each with a TOTP token) for the scale section "
                             "(default 100000)")
    parser.add_argument("--build-timeout", type=float, default=300,
                        help="seconds allowed to build a store (default 300)")
    parser.add_argument("--run-timeout", type=float, default=300,
                        help="seconds allowed for one radclient run (default 300)")
    parser.add_argument("--ldap-logins", type=int, default=4096,
                        help="ldap: logins per run, one distinct user each (default 4096)")
    parser.add_argument("--ldap-runs", type=int, default=3,
                        help="ldap: runs per target, interleaved; the median is reported "
                             "(default 3)")
    parser.add_argument("--ldap-inflight", type=int, default=64,
                        help="ldap and ad: logins in flight from radclient -p (default 64)")
    parser.add_argument("--ldap-rate", type=float, default=200,
                        help="ldap: logins/s of the open-loop latency run (default 200)")
    parser.add_argument("--ldap-latency-seconds", type=float, default=10,
                        help="ldap: length of the latency run per server (default 10)")
    parser.add_argument("--ldap-profile", action="store_true",
                        help="ldap: one more mfaserver run under py-spy (--gil), its samples "
                             "summarized by component as table rows; py-spy from PATH, $PYSPY "
                             "(pip install --target /tmp/pyspy py-spy)")
    parser.add_argument("--ad-logins", type=int, default=500,
                        help="ad: logins per run, one distinct user each; a run must fit in "
                             "a TOTP step, FreeRADIUS checks the current one only (default 500)")
    parser.add_argument("--ad-runs", type=int, default=3,
                        help="ad: runs per target, interleaved; the median is reported "
                             "(default 3)")
    parser.add_argument("--ad-rate", type=float, default=100,
                        help="ad: logins/s of the open-loop latency run (default 100)")
    parser.add_argument("--ad-latency-seconds", type=float, default=10,
                        help="ad: length of the latency run per server (default 10)")
    parser.add_argument("--push-logins", type=int, default=10_000,
                        help="push: logins held pending at once (default 10000)")
    parser.add_argument("--push-timeout", type=float, default=1200,
                        help="push: seconds allowed for scripts/push_load.py (default 1200)")
    parser.add_argument("--webapp-logins", type=int, default=50,
                        help="webapp: logins approved in the browser (default 50)")
    parser.add_argument("--webapp-pages", type=int, default=1000,
                        help="webapp: idle pages long-polling at once (default 1000)")
    import cluster_bench  # here: it imports this file again as "bench", and push_load
    cluster_bench.add_options(parser, "--cluster-")
    parser.add_argument("--cluster-timeout", type=float, default=3600,
                        help="cluster: seconds allowed for benchlib/cluster_bench.py "
                             "(default 3600)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs, stores)")
    args = parser.parse_args(argv)
    args.sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(SECTIONS)}")
    for name in ("count", "inflight", "repeat", "login_runs", "logins", "login_inflight",
                 "scale_users", "ldap_logins", "ldap_runs", "ldap_inflight", "ldap_rate",
                 "ldap_latency_seconds", "ad_logins", "ad_runs", "ad_rate",
                 "ad_latency_seconds", "push_logins", "webapp_logins", "webapp_pages"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.inflight > 255 or args.login_inflight > 255 or args.ldap_inflight > 255:
        parser.error("at most 255 requests in flight (one radclient socket, 8-bit IDs)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report()
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    workdir = Path(tempfile.mkdtemp(prefix="mfaserver-bench-"))
    started = time.monotonic()
    try:
        fr_label = f"FreeRADIUS {freeradius_version()}".strip()
        targets = [t for t in (("ours", ours_server, "mfaserver"),
                               ("freeradius", freeradius_server, fr_label),
                               ("bare", bare_server, "bare Twisted+pyrad"))
                   if t[0] in args.sections]
        rates = bench_front_end(report, args, workdir, targets) if targets else {}
        if rates.get("ours") and rates.get("freeradius"):
            report.add("front end", "ratio", "mfaserver / FreeRADIUS",
                       f"{rates['ours'] / rates['freeradius']:.2f}")
        if rates.get("ours") and rates.get("bare"):
            report.add("front end", "ratio", "mfaserver / bare",
                       f"{rates['ours'] / rates['bare']:.2f}")
        if rates.get("bare") and rates.get("freeradius"):
            report.add("front end", "ratio", "bare / FreeRADIUS",
                       f"{rates['bare'] / rates['freeradius']:.2f}")
        if rates.get("ours_cpu") and rates.get("freeradius_cpu"):
            report.add("front end", "ratio", "CPU/req FreeRADIUS / mfaserver",
                       f"{rates['freeradius_cpu'] / rates['ours_cpu']:.2f}",
                       "> 1: mfaserver needs less CPU per request")
        if rates.get("ours_cpu") and rates.get("bare_cpu"):
            report.add("front end", "ratio", "CPU/req bare / mfaserver",
                       f"{rates['bare_cpu'] / rates['ours_cpu']:.2f}")
        if rates:
            report.notes.append(
                f"Front end: radclient -p {args.inflight} -c N over a file of {args.inflight} "
                f"Status-Server packets (Message-Authenticator computed by radclient), "
                f"~{args.count:,} requests per run, {args.repeat} runs per server after a "
                "warm-up, interleaved across servers; the median run is reported (best and "
                "worst shown: this machine is noisy). radclient runs on the same "
                f"{os.cpu_count()} cores as the server. FreeRADIUS runs its default thread "
                "pool; mfaserver and the bare responder answer on one reactor thread. The bare "
                "responder checks nothing (no client list, no Message-Authenticator check).")
        if args.sections & {"logins", "scale"}:
            bench_logins(report, args, workdir, args.sections)
        for name, run_section in (("ldap", lambda: bench_ldap(report, args, workdir)),
                                  ("ad", lambda: bench_ad(report, args, workdir)),
                                  ("push", lambda: bench_push(report, args)),
                                  ("webapp", lambda: bench_webapp(report, args)),
                                  ("cluster", lambda: bench_cluster(report, args))):
            if name not in args.sections:
                continue
            try:
                run_section()
            except NotAvailable as e:
                report.na(name, "all", str(e))
            except Exception as e:  # a piece under construction must not stop the table
                report.na(name, "all", f"error: {type(e).__name__}: {e}")
    except KeyboardInterrupt:
        progress("interrupted")
        report.notes.append("INTERRUPTED: partial results.")
    finally:
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report.notes.append(f"Machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
                        f"total bench time {time.monotonic() - started:,.0f} s.")
    print(report.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
