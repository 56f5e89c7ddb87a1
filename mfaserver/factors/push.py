"""Push: sign-ins waiting for an answer from the user's device (the ``push`` method).

`PushFactor` holds the login until a device answers (an `ApprovalFactor`);
`NumberMatchingPushFactor` shows a number on the device that the user types
at the NAS (a `ConfirmedApprovalFactor`). Both are thin: the transactions
live in one `PushTransactions` registry, which the device API serves.

A login that asks for a push opens a `PushTransaction`; the user's devices
learn of it from a wake-up and a long poll (`wait_for_new`), and answer it
through the device API (`answer`). Everything here is in memory, on the
injected clock: a restart voids pending transactions, like RADIUS States.

The registry also remembers closed transactions for ``late_window``
seconds, so that a late answer is told apart from a forged one: it is
refused as `TransactionExpired` or `AlreadyAnswered`, and logged, instead of
`UnknownTransaction`.

One login, one push: a transaction carries the login's key (user, NAS,
Calling-Station-Id), and `find` returns the pending one for a key so that a
repeated login joins it instead of pushing again.
"""

from __future__ import annotations

import functools
import hmac
from collections import OrderedDict
from typing import Callable, Hashable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mfaserver.auth.approvals import RateLimiter
from mfaserver.auth.interfaces import (ApprovalWithdrawn, FactorRefused, UnknownApproval,
                                       WrongConfirmation)
from mfaserver.auth.model import Account, Login, Method, Reason, Verdict
from mfaserver.factors.deadlines import Deadlines
from mfaserver.factors.push_protocol import new_match_number, new_transaction_id

log = Logger(namespace="mfaserver.push")

PENDING = "pending"
ANSWERED = "answered"   # approve, deny or fraud recorded
EXPIRED = "expired"     # nobody answered in time
CLOSED = "closed"       # closed from the sign-in side: wrong number, NAS gave up, user blocked


class AnswerRefused(Exception):
    """A device's answer cannot be taken (one of the three kinds below)."""


class UnknownTransaction(AnswerRefused):
    """No such transaction for this device's user (or forgotten long ago)."""


class TransactionExpired(AnswerRefused):
    """The transaction expired, or was closed from the sign-in side, before an answer."""


class AlreadyAnswered(AnswerRefused):
    """The transaction was answered already (by this or another device)."""


class TransactionClosed(ApprovalWithdrawn):
    """The transaction was closed from the sign-in side before an answer."""


class PushTransaction:
    """One sign-in waiting for a device's answer. Small on purpose: thousands may wait."""

    __slots__ = ("txid", "user", "client", "nas_ip", "calling_station_id", "created",
                 "expires", "number", "login_key", "state", "verdict", "answered_by",
                 "_waiters", "_expiry")

    def __init__(self, txid: str, user: str, client: str, nas_ip: str | None,
                 calling_station_id: str | None, created: float, expires: float,
                 number: str | None, login_key: Hashable):
        self.txid = txid
        self.user = user
        self.client = client
        self.nas_ip = nas_ip
        self.calling_station_id = calling_station_id
        self.created = created
        self.expires = expires
        self.number = number
        self.login_key = login_key
        self.state = PENDING
        self.verdict: Verdict | None = None
        self.answered_by: str | None = None
        self._waiters: list[Deferred] = []
        self._expiry = None

    def to_json(self) -> dict:
        """The transaction as a device sees it (docs/device-api.rst)."""
        return {
            "txid": self.txid, "user": self.user, "client": self.client,
            "nas_ip": self.nas_ip, "calling_station_id": self.calling_station_id,
            "created": int(self.created), "expires": int(self.expires),
            "number": self.number,
        }


