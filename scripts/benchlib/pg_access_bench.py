"""How the daemon talks to PostgreSQL (issue #12): sync psycopg in threads, or async psycopg.

Decision: sync psycopg 3 in a bounded thread pool (`WorkerThreads`) on the
default epoll reactor, not the async API on the asyncio reactor. Measured
with one thread-local connection per thread; in the daemon a psycopg_pool
``ConnectionPool`` of the thread count's size takes that place (and adds
reconnection), which this script does not measure.

Why, by the figures below: per login the thread pool takes about half the
benchmark process's CPU (540-620 us against 980-1,330 us) and carries
1.5-2.2x the logins/s (1,070-1,350/s against 520-820/s); latency at a low
rate is lower too (p50 1.5-1.8 ms against 2.3-2.6 ms; the p99s overlap in
the noise). None of the 24 runs per approach overlaps the other's range in
CPU/unit (A 459-670 us, B 912-1,459 us); in units/s the ranges touch
(A 745-1,576/s, B 396-995/s), the medians do not. A profile of B (cProfile,
T = 4) puts the extra cost on the one reactor thread, in psycopg's Python
async wait path: about 11 waits per unit, half of them registering the
socket with the event loop (add_reader, an epoll_ctl), each a turn of the
asyncio loop; with the sync API those waits happen in psycopg_binary's C code
in the worker threads, with the GIL released while blocked. The per-unit
callLater costs B 14-16 % of throughput at T = 1 to 4 (nothing at T = 8) and
8-15 % more CPU per unit; A nothing measurable. Here a unit is dominated by
the database work, so this is less than the issue's 45 %; on sync psycopg
the asyncio reactor's timer cost does not arise, and expiry stays one
sweeper timer anyway.

Pool size: throughput is flat from T = 2 to 8 on this 2-core machine
(PostgreSQL shares the cores), so the size is the PostgreSQL connection
budget per node (a small default such as 4), not a speed knob.

Measured (one run of this script, 2026-12-07; medians of 3 runs each):

nproc 2, cpu AMD EPYC, python 3.11.7, postgresql 15.18 (Debian
15.18-0+deb12u1), psycopg 3.3.9 (binary), psycopg_pool 3.3.3, twisted 26.10.0
C = 64 in flight, 6000 units per closed-loop run; latency open loop
200/s x 5 s; median of 3 runs

approach              per-unit   T   units/s   CPU us/unit   p50 ms   p99 ms
                      callLater
--------------------  ---------  --  -------  ------------  -------  -------
A sync + threads      yes         1     1148           570     1.65     8.66
A sync + threads      yes         2     1119           624     1.63     6.74
A sync + threads      yes         4     1279           567     1.67     7.12
A sync + threads      yes         8     1227           536     1.57     6.96
A sync + threads      no          1     1065           568     1.51     7.09
A sync + threads      no          2     1277           546     1.65     6.26
A sync + threads      no          4     1354           572     1.68     8.40
A sync + threads      no          8     1243           544     1.75     6.51
B async (asyncio)     yes         1      519          1325     2.33     7.47
B async (asyncio)     yes         2      646          1167     2.53    12.02
B async (asyncio)     yes         4      632          1174     2.39    10.13
B async (asyncio)     yes         8      812          1109     2.35     7.95
B async (asyncio)     no          1      601          1203     2.33     8.59
B async (asyncio)     no          2      748          1081     2.35     6.28
B async (asyncio)     no          4      753          1022     2.61    10.09
B async (asyncio)     no          8      816           983     2.59    15.45

The machine is a shared 2-vCPU VM with the PostgreSQL server on the same
cores: single runs of one configuration vary by up to +-30 %, so read the
table for the A/B ratio, not for absolute rates or small differences
between pool sizes.

What is measured
----------------
One throw-away cluster (tests/postgres_server.py), schema from
`mfaserver.store.pg_migrations.migrate`, 10,000 users with one TOTP token
each. The unit of work is what one code login does to the store:

1. one SELECT joining users and tokens by the user's name;
2. one transaction: the replay guard's conditional ``UPDATE tokens SET
   last_step ...`` and the ``INSERT INTO audit``, committed.

Each unit is for a distinct user. Two ways of doing it:

A  ("threads") Twisted's epoll reactor; `mfaserver.workers.WorkerThreads`
   with T threads, each with its own sync ``psycopg.Connection``
   (thread-local, autocommit; the transaction is ``conn.transaction()``);
   the unit is one ``run`` call, its Deferred fired on the reactor thread.
B  ("async") Twisted's asyncio reactor installed on a fresh event loop;
   ``psycopg_pool.AsyncConnectionPool`` with T connections (autocommit,
   ``conn.transaction()``); the unit is a coroutine wrapped as a Deferred
   with ``Deferred.fromFuture(loop.create_task(...))``.

Each either with a per-unit ``callLater`` (a 30 s timeout armed at the
start of the unit and cancelled at its end, what a per-login timer costs)
or without. Every configuration runs in its own subprocess (its own
reactor) and is repeated 3 times, interleaved; the table gives medians.

* units/s: closed loop, C = 64 units in flight, 6,000 units (after 300
  units of warm-up).
* CPU/unit: ``time.process_time()`` of the benchmark process (all its
  threads) over the closed loop, divided by the units. The PostgreSQL
  server's CPU is not included (it is the same SQL for A and B).
* p50/p99: latency of one unit (submit to Deferred fired), open loop at
  200 units/s for 5 s (1,000 units), paced by one ``callLater`` per
  scheduled start in every configuration.

Run: ``.venv/bin/python scripts/benchlib/pg_access_bench.py`` (needs
Debian's postgresql; ``--reps``, ``--threads`` to change the grid).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

USERS = 10_000
CONCURRENCY = 64
THROUGHPUT_UNITS = 6_000
WARMUP_UNITS = 300
LATENCY_RATE = 200
LATENCY_SECONDS = 5
TIMEOUT = 30.0

SELECT = ("SELECT u.id, u.name, u.blocked, u.failures, u.locked_until, t.id, t.kind,"
          " t.secret, t.digits, t.period, t.algorithm, t.counter, t.last_step, t.drift"
          " FROM users u LEFT JOIN tokens t ON t.user_id = u.id AND t.active = 1"
          " WHERE u.name = %s")
UPDATE = ("UPDATE tokens SET last_step = %s WHERE id = %s"
          " AND (last_step IS NULL OR last_step < %s)")
INSERT = ('INSERT INTO audit (time, "user", client, nas_ip, calling_station_id, factor,'
          " outcome, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")


def user_name(i: int) -> str:
    return f"user{i:05d}"


# --------------------------------------------------------------------------
# The parent: cluster, data, the grid of subprocesses, the table.

def populate(dsn: str) -> None:
    import psycopg
    from mfaserver.store.pg_migrations import migrate
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        now = time.time()
        with conn.transaction():
            with conn.cursor() as cur:
                with cur.copy("COPY users (name, blocked, failures, created) FROM STDIN") as cp:
                    for i in range(USERS):
                        cp.write_row((user_name(i), 0, 0, now))
                cur.execute(
                    "INSERT INTO tokens (serial, user_id, kind, secret, digits, period,"
                    " algorithm, counter, last_step, drift, created, active)"
                    " SELECT 'TOTP' || lpad(id::text, 8, '0'), id, 'totp', %s, 6, 30,"
                    " 'sha1', 0, NULL, 0, %s, 1 FROM users", (b"x" * 40, now))
        conn.execute("VACUUM ANALYZE")


def machine(dsn: str) -> dict:
    import psycopg
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(dsn) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    import psycopg_pool
    import twisted
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "postgresql": pg, "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
            "psycopg_pool": psycopg_pool.__version__, "twisted": twisted.__version__}


def child(dsn: str, mode: str, threads: int, timer: bool, first: int) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--dsn", dsn, "--t", str(threads),
            "--first-step", str(first)] + (["--timer"] if timer else [])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"child {mode} T={threads} timer={timer} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["threads", "async"])
    parser.add_argument("--dsn")
    parser.add_argument("--t", type=int)
    parser.add_argument("--timer", action="store_true")
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default="1,2,4,8")
    args = parser.parse_args()
    if args.child:
        result = run_child(args.child, args.dsn, args.t, args.timer, args.first_step)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers import each other by name
    from postgres_server import PostgresServer
    directory = tempfile.mkdtemp(prefix="pg-access-bench-", dir="/tmp")
    os.chmod(directory, 0o755)
    server = PostgresServer(Path(directory) / "pg").start()
    try:
        dsn = server.create_database("bench")
        populate(dsn)
        info = machine(dsn)
        sizes = [int(t) for t in args.threads.split(",")]
        grid = [(mode, timer, t) for mode in ("threads", "async")
                for timer in (True, False) for t in sizes]
        results: dict = {key: [] for key in grid}
        step = 1_000_000
        for rep in range(args.reps):
            for key in grid:
                mode, timer, t = key
                r = child(dsn, mode, t, timer, step)
                step += 100_000
                results[key].append(r)
                print(f"rep {rep + 1} {mode:7} timer={timer!s:5} T={t}: "
                      f"{r['units_per_s']:7.0f}/s {r['cpu_us_per_unit']:6.0f} us CPU/unit "
                      f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms", file=sys.stderr)
    finally:
        server.stop()
    print(table(info, grid, results))


def table(info: dict, grid, results) -> str:
    lines = [", ".join(f"{k} {v}" for k, v in info.items()),
             f"C = {CONCURRENCY} in flight, {THROUGHPUT_UNITS} units per closed-loop run; "
             f"latency open loop {LATENCY_RATE}/s x {LATENCY_SECONDS} s; "
             f"median of {len(next(iter(results.values())))} runs",
             "",
             "approach              per-unit   T   units/s   CPU us/unit   p50 ms   p99 ms",
             "                      callLater",
             "--------------------  ---------  --  -------  ------------  -------  -------"]
    for key in grid:
        mode, timer, t = key
        runs = results[key]
        med = {m: statistics.median(r[m] for r in runs)
               for m in ("units_per_s", "cpu_us_per_unit", "p50_ms", "p99_ms")}
        name = "A sync + threads" if mode == "threads" else "B async (asyncio)"
        lines.append(f"{name:20}  {'yes' if timer else 'no':9}  {t:2}  {med['units_per_s']:7.0f}"
                     f"  {med['cpu_us_per_unit']:12.0f}  {med['p50_ms']:7.2f}  {med['p99_ms']:7.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# A child: one configuration on its own reactor.

def run_child(mode: str, dsn: str, threads: int, timer: bool, first_step: int) -> dict:
    if mode == "async":
        import asyncio
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        from twisted.internet import asyncioreactor
        asyncioreactor.install(loop)
    else:
        from twisted.internet import epollreactor
        epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred

    if mode == "async":
        backend = AsyncBackend(reactor, dsn, threads)
    else:
        backend = ThreadBackend(reactor, dsn, threads)

    state = {"step": first_step}

    def unit(i: int) -> Deferred:
        state["step"] += 1
        d = backend.unit(user_name(i), state["step"])
        if timer:
            call = reactor.callLater(TIMEOUT, d.cancel)

            def disarm(result):
                if call.active():
                    call.cancel()
                return result
            d.addBoth(disarm)
        return d

    def closed_loop(users: range) -> Deferred:
        done = Deferred()
        it = iter(users)
        left = [len(users)]
        errors = []

        def launch():
            i = next(it, None)
            if i is None:
                return
            unit(i).addCallbacks(finished, failed)

        def failed(f):
            errors.append(f)
            finished(None)

        def finished(_):
            left[0] -= 1
            if left[0] == 0:
                if errors:
                    done.errback(errors[0])
                else:
                    done.callback(None)
            else:
                launch()
        for _ in range(min(CONCURRENCY, len(users))):
            launch()
        return done

    def open_loop(users: range, rate: float) -> Deferred:
        done = Deferred()
        latencies: list[float] = []
        left = [len(users)]
        start = time.monotonic() + 0.05

        def fire(i: int):
            t0 = time.perf_counter()

            def finished(result):
                latencies.append(time.perf_counter() - t0)
                left[0] -= 1
                if left[0] == 0:
                    done.callback(latencies)
                return result
            unit(i).addCallback(finished).addErrback(done.errback)
        for n, i in enumerate(users):
            reactor.callLater(max(0.0, start + n / rate - time.monotonic()), fire, i)
        return done

    async def measure() -> dict:
        await backend.open()
        await closed_loop(range(USERS - WARMUP_UNITS, USERS))
        c0, w0 = time.process_time(), time.perf_counter()
        await closed_loop(range(THROUGHPUT_UNITS))
        c1, w1 = time.process_time(), time.perf_counter()
        n_lat = LATENCY_RATE * LATENCY_SECONDS
        lat = sorted(await open_loop(range(THROUGHPUT_UNITS, THROUGHPUT_UNITS + n_lat),
                                     LATENCY_RATE))
        await backend.close()
        return {"units_per_s": THROUGHPUT_UNITS / (w1 - w0),
                "cpu_us_per_unit": (c1 - c0) / THROUGHPUT_UNITS * 1e6,
                "p50_ms": lat[len(lat) // 2] * 1e3,
                "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
                "reactor": type(reactor).__name__}

    out: dict = {}

    def go():
        d = ensureDeferred(measure())

        def ok(r):
            out.update(r)

        def bad(f):
            out["error"] = f.getTraceback()
        d.addCallbacks(ok, bad).addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run()
    if "error" in out:
        raise SystemExit(out["error"])
    return out


class ThreadBackend:
    """A: sync psycopg, one connection per WorkerThreads thread."""

    def __init__(self, reactor, dsn: str, threads: int):
        import threading
        from mfaserver.workers import WorkerThreads
        self.dsn = dsn
        self.local = threading.local()
        self.conns: list = []
        self.workers = WorkerThreads(reactor, threads, "pg")
        self.threads = threads

    def _conn(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            import psycopg
            conn = self.local.conn = psycopg.connect(self.dsn, autocommit=True)
            self.conns.append(conn)
        return conn

    async def open(self):
        self.workers.start()
        # Connect every thread before measuring (each blocks until all connected).
        import threading
        barrier = threading.Barrier(self.threads)

        def connect():
            self._conn()
            barrier.wait(10)
        from twisted.internet.defer import gatherResults
        await gatherResults([self.workers.run(connect) for _ in range(self.threads)])

    async def close(self):
        self.workers.stop()
        for conn in self.conns:
            conn.close()

    def _login(self, name: str, step: int):
        conn = self._conn()
        rows = conn.execute(SELECT, (name,)).fetchall()
        token_id = rows[0][5]
        with conn.transaction():
            conn.execute(UPDATE, (step, token_id, step))
            conn.execute(INSERT, (time.time(), name, "nas1", "192.0.2.1", "00-11-22",
                                  "totp", "accept", "ok"))
        return rows

    def unit(self, name: str, step: int):
        return self.workers.run(self._login, name, step)


class AsyncBackend:
    """B: async psycopg, an AsyncConnectionPool of T connections."""

    def __init__(self, reactor, dsn: str, size: int):
        import asyncio
        from psycopg_pool import AsyncConnectionPool
        self.loop = asyncio.get_event_loop()
        self.pool = AsyncConnectionPool(dsn, min_size=size, max_size=size, open=False,
                                        kwargs={"autocommit": True})

    def open(self):
        from twisted.internet.defer import Deferred
        return Deferred.fromFuture(self.loop.create_task(self.pool.open(wait=True)))

    def close(self):
        from twisted.internet.defer import Deferred
        return Deferred.fromFuture(self.loop.create_task(self.pool.close()))

    async def _login(self, name: str, step: int):
        async with self.pool.connection() as conn:
            cur = await conn.execute(SELECT, (name,))
            rows = await cur.fetchall()
            token_id = rows[0][5]
            async with conn.transaction():
                await conn.execute(UPDATE, (step, token_id, step))
                await conn.execute(INSERT, (time.time(), name, "nas1", "192.0.2.1",
                                            "00-11-22", "totp", "accept", "ok"))
        return rows

    def unit(self, name: str, step: int):
        from twisted.internet.defer import Deferred
        return Deferred.fromFuture(self.loop.create_task(self._login(name, step)))


if __name__ == "__main__":
    main()
