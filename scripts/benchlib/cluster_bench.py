"""Issue #12 benchmark: mfaserver nodes sharing one PostgreSQL, against one node on SQLite.

    scripts/bench --only cluster                  # through the bench (a table)
    .venv/bin/python scripts/benchlib/cluster_bench.py [--pushes 100000] [--json]
    .venv/bin/python scripts/benchlib/cluster_bench.py --parts ldap --logins 200 --rounds 1

All on 127.0.0.1, in a temporary directory, with a throw-away PostgreSQL
(tests/postgres_server.py: initdb in a temp dir, fsync off):

1. Logins/s (``--parts logins``), "password,code" (TOTP), local users, every
   request a distinct user (so a replay-guard write and an audit row each): one
   node on SQLite; one node on PostgreSQL; two nodes on that database, the load
   split across both ports; ``[server] workers = "auto"`` if ``mfaserver
   check-config`` accepts the key. Every target gets the same load: ``--clients``
   UDP sockets of `loadgen.closed_loop` (or radclient processes, ``--generator``),
   each its own source socket so that SO_REUSEPORT workers get a share each (the
   kernel hashes the source socket), ``--inflight`` in flight each. Rounds are
   interleaved across targets; medians are reported. No FreeRADIUS here: this
   bench has no local-user rlm_totp setup.
2. The same with LDAP users (``--parts ldap``): a slapd (benchlib/ldap_bench.py)
   holding a distinct user for every request, the same four mfaserver targets
   with ``[directory] backend = "ldap"`` (the TOTP seeds in their store), and
   FreeRADIUS with rlm_ldap + rlm_totp (every core) as a fifth target in the
   same rounds; each mfaserver target's ratio to FreeRADIUS, and the ratios of 1.
3. Pending pushes across two nodes (push_load.py's store, wake-up sink,
   RADIUS sender and device pool): ``--pushes`` logins, alternately to node A
   and node B, all held; daemon RSS per node, KiB per pending login per node,
   ``pg_total_relation_size('cluster_push')``; then every device polls and
   approves through the device APIs of both nodes (round robin by connection)
   and the Access-Accepts are counted.
4. Failover, ``--trials`` times: a push login held on node A (its wake-up
   seen), ``kill -9`` of A, the same Access-Request sent to node B at once (the
   NAS retry; a NAS would first wait its own timeout, not counted here), the
   device polls B and approves through B ``--settle`` seconds later; time from
   the kill to B's Access-Accept; wake-ups (pushes) per trial, which must be
   exactly 1. Then ``--early-trials`` times the other order a user can produce:
   the approval through B while A is dead, before the NAS's retry. A is started
   again before each trial.

The daemons run ``python -m mfaserver.cli.main`` with this checkout first on
PYTHONPATH, so the code measured is the code next to this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "scripts"), str(ROOT / "tests")]

import bench as b  # noqa: E402 (the bench's modules import each other flat)
from loadgen import closed_loop  # noqa: E402
import push_load as pl  # noqa: E402

TARGET_PG_RATIO = 0.7
TARGET_WORKERS_EFFICIENCY = 0.8
TARGET_KIB_PER_PENDING = 10.0
TARGET_APPROVALS_PER_S = 1000.0


def daemon_env() -> dict:
    """The daemons' environment (`main` puts this checkout first on PYTHONPATH)."""
    return dict(os.environ, PYTHONUNBUFFERED="1")


def mfaserver_argv(config: Path, *command: str) -> list[str]:
    return [sys.executable, "-m", "mfaserver.cli.main", "-c", str(config), *command]


def store_section(dsn: str, node: str) -> str:
    """The [store] and [cluster] tables of a node on PostgreSQL at ``dsn``."""
    return (f'\n[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n\n'
            f'[cluster]\nnode_name = "{node}"\n')


def set_server_key(config: Path, line: str) -> None:
    """Add ``line`` to the [server] table ours_config writes (TOML tables cannot reopen)."""
    text = config.read_text()
    anchor = 'state_dir = "state"\n'
    if anchor not in text:
        raise b.NotAvailable(f"{config.name}: no [server] state_dir line to extend")
    config.write_text(text.replace(anchor, anchor + line + "\n", 1))


def check_config(config: Path) -> str:
    """"" if ``mfaserver check-config`` accepts ``config``, else its message."""
    out = subprocess.run(mfaserver_argv(config, "check-config"), capture_output=True,
                         text=True, timeout=60, env=daemon_env(), cwd=config.parent)
    if out.returncode == 0:
        return ""
    return (out.stderr or out.stdout).strip().splitlines()[-1][-300:] or f"exit {out.returncode}"


def copy_store(build_dir: Path, dsn: str) -> float:
    """``mfaserver store copy --to DSN`` of the SQLite store under ``build_dir``; seconds."""
    config = b.ours_config(build_dir, 1812)
    t0 = time.monotonic()
    out = subprocess.run(mfaserver_argv(config, "store", "copy", "--to", dsn),
                         capture_output=True, text=True, timeout=1800, env=daemon_env(),
                         cwd=build_dir)
    if out.returncode != 0:
        raise b.NotAvailable("store copy failed: " + (out.stderr or out.stdout)[-300:])
    return time.monotonic() - t0


def node_dir(workdir: Path, name: str, build_dir: Path) -> Path:
    """A node's folder with a copy of the seed key the store was built with."""
    directory = workdir / name
    (directory / "state").mkdir(parents=True, mode=0o700)
    shutil.copy2(build_dir / "state" / "seed.key", directory / "state" / "seed.key")
    return directory


def machine_note() -> str:
    load = open("/proc/loadavg").read().split()[:3]
    return f"load average {' '.join(load)}"


def disturbance(report: b.Report, section: str, when: str) -> None:
    """A row with the share of idle cores (other work on this shared machine)."""
    idle = b.idle_share()
    report.add(section, "machine", f"cores idle {when}", f"{100 * idle:.0f} %",
               f"{machine_note()}; < 95 %: something else is running, figures are low")


