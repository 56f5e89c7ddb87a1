"""Pieces of the ``ldap`` benchmark section (issue #3): a big slapd, FreeRADIUS with
rlm_ldap + rlm_totp, and the raw ldap3 search+bind rate of one Python process.

Used by ``bench.py``; nothing here prints a table. Everything runs on 127.0.0.1.

* `start_slapd` starts the test suite's slapd (``tests/ldap_server.py``: its
  config, its 300 test users and service account) with ``count`` more users
  loaded by slapadd before slapd starts (offline, ~15,000 entries/s): each
  bench user has the same password and its TOTP seed, base32, in
  ``description``, which the service account may read (FreeRADIUS takes the
  seed from there; mfaserver keeps its own copy in its store).
* `write_freeradius_config` writes a radiusd.conf doing the same job as
  mfaserver: split ``password,code``, find the user with ``ldap`` (service
  account), bind as the user, check the code with ``totp``.
* ``python ldap_bench.py raw ...`` is the raw ldap3 client (run as its own
  process by bench.py): the search + bind of a login, nothing else, with a
  pool of threads that each reuse one search and one bind connection; it
  prints one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LDAP_PASSWORD = "bench-ldap-password"
SEED_ATTRIBUTE = "description"  # readable by the service account, free text in inetOrgPerson


def test_ldap_server():
    """The test suite's ``tests/ldap_server.py`` module (slapd config and test data)."""
    return suite_helper("ldap_server")


def suite_helper(stem: str):
    """The test suite's ``tests/<stem>.py`` helper module, loaded once."""
    name = f"mfaserver_bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def ldap_name(i: int) -> str:
    return f"lb{i:06d}"


def b32(seed: bytes) -> str:
    return base64.b32encode(seed).decode("ascii").rstrip("=")


