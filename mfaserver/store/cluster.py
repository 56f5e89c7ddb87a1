"""The short-lived state several nodes share, in PostgreSQL's ``cluster_*`` tables (issue #12).

One node on SQLite keeps this state in memory (`mfaserver.auth.challenges`,
`mfaserver.factors.push`). Nodes on one PostgreSQL database keep it here, so
that whichever node a RADIUS request, a retransmission or a device's answer
reaches finds the same login:

- ``cluster_challenges``: Access-Challenge States, one per (client, user),
  taken once with ``DELETE ... RETURNING``;
- ``cluster_push``: pushes, pending and for a while after (a late answer is
  told apart from a forged one); a partial unique index on the login's key
  makes a second node *join* a pending push instead of sending another;
- ``cluster_rate``: token buckets for send limits, global to the cluster;
- ``cluster_sms``: each user's live texted code, sealed with the seed key;
- ``cluster_calls``: phone calls, pending and for a while after, so that
  the provider's callbacks may reach any node.

Every method runs on a database thread (`ThreadedStore.run_state`) and is
one transaction. What changes a push is committed with a ``NOTIFY`` on
`CHANNEL`, so the node holding the RADIUS request hears of it at once
(`mfaserver.store.listen`). Times are the nodes' clocks (``now``), which
TOTP already requires to agree.

The methods live in a mixin of `mfaserver.store.pg.PgStore`; they use its
connection and lock.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from mfaserver.store.db import _guarded

# The NOTIFY channel, and the payloads sent on it.
CHANNEL = "mfaserver"
NEW_PUSH = "new "        # + user: a push opened for the user (wakes long polls)
PUSH_ENDED = "ended "    # + txid: a push was answered or closed
CALL_ENDED = "call "     # + call id: a phone call was decided, failed or closed

PENDING = "pending"
ANSWERED = "answered"
EXPIRED = "expired"
CLOSED = "closed"

PUSH_COLUMNS = ("txid, username, client, nas_ip, calling_station_id, created, expires,"
                 " number, state, verdict, answered_by, login_key")


# A device's poll: the user's pending pushes, oldest first (the reactor sends it too).
PENDING_PUSHES_SQL = (f"SELECT {PUSH_COLUMNS} FROM cluster_push"
                      " WHERE username = %s AND state = 'pending' AND expires > %s"
                      " ORDER BY created, txid")


def login_key_text(key) -> str:
    """A login's key (user, client, Calling-Station-Id) as the table's text column."""
    return json.dumps(list(key), ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class PushRow:
    """A row of ``cluster_push`` as read."""

    txid: str
    user: str
    client: str
    nas_ip: str | None
    calling_station_id: str | None
    created: float
    expires: float
    number: str | None
    state: str
    verdict: str | None
    answered_by: str | None
    login_key: str


@dataclass(frozen=True)
class PushOpened:
    """What `ClusterState.open_push` did: opened ``row``, joined it, or was refused."""

    row: PushRow | None
    new: bool = False
    refused: str | None = None   # "user" or "global" (pending limits), "rate"


def _push_row(row) -> PushRow:
    return PushRow(*row)


# ClusterState.open_push's one statement (pg_migrations: cluster_open_push).
OPEN_PUSH_SQL = ("SELECT * FROM cluster_open_push(%s, %s, %s, %s, %s, %s,"
                 " %s::double precision, %s::double precision, %s, %s, %s::double precision,"
                 " %s::bigint, %s::bigint, %s::double precision, %s::double precision, %s)")


def open_push_params(*, txid: str, login_key: str, user: str, client: str,
                     nas_ip: str | None, calling_station_id: str | None, now: float,
                     timeout: float, number: str | None, node: str, late_window: float,
                     max_per_user: int, max_total: int, rate: tuple[float, float] | None,
                     join: str = "any") -> tuple:
    """OPEN_PUSH_SQL's parameters, in the function's order (`ClusterState.open_push`
    says what they mean)."""
    rate_per_second, rate_burst = rate if rate is not None else (None, None)
    return (txid, login_key, user, client, nas_ip, calling_station_id, now, timeout, number,
            node, late_window, max_per_user, max_total, rate_per_second, rate_burst, join)


def push_opened(row) -> PushOpened:
    """cluster_open_push's row: its outcome, then the push's columns."""
    outcome = row[0]
    if outcome in ("user", "global", "rate"):
        return PushOpened(None, refused=outcome)
    return PushOpened(_push_row(row[1:]), new=outcome == "new")


def _to_json(value) -> object:
    """A context value as JSON: tuples become lists, bytes a tagged hex string."""
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(value) -> object:
    if isinstance(value, dict):
        if set(value) == {"hex"}:
            return bytes.fromhex(value["hex"])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_from_json(item) for item in value)
    return value


def context_to_text(context: dict) -> str:
    """A challenge's context (names, reply attributes, menu) as stored.

    Only plain values: str, int, float, bool, None, bytes, tuples and dicts of
    them. Tuples come back as tuples; a dict whose only key is ``hex`` is
    reserved for bytes.
    """
    return json.dumps(_to_json(context), ensure_ascii=False, separators=(",", ":"))


def context_from_text(text: str) -> dict:
    return _from_json(json.loads(text))


class ClusterState:
    """The ``cluster_*`` tables' statements; mixed into `PgStore`."""

    # --- challenge States ---

    @_guarded
    def issue_challenge(self, state: bytes, client: str, user: str, context: str,
                        expires: float) -> None:
        """Store a State for (client, user), replacing the user's older one."""
        self._conn.execute(
            "INSERT INTO cluster_challenges (state, client, username, context, expires)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (client, username) DO UPDATE"
            " SET state = excluded.state, context = excluded.context,"
            " expires = excluded.expires",
            (state, client, user, context, expires))

    @_guarded
    def redeem_challenge(self, state: bytes, client: str, user: str,
                         now: float) -> str | None:
        """Take the live State bound to this client and user (once, on any node):
        its context, or None."""
        row = self._conn.execute(
            "DELETE FROM cluster_challenges WHERE state = %s AND client = %s"
            " AND username = %s AND expires > %s RETURNING context",
            (state, client, user, now)).fetchone()
        return None if row is None else row[0]

    @_guarded
    def count_challenges(self) -> int:
        return self._conn.execute("SELECT count(*) FROM cluster_challenges").fetchone()[0]

    # --- pushes ---

    @_guarded
    def open_push(self, *, txid: str, login_key: str, user: str, client: str,
                  nas_ip: str | None, calling_station_id: str | None, now: float,
                  timeout: float, number: str | None, node: str, late_window: float,
                  max_per_user: int, max_total: int, rate: tuple[float, float] | None,
                  join: str = "any") -> PushOpened:
        """Join the pending push of this login, or open one (and tell every node).

        ``join``: "any" joins whatever push is pending for the login; "numbered"
        only one with a number (a number-matching login; a held push of the
        same login is closed instead, as it could not be confirmed). Over a
        limit, nothing is opened: ``refused`` says which. ``rate`` is (tokens
        per second, burst) for the user's push bucket, taken only for a new push.
        """
        row = self._conn.execute(OPEN_PUSH_SQL, open_push_params(
            txid=txid, login_key=login_key, user=user, client=client, nas_ip=nas_ip,
            calling_station_id=calling_station_id, now=now, timeout=timeout, number=number,
            node=node, late_window=late_window, max_per_user=max_per_user,
            max_total=max_total, rate=rate, join=join)).fetchone()
        return push_opened(row)

    @_guarded
    def get_push(self, txid: str, now: float) -> PushRow | None:
        """A push by id: pending, or ended and still remembered."""
        row = self._conn.execute(f"SELECT {PUSH_COLUMNS} FROM cluster_push WHERE txid = %s"
                                 " AND forget_after > %s", (txid, now)).fetchone()
        return None if row is None else _push_row(row)

    @_guarded
    def find_push(self, login_key: str, now: float) -> PushRow | None:
        """The pending push of a login."""
        row = self._conn.execute(f"SELECT {PUSH_COLUMNS} FROM cluster_push"
                                 " WHERE login_key = %s AND state = 'pending' AND expires > %s",
                                 (login_key, now)).fetchone()
        return None if row is None else _push_row(row)

    @_guarded
    def pending_pushes(self, user: str, now: float) -> list[PushRow]:
        """The user's pending pushes, oldest first (what a device's poll lists)."""
        rows = self._conn.execute(PENDING_PUSHES_SQL, (user, now)).fetchall()
        return [_push_row(row) for row in rows]

    @_guarded
    def count_pending_pushes(self, now: float, user: str | None = None,
                             numbered: bool = False) -> int:
        sql = "SELECT count(*) FROM cluster_push WHERE state = 'pending' AND expires > %s"
        params: list = [now]
        if user is not None:
            sql += " AND username = %s"
            params.append(user)
        if numbered:
            sql += " AND number IS NOT NULL"
        return self._conn.execute(sql, params).fetchone()[0]

    @_guarded
    def ended_pushes(self, txids: list[str]) -> list[PushRow]:
        """Those of ``txids`` that are no longer pending (the poll behind NOTIFY)."""
        rows = self._conn.execute(f"SELECT {PUSH_COLUMNS} FROM cluster_push"
                                  " WHERE txid = ANY(%s) AND state <> 'pending'",
                                  (txids,)).fetchall()
        return [_push_row(row) for row in rows]

    @_guarded
    def users_with_new_pushes(self, users: list[str], since: float, now: float) -> list[str]:
        """Those of ``users`` with a push opened at ``since`` or later and still pending."""
        rows = self._conn.execute(
            "SELECT DISTINCT username FROM cluster_push WHERE username = ANY(%s)"
            " AND state = 'pending' AND created >= %s AND expires > %s",
            (users, since, now)).fetchall()
        return [user for user, in rows]

    @_guarded
    def answer_push(self, txid: str, user: str, decide, device_id: str, now: float,
                    late_window: float) -> tuple[str, PushRow | None]:
        """Record a device's answer to a pending push of ``user``; the first answer wins.

        ``decide(row)`` gives the verdict to record (it compares the number).
        Returns ("answered", row after) or, with nothing written, ("unknown",
        None), ("expired", row) or ("already", row).
        """
        with self._immediate() as conn:
            row = conn.execute(f"SELECT {PUSH_COLUMNS} FROM cluster_push WHERE txid = %s"
                               " AND forget_after > %s FOR UPDATE", (txid, now)).fetchone()
            if row is None or row[1] != user:
                return "unknown", None
            found = _push_row(row)
            if found.state in (EXPIRED, CLOSED) or (found.state == PENDING
                                                    and now >= found.expires):
                return "expired", found
            if found.state == ANSWERED:
                return "already", found
            verdict = decide(found)
            conn.execute("UPDATE cluster_push SET state = 'answered', verdict = %s,"
                         " answered_by = %s, forget_after = %s WHERE txid = %s",
                         (verdict, device_id, now + late_window, txid))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, PUSH_ENDED + txid))
        return ANSWERED, PushRow(**{**found.__dict__, "state": ANSWERED, "verdict": verdict,
                                    "answered_by": device_id})

    @_guarded
    def mark_delivered(self, table: str, key: str, row_id: str) -> None:
        """A node answered a RADIUS request with this row's answer: a later retry of
        the login is a new login, not a taker of that answer."""
        if (table, key) not in (("cluster_push", "txid"), ("cluster_calls", "call_id")):
            raise ValueError(f"no such cluster table: {table}")
        self._conn.execute(f"UPDATE {table} SET delivered = 1 WHERE {key} = %s"
                           " AND delivered = 0", (row_id,))

    @_guarded
    def close_push(self, txid: str, now: float, late_window: float) -> bool:
        """Close a pending push from the sign-in side (wrong number, account refused)."""
        with self._immediate() as conn:
            return self._end_push(conn, txid, CLOSED, now + late_window)

    @_guarded
    def close_user_pushes(self, user: str, now: float, late_window: float) -> int:
        """Close every pending push of ``user`` (blocked after a fraud report)."""
        return self._close_user("cluster_push", "txid", PUSH_ENDED, user, now + late_window)

    def _close_user(self, table: str, key: str, notice: str, user: str,
                    forget_after: float) -> int:
        """Close the user's pending rows of ``table`` and tell every node (``notice`` + id)."""
        with self._immediate() as conn:
            rows = conn.execute(
                f"UPDATE {table} SET state = 'closed', forget_after = %s"
                f" WHERE username = %s AND state = 'pending' RETURNING {key}",
                (forget_after, user)).fetchall()
            for row_id, in rows:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, notice + row_id))
        return len(rows)

    @staticmethod
    def _lock_user(conn, user: str) -> None:
        """One push or call opens at a time per user, across nodes: the limits and
        the one-pending-login rule are checked and kept together."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))",
                     ("pending " + user,))

    @staticmethod
    def _pending(conn, now: float, user: str | None = None) -> int:
        """Out-of-band logins pending (pushes and calls), of ``user`` or in all (the
        triggers' count in ``cluster_pending``, see pg_migrations)."""
        if user is None:
            return conn.execute("SELECT coalesce(sum(n), 0) FROM cluster_pending").fetchone()[0]
        return conn.execute("SELECT cluster_user_pending(%s, %s::double precision)",
                            (user, now)).fetchone()[0]

    @staticmethod
    def _end_push(conn, txid: str, state: str, forget_after: float) -> bool:
        ended = conn.execute("UPDATE cluster_push SET state = %s, forget_after = %s"
                             " WHERE txid = %s AND state = 'pending' RETURNING txid",
                             (state, forget_after, txid)).fetchall()
        if ended:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, PUSH_ENDED + txid))
        return bool(ended)

    # --- send limits ---

    @staticmethod
    def _take(conn, key: str, now: float, per_second: float, burst: float) -> bool:
        """Take one token from bucket ``key`` (full when new); False if none is left.
        The caller's transaction serialises takers (row lock)."""
        return conn.execute("SELECT cluster_take_token(%s, %s::double precision,"
                            " %s::double precision, %s::double precision)",
                            (key, now, per_second, burst)).fetchone()[0]

    @_guarded
    def take_token(self, key: str, now: float, per_second: float, burst: float) -> bool:
        """One send from the cluster-wide bucket ``key`` (per_second refill, ``burst``
        at most); False, and nothing taken, when it is empty."""
        with self._immediate() as conn:
            return self._take(conn, key, now, per_second, burst)

    # --- texted codes ---

    @_guarded
    def put_sms_code(self, user: str, phone: str, code: str, *, now: float, ttl: float,
                     per_user: tuple[float, float], per_number: tuple[float, float]) -> bool:
        """Take a send from the user's and the number's buckets and make ``code`` the
        user's live code (sealed with the seed key: the table never holds a
        usable code). False, and no code stored, when over a limit."""
        with self._immediate() as conn:
            if not (self._take(conn, "sms-user " + user, now, *per_user)
                    and self._take(conn, "sms-number " + phone, now, *per_number)):
                return False
            sealed = self._cipher.encrypt(code.encode(), serial="sms " + user)
            conn.execute("INSERT INTO cluster_sms (username, code, expires) VALUES (%s, %s, %s)"
                         " ON CONFLICT (username) DO UPDATE SET code = excluded.code,"
                         " expires = excluded.expires", (user, sealed, now + ttl))
        return True

    @_guarded
    def use_sms_code(self, user: str, code: str, now: float) -> bool:
        """True, once in the whole cluster, if ``code`` is the user's live code."""
        with self._immediate() as conn:
            row = conn.execute("SELECT code, expires FROM cluster_sms WHERE username = %s"
                               " FOR UPDATE", (user,)).fetchone()
            if row is None:
                return False
            if row[1] <= now:
                conn.execute("DELETE FROM cluster_sms WHERE username = %s", (user,))
                return False
            expected = self._cipher.decrypt(row[0], serial="sms " + user)
            if len(code) != len(expected) or not hmac.compare_digest(code.encode(), expected):
                return False
            conn.execute("DELETE FROM cluster_sms WHERE username = %s", (user,))
        return True

    # --- phone calls ---

    @_guarded
    def open_call(self, *, call_id: str, login_key: str, user: str, client: str, masked: str,
                  phone: str, now: float, timeout: float, node: str, late_window: float,
                  max_calls: int, max_per_user: int, per_user: tuple[float, float],
                  per_number: tuple[float, float]) -> tuple:
        """Join the pending call of this login, or record a new one to place.

        Returns (call id, expires, new, refused, state, verdict); ``refused``
        (nothing recorded) is "global" when ``max_calls`` out-of-band logins
        are pending in the cluster, "user" when ``max_per_user`` are the
        user's, "rate" over a send limit. A call decided while no node held
        the login is taken by its retry, once (state "decided").
        """
        with self._immediate() as conn:
            self._lock_user(conn, user)
            conn.execute("UPDATE cluster_calls SET state = 'expired' WHERE login_key = %s"
                         " AND state = 'pending' AND expires <= %s", (login_key, now))
            row = conn.execute("SELECT call_id, expires FROM cluster_calls WHERE login_key = %s"
                               " AND state = 'pending'", (login_key,)).fetchone()
            if row is not None:
                return row[0], row[1], False, None, "pending", None
            row = conn.execute(
                "SELECT call_id, expires, verdict FROM cluster_calls WHERE login_key = %s"
                " AND state = 'decided' AND delivered = 0 AND expires > %s"
                " ORDER BY created DESC LIMIT 1 FOR UPDATE", (login_key, now)).fetchone()
            if row is not None:
                conn.execute("UPDATE cluster_calls SET delivered = 1 WHERE call_id = %s",
                             (row[0],))
                return row[0], row[1], False, None, "decided", row[2]
            if self._pending(conn, now) >= max_calls:
                return None, 0.0, False, "global", None, None
            if self._pending(conn, now, user) >= max_per_user:
                return None, 0.0, False, "user", None, None
            if not (self._take(conn, "call-user " + user, now, *per_user)
                    and self._take(conn, "call-number " + phone, now, *per_number)):
                return None, 0.0, False, "rate", None, None
            expires = now + timeout
            conn.execute(
                "INSERT INTO cluster_calls (call_id, login_key, username, client, masked,"
                " created, expires, state, node, forget_after)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s)",
                (call_id, login_key, user, client, masked, now, expires, node,
                 expires + late_window))
        return call_id, expires, True, None, "pending", None

    @_guarded
    def get_call(self, call_id: str, now: float) -> tuple | None:
        """(user, client, state, verdict) of a call still remembered."""
        return self._conn.execute("SELECT username, client, state, verdict FROM cluster_calls"
                                  " WHERE call_id = %s AND forget_after > %s",
                                  (call_id, now)).fetchone()

    @_guarded
    def answer_call(self, call_id: str, now: float) -> str | None:
        """The phone was picked up: the client's name, the first time, while pending."""
        row = self._conn.execute(
            "UPDATE cluster_calls SET answered = 1 WHERE call_id = %s AND state = 'pending'"
            " AND answered = 0 AND expires > %s RETURNING client", (call_id, now)).fetchone()
        return None if row is None else row[0]

    @_guarded
    def claim_call_keys(self, call_id: str, now: float) -> tuple[str, str] | None:
        """Keys arrived: (user, client) for the first set of keys of a pending call,
        on whichever node; None for any later one."""
        row = self._conn.execute(
            "UPDATE cluster_calls SET keyed = 1 WHERE call_id = %s AND state = 'pending'"
            " AND keyed = 0 AND expires > %s RETURNING username, client",
            (call_id, now)).fetchone()
        return None if row is None else (row[0], row[1])

    @_guarded
    def end_call(self, call_id: str, state: str, verdict: str | None, now: float,
                 late_window: float, *, unless_keyed: bool = False) -> bool:
        """End a pending call (decided, failed); every node holding it hears of it."""
        sql = ("UPDATE cluster_calls SET state = %s, verdict = %s, forget_after = %s"
               " WHERE call_id = %s AND state = 'pending'")
        if unless_keyed:
            sql += " AND keyed = 0"
        with self._immediate() as conn:
            ended = conn.execute(sql + " RETURNING call_id",
                                 (state, verdict, now + late_window, call_id)).fetchall()
            if ended:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, CALL_ENDED + call_id))
        return bool(ended)

    @_guarded
    def close_user_calls(self, user: str, now: float, late_window: float) -> int:
        """Close every pending call of ``user`` (blocked after a fraud report)."""
        return self._close_user("cluster_calls", "call_id", CALL_ENDED, user,
                                now + late_window)

    @_guarded
    def ended_calls(self, call_ids: list[str]) -> list[tuple[str, str, str | None]]:
        """(call id, state, verdict) of those of ``call_ids`` no longer pending."""
        return self._conn.execute("SELECT call_id, state, verdict FROM cluster_calls"
                                  " WHERE call_id = ANY(%s) AND state <> 'pending'",
                                  (call_ids,)).fetchall()

    # --- the sweeper ---

    @_guarded
    def sweep(self, now: float, rate_idle: float = 7200.0) -> tuple[int, int]:
        """Remove what has expired: challenges, pushes past their late window, full
        buckets idle for ``rate_idle`` seconds. Any node may run it, at any time.
        Returns (challenges, pushes) removed."""
        challenges = self._conn.execute("DELETE FROM cluster_challenges WHERE expires <= %s",
                                        (now,)).rowcount
        self._conn.execute("UPDATE cluster_push SET state = 'expired'"
                           " WHERE state = 'pending' AND expires <= %s", (now,))
        pushes = self._conn.execute("DELETE FROM cluster_push WHERE forget_after <= %s",
                                    (now,)).rowcount
        self._conn.execute("DELETE FROM cluster_rate WHERE updated <= %s", (now - rate_idle,))
        self._conn.execute("DELETE FROM cluster_sms WHERE expires <= %s", (now,))
        self._conn.execute("UPDATE cluster_calls SET state = 'expired'"
                           " WHERE state = 'pending' AND expires <= %s", (now,))
        self._conn.execute("DELETE FROM cluster_calls WHERE forget_after <= %s", (now,))
        return challenges, pushes