class LongPolls:
    """Devices' long polls, by user: each fires with None when `wake` is called for
    its user or when its time is up. One timer for the earliest deadline: a
    thousand open pages cost no timer each."""

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._pollers: dict[str, list[Deferred]] = {}
        self._deadlines: Deadlines[tuple[str, Deferred]] = Deadlines(
            clock, live=self._is_polling, expire=self._timed_out)

    def users(self) -> list[str]:
        """The users with a poll open."""
        return list(self._pollers)

    def wait(self, user: str, timeout: float) -> Deferred[None]:
        d = Deferred(functools.partial(self._cancelled, user))
        self._pollers.setdefault(user, []).append(d)
        self._deadlines.add(self._clock.seconds() + timeout, (user, d))
        return d

    def wake(self, user: str) -> None:
        pollers = self._pollers.pop(user, ())
        for poller in pollers:
            poller.callback(None)
        if pollers:
            self._deadlines.arm()

    def close_all(self) -> None:
        for pollers in self._pollers.values():
            for poller in pollers:
                poller.callback(None)
        self._pollers.clear()
        self._deadlines.clear()

    def _timed_out(self, poll: tuple[str, Deferred]) -> None:
        user, d = poll
        self._drop(user, d)
        d.callback(None)

    def _is_polling(self, poll: tuple[str, Deferred]) -> bool:
        user, d = poll
        return d in self._pollers.get(user, ())

    def _cancelled(self, user: str, d: Deferred) -> None:
        """The client went away: forget its poll (and the timer, if it was for it alone)."""
        self._drop(user, d)
        self._deadlines.arm()

    def _drop(self, user: str, d: Deferred) -> None:
        pollers = self._pollers.get(user)
        if pollers is not None and d in pollers:
            pollers.remove(d)
            if not pollers:
                del self._pollers[user]


def wake_devices(polls: LongPolls, wake: Callable[[str], None] | None, user: str) -> None:
    """A push opened for ``user``: end their devices' long polls here, and send the
    wake-up notifications (best effort)."""
    polls.wake(user)
    if wake is not None:
        try:
            wake(user)
        except Exception:
            log.failure("could not wake the devices of {user}", user=user)


