"""Push across the nodes of a cluster: the ``cluster_push`` table (issue #12).

`SharedPushTransactions` is `mfaserver.factors.push.PushTransactions` for
several nodes on one PostgreSQL database. A push is a row; opening one
while the same login (user, NAS, Calling-Station-Id) has one pending joins
it instead, on whichever node the retransmission or the NAS's fail-over
lands, so a user gets one push per login. A device's answer may reach any
node: it is written with a ``NOTIFY``, and every node holding a RADIUS
request for that push hears of it at once (`mfaserver.store.listen`), or
at the next `poll` (every few seconds: the safety net when a notification
is missed).

What stays in this node's memory is only what waits here: the Deferreds of
the RADIUS requests held for a push (settled by the notification, the poll
or their deadline, one timer for all), and the devices' long polls. When a
node stops, its waiters go and the rows stay: the NAS's retry to another
node joins the push, and the user's answer is not lost.

Limits are the cluster's: pending pushes per user and in all, and the
per-user push rate, are checked in the transaction that opens the push.
"""

from __future__ import annotations

import hmac
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.auth.approvals import RateLimiter, TooManyPending
from mfaserver.auth.interfaces import FactorRefused, UnknownApproval, WrongConfirmation
from mfaserver.auth.model import Login, Reason, Verdict
from mfaserver.factors.cluster_waits import RowWaits
from mfaserver.factors.push import (ANSWERED, CLOSED, EXPIRED, MSG_MATCH_NUMBER,
                                    MSG_TOO_MANY_PUSHES, MSG_WRONG_NUMBER, AlreadyAnswered,
                                    LongPolls, PushTransaction, TransactionClosed,
                                    TransactionExpired, UnknownTransaction, _Push, wake_devices)
from mfaserver.factors.push_protocol import new_match_number, new_transaction_id
from mfaserver.store.cluster import (NEW_PUSH, PUSH_ENDED, ClusterState, PushRow,
                                     login_key_text)

log = Logger(namespace="mfaserver.push")

def _transaction(row: PushRow) -> PushTransaction:
    txn = PushTransaction(row.txid, row.user, row.client, row.nas_ip, row.calling_station_id,
                          row.created, row.expires, row.number, row.login_key)
    txn.state = row.state
    txn.verdict = Verdict(row.verdict) if row.verdict is not None else None
    txn.answered_by = row.answered_by
    return txn


