"""Out-of-band logins in flight, and the limits around them.

A push or a phone call holds the RADIUS request open while the user decides.
The same login may arrive again meanwhile: a NAS retransmission with a new
Identifier, a second RADIUS server behind a load balancer, an impatient
user. `PendingLogins` makes each of those join the login already pending, so
there is one push, one call, one SMS per login, ever; when it completes every
copy gets the same answer. It also caps how many out-of-band logins a user,
and the whole daemon, may have pending.

`RateLimiter` is a token bucket per key (user, destination number) on the
injected clock: the toll-fraud and push-fatigue guard for sends.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure


class TooManyPending(Exception):
    """The user, or the daemon, already has the most pending logins allowed."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope  # "user" or "global"


class _Pending:
    __slots__ = ("user", "result", "waiters")

    def __init__(self, user: str, result: Deferred):
        self.user = user
        self.result = result
        self.waiters: list[Deferred] = []


class PendingLogins:
    """One out-of-band login per key at a time; copies join it.

    The key identifies "the same login": (user, client, Calling-Station-Id).
    """

    def __init__(self, max_per_user: int = 1, max_total: int = 10_000):
        self.max_per_user = max_per_user
        self.max_total = max_total
        # Out-of-band logins pending elsewhere that count towards the same
        # limits (number-matching pushes, which hold no request open).
        self.also_for_user: Callable[[str], int] = lambda user: 0
        self.also_total: Callable[[], int] = lambda: 0
        self._by_key: dict[Hashable, _Pending] = {}
        self._per_user: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def is_pending(self, key: Hashable) -> bool:
        return key in self._by_key

    def join_or_start(self, key: Hashable, user: str,
                      start: Callable[[], Deferred]) -> Deferred:
        """Join the login pending under ``key``, or start one with ``start()``.

        Fires with what ``start()``'s Deferred fires with. Fails with
        `TooManyPending` (nothing started) when over a limit. Cancelling the
        returned Deferred only detaches that waiter; the login goes on for the
        others, and is cancelled itself when its last waiter leaves.
        """
        pending = self._by_key.get(key)
        if pending is not None:
            waiter = Deferred(lambda d: self._leave(key, pending, d))
            pending.waiters.append(waiter)
            return waiter
        self.check_room(user)
        pending = _Pending(user, None)
        self._by_key[key] = pending
        self._per_user[user] = self._per_user.get(user, 0) + 1
        # The first waiter is in place before start() runs: a Deferred that
        # has already fired (a gateway refusing at once) still reaches it.
        waiter = Deferred(lambda d: self._leave(key, pending, d))
        pending.waiters.append(waiter)
        try:
            result = start()
        except BaseException:
            self._forget(key, pending)
            raise
        pending.result = result
        result.addBoth(self._finished, key, pending)
        return waiter

    def check_room(self, user: str) -> None:
        """Raise `TooManyPending` if a new out-of-band login of ``user`` is over a limit."""
        if len(self._by_key) + self.also_total() >= self.max_total:
            raise TooManyPending("global")
        if self.count_for(user) + self.also_for_user(user) >= self.max_per_user:
            raise TooManyPending("user")

    def count_for(self, user: str) -> int:
        """How many logins of ``user`` are pending here."""
        return self._per_user.get(user, 0)

    def _leave(self, key: Hashable, pending: _Pending, waiter: Deferred) -> None:
        if waiter in pending.waiters:
            pending.waiters.remove(waiter)
        if (not pending.waiters and self._by_key.get(key) is pending
                and pending.result is not None):
            pending.result.cancel()

    def _finished(self, result, key: Hashable, pending: _Pending):
        self._forget(key, pending)
        waiters, pending.waiters = pending.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None  # delivered to the waiters (if any); nothing left unhandled

    def _forget(self, key: Hashable, pending: _Pending) -> None:
        if self._by_key.get(key) is pending:
            del self._by_key[key]
            left = self._per_user[pending.user] - 1
            if left:
                self._per_user[pending.user] = left
            else:
                del self._per_user[pending.user]


class RateLimiter:
    """A token bucket per key: ``per_hour`` sends an hour, up to ``max_burst`` at once.

    Memory is bounded: at most ``max_keys`` buckets; the least recently used
    go first (a forgotten bucket starts full again, which only ever errs
    towards the configured burst).
    """

    def __init__(self, clock: IReactorTime, per_hour: float, *, max_burst: int,
                 max_keys: int = 100_000):
        self._clock = clock
        self.max_burst = max_burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.set_per_hour(per_hour)

    def set_per_hour(self, per_hour: float) -> None:
        """Change the rate (a reload); tokens already taken stay taken."""
        self.burst = min(self.max_burst, per_hour)
        self.per_second = per_hour / 3600.0

    @property
    def bucket(self) -> tuple[float, float]:
        """(tokens per second, burst): the settings a cluster's shared bucket of the
        same limit is taken with (`mfaserver.store.cluster`)."""
        return self.per_second, self.burst

    def allow(self, key: Hashable) -> bool:
        """Take one token for ``key``; False (and nothing taken) if none is left."""
        now = self._clock.seconds()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed


def hourly_send_limit(clock: IReactorTime, per_hour: int) -> RateLimiter:
    """The limit on texts and calls to one user or one number: a burst of up to 3
    lets a user retry at once; the hourly rate caps toll fraud and annoyance."""
    return RateLimiter(clock, per_hour, max_burst=3)