class PushTransactions:
    """The registry of push transactions, their waiters and the devices' long polls.

    ``wake(user)`` is called once per new transaction (never for a joined
    login): it sends the wake-up notifications, best effort. It may be
    replaced (a reload) or None.
    """

    def __init__(self, clock: IReactorTime, *,
                 wake: Callable[[str], None] | None = None, late_window: float = 600.0,
                 max_remembered: int = 100_000):
        self._clock = clock
        self.wake = wake
        self.late_window = late_window
        self._max_remembered = max_remembered
        self._pending: dict[str, PushTransaction] = {}
        self._by_login: dict[Hashable, PushTransaction] = {}
        self._by_user: dict[str, list[PushTransaction]] = {}
        self._done: OrderedDict[str, tuple[PushTransaction, float]] = OrderedDict()
        self._polls = LongPolls(clock)
        # user -> pending transactions with a number (number matching holds no
        # login, so these count towards the pending-login limits separately).
        self._numbered: dict[str, int] = {}
        self._numbered_total = 0

    def __len__(self) -> int:
        return len(self._pending)

    def count_for(self, user: str) -> int:
        return len(self._by_user.get(user, ()))

    def numbered_count(self, user: str | None = None) -> int:
        """Pending transactions with a number to match, of ``user`` or in all."""
        if user is None:
            return self._numbered_total
        return self._numbered.get(user, 0)

    # --- the sign-in side ---

    def open(self, user: str, *, client: str, nas_ip: str | None,
             calling_station_id: str | None, timeout: float,
             login_key: Hashable = None, number: str | None = None) -> PushTransaction:
        """Open a transaction for ``user``, expiring in ``timeout`` seconds, and wake
        the user's devices and long polls.

        ``number`` is the number the device shows for number matching (None:
        no number matching).
        """
        now = self._clock.seconds()
        txn = PushTransaction(
            new_transaction_id(), user, client, nas_ip, calling_station_id, now,
            now + timeout, number, login_key)
        txn._expiry = self._clock.callLater(timeout, self._expire, txn)
        self._pending[txn.txid] = txn
        if login_key is not None:
            self._by_login[login_key] = txn
        self._by_user.setdefault(user, []).append(txn)
        if number is not None:
            self._numbered[user] = self._numbered.get(user, 0) + 1
            self._numbered_total += 1
        wake_devices(self._polls, self.wake, user)
        return txn

    def find(self, login_key: Hashable) -> PushTransaction | None:
        """The pending transaction of a login, to join it."""
        return self._by_login.get(login_key)

    def get(self, txid: str) -> PushTransaction | None:
        """A pending transaction, or a closed one still remembered."""
        txn = self._pending.get(txid)
        if txn is not None:
            return txn
        done = self._done.get(txid)
        # Pruning happens only when another transaction finishes: check the time here.
        if done is None or done[1] <= self._clock.seconds():
            return None
        return done[0]

    def wait(self, txid: str) -> Deferred[Verdict]:
        """Fire with the device's `Verdict` for ``txid``.

        Fails with `defer.TimeoutError` when the transaction expires, with
        `TransactionClosed` when it was closed without an answer (or is
        unknown). Cancelling the last waiter of a pending transaction closes
        it: the sign-in side gave up.
        """
        txn = self.get(txid)
        if txn is None or txn.state == CLOSED:
            return defer.fail(TransactionClosed(txid))
        if txn.state == ANSWERED:
            return defer.succeed(txn.verdict)
        if txn.state == EXPIRED:
            return defer.fail(defer.TimeoutError(txid))
        waiter = Deferred(lambda d: self._leave(txn, d))
        txn._waiters.append(waiter)
        return waiter

    def close(self, txid: str) -> None:
        """Close a pending transaction from the sign-in side (wrong number, gave up)."""
        txn = self._pending.get(txid)
        if txn is not None:
            self._finish(txn, CLOSED)

    def close_user(self, user: str) -> int:
        """Close every pending transaction of ``user`` (blocked after a fraud report)."""
        txns = list(self._by_user.get(user, ()))
        for txn in txns:
            self._finish(txn, CLOSED)
        return len(txns)

    def close_all(self) -> None:
        """Shutdown: close everything pending; waiters fail with TransactionClosed."""
        for txn in list(self._pending.values()):
            self._finish(txn, CLOSED)
        self._polls.close_all()

    # --- the device side ---

    def pending_for(self, user: str) -> list[PushTransaction]:
        """The user's pending transactions, oldest first."""
        return list(self._by_user.get(user, ()))

    def wait_for_new(self, user: str, timeout: float) -> Deferred[None]:
        """A long poll: fire with None when a transaction opens for ``user``, or after
        ``timeout`` seconds, whichever is first."""
        return self._polls.wait(user, timeout)

    def answer(self, txid: str, device_user: str, decision: str,
               number: str | None = None, device_id: str = "") -> PushTransaction:
        """Record a device's answer; the first answer wins.

        Raises `UnknownTransaction` when there is no such transaction for
        ``device_user``, `TransactionExpired` when it expired or was closed,
        `AlreadyAnswered` when it was answered already. With number matching on, an approval carrying a
        wrong ``number`` counts as a denial.
        """
        txn = self.get(txid)
        if txn is None or txn.user != device_user:
            raise UnknownTransaction("no such transaction for this device")
        if txn.state in (EXPIRED, CLOSED) or (
                txn.state == PENDING and self._clock.seconds() >= txn.expires):
            raise TransactionExpired("this transaction expired or was closed")
        if txn.state == ANSWERED:
            raise AlreadyAnswered("this transaction was already answered")
        verdict = Verdict(decision)
        if (verdict is Verdict.APPROVE and number is not None and txn.number is not None
                and not hmac.compare_digest(number.encode(), txn.number.encode())):
            verdict = Verdict.DENY
        txn.verdict = verdict
        txn.answered_by = device_id
        self._finish(txn, ANSWERED)
        return txn

    # --- internals ---

    def _leave(self, txn: PushTransaction, waiter: Deferred) -> None:
        if waiter in txn._waiters:
            txn._waiters.remove(waiter)
        if not txn._waiters and txn.state == PENDING:
            self._finish(txn, CLOSED)

    def _expire(self, txn: PushTransaction) -> None:
        txn._expiry = None
        if txn.state == PENDING:
            self._finish(txn, EXPIRED)

    def _finish(self, txn: PushTransaction, state: str) -> None:
        if txn.state != PENDING:
            return
        txn.state = state
        if txn._expiry is not None and txn._expiry.active():
            txn._expiry.cancel()
        txn._expiry = None
        del self._pending[txn.txid]
        if txn.login_key is not None and self._by_login.get(txn.login_key) is txn:
            del self._by_login[txn.login_key]
        if txn.number is not None:
            self._numbered_total -= 1
            left = self._numbered[txn.user] - 1
            if left:
                self._numbered[txn.user] = left
            else:
                del self._numbered[txn.user]
        of_user = self._by_user[txn.user]
        of_user.remove(txn)
        if not of_user:
            del self._by_user[txn.user]
        self._remember(txn)
        waiters, txn._waiters = txn._waiters, []
        for waiter in waiters:
            if state == ANSWERED:
                waiter.callback(txn.verdict)
            elif state == EXPIRED:
                waiter.errback(defer.TimeoutError(txn.txid))
            else:
                waiter.errback(TransactionClosed(txn.txid))

    def _remember(self, txn: PushTransaction) -> None:
        now = self._clock.seconds()
        self._done[txn.txid] = (txn, now + self.late_window)
        while self._done:
            _, (oldest, until) = next(iter(self._done.items()))
            if until > now and len(self._done) <= self._max_remembered:
                break
            self._done.popitem(last=False)