class SharedPushTransactions:
    """The push registry of a cluster node; the device API and the factors use it.

    ``run`` runs a `ClusterState` method on a database thread
    (`ThreadedStore.run_state`); ``limits()`` gives (pending per user,
    pending in all) from the current config; ``wake(user)`` sends the
    wake-up notifications of a new push (only the node that opened it does).
    """

    def __init__(self, run: Callable[..., Deferred], clock: IReactorTime, *, node: str,
                 limits: Callable[[], tuple[int, int]],
                 wake: Callable[[str], None] | None = None, late_window: float = 600.0,
                 sent_by_reactor=None):
        self._run = run
        # A device's poll and answer, and what the holder of an ended push reads and
        # writes, when the reactor sends those statements itself
        # (`mfaserver.store.pg_reactor.PgLogins`).
        self._sent_by_reactor = sent_by_reactor
        self._clock = clock
        self.node = node
        self._limits = limits
        self.wake = wake
        self.late_window = late_window
        self._waits = RowWaits(clock)
        self._polls = LongPolls(clock)
        self._polled_at = clock.seconds()

    def __len__(self) -> int:
        """Pushes waited on by a request held on this node."""
        return len(self._waits)

    # --- the sign-in side ---

    def open(self, login: Login, timeout: float, *, number: str | None = None,
             join: str = "any", limit: RateLimiter | None = None) -> Deferred[PushTransaction]:
        """Join the login's pending push, or open one and wake the user's devices.

        Fails with `FactorRefused` (push rate) or `TooManyPending` when over
        a limit; see `ClusterState.open_push` for ``join``.
        """
        max_per_user, max_total = self._limits()
        rate = None if limit is None else limit.bucket
        push = dict(txid=new_transaction_id(), login_key=login_key_text(login.key),
                    user=login.user, client=login.client, nas_ip=login.nas_ip,
                    calling_station_id=login.calling_station_id,
                    now=self._clock.seconds(), timeout=timeout, number=number,
                    node=self.node, late_window=self.late_window,
                    max_per_user=max_per_user, max_total=max_total, rate=rate, join=join)
        if self._sent_by_reactor is not None:
            d = self._sent_by_reactor.open_push(**push)
        else:
            d = self._run(ClusterState.open_push, **push)
        d.addCallback(self._opened, login.user)
        return d

    def _opened(self, opened, user: str) -> PushTransaction:
        if opened.refused == "rate":
            log.warn("push limit reached for {user}: no push sent", user=user)
            raise FactorRefused(Reason.RATE_LIMITED, MSG_TOO_MANY_PUSHES)
        if opened.refused is not None:
            raise TooManyPending(opened.refused)
        if opened.new:
            # This node's own long polls hear of it by notification too; a
            # wake-up (ntfy, Web Push) goes out from here alone.
            wake_devices(self._polls, self.wake, user)
        return _transaction(opened.row)

    def find(self, login_key) -> Deferred[PushTransaction | None]:
        d = self._run(ClusterState.find_push, login_key_text(login_key), self._clock.seconds())
        d.addCallback(lambda row: None if row is None else _transaction(row))
        return d

    def get(self, txid: str) -> Deferred[PushTransaction | None]:
        """A pending push, or an ended one still remembered."""
        if self._sent_by_reactor is not None:
            d = self._sent_by_reactor.get_push(txid, self._clock.seconds())
        else:
            d = self._run(ClusterState.get_push, txid, self._clock.seconds())
        d.addCallback(lambda row: None if row is None else _transaction(row))
        return d

    def wait(self, txn: PushTransaction) -> Deferred[Verdict]:
        """Fire with the answer to ``txn``; fail with `defer.TimeoutError` when it
        expires, `TransactionClosed` when closed. Cancelling only detaches this
        waiter (the push stays for the other nodes and for the NAS's retry)."""
        if txn.state != "pending" or self._waits.ended_recently(txn.txid):
            if txn.state == "pending":
                # Answered before this request could wait: it takes the answer itself.
                d = self.get(txn.txid)
                d.addCallback(self._taken)
                return d.addCallback(self._ended_result)
            return self._ended_result(txn)
        if self._clock.seconds() >= txn.expires:
            return defer.fail(defer.TimeoutError(txn.txid))
        return self._waits.add(txn.txid, txn.expires)

    @staticmethod
    def _ended_result(txn: PushTransaction | None):
        if txn is None or txn.state == CLOSED:
            return defer.fail(TransactionClosed(txn.txid if txn else ""))
        if txn.state == ANSWERED:
            return defer.succeed(txn.verdict)
        if txn.state == EXPIRED or txn.state == "pending":
            return defer.fail(defer.TimeoutError(txn.txid))
        return defer.fail(TransactionClosed(txn.txid))

    def close(self, txid: str) -> Deferred[bool]:
        """Close a pending push from the sign-in side (wrong number, account refused)."""
        return self._run(ClusterState.close_push, txid, self._clock.seconds(), self.late_window)

    def close_user(self, user: str) -> Deferred[int]:
        """Close every pending push of ``user``, on every node (fraud reported)."""
        return self._run(ClusterState.close_user_pushes, user, self._clock.seconds(),
                         self.late_window)

    def close_all(self) -> None:
        """This node stops: its waiters get no answer (their requests no reply) and
        its long polls end. The pushes stay, for the other nodes."""
        # Cancelled, not closed: the pipeline sends no reply, so the NAS tries
        # another node, which joins the push.
        self._waits.close_all(lambda txid: defer.CancelledError(txid))
        self._polls.close_all()

    # --- the device side ---

    def pending_for(self, user: str) -> Deferred[list[PushTransaction]]:
        """The user's pending pushes, oldest first, whichever node opened them."""
        if self._sent_by_reactor is not None:
            d = self._sent_by_reactor.pending_pushes(user, self._clock.seconds())
        else:
            d = self._run(ClusterState.pending_pushes, user, self._clock.seconds())
        d.addCallback(lambda rows: [_transaction(row) for row in rows])
        return d

    def wait_for_new(self, user: str, timeout: float) -> Deferred[None]:
        """A long poll: fires when a push opens for ``user`` on any node, or after
        ``timeout`` seconds."""
        return self._polls.wait(user, timeout)

    def answer(self, txid: str, device_user: str, decision: str,
               number: str | None = None, device_id: str = "") -> Deferred[PushTransaction]:
        """Record a device's answer, as `PushTransactions.answer` (same refusals)."""
        verdict = Verdict(decision)
        if self._sent_by_reactor is not None:
            # One statement the reactor sends; the number compared in the database.
            now = self._clock.seconds()
            d = self._sent_by_reactor.answer_push(txid, device_user, verdict.value, number,
                                                  device_id, now, now + self.late_window)
            d.addCallback(self._answered)
            return d

        def decide(row: PushRow) -> str:
            if (verdict is Verdict.APPROVE and number is not None and row.number is not None
                    and not hmac.compare_digest(number.encode(), row.number.encode())):
                return Verdict.DENY.value
            return verdict.value

        d = self._run(ClusterState.answer_push, txid, device_user, decide, device_id,
                      self._clock.seconds(), self.late_window)
        d.addCallback(self._answered)
        return d

    @staticmethod
    def _answered(result) -> PushTransaction:
        outcome, row = result
        if outcome == "unknown":
            raise UnknownTransaction("no such transaction for this device")
        if outcome == "expired":
            raise TransactionExpired("this transaction expired or was closed")
        if outcome == "already":
            raise AlreadyAnswered("this transaction was already answered")
        return _transaction(row)

    # --- notifications and the poll ---

    def notified(self, payload: str) -> None:
        """A payload from the cluster's channel (`mfaserver.store.listen.Listener`)."""
        if payload.startswith(PUSH_ENDED):
            txid = payload[len(PUSH_ENDED):]
            if txid in self._waits:
                self.get(txid).addCallbacks(self._settle, self._lookup_failed)
            else:
                self._waits.note_end(txid)
        elif payload.startswith(NEW_PUSH):
            self._polls.wake(payload[len(NEW_PUSH):])

    def poll(self) -> Deferred[None]:
        """What notifications would have said, asked of the database (the safety
        net, every few seconds, and after the listener reconnects): pushes waited
        on here that ended, and new pushes of users polling here. Costs nothing
        when nothing waits."""
        now = self._clock.seconds()
        since, self._polled_at = self._polled_at, now
        self._waits.forget_old_ends()
        work = []
        if self._waits:
            d = self._run(ClusterState.ended_pushes, self._waits.keys())
            d.addCallback(lambda rows: [self._settle(_transaction(row)) for row in rows])
            work.append(d)
        users = self._polls.users()
        if users:
            # A little overlap: a push committed as the last poll ran is not missed.
            d = self._run(ClusterState.users_with_new_pushes, users, since - 1.0, now)
            d.addCallback(lambda found: [self._polls.wake(user) for user in found])
            work.append(d)
        done = defer.gatherResults(work, consumeErrors=True)
        done.addCallbacks(lambda _: None, self._lookup_failed)
        return done

    def _settle(self, txn: PushTransaction | None) -> None:
        if txn is None or txn.state == "pending":
            return
        if txn.state == ANSWERED and txn.txid in self._waits:
            self._mark_delivered(txn.txid)
        self._waits.settle(txn.txid, lambda: self._ended_result(txn))

    def _taken(self, txn: PushTransaction | None) -> PushTransaction | None:
        if txn is not None and txn.state == ANSWERED:
            self._mark_delivered(txn.txid)
        return txn

    def _mark_delivered(self, txid: str) -> None:
        """This node answers a request with the push's answer: a later copy of the
        login must not take it again (ClusterState.open_push)."""
        if self._sent_by_reactor is not None:
            d = self._sent_by_reactor.mark_push_delivered(txid)
        else:
            d = self._run(ClusterState.mark_delivered, "cluster_push", "txid", txid)
        d.addErrback(self._lookup_failed)

    @staticmethod
    def _lookup_failed(failure) -> None:
        # The store says it is unavailable once, elsewhere; the next poll retries.
        failure = getattr(failure.value, "subFailure", failure)
        log.debug("cluster push lookup failed: {error}", error=failure.getErrorMessage())