class PgCluster:
    """The throw-away PostgreSQL and a psycopg connection to ask it things."""

    def __init__(self, directory: Path):
        from postgres_server import PostgresServer, PostgresUnavailable
        try:
            self.server = PostgresServer(directory).start()
        except PostgresUnavailable as e:
            raise b.NotAvailable(f"PostgreSQL: {e}") from None

    def database(self, name: str) -> str:
        return self.server.create_database(name)

    def query(self, dsn: str, sql: str):
        import psycopg
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(sql).fetchone()

    def cpu(self) -> float:
        """CPU seconds of the postmaster and its backends so far."""
        return b.tree_cpu_seconds(self.server.process.pid, depth=1)

    def version(self) -> str:
        return self.query(self.server.dsn(), "SHOW server_version")[0]

    def stop(self) -> None:
        self.server.stop(immediate=False)


# --- 1. logins/s, local users; 2. LDAP users, and FreeRADIUS ----------------------------------

@dataclass
class Target:
    key: str
    label: str
    ports: list[int]
    servers: list[b.Server]
    runs: list[dict] = field(default_factory=list)
    # FreeRADIUS's rlm_totp accepts the current TOTP step only (mfaserver the one before
    # too), so each of its rounds must fit in one step: the warm-up's rate says how long a
    # round will take.
    current_step_only: bool = False
    warm_rate: float = 0.0


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and its children (the workers worker 0 starts), in KiB."""
    total = pl.proc_status_kib(pid, "VmRSS")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(tree_rss_kib(int(c)) for c in f.read().split())
        except OSError:
            continue
    return total


def login_round(target: Target, names: list[str], args, workdir: Path,
                pg: PgCluster | None, password: str = b.LOGIN_PASSWORD,
                directory_cpu: Callable[[], float] | None = None) -> dict:
    """Log in each of ``names`` once against ``target``; returns accepted/s and the CPU
    the servers (and PostgreSQL, the directory server, and the load generator) spent.

    ``--generator python`` (the default): `loadgen.closed_loop` in this process,
    ``--clients`` sockets with ``--inflight`` requests in flight each, socket k to
    port k mod len(ports). ``--generator radclient``: that many radclient
    processes, ``-p inflight`` each, which spend more CPU than the server they
    load (see `loadgen.closed_loop`). ``directory_cpu()``: CPU seconds so far of
    the directory server (slapd), if there is one."""
    if target.current_step_only:
        b.wait_for_step_room(1.5 * len(names) / max(target.warm_rate, 50.0) + 1, 0)
    # Stay clear of a TOTP step boundary so every code is inside the window.
    elif int(time.time()) % 30 > 27:
        time.sleep(30 - time.time() % 30 + 0.2)
    now = time.time()
    cpu0 = sum(b.tree_cpu_seconds(s.proc.pid) for s in target.servers)
    pg0 = pg.cpu() if pg else 0.0
    directory0 = directory_cpu() if directory_cpu else 0.0
    if args.generator == "python":
        logins = [(name, f"{password},{b.totp(b.seed_for(name), now)}") for name in names]
        r = closed_loop(b.HOST, target.ports, b.SECRET.encode(), logins,
                        sockets=args.clients, inflight=args.clients * args.inflight,
                        timeout=10.0)
        wall, gen_cpu = r.wall, r.cpu
        accepted, rejected, lost = r.accepted, r.rejected, r.lost + r.other
    else:
        wall, gen_cpu, (accepted, rejected, lost) = radclient_round(
            target, names, now, args, workdir, password)
    for s in target.servers:
        s.check_alive()
    return dict(wall=wall, sent=len(names), accepted=accepted, rejected=rejected, lost=lost,
                rate=accepted / wall if wall > 0 else 0.0, generator_cpu=gen_cpu,
                cpu=sum(b.tree_cpu_seconds(s.proc.pid) for s in target.servers) - cpu0,
                pg_cpu=(pg.cpu() - pg0) if pg else 0.0,
                directory_cpu=(directory_cpu() - directory0) if directory_cpu else 0.0)


def radclient_round(target: Target, names: list[str], now: float, args, workdir: Path,
                    password: str = b.LOGIN_PASSWORD
                    ) -> tuple[float, float, tuple[int, int, int]]:
    """``--clients`` radclient processes at once, client k to port k mod len(ports):
    (wall seconds, their CPU seconds, (accepted, rejected, lost))."""
    files = []
    for k in range(args.clients):
        share = names[k::args.clients]
        path = workdir / f"logins-{target.key}-{share[0]}"
        b.login_file(path, share, now, password)
        files.append(path)
    children0 = os.times()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(
        ["radclient", "-q", "-s", "-p", str(args.inflight), "-c", "1", "-t", "10", "-r", "1",
         "-f", str(path), f"{b.HOST}:{target.ports[k % len(target.ports)]}", "auth",
         b.SECRET], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL) for k, path in enumerate(files)]
    totals = [0, 0, 0]
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=args.run_timeout)
            for n, count in enumerate(b.radclient_counts(out)):
                totals[n] += count
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t0
    children1 = os.times()
    cpu = (children1.children_user + children1.children_system
           - children0.children_user - children0.children_system)
    return wall, cpu, tuple(totals)


def node_server(name: str, directory: Path, extra: str = "", workers: str = "") -> b.Server:
    """An mfaserver node in ``directory`` (ours_config plus ``extra``), to be entered."""
    port = b.free_udp_port()
    config = b.ours_config(directory, port, extra)
    if workers:
        set_server_key(config, f"workers = {workers}")
        refused = check_config(config)
        if refused:
            raise b.NotAvailable(f"not available: check-config refuses it: {refused}")
    return b.Server(name, mfaserver_argv(config, "run"), port, directory / "run.log",
                    cwd=directory, env=daemon_env())


def mfaserver_targets(stack: contextlib.ExitStack, report: b.Report, section: str,
                      workdir: Path, part: str, build: Path, dsn: str,
                      extra: str = "") -> list[Target]:
    """The four mfaserver targets, started (``stack`` stops them): one node on the SQLite
    store in ``build``, one and two nodes on its copy at ``dsn``, and ``workers = "auto"``
    on it (an n/a row instead if check-config refuses the key). ``extra`` is more config
    for every node; the nodes' folders are ``workdir/<part>-...``."""
    targets = []
    sqlite = stack.enter_context(node_server("sqlite node", build, extra))
    targets.append(Target("sqlite", "1 node, SQLite", [sqlite.port], [sqlite]))
    nodes = [stack.enter_context(node_server(f"node {node}",
                                             node_dir(workdir, f"{part}-node{node}", build),
                                             extra + store_section(dsn, node)))
             for node in ("A", "B")]
    targets.append(Target("pg1", "1 node, PostgreSQL", [nodes[0].port], [nodes[0]]))
    targets.append(Target("pg2", "2 nodes, 1 PostgreSQL", [n.port for n in nodes], nodes))
    try:
        workers = stack.enter_context(node_server(
            "workers", node_dir(workdir, f"{part}-workers", build),
            extra + store_section(dsn, "W"), workers='"auto"'))
    except b.NotAvailable as e:
        report.na(section, 'workers = "auto"', str(e))
    else:
        targets.append(Target("workers", f'workers = "auto" ({os.cpu_count()} cores)',
                              [workers.port], [workers]))
    return targets