def start_slapd(directory: Path, names: list[str], seed_for, timeout: float = 60.0):
    """Start slapd in ``directory`` with the test data plus one entry per name.

    Returns ``(ldap_server module, Slapd)``; the caller stops it. Raises
    RuntimeError with slapd's output when it does not come up.
    """
    ls = test_ldap_server()
    if not ls.available():
        raise RuntimeError("slapd, slapadd or the OpenLDAP schema files are missing "
                           "(apt packages slapd, ldap-utils)")
    schemas = ls.schema_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "db").mkdir(exist_ok=True)
    conf = directory / "slapd.conf"
    conf.write_text(ls.make_config(directory, schemas, None))
    # One salted hash shared by all bench users: slapd still checks it on every bind
    # (the cost of a {SSHA} check does not depend on the salt).
    password_hash = ls.ssha(LDAP_PASSWORD)
    ldif = directory / "data.ldif"
    with open(ldif, "w") as f:
        f.write(ls.make_ldif())
        for name in names:
            f.write(f"\ndn: uid={name},{ls.PEOPLE_DN}\nobjectClass: inetOrgPerson\n"
                    f"uid: {name}\ncn: {name}\nsn: {name}\nuserPassword: {password_hash}\n"
                    f"{SEED_ATTRIBUTE}: {b32(seed_for(name))}\n")
    subprocess.run([ls.SLAPADD, "-q", "-f", str(conf), "-l", str(ldif)], check=True,
                   capture_output=True, timeout=timeout)
    port = ls.free_tcp_port()
    ldaps_port = ls.free_tcp_port()
    with open(directory / "slapd.log", "wb") as log:
        process = subprocess.Popen(
            [ls.SLAPD, "-d", "0", "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ls.Slapd(directory, port, ldaps_port, process)
    deadline = time.monotonic() + 10
    import socket
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return ls, server
        except OSError:
            time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"slapd did not start (exit {process.returncode}): "
                       + (directory / "slapd.log").read_text(errors="replace")[-300:])


def mfaserver_ldap_section(ls, url: str) -> str:
    """The [directory] part of an mfaserver config for the bench slapd."""
    return (f'[directory]\nbackend = "ldap"\n\n'
            f'[directory.ldap]\nservers = ["{url}"]\n'
            f'bind_dn = "{ls.SERVICE_DN}"\nbind_password = "{ls.SERVICE_PASSWORD}"\n'
            f'base_dn = "{ls.BASE_DN}"\nuser_filter = "(uid={{username}})"\n'
            f'username_attribute = "uid"\ntimeout = 5\npool_size = 8\n')


# --- FreeRADIUS 3 with rlm_ldap + rlm_totp ----------------------------------------------------

from freeradius_conf import FREERADIUS_PRELUDE  # noqa: E402 (next to its one use)

FREERADIUS_LDAP_CONF = """\
# FreeRADIUS 3 config written by scripts/bench (section "{section}"): password,code
# logins against {directory}. One auth listener on {host}:{port}, one client.
""" + FREERADIUS_PRELUDE + """\
thread pool {{
	start_servers = {threads}
	max_servers = {threads}
	min_spare_servers = 3
	max_spare_servers = {threads}
	max_requests_per_server = 0
}}
modules {{
	# Finds the user with the service account and copies the base32 seed from
	# the entry to control:TOTP-Secret; in authenticate, binds as the user.
	ldap {{
		server = "{ldap_server}"
		port = {ldap_port}
		identity = "{service_dn}"
		password = "{service_password}"
		base_dn = "{base_dn}"
		update {{
			control:TOTP-Secret := "{seed_attribute}"
		}}
		user {{
			base_dn = "${{..base_dn}}"
			filter = "({user_attribute}=%{{%{{Stripped-User-Name}}:-%{{User-Name}}}})"
			scope = "sub"
		}}
		options {{
			chase_referrals = no
			rebind = no
			res_timeout = 5
			srv_timelimit = 5
			net_timeout = 5
		}}
{tls}		pool {{
			start = {threads}
			min = {threads}
			max = {threads}
			spare = {threads}
			uses = 0
			retry_delay = 1
			lifetime = 0
			idle_timeout = 0
		}}
	}}
	# Checks request:TOTP-Password against control:TOTP-Secret (the current
	# 30 s step or the one before). 3.2.1 takes no options and keeps no record
	# of used codes.
	totp {{
	}}
	always reject {{
		rcode = reject
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
		if (&User-Password =~ /^(.*),([0-9]{{6}})$/) {{
			update request {{
				&TOTP-Password := "%{{2}}"
				&User-Password := "%{{1}}"
			}}
		}}
		else {{
			reject
		}}
		ldap
		if (!ok && !updated) {{
			reject
		}}
		update control {{
			&Auth-Type := mfa
		}}
	}}
	authenticate {{
		# The password (bind as the user), then the code; anything but ok from
		# the bind ends the section with a reject.
		Auth-Type mfa {{
			ldap {{
				ok = 1
				updated = 1
				noop = reject
				notfound = reject
				fail = reject
				invalid = reject
				userlock = reject
				handled = reject
			}}
			totp
		}}
	}}
}}
"""


def write_freeradius_config(directory: Path, ls, *, host: str, port: int, secret: str,
                            ldap_port: int, threads: int = 32, ldap_server: str = "127.0.0.1",
                            user_attribute: str = "uid", tls: str = "",
                            section: str = "ldap", name: str = "slapd") -> Path:
    """radiusd.conf in ``directory`` for the directory described by ``ls`` (a module
    with SERVICE_DN, SERVICE_PASSWORD, BASE_DN); ``tls`` is rlm_ldap's tls block."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "radiusd.conf").write_text(FREERADIUS_LDAP_CONF.format(
        dir=directory, host=host, port=port, secret=secret, threads=threads,
        ldap_server=ldap_server, ldap_port=ldap_port, user_attribute=user_attribute, tls=tls,
        section=section, directory=name, service_dn=ls.SERVICE_DN,
        service_password=ls.SERVICE_PASSWORD, base_dn=ls.BASE_DN,
        seed_attribute=SEED_ATTRIBUTE))
    return directory


# --- profile summary ----------------------------------------------------------------------------

# (label, path fragments): a sample goes to the first label any of its frames matches.
PROFILE_CATEGORIES = (
    ("ldap3 (BER encode/decode, socket I/O)", ("/ldap3/",)),
    ("store (SQLite: account read, TOTP step write, audit row)",
     ("/sqlite_utils/", "/sqlite3/", "mfaserver/store/")),
    ("password hash / TOTP", ("mfaserver/passwords", "mfaserver/factors/")),
    ("logging (log events, audit log formatting)", ("twisted/logger/", "mfaserver/logs")),
    ("RADIUS codec (decode, encode, M-A, translate, replay cache)",
     ("mfaserver/radius/codec", "mfaserver/radius/translate", "mfaserver/radius/replay")),
    ("thread hand-offs (queues, locks, wake-ups)",
     ("/threading.py", "/queue.py", "twisted/_threads/", "twisted/python/threadpool",
      "mfaserver/workers")),
    ("pipeline, protocol and directory glue",
     ("mfaserver/auth/", "mfaserver/directory/", "mfaserver/radius/")),
    ("Twisted reactor and Deferreds", ("/twisted/",)),
)


def summarize_profile(path: Path, daemon_pid: int, top: int = 10) -> list[tuple[str, float]]:
    """Shares of samples per category from a py-spy ``--format raw`` (collapsed) file.

    Samples from the daemon's child processes (py-spy ``--subprocesses``: LDAP
    worker processes) are labelled "LDAP worker process:".
    """
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        stack = stack.replace(" (", " (/")  # py-spy shows site-packages paths relative
        label = next((name for name, fragments in PROFILE_CATEGORIES
                      if any(f in stack for f in fragments)), "other (interpreter, stdlib)")
        # py-spy 0.4 may file a child's samples under the parent's "process" frame:
        # the LDAP worker is also recognised by its module.
        if ("mfaserver/directory/ldap_worker" in stack
                or (stack.startswith("process ")
                    and not stack.startswith(f"process {daemon_pid}:"))):
            label = "LDAP worker process: " + label
        counts[label] = counts.get(label, 0) + n
    if not total:
        return []
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [(label, n / total) for label, n in ranked]


# --- the raw ldap3 client ---------------------------------------------------------------------

def raw_command(python: str, url: str, ls, names_file: Path, threads: int) -> list[str]:
    return [python, str(Path(__file__).resolve()), "raw", "--url", url,
            "--bind-dn", ls.SERVICE_DN, "--bind-password", ls.SERVICE_PASSWORD,
            "--base-dn", ls.BASE_DN, "--password", LDAP_PASSWORD,
            "--names", str(names_file), "--threads", str(threads)]


def _raw_main(argv: list[str]) -> int:
    """Search (service account) + bind (as the entry) per name; print JSON figures."""
    import ldap3

    p = argparse.ArgumentParser(prog="ldap_bench.py raw")
    p.add_argument("--url", required=True)
    p.add_argument("--bind-dn", required=True)
    p.add_argument("--bind-password", required=True)
    p.add_argument("--base-dn", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--names", required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=120)
    a = p.parse_args(argv)
    names = Path(a.names).read_text().split()
    server = ldap3.Server(a.url, get_info=ldap3.NONE, connect_timeout=5)

    def connect(user=None, password=None) -> ldap3.Connection:
        conn = ldap3.Connection(server, user=user, password=password,
                                authentication=ldap3.SIMPLE, client_strategy=ldap3.SYNC,
                                auto_referrals=False, receive_timeout=5, read_only=True,
                                raise_exceptions=False)
        conn.open(read_server_info=False)
        return conn

    # Per thread: one bound search connection and one connection re-bound as each
    # user, opened before the clock starts (as a warm pool is).
    pools = []
    for _ in range(a.threads):
        searcher = connect(a.bind_dn, a.bind_password)
        if not searcher.bind():
            print(json.dumps({"error": f"service bind refused: {searcher.result}"}))
            return 1
        pools.append((searcher, connect()))
    shares = [names[i::a.threads] for i in range(a.threads)]
    ok = [0] * a.threads
    failed = [0] * a.threads
    barrier = threading.Barrier(a.threads + 1)
    deadline = time.monotonic() + a.time_limit

    def work(i: int) -> None:
        searcher, binder = pools[i]
        barrier.wait()
        for name in shares[i]:
            if time.monotonic() > deadline:
                break
            searcher.search(a.base_dn, f"(uid={name})", ldap3.SUBTREE,
                            attributes=["uid", "mobile"], size_limit=2, time_limit=5)
            entries = [r for r in searcher.response or () if r["type"] == "searchResEntry"]
            if len(entries) != 1:
                failed[i] += 1
                continue
            binder.user, binder.password = entries[0]["dn"], a.password
            if binder.bind():
                ok[i] += 1
            else:
                failed[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(a.threads)]
    for w in workers:
        w.start()
    barrier.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for searcher, binder in pools:
        searcher.unbind()
        binder.unbind()
    print(json.dumps({"ok": sum(ok), "failed": sum(failed), "wall": wall, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["raw"]:
        sys.exit(_raw_main(sys.argv[2:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