# --- The factors ------------------------------------------------------------------------------

class _SharedPush(_Push):
    """As one node's push factors, over the cluster's registry."""

    transactions: SharedPushTransactions

    def withdraw_user(self, user: str) -> None:
        d = self.transactions.close_user(user)
        d.addErrback(lambda f: log.error("could not close the pushes of {user}: {error}",
                                         user=user, error=f.getErrorMessage()))


class SharedPushFactor(_SharedPush):
    """`ApprovalFactor`: push (or join the login's push) and fire with the answer."""

    def request_approval(self, login: Login, timeout: float) -> Deferred[Verdict]:
        d = self.transactions.open(login, timeout, limit=self._limit)
        d.addCallback(self.transactions.wait)
        return d


class SharedNumberMatchingPushFactor(_SharedPush):
    """`ConfirmedApprovalFactor` with number matching; every step may run on another node."""

    prompt = MSG_MATCH_NUMBER

    def find(self, login_key) -> Deferred[str | None]:
        d = self.transactions.find(login_key)
        d.addCallback(lambda txn: txn.txid if txn is not None and txn.number is not None
                      else None)
        return d

    def open(self, login: Login, timeout: float) -> Deferred[str]:
        d = self.transactions.open(login, timeout, number=new_match_number(),
                                   join="numbered", limit=self._limit)
        d.addCallback(lambda txn: txn.txid)
        return d

    def known(self, ticket: str) -> Deferred[bool]:
        return self.transactions.get(ticket).addCallback(lambda txn: txn is not None)

    def confirm(self, ticket: str, typed: str) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._confirm(ticket, typed))

    async def _confirm(self, ticket: str, typed: str) -> Verdict:
        txn = await self.transactions.get(ticket)
        if txn is None:
            raise UnknownApproval(ticket)
        if txn.number is None or not hmac.compare_digest(typed.encode(), txn.number.encode()):
            await self.transactions.close(ticket)
            raise WrongConfirmation(Reason.WRONG_NUMBER, MSG_WRONG_NUMBER)
        return await self.transactions.wait(txn)

    def withdraw(self, ticket: str) -> Deferred[bool]:
        return self.transactions.close(ticket)

    def pending_count(self, user: str | None = None) -> int:
        # The cluster's limits are checked where a push opens (open_push).
        return 0