def run_rounds(report: b.Report, section: str, part: str, targets: list[Target],
               names: dict[str, list[str]], args, workdir: Path, pg: PgCluster,
               password: str = b.LOGIN_PASSWORD,
               directory_cpu: Callable[[], float] | None = None) -> dict[str, int]:
    """A warm-up of ``--warmup`` logins per target (a target that accepts none of them
    gets an n/a row and leaves ``targets``), then ``--rounds`` interleaved rounds of
    ``--logins``, each login by the next unused user of ``names[target.key]``; adds them
    to ``target.runs`` and returns each target's RSS in KiB after the last round."""
    progress(f"{part}: warm-up, then " + f"{args.rounds} interleaved rounds of "
             f"{args.logins:,} logins against: " + ", ".join(t.label for t in targets))
    for t in list(targets):
        warm = login_round(t, names[t.key][:args.warmup], args, workdir, pg, password,
                           directory_cpu)
        t.warm_rate = warm["rate"]
        if warm["accepted"] == 0:
            report.na(section, t.label, f"no login accepted in the warm-up "
                                        f"(rejected {warm['rejected']}, lost {warm['lost']})"
                                        f"; {b.tail(t.servers[0].log_path, 3)}")
            targets.remove(t)
    for r in range(args.rounds):
        for t in targets:
            first = args.warmup + r * args.logins
            t.runs.append(login_round(t, names[t.key][first:first + args.logins],
                                      args, workdir, pg, password, directory_cpu))
            progress(f"  round {r + 1} {t.label}: {t.runs[-1]['rate']:,.0f}/s")
    return {t.key: sum(tree_rss_kib(s.proc.pid) for s in t.servers) for t in targets}