# --- The factors ------------------------------------------------------------------------------

PUSH = Method(
    name="push", label="push to your app", starts=True, unusable=Reason.NO_DEVICE,
    unusable_message="No authenticator app is set up for your account. "
                     "Contact your administrator.")
MSG_TOO_MANY_PUSHES = "Too many sign-in requests. Wait a while, then try again."
MSG_MATCH_NUMBER = "Approve the sign-in in your app, then enter the number it shows."
MSG_WRONG_NUMBER = "Wrong number. Please sign in again."


def push_limit(clock: IReactorTime, per_hour: int) -> RateLimiter:
    """The push-fatigue guard: new pushes a user may get ([push] max_per_user_per_hour),
    up to 5 at once."""
    return RateLimiter(clock, per_hour, max_burst=5)


class _Push:
    """What both push factors share: the registry, the per-user send limit, usability."""

    method = PUSH

    def __init__(self, transactions: PushTransactions, limit: RateLimiter):
        self.transactions = transactions
        self._limit = limit

    def usable(self, account: Account) -> bool:
        return account.devices > 0

    def withdraw_user(self, user: str) -> None:
        self.transactions.close_user(user)

    def _open(self, login: Login, timeout: float, number: str | None) -> PushTransaction:
        if not self._limit.allow(login.user):
            log.warn("push limit reached for {user}: no push sent", user=login.user)
            raise FactorRefused(Reason.RATE_LIMITED, MSG_TOO_MANY_PUSHES)
        return self.transactions.open(
            login.user, client=login.client, nas_ip=login.nas_ip,
            calling_station_id=login.calling_station_id, timeout=timeout,
            login_key=login.key, number=number)


class PushFactor(_Push):
    """`ApprovalFactor`: push to the user's devices and fire with the first answer."""

    def request_approval(self, login: Login, timeout: float) -> Deferred[Verdict]:
        """Open a transaction; fire with the device's `Verdict`, fail with
        `defer.TimeoutError` when it expires, `TransactionClosed` when closed."""
        txn = self._open(login, timeout, number=None)
        return self.transactions.wait(txn.txid)


class NumberMatchingPushFactor(_Push):
    """`ConfirmedApprovalFactor`: the device shows a number; the user types it at the NAS.

    A ticket is a transaction id; the registry remembers an answered
    transaction for a while, so the number may be typed before or after the
    device answers.
    """

    prompt = MSG_MATCH_NUMBER

    def find(self, login_key: Hashable) -> str | None:
        # A held push of the same login (number matching was switched on
        # meanwhile) has no number to confirm: it is not this factor's.
        txn = self.transactions.find(login_key)
        return txn.txid if txn is not None and txn.number is not None else None

    def open(self, login: Login, timeout: float) -> str:
        return self._open(login, timeout, number=new_match_number()).txid

    def known(self, ticket: str) -> bool:
        return self.transactions.get(ticket) is not None

    def confirm(self, ticket: str, typed: str) -> Deferred[Verdict]:
        txn = self.transactions.get(ticket)
        if txn is None:
            raise UnknownApproval(ticket)
        if txn.number is None or not hmac.compare_digest(typed.encode(), txn.number.encode()):
            self.transactions.close(ticket)
            raise WrongConfirmation(Reason.WRONG_NUMBER, MSG_WRONG_NUMBER)
        return self.transactions.wait(ticket)

    def withdraw(self, ticket: str) -> None:
        self.transactions.close(ticket)

    def pending_count(self, user: str | None = None) -> int:
        return self.transactions.numbered_count(user)