def report_rounds(report: b.Report, section: str, targets: list[Target], rss: dict[str, int],
                  directory_name: str = "") -> dict[str, float]:
    """Per target, the median logins/s and the CPU per login of its median round; returns
    the medians by target key. ``directory_name`` names the directory server whose CPU
    the rounds measured (slapd), if any."""
    medians = {}
    for t in targets:
        rates = [x["rate"] for x in t.runs]
        medians[t.key] = statistics.median(rates)
        mid = sorted(t.runs, key=lambda x: x["rate"])[len(t.runs) // 2]
        failed = sum(x["sent"] - x["accepted"] for x in t.runs)
        note = f"runs {', '.join(f'{x:,.0f}' for x in rates)}"
        note += (f"; NOT ACCEPTED {failed} of {sum(x['sent'] for x in t.runs)}" if failed
                 else f"; all {sum(x['accepted'] for x in t.runs):,} accepted")
        report.add(section, t.label, "logins/s (median)", f"{medians[t.key]:,.0f}", note)
        if mid["accepted"]:
            per = 1e3 / mid["accepted"]
            freeradius = t.key == "freeradius"
            others = (f"; PostgreSQL {mid['pg_cpu'] * per:.2f} ms"
                      if t.key not in ("sqlite", "freeradius") else "")
            if directory_name:
                others += f"; {directory_name} {mid['directory_cpu'] * per:.2f} ms"
            busy = mid["cpu"] + mid["pg_cpu"] + mid["directory_cpu"] + mid["generator_cpu"]
            report.add(section, t.label,
                       "CPU per login: " + ("FreeRADIUS" if freeradius else "mfaserver"),
                       f"{mid['cpu'] * per:.2f} ms",
                       f"all its {'threads' if freeradius else 'processes'}{others}; load "
                       f"generator {mid['generator_cpu'] * per:.2f} ms; cores busy "
                       f"{busy / mid['wall']:.2f} of {os.cpu_count()}; "
                       f"RSS {rss[t.key] / 1024:,.0f} MiB")
    return medians


def report_cluster_ratios(report: b.Report, section: str, medians: dict[str, float]) -> None:
    """PostgreSQL / SQLite, 2 nodes / 1 node and workers / (cores x 1 node), against the
    issue's targets."""
    if medians.get("pg1") and medians.get("sqlite"):
        ratio = medians["pg1"] / medians["sqlite"]
        report.add(section, "ratio", "1 node PostgreSQL / SQLite", f"{ratio:.2f}",
                   f"[>= {TARGET_PG_RATIO}: {'met' if ratio >= TARGET_PG_RATIO else 'NOT MET'}]")
    if medians.get("pg2") and medians.get("pg1"):
        ratio = medians["pg2"] / medians["pg1"]
        report.add(section, "ratio", "2 nodes / 1 node (PostgreSQL)", f"{ratio:.2f}",
                   f"= {ratio / 2:.2f} x 2 x one node")
    cores = os.cpu_count() or 1
    if medians.get("workers") and medians.get("pg1"):
        share = medians["workers"] / (cores * medians["pg1"])
        report.add(section, "ratio", f"workers / ({cores} x 1 node)", f"{share:.2f}",
                   f"[>= {TARGET_WORKERS_EFFICIENCY}: "
                   f"{'met' if share >= TARGET_WORKERS_EFFICIENCY else 'NOT MET'}]")
    elif "workers" not in medians:
        report.add(section, "ratio", f"workers / ({cores} x 1 node)", "n/a",
                   '(workers = "auto" not available)')


def bench_logins(report: b.Report, args, workdir: Path, pg: PgCluster) -> None:
    section = "cluster logins"
    disturbance(report, section, "before the logins")
    b.require("radclient", "freeradius-utils")
    _, _, hash_password, _, _, _ = b.import_store_api()
    password_hash = hash_password(b.LOGIN_PASSWORD, **({} if args.hash == "scrypt"
                                                       else {"log2_n": 1}))
    keys = ["sqlite", "pg1", "pg2", "workers"]
    per_target = args.warmup + args.rounds * args.logins
    names = {key: [f"{key[:3]}{k}{i:06d}" for i in range(per_target)]
             for k, key in enumerate(keys)}
    build = workdir / "logins-sqlite"
    build.mkdir()
    every = [n for key in keys for n in names[key]]
    progress(f"logins: building a store with {len(every):,} users + TOTP tokens")
    build_s, created = b.build_store(build, [(n, password_hash) for n in every], len(every),
                                     password_hash, args.build_timeout)
    if created < len(every):
        raise b.NotAvailable(f"store build reached {created:,} of {len(every):,} users")
    dsn = pg.database("logins")
    copy_s = copy_store(build, dsn)
    report.add(section, "setup", "users (one TOTP token each)", f"{len(every):,}",
               f"SQLite build {build_s:.1f} s; mfaserver store copy --to PostgreSQL "
               f"{copy_s:.1f} s; password hash: "
               + ("scrypt log2 N=14 (the default)" if args.hash == "scrypt"
                  else "scrypt log2 N=1 (cheapest; --cluster-hash scrypt for the default)"))

    targets: list[Target] = []
    with contextlib.ExitStack() as stack:
        targets = mfaserver_targets(stack, report, section, workdir, "logins", build, dsn)
        report.add(section, "FreeRADIUS", "-", "n/a",
                   "(no local-user rlm_totp setup; FreeRADIUS is measured with LDAP users "
                   "(rlm_ldap + rlm_totp) in section \"cluster ldap\": see its "
                   "\"... / FreeRADIUS\" ratio rows)")
        rss = run_rounds(report, section, "logins", targets, names, args, workdir, pg)
    medians = report_rounds(report, section, targets, rss)
    report_cluster_ratios(report, section, medians)
    disturbance(report, section, "after the logins")


LDAP_KEYS = ("sqlite", "pg1", "pg2", "workers", "freeradius")
FREERADIUS_THREADS = 32  # ldap_bench.write_freeradius_config's default: every core busy


def ldap_freeradius(directory: Path, lb, ls, slapd) -> b.Server:
    """FreeRADIUS with rlm_ldap + rlm_totp against ``slapd``, ldap_bench's config as the
    ldap section runs it, to be entered; NotAvailable if it or rlm_ldap is missing or
    ``freeradius -C`` refuses the config."""
    binary = b.require("freeradius", "freeradius")
    if not Path("/usr/lib/freeradius/rlm_ldap.so").exists():
        raise b.NotAvailable("rlm_ldap not installed (apt package freeradius-ldap)")
    port = b.free_udp_port()
    lb.write_freeradius_config(directory, ls, host=b.HOST, port=port, secret=b.SECRET,
                               ldap_port=slapd.port, threads=FREERADIUS_THREADS,
                               section="cluster ldap")
    check = subprocess.run([binary, "-C", "-d", str(directory)], capture_output=True,
                           text=True, timeout=60)
    if check.returncode != 0:
        raise b.NotAvailable("freeradius -C failed: " + (check.stderr or check.stdout)[-300:])
    return b.Server("freeradius", [binary, "-f", "-d", str(directory), "-l", "stdout"], port,
                    directory / "freeradius.log")


def check_logins(report: b.Report, section: str, targets: list[Target],
                 probes: dict[str, list[str]], workdir: Path, password: str) -> None:
    """Once per target, with radclient: a right login is accepted, a wrong code and a wrong
    password are not (a server that accepted anything would be fast for nothing)."""
    b.wait_for_step_room(5, 0)  # FreeRADIUS takes the current step's code only
    for t in targets:
        right, wrong_code, wrong_password = probes[t.key]
        now = time.time()
        code = {name: b.totp(b.seed_for(name), now) for name in probes[t.key]}
        server = t.servers[0]
        seen = [b.ldap_probe(server, workdir, right, f"{password},{code[right]}"),
                b.ldap_probe(server, workdir, wrong_code,
                             f"{password},{(int(code[wrong_code]) + 1) % 1_000_000:06d}"),
                b.ldap_probe(server, workdir, wrong_password,
                             f"wrong-{password},{code[wrong_password]}")]
        ok = seen == ["accept", "reject", "reject"]
        report.add(section, t.label, "checks: right / wrong code / wrong password",
                   " / ".join(seen), "as expected" if ok else "NOT AS EXPECTED")


def bench_ldap_logins(report: b.Report, args, workdir: Path, pg: PgCluster) -> None:
    """The logins of `bench_logins` with the users in slapd (ldap_bench.py), against the
    same four mfaserver targets and FreeRADIUS (rlm_ldap + rlm_totp), in the same rounds."""
    section = "cluster ldap"
    disturbance(report, section, "before the LDAP logins")
    b.require("radclient", "freeradius-utils")
    b.import_store_api()
    import ldap_bench as lb
    per_target = args.warmup + args.rounds * args.logins
    # Every request a user of its own, FreeRADIUS's too (a login bench measures first
    # lookups and replay-guard writes, not caches); the last 3 of each are check_logins'.
    names = {key: [f"ld{key[:3]}{i:06d}" for i in range(per_target + 3)] for key in LDAP_KEYS}
    probes = {key: names[key][per_target:] for key in LDAP_KEYS}
    every = [n for key in LDAP_KEYS for n in names[key]]
    progress(f"ldap: slapd with {len(every):,} users")
    t0 = time.monotonic()
    try:
        ls, slapd = lb.start_slapd(workdir / "ldap-slapd", every, b.seed_for,
                                   timeout=args.build_timeout)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        raise b.NotAvailable(f"slapd: {e}") from None
    slapd_s = time.monotonic() - t0

    targets: list[Target] = []
    with contextlib.ExitStack() as stack:
        stack.callback(slapd.stop)
        # slapd checks the password; mfaserver checks the code against the seed in its own
        # store (a user without a password, with a TOTP token), as the ldap section's
        # store does. FreeRADIUS reads the seed from the entry.
        in_store = [n for key in LDAP_KEYS if key != "freeradius" for n in names[key]]
        build = workdir / "ldap-sqlite"
        build.mkdir()
        progress(f"ldap: building a store with {len(in_store):,} users + TOTP tokens")
        build_s, created = b.build_store(build, [(n, None) for n in in_store], len(in_store),
                                         None, args.build_timeout)
        if created < len(in_store):
            raise b.NotAvailable(f"store build reached {created:,} of {len(in_store):,} users")
        dsn = pg.database("ldap")
        copy_s = copy_store(build, dsn)
        report.add(section, "setup", "users in slapd (TOTP seed in the entry)",
                   f"{len(every):,}",
                   f"slapadd + start {slapd_s:.1f} s; {len(in_store):,} of them in "
                   f"mfaserver's store (TOTP token, no password): SQLite build {build_s:.1f} s, "
                   f"store copy to PostgreSQL {copy_s:.1f} s")
        extra = "\n" + lb.mfaserver_ldap_section(ls, slapd.url)
        targets = mfaserver_targets(stack, report, section, workdir, "ldap", build, dsn,
                                    extra)
        label = f"FreeRADIUS {b.freeradius_version()} rlm_ldap+rlm_totp".replace("  ", " ")
        try:
            fr = stack.enter_context(ldap_freeradius(workdir / "ldap-freeradius", lb, ls,
                                                     slapd))
        except b.NotAvailable as e:
            report.na(section, label, str(e))
        else:
            targets.append(Target("freeradius", label, [fr.port], [fr],
                                  current_step_only=True))
        check_logins(report, section, targets, probes, workdir, lb.LDAP_PASSWORD)
        rss = run_rounds(report, section, "ldap", targets, names, args, workdir, pg,
                         lb.LDAP_PASSWORD, lambda: b.pid_cpu_seconds(slapd.process.pid))
    medians = report_rounds(report, section, targets, rss, "slapd")
    freeradius = medians.get("freeradius")
    for t in targets:
        if freeradius and t.key != "freeradius" and medians.get(t.key):
            report.add(section, "ratio", f"{t.label} / FreeRADIUS",
                       f"{medians[t.key] / freeradius:.2f}",
                       f"FreeRADIUS: {FREERADIUS_THREADS} threads on all {os.cpu_count()} "
                       "cores, no replay record, no audit row")
    if not freeradius:
        report.add(section, "ratio", "mfaserver / FreeRADIUS", "n/a",
                   "(FreeRADIUS not measured: see its row above)")
    report_cluster_ratios(report, section, medians)
    disturbance(report, section, "after the LDAP logins")


# --- 3. pending pushes across two nodes; 4. failover ------------------------------------------

class Nodes:
    """Node A and B (push_load.Daemon each) on one database; A can be killed and restarted."""

    def __init__(self, workdir: Path, build: Path, dsn: str, max_pending: int):
        self.configs, self.radius, self.web = {}, {}, {}
        for node in ("A", "B"):
            directory = node_dir(workdir, f"push-node{node}", build)
            self.radius[node] = pl.free_port(socket.SOCK_DGRAM)
            self.web[node] = pl.free_port(socket.SOCK_STREAM)
            config = pl.write_config(directory, self.radius[node], self.web[node],
                                     timeout=600, max_pending=max_pending)
            with open(config, "a") as f:
                f.write(store_section(dsn, node))
            self.configs[node] = config
        self.daemons: dict[str, pl.Daemon] = {}
        self.starts = 0

    def start(self, node: str) -> None:
        self.starts += 1
        config = self.configs[node]
        daemon = pl.Daemon(config, config.parent / f"run-{self.starts}.log", None)
        self.daemons[node] = daemon
        secret = b.SECRET.encode()
        if not pl.wait_for(lambda: bool(pl.status_latencies(self.radius[node], secret, 1)[0]),
                           60, daemon, 0.05):
            raise pl.Failed(f"node {node} did not answer Status-Server: {daemon.tail()}")

    def check_alive(self) -> None:
        for daemon in self.daemons.values():
            daemon.check_alive()

    def kill(self, node: str) -> None:
        daemon = self.daemons.pop(node)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()


def push_args(args) -> argparse.Namespace:
    """What push_load's functions read from their own arguments."""
    return argparse.Namespace(window=args.window, phase_timeout=args.phase_timeout)


def bench_pushes(report: b.Report, args, workdir: Path, pg: PgCluster) -> None:
    section = "cluster push"
    disturbance(report, section, "before the pushes")
    n = args.pushes
    names = [f"u{i:06d}" for i in range(n)]
    warm = [f"warm{i:04d}" for i in range(40)]
    fail = [f"fail{i:03d}" for i in range(args.trials)]
    early = [f"early{i:03d}" for i in range(args.early_trials)]
    sink = pl.WakeSink()
    sink.start()
    nodes = pools = None
    try:
        build = workdir / "push-sqlite"
        (build / "state").mkdir(parents=True, mode=0o700)
        extra = warm + fail + early
        progress(f"push: building a store with {n + len(extra):,} users and devices")
        t0 = time.monotonic()
        devices = pl.build_store(build / "state", extra + names, sink.port)
        build_s = time.monotonic() - t0
        dsn = pg.database("push")
        copy_s = copy_store(build, dsn)
        report.add(section, "setup", "users (one push device each)",
                   f"{n + len(extra):,}",
                   f"SQLite build {build_s:.1f} s (push_load.build_store), store copy to "
                   f"PostgreSQL {copy_s:.1f} s")
        nodes = Nodes(workdir, build, dsn, max_pending=n + 1000)
        nodes.start("A")
        nodes.start("B")
        pools = pl.DevicePool([nodes.web["A"], nodes.web["B"]], args.device_processes,
                              args.connections)
        hold_and_approve(warm, devices, nodes, sink, pools, args, "warm-up")
        time.sleep(0.5)
        rss0 = {k: d.rss_kib() for k, d in nodes.daemons.items()}
        progress(f"push: holding {n:,} logins, alternately on node A and node B")
        r = hold_and_approve(names, devices, nodes, sink, pools, args, "run",
                             measure=lambda: (
                                 {k: d.rss_kib() for k, d in nodes.daemons.items()},
                                 pg.query(dsn, "SELECT pg_total_relation_size('cluster_push'),"
                                               " count(*) FROM cluster_push")))
        time.sleep(1.0)  # a late duplicate wake-up would show up now
        with sink.lock:
            wakes = [sink.counts.get("/" + name, 0) for name in names]
        rss1, (table_bytes, rows) = r["measured"]
        for node in ("A", "B"):
            held = (n + (node == "A")) // 2
            per = (rss1[node] - rss0[node]) / held
            report.add(section, f"node {node}", "KiB per pending login", f"{per:.2f}",
                       f"[<= {TARGET_KIB_PER_PENDING:g}: "
                       f"{'met' if per <= TARGET_KIB_PER_PENDING else 'NOT MET'}] VmRSS "
                       f"{rss0[node] / 1024:.1f} MiB after the warm-up, "
                       f"{rss1[node] / 1024:.1f} MiB with {held:,} held here")
        report.add(section, "PostgreSQL", "pg_total_relation_size('cluster_push')",
                   f"{table_bytes / 2 ** 20:,.1f} MiB",
                   f"{rows:,} rows with {n:,} pending ({table_bytes / max(1, rows):,.0f} "
                   "bytes/row, indexes included)")
        rate = r["accepted"] / r["approve_s"] if r["approve_s"] > 0 else 0.0
        ok = rate >= TARGET_APPROVALS_PER_S and r["accepted"] == n
        report.add(section, "nodes A+B", "approvals/s end to end", f"{rate:,.0f}",
                   f"[>= {TARGET_APPROVALS_PER_S:,.0f}: {'met' if ok else 'NOT MET'}] "
                   f"{r['accepted']:,} Access-Accepts of {n:,} in {r['approve_s']:.2f} s (first "
                   f"approval POST to last Access-Accept); HTTP {r['answer_statuses']}; "
                   f"rejected {r['rejected']}, unanswered {r['unanswered']}")
        report.add(section, "nodes A+B", "intake: logins held/s",
                   f"{n / r['intake_s']:,.0f}",
                   f"retransmitted {r['retransmitted']}; devices seeing exactly one pending "
                   f"sign-in {r['pending_seen']:,} of {n:,}")
        lost = sum(1 for w in wakes if w == 0)
        dup = sum(1 for w in wakes if w > 1)
        report.add(section, "nodes A+B", "wake-ups lost / duplicated", f"{lost} / {dup}",
                   f"[0 / 0: {'met' if not lost and not dup else 'NOT MET'}] "
                   f"{sum(wakes):,} webhook POSTs for {n:,} users")
        disturbance(report, section, "after the pushes")
        bench_failover(report, args, nodes, devices, fail, early, sink)
    finally:
        if pools is not None:
            pools.close()
        if nodes is not None:
            nodes.stop()
        sink.stop()


def hold_and_approve(names, devices, nodes: Nodes, sink, pool, args, phase: str,
                     measure=None) -> dict:
    """Login i held on node A (even i) or B (odd); all polled and approved through both
    device APIs; returns figures (``measure()``'s result as "measured", taken while all
    are pending)."""
    secret = b.SECRET.encode()
    logins = pl.Logins(names, secret)
    logins.start()
    n = len(names)
    ports = [nodes.radius["A"], nodes.radius["B"]]
    try:
        t0 = time.monotonic()
        _, retransmitted = pl.send_paced(logins, sink, args.window, lambda i: ports[i % 2],
                                         nodes, phase)
        figures = dict(intake_s=time.monotonic() - t0, retransmitted=retransmitted)
        if measure is not None:
            figures["measured"] = measure()
        jobs = [(name, devices[name][0], devices[name][1], None) for name in names]
        polled = pool.run("poll", jobs, args.phase_timeout)
        figures["pending_seen"] = sum(1 for name in names
                                      if len(polled["txids"].get(name, ())) == 1)
        jobs = [(name, devices[name][0], devices[name][1], polled["txids"][name][0])
                for name in names if polled["txids"].get(name)]
        progress(f"push {phase}: {len(jobs):,} polled; approving")
        answered = pool.run("answer", jobs, args.phase_timeout)
        pl.wait_for(lambda: logins.replies >= n, 60, nodes, 0.01)
        accept = logins.codec.ACCESS_ACCEPT
        accepts = [t for c, t in zip(logins.reply_code, logins.reply_at) if c == accept]
        figures.update(
            accepted=len(accepts),
            rejected=sum(1 for c in logins.reply_code if c == logins.codec.ACCESS_REJECT),
            unanswered=sum(1 for c in logins.reply_code if not c),
            approve_s=(max(accepts) - answered["first"]) if accepts else 0.0,
            answer_statuses=answered["statuses"])
        progress(f"push {phase}: {figures['accepted']:,} of {n:,} accepted; HTTP "
                 f"{answered['statuses']}")
        if phase == "warm-up" and figures["accepted"] != n:
            raise pl.Failed(f"warm-up: {figures['accepted']} of {n} accepted; "
                            + " | ".join(d.tail(2) for d in nodes.daemons.values()))
        return figures
    finally:
        logins.stop()


class Trial:
    """One failover trial's outcome: seconds from the kill and from the approval POST to
    B's Access-Accept (None when there was none), or what went wrong."""

    def __init__(self):
        self.from_kill: float | None = None
        self.from_approval: float | None = None
        self.problem = ""


def failover_trial(nodes: Nodes, logins, k: int, name: str, devices, sink, device_b,
                   approve_first: bool, settle: float) -> Trial:
    """A push login held on A, kill -9 A; then the NAS retry to B and, ``settle`` seconds
    later, the device's poll and approval through B; or (``approve_first``) the
    approval through B first and the retry after it."""
    trial = Trial()
    if "A" not in nodes.daemons:
        nodes.start("A")
    logins.send(k, nodes.radius["A"])
    if not pl.wait_for(lambda: sink.woken(name) >= 1, 10, nodes, 0.002):
        trial.problem = "no wake-up from A in 10 s"
        return trial
    time.sleep(0.2)  # the login settles on A (its waiter armed)
    nodes.kill("A")
    killed = time.monotonic()
    if not approve_first:
        logins.send(k, nodes.radius["B"])  # the NAS retry: the same datagram
        time.sleep(settle)
    job = (name, devices[name][0], devices[name][1], None)
    txids = []
    deadline = time.monotonic() + 10
    while not txids and time.monotonic() < deadline:
        txids = device_b.run("poll", [job], 30)["txids"].get(name) or []
    if not txids:
        trial.problem = "the device saw no pending sign-in through B"
        return trial
    if len(txids) > 1:
        trial.problem = f"the device sees {len(txids)} pending sign-ins"
    answered = device_b.run("answer", [job[:3] + (txids[0],)], 30)
    if approve_first:
        logins.send(k, nodes.radius["B"])
    if not pl.wait_for(lambda: logins.reply_code[k] != 0, 10, nodes, 0.001):
        trial.problem = (trial.problem + "; " if trial.problem else "") + \
            "no reply from B within 10 s of the approval"
        return trial
    if logins.reply_code[k] != logins.codec.ACCESS_ACCEPT:
        trial.problem = f"B answered code {logins.reply_code[k]}"
        return trial
    trial.from_kill = logins.reply_at[k] - killed
    trial.from_approval = logins.reply_at[k] - answered["first"]
    return trial


def bench_failover(report: b.Report, args, nodes: Nodes, devices, fail: list[str],
                   early: list[str], sink) -> None:
    section = "cluster failover"
    progress(f"failover: {len(fail)} trials: push held on A, kill -9 A, retry to B, approve "
             f"through B {args.settle:g} s later; then {len(early)} with the approval "
             "through B before the retry")
    logins = pl.Logins(fail + early, b.SECRET.encode())
    logins.start()
    device_b = pl.DevicePool(nodes.web["B"], 1, 1)
    results = {"retry first": [], "approval first": []}
    try:
        # The device process's first request imports and connects: not a failover cost.
        name = (fail + early)[0]
        device_b.run("poll", [(name, devices[name][0], devices[name][1], None)], 30)
        for k, name in enumerate(fail + early):
            mode = "retry first" if k < len(fail) else "approval first"
            trial = failover_trial(nodes, logins, k, name, devices, sink, device_b,
                                   mode == "approval first", args.settle)
            results[mode].append((name, trial))
            progress(f"  trial {k + 1} ({mode}): "
                     + (f"{1e3 * trial.from_kill:.0f} ms kill -> Access-Accept"
                        if trial.from_kill is not None else "") + (f" {trial.problem}"
                                                                   if trial.problem else ""))
        time.sleep(3.0)  # longer than the 2.5 s poll: a late second push would show
    finally:
        device_b.close()
        logins.stop()
    for mode, trials in results.items():
        if not trials:
            continue
        label = f"A killed, {mode}"
        times = [t.from_kill for _, t in trials if t.from_kill is not None]
        after = [t.from_approval for _, t in trials if t.from_approval is not None]
        if times:
            report.add(section, label, "kill -9 -> Access-Accept p50",
                       f"{1e3 * pl.percentile(times, 50):,.0f} ms",
                       f"p99 {1e3 * pl.percentile(times, 99):,.0f} ms, max "
                       f"{1e3 * max(times):,.0f} ms; approval POST -> Access-Accept p50 "
                       f"{1e3 * pl.percentile(after, 50):,.0f} ms, p99 "
                       f"{1e3 * pl.percentile(after, 99):,.0f} ms")
            report.add(section, label, "kill -9 -> Access-Accept p99",
                       f"{1e3 * pl.percentile(times, 99):,.0f} ms")
        report.add(section, label, "Access-Accepts from B", f"{len(times)} / {len(trials)}",
                   f"[{len(trials)}: {'met' if len(times) == len(trials) else 'NOT MET'}]")
        wakes = [sink.woken(name) for name, _ in trials]
        report.add(section, label, "pushes per trial", " ".join(str(w) for w in wakes),
                   f"[exactly 1 each: {'met' if all(w == 1 for w in wakes) else 'NOT MET'}] "
                   f"double pushes {sum(1 for w in wakes if w > 1)}")
        for name, t in trials:
            if t.problem:
                report.add(section, label, f"problem ({name})", "!", t.problem)


# --- main -----------------------------------------------------------------------------------

def progress(message: str) -> None:
    b.progress(f"cluster: {message}")


def run(args) -> b.Report:
    report = b.Report()
    workdir = Path(tempfile.mkdtemp(prefix="mfaserver-cluster-bench-"))
    os.chmod(workdir, 0o755)  # PostgreSQL runs as the postgres user when we are root
    started = time.monotonic()
    pg = None
    try:
        b.require("radclient", "freeradius-utils")
        pg = PgCluster(workdir / "pg")
        version = pg.version()
        for name, part in (("logins", bench_logins), ("ldap", bench_ldap_logins),
                           ("push", bench_pushes)):
            if name not in args.parts:
                continue
            try:
                part(report, args, workdir, pg)
            except (b.NotAvailable, pl.Failed) as e:
                report.na(f"cluster {name}", "all", str(e))
            except Exception as e:  # one part failing must not lose the other's rows
                report.na(f"cluster {name}", "all", f"error: {type(e).__name__}: {e}")
        report.notes.append(
            f"Cluster (issue #12): PostgreSQL {version} (tests/postgres_server.py: throw-away "
            "cluster, fsync off, on the same cores); nodes are `mfaserver run` processes "
            "with [store] backend = \"postgresql\" on one database. Machine: "
            f"{os.cpu_count()} cores ({pl.cpu_model()}); the load generators and PostgreSQL "
            "share them.")
        if "logins" in args.parts:
            report.notes.append(
                "Cluster logins: \"password,code\", every request a distinct user with its "
                "current TOTP code, "
                + (f"benchlib/loadgen.py closed_loop: {args.clients} UDP sockets x "
                   f"{args.inflight} in flight, packets built before the clock starts"
                   if args.generator == "python" else
                   f"{args.clients} radclient processes at once x {args.inflight} in flight")
                + ", socket k to port k mod (ports of the target): "
                "workers get what the kernel's SO_REUSEPORT hash of the source "
                "sockets gives them, which need not be an even split; "
                f"{args.rounds} rounds of {args.logins:,} per target after a warm-up, "
                "interleaved; medians.")
        if "ldap" in args.parts:
            report.notes.append(
                "Cluster LDAP logins: the same load and rounds with the users in slapd "
                "(benchlib/ldap_bench.py: tests/ldap_server.py's config, the users loaded by "
                "slapadd, one password, the TOTP seed in each entry's description) and "
                "FreeRADIUS (rlm_ldap search with the service account, bind as the user, "
                f"rlm_totp; {FREERADIUS_THREADS} threads and LDAP connections) as a fifth "
                "target; every request a distinct user, FreeRADIUS's too. The mfaserver "
                "nodes add [directory] backend = \"ldap\" (search, then bind as the user; "
                "pool_size 8) and keep the seeds in their store (users without a password) "
                "with replay guard and audit row; rlm_totp keeps no record of used codes and "
                "accepts the current step only, so a FreeRADIUS round starts in a fresh step "
                "if it might not end in this one. Checks first: a right login accepted, a "
                "wrong code and a wrong password rejected (radclient). slapd's CPU per login "
                "is in the CPU rows.")
        if "push" in args.parts:
            report.notes.append(
                "Cluster pushes: scripts/push_load.py's store (Ed25519 devices, webhook "
                "wake-ups to a sink here, log2 N=1 hashes), logins alternately to node A and "
                "B, flow-controlled by the wake-ups; RSS after a warm-up vs with all pending; "
                f"devices poll and approve through both nodes' device APIs "
                f"({args.device_processes} processes, {args.connections} keep-alive "
                "connections in all, round robin). Failover, on those "
                f"nodes: {args.trials} trials \"retry first\" (login held on A and its push "
                "seen, kill -9 A, the same datagram sent to B at once as the NAS retry, the "
                f"device polls and approves through B {args.settle:g} s later: the figures "
                f"include that wait) and {args.early_trials} \"approval first\" (the user "
                "approves through B while A is dead and the NAS has not retried yet, as "
                "happens when the NAS waits its timeout before failing over; then the retry); "
                "pushes = webhook wake-ups for the trial's user, counted 3 s after the last "
                "trial; A is restarted before each trial.")
    except b.NotAvailable as e:
        report.na("cluster", "all", str(e))
    finally:
        if pg is not None:
            pg.stop()
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report.notes.append(f"Cluster bench time {time.monotonic() - started:,.0f} s.")
    return report


# name, type (or choices), default, help: scripts/bench has these as --cluster-NAME ...
OPTIONS = (
    ("logins", int, 1000, "logins per round and target, one distinct user each"),
    ("rounds", int, 5, "login rounds per target, interleaved; the median is reported"),
    ("hash", ("cheap", "scrypt"), "cheap",
     "the login users' password hash: scrypt log2 N=1 (cheap: the store and cluster path "
     "is what is measured) or the default scrypt (hash-bound)"),
    ("pushes", int, 20_000, "pushes pending across two nodes (the issue asks 100000)"),
    ("trials", int, 20, "failover trials: the NAS retry to B, then the approval"),
    ("early-trials", int, 5, "failover trials with the approval through B before the retry"),
)
# ... and these only this script has.
OWN_OPTIONS = (
    ("parts", str, "logins,ldap,push",
     "logins (local users), ldap (LDAP users, and FreeRADIUS), push (includes the failover "
     "trials)"),
    ("warmup", int, 100, "warm-up logins per target (logins and ldap)"),
    ("generator", ("python", "radclient"), "python",
     "the logins' load generator: loadgen.closed_loop in this process, or radclient "
     "processes (which take most of a 2-core machine themselves)"),
    ("clients", int, 8, "generator sockets (or radclient processes) per round: SO_REUSEPORT "
                        "workers get a share per source socket"),
    ("inflight", int, 8, "requests in flight per socket (radclient -p)"),
    ("settle", float, 0.5, "failover: seconds from the retry to the device's approval"),
    ("window", int, 128, "push logins sent but not yet woken at most"),
    ("connections", int, 32, "device API keep-alive connections in all, one request at a "
                             "time each (so: the approvals in flight)"),
    ("device-processes", int, 2, "processes the device API connections are spread over"),
    ("phase-timeout", float, 900, "seconds allowed for the polls, and for the approvals"),
    ("build-timeout", float, 600, "seconds allowed to build the logins store"),
    ("run-timeout", float, 300, "seconds allowed for one round of radclient runs"),
)


def add_options(parser: argparse.ArgumentParser, prefix: str = "--",
                options=OPTIONS) -> None:
    for name, kind, default, text in options:
        how = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        parser.add_argument(prefix + name, default=default, help=f"{text} (default {default})",
                            **how)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cluster_bench.py", description=__doc__.splitlines()[0])
    add_options(p)
    add_options(p, options=OWN_OPTIONS)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (rows, notes) instead of the table")
    args = p.parse_args(argv)
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    unknown = args.parts - {"logins", "ldap", "push"}
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))} (logins, ldap, push)")
    for name in ("logins", "rounds", "warmup", "clients", "inflight", "pushes", "trials"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    # Every daemon (ours and push_load.Daemon) imports this checkout's mfaserver,
    # whichever venv's python runs it.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    report = run(args)
    if args.json:
        print(json.dumps({"rows": [[r.section, r.target, r.metric, r.value, r.note]
                                   for r in report.rows],
                          "notes": report.notes,
                          "machine": {"cores": os.cpu_count(), "cpu": pl.cpu_model()}}))
    else:
        print(f"Machine: {os.cpu_count()} cores, {pl.cpu_model()}")
        print(report.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
